"""quant.evaluate on cases whose answer is known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quant.errors import QuantError
from quant.evaluate import evaluate


class Oracle(nn.Module):
    """Reads the label from pixel [0, 0, 0] and answers it one-hot, or `shift` classes off."""

    def __init__(self, classes: int = 10, shift: int = 0) -> None:
        super().__init__()
        self.classes, self.shift = classes, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0].long() + self.shift) % self.classes
        logits = nn.functional.one_hot(label, self.classes).float()
        return logits - 0.01 * torch.arange(self.classes).float()  # second guess: class 0, then 1...


def _data(n: int = 50, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = labels.float()
    return images, labels


def test_oracle_is_perfect_on_every_input_kind() -> None:
    images, labels = _data()
    for data in (
        (images, labels),
        TensorDataset(images, labels),
        DataLoader(TensorDataset(images, labels), 7),
    ):
        r = evaluate(Oracle(), data, batch_size=8, progress=False)
        assert r == {"top1": 100.0, "top5": 100.0, "n": 50}


def test_wrong_top1_right_top5() -> None:
    images, labels = _data()
    r = evaluate(Oracle(shift=1), (images, labels), progress=False)
    assert r["top1"] == 0.0
    # top5 = {label+1, 0, 1, 2, 3}: hits for labels 0..3 -> 4 of 10 classes
    assert r["top5"] == pytest.approx(40.0) and r["n"] == 50


def test_fewer_than_five_classes() -> None:
    images, labels = _data(12, classes=3)
    r = evaluate(Oracle(classes=3, shift=1), (images, labels), progress=False)
    assert r["top1"] == 0.0 and r["top5"] == 100.0


class OddShift(Oracle):
    """The oracle's logits, but one class off on images with an odd label: half wrong at top-1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = x[:, 0, 0, 0].long()
        shifted = torch.where(label % 2 == 1, (label + 1) % self.classes, label)
        return 3.0 * nn.functional.one_hot(shifted, self.classes).float()


def test_fidelity_to_a_reference_model() -> None:
    images, labels = _data()
    same = evaluate(Oracle(), (images, labels), batch_size=8, progress=False, reference=Oracle())
    assert same["agree"] == 100.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    r = evaluate(OddShift(), (images, labels), batch_size=8, progress=False, reference=Oracle())
    assert r["top1"] == 50.0 and r["agree"] == 50.0  # disagrees exactly where it is wrong
    p = Oracle()(images).log_softmax(-1)
    q = OddShift()(images).log_softmax(-1)
    assert r["kl"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    assert "agree" not in evaluate(OddShift(), (images, labels), progress=False)


def test_bad_inputs() -> None:
    with pytest.raises(QuantError, match="no images"):
        evaluate(Oracle(), (torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(QuantError, match="3 images but 2 labels"):
        evaluate(Oracle(), (torch.zeros(3, 3, 4, 4), torch.zeros(2)), progress=False)
    with pytest.raises(QuantError, match="cannot evaluate on"):
        evaluate(Oracle(), [1, 2, 3], progress=False)

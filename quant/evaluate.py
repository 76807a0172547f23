"""Top-1/top-5 accuracy of a classifier, the number every result row reports."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from tqdm.auto import tqdm

from .errors import QuantError

Data = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor]


def _as_loader(data: Data, batch_size: int, num_workers: int) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        if len(images) != len(labels):
            raise QuantError(f"{len(images)} images but {len(labels)} labels")
        data = TensorDataset(images, torch.as_tensor(labels))
    if not isinstance(data, Dataset):
        raise QuantError(
            f"cannot evaluate on {type(data).__name__}: pass a Dataset, DataLoader or (images, labels)"
        )
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _total(loader: Iterable) -> int | None:
    try:
        return len(loader.dataset) if not isinstance(loader.dataset, IterableDataset) else None  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def evaluate(
    model: nn.Module,
    data: Data,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    reference: nn.Module | None = None,
) -> dict:
    """{'top1', 'top5' (percent), 'n'} of `model` on `data`, in eval mode and inference mode.

    top5 is top-min(5, classes), so a 3-class toy gives 100% top-5 rather than an error.

    With `reference` (the float model a quantized `model` came from) the dict also has its fidelity
    to it: 'agree', the percent of images whose top-1 class is the reference's, and 'kl', the mean
    KL(reference || model) of the softmax outputs in nats. Why: on a weak model many images sit on
    a near-tie between two classes, and quantization noise flips their top-1 either way, so two
    quantizers' top-1 can differ by chance where their fidelity does not.
    """
    loader = _as_loader(data, batch_size, num_workers)
    model.eval().to(device)
    if reference is not None:
        reference.eval().to(device)
    correct1 = correct5 = n = 0
    agree = 0
    kl_sum = 0.0
    with (
        torch.inference_mode(),
        tqdm(total=_total(loader), disable=not progress, desc="eval", unit="img") as bar,
    ):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device)
            logits = model(images)
            k = min(5, logits.shape[-1])
            topk = logits.topk(k, dim=-1).indices
            hits = topk == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=-1).sum())
            if reference is not None:
                ref = reference(images)
                agree += int((ref.argmax(-1) == topk[:, 0]).sum())
                ref_logp, logp = ref.float().log_softmax(-1), logits.float().log_softmax(-1)
                kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
            n += len(labels)
            bar.update(len(labels))
    if n == 0:
        raise QuantError("no images to evaluate on")
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}
    if reference is not None:
        out.update(agree=100.0 * agree / n, kl=kl_sum / n)
    return out

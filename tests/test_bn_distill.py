"""BN-statistics distillation (engine/bn_distill.py) on a tiny BN CNN: the loss falls, the output
honours SHARDS.md, reruns give identical bytes, and bad arguments are refused with one line."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.bn_distill import BNDistillGenerator, bn_stats_loss, class_targets, sample_seed
from engine.bn_distill_nets import _reflect_pad, shift_per_sample
from engine.errors import EngineError

SIZE = (3, 16, 16)
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
NUM_CLASSES = 5
SHARDS_FIELDS = {
    "format_version", "index", "key", "generator", "model", "prompt", "negative_prompt", "class_ids",
    "class_names", "vocab", "k", "pairing", "seed", "run_seed", "scheduler", "steps", "guidance",
    "width", "height", "rejected",
}  # fmt: skip


def tiny_bn_cnn() -> nn.Module:
    """Conv+BN+ReLU x3 (one strided, so the swing jitter is exercised) whose running statistics
    come from train-mode forwards on smooth, channel-shifted noise: targets far from N(0, 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
        )  # fmt: skip
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average: exact statistics of the data below
        model.train()
        with torch.no_grad():
            for _ in range(4):
                coarse = torch.randn(32, 3, 4, 4)
                x = F.interpolate(coarse, size=SIZE[1:], mode="bilinear", align_corners=False)
                model(x * 0.8 + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1))
    return model.eval()


def make(**kw) -> BNDistillGenerator:
    args = dict(input_size=SIZE, mean=MEAN, std=STD, num_classes=NUM_CLASSES, iters=30, batch_size=8, k=1,
                run_seed=7, model_spec="module:tiny_bn_cnn", lr=0.05)  # fmt: skip
    args.update(kw)
    return BNDistillGenerator(tiny_bn_cnn, **args)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("method", ["generator", "pixels"])
def test_loss_falls_and_output_is_complete(method: str) -> None:
    gen = make(method=method, k=2)
    out = gen.generate([3, 4, 5, 6, 7, 8])
    (hist,) = gen.history
    assert hist["last"] < 0.6 * hist["first"], hist["curve"]
    assert len(out) == 6
    for index, (img, meta) in zip([3, 4, 5, 6, 7, 8], out):
        assert img.mode == "RGB" and img.size == (16, 16)
        assert SHARDS_FIELDS <= meta.keys()
        assert meta["index"] == index and meta["key"] == f"s{index:09d}"
        assert meta["generator"] == "bn-distill" and meta["model"] == "module:tiny_bn_cnn"
        assert meta["steps"] == 30 and (meta["width"], meta["height"]) == (16, 16)
        assert meta["scheduler"] is None and meta["guidance"] is None and meta["negative_prompt"] is None
        assert meta["k"] == 2 and meta["pairing"] == "random" and meta["rejected"] == 0
        assert meta["seed"] == sample_seed(7, index) and meta["run_seed"] == 7 and meta["format_version"] == 1
        ids = meta["class_ids"]
        assert len(set(ids)) == 2 and all(0 <= c < NUM_CLASSES for c in ids)
        assert meta["class_names"] == [str(c) for c in ids]
        assert meta["prompt"] == f"bn-distill: {ids[0]} and {ids[1]}"


def test_bn_stats_loss_matches_definition() -> None:
    model = tiny_bn_cnn()
    x = torch.randn(4, *SIZE)
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for m in bns]
    model(x)
    for h in handles:
        h.remove()
    errors = [
        (
            a.mean((0, 2, 3)) - m.running_mean,
            torch.sqrt(a.var((0, 2, 3)) + m.eps) - torch.sqrt(m.running_var + m.eps),
        )
        for a, m in zip(inputs, bns)
    ]
    norm = sum(dm.norm() + ds.norm() for dm, ds in errors)  # ZeroQ
    mse = sum(dm.square().mean() + ds.square().mean() for dm, ds in errors)  # Genie-D
    assert torch.allclose(bn_stats_loss(model, x, "norm"), norm, rtol=1e-5)
    assert torch.allclose(bn_stats_loss(model, x), mse, rtol=1e-5)
    assert torch.allclose(bn_stats_loss(model, x, "mse"), mse, rtol=1e-5)


def test_same_seed_same_bytes_and_other_seed_differs() -> None:
    a = [png_bytes(img) for img, _ in make(iters=5).generate([0, 1, 2])]
    b = [png_bytes(img) for img, _ in make(iters=5).generate([0, 1, 2])]
    c = [png_bytes(img) for img, _ in make(iters=5, run_seed=8).generate([0, 1, 2])]
    assert a == b
    assert a != c


def test_targets_are_pure_functions_of_run_seed_and_index() -> None:
    gen = make()
    assert gen.sample_json(11) == make(batch_size=3).sample_json(11)
    assert class_targets(7, 11, 2, NUM_CLASSES) == class_targets(7, 11, 2, NUM_CLASSES)
    pairs = {tuple(class_targets(7, i, 2, NUM_CLASSES)) for i in range(40)}
    assert len(pairs) > 5 and all(len(set(p)) == 2 for p in pairs)
    assert class_targets(7, 0, 0, NUM_CLASSES) == []


def test_unconditional_and_vocab_names() -> None:
    gen = BNDistillGenerator(tiny_bn_cnn, SIZE, MEAN, STD, NUM_CLASSES, iters=2, batch_size=4, k=0,
                             class_names=list("abcde"), vocab="file:letters")  # fmt: skip
    ((img, meta),) = gen.generate([9])
    assert meta["class_ids"] == [] and meta["prompt"] == "bn-distill: unconditional"
    assert meta["vocab"] == "file:letters"
    one = make(k=1, class_names=list("abcde")).sample_json(2)
    assert one["class_names"] == ["abcde"[one["class_ids"][0]]]


def test_shift_per_sample_is_a_reflect_padded_crop() -> None:
    x = torch.randn(3, 2, 5, 6)
    padded = F.pad(x, [1] * 4, mode="reflect")
    assert torch.equal(_reflect_pad(x, 1), padded)
    offsets = torch.tensor([0, 4, 8])
    y = shift_per_sample(x, offsets)
    for b, o in enumerate(offsets.tolist()):
        dy, dx = divmod(o, 3)
        assert torch.equal(y[b], padded[b, :, dy : dy + 5, dx : dx + 6])


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(iters=0), "iters"),
        (dict(k=-1), "k (classes"),
        (dict(k=NUM_CLASSES + 1), "k (classes"),
        (dict(method="diffusion"), "unknown bn-distill method"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(mean=(0.5,)), "mean and std"),
        (dict(class_names=["a"]), "class_names"),
        (dict(bn_loss="l1"), "unknown bn-distill loss 'l1'"),
        (dict(marginal="uniform"), "unknown pixel marginal 'uniform'"),
    ],
)
def test_bad_args_raise_one_line(kw: dict, words: str) -> None:
    with pytest.raises(EngineError) as info:
        make(**kw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_model_without_bn_or_wrong_width_is_refused() -> None:
    no_bn = BNDistillGenerator(lambda: nn.Sequential(nn.Conv2d(3, 2, 1)), SIZE, MEAN, STD, 2, iters=1, k=0)
    with pytest.raises(EngineError, match="batch-norm"):
        no_bn.generate([0])
    wrong = BNDistillGenerator(tiny_bn_cnn, SIZE, MEAN, STD, 7, iters=1, k=1)
    with pytest.raises(EngineError, match="logits"):
        wrong.generate([0])


def bn_cfg(tmp_path, **kw):
    """A bn-distill run config over a 5-name class file (the tiny CNN's classes)."""
    from engine.config import GenerateConfig

    names = tmp_path / "letters.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    base = dict(out=str(tmp_path / "pool"), generator="bn-distill", model="module:tiny", vocab=str(names))
    return GenerateConfig(**{**base, **kw}).resolved()


def test_from_config_builds_from_the_run_config_and_the_classifier(tmp_path) -> None:
    from engine.bn_distill import from_config
    from engine.classifier import Classifier

    classifier = Classifier(tiny_bn_cnn, SIZE, MEAN, STD, NUM_CLASSES)
    settings = {"iterations": 3, "method": "pixels", "bn_loss": "norm", "ce_weight": 0.5, "swing": False}
    cfg = bn_cfg(tmp_path, seed=5, batch_size=4, settings=settings)
    gen = from_config(cfg, classifier=classifier)
    assert (gen.iters, gen.batch_size, gen.k, gen.run_seed, gen.method) == (3, 4, 2, 5, "pixels")
    assert (gen.bn_loss, gen.lr, gen.ce_weight, gen.swing, gen.device.type) == (
        "norm",
        0.1,
        0.5,
        False,
        "cpu",
    )
    ((img, meta),) = gen.generate([1])
    assert meta["model"] == "module:tiny" and meta["steps"] == 3 and meta["vocab"] == cfg.vocab
    assert from_config(bn_cfg(tmp_path), classifier=classifier).bn_loss == "mse"
    with pytest.raises(EngineError, match="classifier"):
        from_config(cfg)
    with pytest.raises(EngineError, match="vocab 'imagenet' has 1000 classes"):
        from_config(bn_cfg(tmp_path, vocab="imagenet"), classifier=classifier)


def test_batch_size_is_part_of_the_recipe(tmp_path) -> None:
    """BN statistics are batch statistics: the batch size (the run's, unless the settings give one)
    enters the config hash, as every other bn-distill setting does."""
    base = bn_cfg(tmp_path, batch_size=4)
    assert base.settings.batch_size == 4 and base.content_config()["settings"]["batch_size"] == 4
    assert bn_cfg(tmp_path, batch_size=2).config_hash() != base.config_hash()
    assert bn_cfg(tmp_path, batch_size=2, settings={"batch_size": 4}).config_hash() == base.config_hash()
    assert bn_cfg(tmp_path, batch_size=4, workers=3, device="cpu").config_hash() == base.config_hash()
    with pytest.raises(EngineError, match="'auto'"):
        bn_cfg(tmp_path, batch_size="auto")
    with pytest.raises(EngineError, match="pairing 'balanced'"):
        bn_cfg(tmp_path, pairing="balanced")


def test_generator_schedule_is_genie_d() -> None:
    """Latents keep their rate; the decoder's falls 5% every 100 steps (Genie-D's recipe)."""
    gen = make(lr=0.1)
    params, _ = gen._parameterize([0, 1], batch_seed=3)
    opt = torch.optim.Adam(params)
    decay = gen._lr_decay(opt)
    for it in range(250):
        decay(it)
    latents, decoder = opt.param_groups
    assert latents["lr"] == 0.1 and decoder["lr"] == pytest.approx(0.01 * 0.95**2)


def test_gaussian_marginal_keeps_order_and_spans_the_pixel_range() -> None:
    """`marginal="gauss"`: each image's channels become the normalization's Gaussian (mean 0, std 1
    in normalized units, clipped to [0, 255] when written), in the same pixel order as without;
    the optimised images span far less of the range."""
    from engine.pixel_marginal import gaussian_marginal

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 16, 16, generator=g) * 0.2 + torch.arange(3.0).view(3, 1, 1, 1)
    x[0, 0, 0, :4] = x[0, 0, 1, 0]  # ties keep their order
    y = gaussian_marginal(x)
    assert torch.equal(x.flatten(2).argsort(dim=2, stable=True), y.flatten(2).argsort(dim=2, stable=True))
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(y.std(dim=(2, 3)), torch.ones(3, 2), atol=0.02)
    plain = [np.asarray(img) for img, _ in make(iters=5).generate([0, 1, 2, 3])]
    gauss = [np.asarray(img) for img, _ in make(iters=5, marginal="gauss").generate([0, 1, 2, 3])]
    for p, g in zip(plain, gauss):
        spread = lambda a: int(a.max()) - int(a.min())  # noqa: E731
        assert spread(g) > spread(p) and spread(g) >= 250
        for c in range(3):  # a darker pixel stays no brighter
            pc, gc = p[..., c].ravel(), g[..., c].ravel()
            levels = np.unique(pc)
            lows, highs = [gc[pc == v].min() for v in levels], [gc[pc == v].max() for v in levels]
            assert all(h <= lo for h, lo in zip(highs[:-1], lows[1:]))


def test_a_setting_added_later_keeps_older_pools_resumable() -> None:
    """`marginal` came after pools were made: at its default it stays out of the content (so an
    older pool's hash is unchanged); set, it is part of it."""
    from engine.bn_distill_settings import BNDistillSettings

    old = {"iterations": 400, "method": "generator", "lr": 0.1, "bn_loss": "mse", "ce_weight": 0.1,
           "swing": True, "batch_size": 128}  # fmt: skip
    assert BNDistillSettings(**old).content() == old
    assert BNDistillSettings(**old, marginal="gauss").content() == {**old, "marginal": "gauss"}


def test_gauss_fit_matches_bn_statistics_on_the_written_pixels() -> None:
    """`marginal="gauss-fit"` distils through the map to the written pixels (Gaussian marginal, clamp,
    8 bit): the BN loss of its last step is the BN loss of the decoded images. `gauss` remaps after
    distilling, so its written images' statistics differ from what was optimised."""

    def losses(marginal: str) -> tuple[float, float, int]:
        gen = make(iters=20, marginal=marginal, swing=False)
        out = gen.generate(list(range(8)))
        pixels = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img, _ in out])
        x = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            written = float(bn_stats_loss(tiny_bn_cnn(), x))
        return gen.history[-1]["last"], written, int(pixels.max()) - int(pixels.min())

    last, written, span = losses("gauss-fit")
    assert written == pytest.approx(last, rel=1e-4) and span >= 250
    last, written, span = losses("gauss")
    assert abs(written - last) > 0.05 * last and span >= 250

"""BN-statistics distillation: calibration images from the classifier alone (generator "bn-distill").

The Genie-D / ZeroQ recipe, written for the engine's contract (SHARDS.md): a batch of images is
optimized so that the batch statistics at every BN input of the full-precision classifier match
the running statistics it learned on real data, optionally pushing each image towards k target
classes (k=2 with soft labels 0.5/0.5 is the analogue of mixup-class prompting). Two
parameterizations: `method="generator"` optimizes per-sample latents and a tiny shared decoder
(Genie-D; the default: Genie's ablation has it quantize better than pixels at equal iterations),
`method="pixels"` optimizes the normalized pixels directly (ZeroQ / DeepInversion; cheaper per
iteration). The default objective and rates are Genie-D's (`bn_loss="mse"`, latents at a constant
rate, the decoder's decaying). Settings: engine.bn_distill_settings.

Determinism: sample i's class targets and initial latent/pixels are a pure function of
(run_seed, i) (engine.seeds, one `torch.Generator` per sample); the decoder's initial weights and
the jitter offsets are a pure function of (run_seed, the batch's indices). BN statistics are batch
statistics, so a batch is optimized jointly and a sample's final pixels depend on its batch
mates: `generate(indices)` is reproducible for the same `indices` list (and batch_size) on the
same machine, which is what the engine needs, since its work unit (a shard) is a fixed index
range; the batch size is part of the pool's config hash. On CUDA, cuDNN is held to deterministic
kernels during the optimisation.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.bn_distill_loss import BNStatsMatcher, bn_layers, bn_stats_loss
from engine.bn_distill_nets import (
    LATENT_DIM,
    SwingJitter,
    build_latent_generator,
    draw_offsets,
    strided_convs,
)
from engine.bn_distill_settings import DEFAULT_LR, LOSS_FORMS, MARGINALS, METHODS, BNDistillSettings
from engine.classifier import Classifier
from engine.errors import EngineError
from engine.pairing import ClassDraw, check_pairing, head_similarity, prepare_similarity
from engine.pixel_marginal import gaussian_marginal
from engine.records import sample_record
from engine.seeds import BN_BATCH, BN_CLASSES, BN_SAMPLE

if TYPE_CHECKING:
    from engine.config import GenerateConfig

__all__ = ["BNDistillGenerator", "bn_stats_loss", "class_targets", "from_config", "prepare", "sample_seed"]

DECODER_LR_RATIO = 0.1  # Genie-D: latents 0.1, decoder 0.01
DECODER_LR_DECAY = (0.95, 100)  # Genie-D: the decoder's lr x 0.95 every 100 iterations; latents constant
HISTORY_LEN = 64
_KNOWN_VOCABS = {10: "cifar10", 100: "cifar100", 1000: "imagenet"}


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of sample `index`'s own generator (its initial latent or pixels)."""
    return BN_SAMPLE.seed(run_seed, index)


def class_targets(
    run_seed: int, index: int, k: int, num_classes: int, pairing: ClassDraw | None = None
) -> list[int]:
    """The k distinct classes of sample `index`, drawn from their own stream (`pairing`: how, see
    engine.pairing; default random)."""
    if k == 0:
        return []
    g = BN_CLASSES.torch_generator(run_seed, index)
    return (pairing or ClassDraw("random", num_classes, k))(g)


def _input_stats_term(x: torch.Tensor, form: str) -> torch.Tensor:
    """Genie's input term: per-image channel mean 0 / std 1, the normalized range of real data.

    "mse": squared errors summed over every (image, channel) pair, which holds each image to the
    normalized range (Genie-D averages over the images instead). "norm": the unsquared norms of the
    same errors.
    """
    std, mean = torch.std_mean(x, dim=(2, 3))
    if form == "mse":
        return mean.square().sum() + (std - 1.0).square().sum()
    return torch.linalg.vector_norm(mean) + torch.linalg.vector_norm(std - 1.0)


class BNDistillGenerator:
    """Synthesizes calibration images by BN-statistics distillation of a classifier.

    Args:
        model_factory: builds the full-precision classifier (any nn.Module with BN layers); the
            engine never imports `quant`, so the CLI injects this. Built once, on first use.
        input_size: (C, H, W) of the classifier's input.
        mean, std: the classifier's normalization; images are `x * std + mean`, clamped, 8 bit.
        num_classes: logits of the classifier.
        iters: optimisation steps per batch (>= 1).
        lr: learning rate of the latents (decoder: lr / 10) or of the pixels; None = method default.
        batch_size: images optimized jointly (BN statistics are batch statistics).
        k: classes per sample: 0 = BN loss only, 1 = cross-entropy to one class, 2 = soft 0.5/0.5.
        run_seed: the pool's seed.
        method: "generator" (latents + tiny decoder, Genie-D) or "pixels" (ZeroQ-style).
        device: where to optimize.
        ce_weight: weight of the class loss relative to the BN loss.
        model_spec: the classifier spec string recorded as the sample's `model`.
        class_names: names for the class ids (default: the engine vocabulary if `vocab` names
            one with `num_classes` entries, else the ids as strings).
        vocab: recorded vocabulary name; default inferred from num_classes (cifar10, cifar100,
            imagenet), else "file:none".
        swing: jitter the input of strided convs per sample (Genie-D's swing convolution).
        bn_loss: "mse" (Genie-D: mean squared error of each layer's channel statistics) or "norm"
            (ZeroQ: unsquared norms); see `stats_distance`.
        marginal: "none" (the optimised pixels), "gauss" (each written image's channels given the
            normalization's Gaussian marginal, `engine.pixel_marginal`, after distillation) or
            "gauss-fit" (the same map, clamp and 8-bit rounding inside every step, straight-through,
            so the BN statistics are matched on the pixels that are written).
        pairing: how a sample's k classes are combined: random, or similar / dissimilar by the
            classifier's own class similarity (engine.pairing; computed here if `similarity` is None).
        similarity: the (num_classes, num_classes) class-similarity matrix of those pairings.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        iters: int = 400,
        lr: float | None = None,
        batch_size: int = 128,
        k: int = 2,
        run_seed: int = 0,
        method: str = "generator",
        device: str | torch.device = "cpu",
        ce_weight: float = 0.1,
        model_spec: str = "unknown",
        class_names: Sequence[str] | None = None,
        vocab: str | None = None,
        swing: bool = True,
        bn_loss: str = "mse",
        marginal: str = "none",
        pairing: str = "random",
        similarity: object = None,
    ) -> None:
        check_pairing("bn-distill", pairing)
        _check_args(
            input_size, mean, std, num_classes, iters, lr, batch_size, k, method, ce_weight, class_names,
            bn_loss,
        )  # fmt: skip
        if marginal not in MARGINALS:
            raise EngineError(f"unknown pixel marginal {marginal!r}; choose one of {', '.join(MARGINALS)}")
        self.bn_loss = bn_loss
        self.marginal = marginal
        self.model_factory = model_factory
        self.input_size = tuple(int(v) for v in input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.num_classes = num_classes
        self.iters = iters
        self.method = method
        self.lr = DEFAULT_LR[method] if lr is None else float(lr)
        self.batch_size = batch_size
        self.k = k
        self.run_seed = run_seed
        self.device = torch.device(device)
        self.ce_weight = ce_weight
        self.model_spec = model_spec
        self.vocab = vocab or _KNOWN_VOCABS.get(num_classes, "file:none")
        self.class_names = (
            list(class_names) if class_names is not None else _default_names(self.vocab, num_classes)
        )
        self.swing = swing
        self.pairing = pairing
        if pairing != "random" and k > 1 and similarity is None:
            similarity = head_similarity(model_factory().cpu())
        self.draw = ClassDraw(pairing, num_classes, k, similarity)
        # One entry per optimized batch (see `_record`), the latest HISTORY_LEN only: a warm actor
        # distills for days and must not grow without bound.
        self.history: deque[dict] = deque(maxlen=HISTORY_LEN)
        self._model: nn.Module | None = None

    # -- public -------------------------------------------------------------------------------

    def generate(self, indices: list[int]) -> list[tuple[Image.Image, dict]]:
        """One (RGB image, sample JSON) per index, in order; batches of `batch_size` in list order."""
        out: list[tuple[Image.Image, dict]] = []
        for start in range(0, len(indices), self.batch_size):
            chunk = [int(i) for i in indices[start : start + self.batch_size]]
            images = self._distill_batch(chunk)
            out += [(img, self.sample_json(i)) for img, i in zip(images, chunk)]
        return out

    def sample_json(self, index: int) -> dict:
        """The per-sample record of SHARDS.md; depends only on (run_seed, index) and the config."""
        ids = class_targets(self.run_seed, index, self.k, self.num_classes, self.draw)
        names = [self.class_names[c] for c in ids]
        _, height, width = self.input_size
        return sample_record(
            index,
            generator="bn-distill",
            model=self.model_spec,
            prompt="bn-distill: " + (" and ".join(names) if names else "unconditional"),
            class_ids=ids,
            class_names=names,
            vocab=self.vocab,
            k=self.k,
            pairing=self.pairing,
            seed=sample_seed(self.run_seed, index),
            run_seed=self.run_seed,
            steps=self.iters,
            width=width,
            height=height,
        )

    # -- the algorithm --------------------------------------------------------------------------

    def _distill_batch(self, indices: list[int]) -> list[Image.Image]:
        """Optimize one batch jointly; returns its 8-bit images and records the loss curve."""
        tick = time.perf_counter()
        model = self.model()
        batch_seed = BN_BATCH.seed(self.run_seed, ",".join(map(str, indices)))
        params, make_x = self._parameterize(indices, batch_seed)
        targets = self._soft_targets(indices)
        opt = torch.optim.Adam(params)
        decay = self._lr_decay(opt)
        convs = strided_convs(model) if self.swing else []
        offsets = draw_offsets(self.iters, len(convs), len(indices), batch_seed, self.device)
        curve = torch.zeros(self.iters, device=self.device)  # filled on device: no per-step host sync
        with (
            _deterministic(self.device),
            BNStatsMatcher(model, self.bn_loss) as bn,
            SwingJitter(convs, offsets) as jitter,
        ):
            for it in range(self.iters):
                jitter.step(it)
                bn.reset()
                opt.zero_grad(set_to_none=True)
                x = make_x()
                seen = x
                if self.marginal == "gauss-fit":  # the model sees what will be written
                    seen = x + (self._written(x) - x).detach()
                logits = model(seen)
                bn_loss = bn.loss()
                loss = bn_loss + _input_stats_term(x, self.bn_loss)
                if targets is not None:
                    loss = loss + self.ce_weight * F.cross_entropy(logits, targets)
                loss.backward()
                opt.step()
                decay(it)
                if self.method == "pixels":
                    self._clamp_pixels(params[0]["params"][0])
                curve[it] = bn_loss.detach()
        x = gaussian_marginal(x.detach()) if self.marginal != "none" else x.detach()
        images = self._to_uint8(x)
        self._record(indices, curve, images, time.perf_counter() - tick)
        return [Image.fromarray(a, "RGB") for a in images.permute(0, 2, 3, 1).cpu().numpy()]

    def _parameterize(
        self, indices: list[int], batch_seed: int
    ) -> tuple[list[dict], Callable[[], torch.Tensor]]:
        """The optimized tensors (as Adam param groups) and the map from them to a normalized batch."""
        c, h, w = self.input_size
        shape = (LATENT_DIM,) if self.method == "generator" else (c, h, w)
        init = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(self.run_seed, i)))
                for i in indices
            ]
        )
        leaf = init.to(self.device).requires_grad_()
        if self.method == "pixels":
            return [{"params": [leaf], "lr": self.lr}], lambda: leaf
        decoder = build_latent_generator(c, h, w, batch_seed).to(self.device).train()
        groups = [
            {"params": [leaf], "lr": self.lr},
            {"params": list(decoder.parameters()), "lr": self.lr * DECODER_LR_RATIO},
        ]
        return groups, lambda: decoder(leaf)

    def _lr_decay(self, opt: torch.optim.Optimizer) -> Callable[[int], None]:
        """The learning-rate schedule, called after step `it`.

        Generator: Genie-D's, latents at a constant rate and the decoder's rate x 0.95 every 100
        steps (its plateau rule for the latents never fires in a few hundred steps of falling loss,
        and dropping it avoids a host sync per step). Pixels: cosine to zero over the run.
        """
        if self.method == "pixels":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iters, eta_min=0.0)
            return lambda it: sched.step()
        gamma, every = DECODER_LR_DECAY
        decoder = opt.param_groups[1]

        def decay(it: int) -> None:
            if (it + 1) % every == 0:
                decoder["lr"] *= gamma

        return decay

    def _soft_targets(self, indices: list[int]) -> torch.Tensor | None:
        """(B, num_classes) class probabilities, 1/k on each target class; None for k=0."""
        if self.k == 0:
            return None
        targets = torch.zeros(len(indices), self.num_classes)
        for row, i in enumerate(indices):
            targets[row, class_targets(self.run_seed, i, self.k, self.num_classes, self.draw)] = 1.0 / self.k
        return targets.to(self.device)

    # -- helpers --------------------------------------------------------------------------------

    def model(self) -> nn.Module:
        """The classifier, built once: eval mode (BN uses running stats), frozen, on the device.

        Freezing matters for speed: backward then computes input gradients only.
        """
        if self._model is None:
            model = self.model_factory().to(self.device).eval().requires_grad_(False)
            if not bn_layers(model):
                raise EngineError("bn-distill needs a classifier with batch-norm layers (running statistics)")
            if self.k > 0:
                with torch.no_grad():
                    width = model(torch.zeros(2, *self.input_size, device=self.device)).shape[-1]
                if width != self.num_classes:
                    raise EngineError(f"classifier gives {width} logits, num_classes is {self.num_classes}")
            self._model = model
        return self._model

    def _norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def _clamp_pixels(self, x: torch.Tensor) -> None:
        """Keep optimized pixels inside the normalized image of [0, 1] (as DeepInversion does)."""
        mean, std = self._norm()
        x.copy_(torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std))

    @torch.no_grad()
    def _written(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized batch the written 8-bit images decode to, after the Gaussian marginal."""
        mean, std = self._norm()
        return (self._levels(gaussian_marginal(x)) / 255 - mean) / std

    @torch.no_grad()
    def _to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized batch -> (B, 3, H, W) uint8 RGB (grey inputs are repeated to 3 channels)."""
        img = self._levels(x).to(torch.uint8)
        return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img

    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized batch -> its 8-bit pixel levels 0..255 (as floats), in the input's channels."""
        mean, std = self._norm()
        return (x * std + mean).clamp(0, 1).mul(255).round()

    @torch.no_grad()
    def _record(self, indices: list[int], curve: torch.Tensor, images: torch.Tensor, seconds: float) -> None:
        """Loss curve (one host transfer) and what the fp model thinks of the final 8-bit images."""
        mean, std = self._norm()
        x = images[:, : self.input_size[0]].float().div(255)
        probs = self.model()((x - mean) / std).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        values = curve.cpu().tolist()
        self.history.append(
            {
                "indices": (indices[0], indices[-1]),
                "first": values[0],
                "last": values[-1],
                "curve": values,
                "seconds": seconds,
                "seconds_per_iter": seconds / self.iters,
                "fp_confidence": probs.max(-1).values.mean().item(),
                "fp_entropy": entropy.mean().item(),
                "fp_pred": probs.argmax(-1).tolist(),
            }
        )


def _default_names(vocab: str, num_classes: int) -> list[str]:
    """Names from the engine's vocabulary file of that name, else the ids themselves.

    A built-in vocabulary whose size differs from the classifier's is a mistake (e.g. the default
    `imagenet` with a CIFAR-10 model) that would mislabel every sample: refuse it.
    """
    try:
        text = resources.files("engine").joinpath("vocab", f"{vocab}.txt").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return [str(c) for c in range(num_classes)]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise EngineError(f"vocab {vocab!r} has {len(names)} classes, the classifier has {num_classes}")
    return names


def _check_args(
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    iters: int,
    lr: float | None,
    batch_size: int,
    k: int,
    method: str,
    ce_weight: float,
    class_names: Sequence[str] | None,
    bn_loss: str,
) -> None:
    """Refuse a bad request before anything runs, with one line saying what is wrong."""
    if method not in METHODS:
        raise EngineError(f"unknown bn-distill method {method!r}; choose one of {', '.join(METHODS)}")
    if bn_loss not in LOSS_FORMS:
        raise EngineError(f"unknown bn-distill loss {bn_loss!r}; choose one of {', '.join(LOSS_FORMS)}")
    if len(input_size) != 3 or any(int(v) < 1 for v in input_size):
        raise EngineError(f"input_size must be (C, H, W) of positive ints, got {tuple(input_size)}")
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise EngineError(f"mean and std need {input_size[0]} values (one per channel)")
    if any(not s > 0 for s in std):
        raise EngineError(f"std must be positive, got {tuple(std)}")
    if num_classes < 1:
        raise EngineError(f"num_classes must be >= 1, got {num_classes}")
    if iters < 1:
        raise EngineError(f"iters must be >= 1, got {iters}")
    if batch_size < 1:
        raise EngineError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= k <= num_classes:
        raise EngineError(f"k (classes per sample) must be in [0, {num_classes}], got {k}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise EngineError(f"lr must be a positive number, got {lr}")
    if not (ce_weight >= 0 and math.isfinite(ce_weight)):
        raise EngineError(f"ce_weight must be >= 0, got {ce_weight}")
    if class_names is not None and len(class_names) != num_classes:
        raise EngineError(f"class_names has {len(class_names)} names, num_classes is {num_classes}")


class _deterministic:
    """On CUDA, cuDNN deterministic kernels for the duration (restored after); no-op elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self._saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self._saved


def from_config(
    cfg: GenerateConfig, *, classifier: Classifier | None = None, device: str | None = None,
    similarity: object = None, **_: object,
) -> BNDistillGenerator:  # fmt: skip
    """The generator of a resolved run config (the registry's factory). `classifier` comes from the
    CLI layer, which alone may import `quant`; `device` is the worker's (default: cfg.device, where
    "auto" means CUDA if present)."""
    if classifier is None:
        raise EngineError("bn-distill needs the classifier (the `classifier` context) from the CLI layer")
    s = cfg.generator_settings(BNDistillSettings)
    if s.batch_size is None:
        raise TypeError("bn-distill settings are not resolved: pass cfg.resolved()")
    device = device or cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return BNDistillGenerator(
        model_factory=classifier.factory,
        input_size=classifier.input_size,
        mean=classifier.mean,
        std=classifier.std,
        num_classes=classifier.num_classes,
        iters=s.iterations,
        lr=s.lr,
        batch_size=s.batch_size,
        k=cfg.k,
        run_seed=cfg.seed,
        method=s.method,
        device=device,
        ce_weight=s.ce_weight,
        model_spec=str(cfg.model),
        vocab=cfg.vocab,
        swing=s.swing,
        bn_loss=s.bn_loss,
        marginal=s.marginal,
        pairing=cfg.pairing,
        similarity=similarity,
    )


def prepare(cfg: GenerateConfig, classifier: Classifier | None = None, **_: object) -> dict:
    """Once per run, in the driver: the classifier's class-similarity matrix when the pairing needs one."""
    return prepare_similarity(cfg, classifier)


from_config.prepare = prepare  # type: ignore[attr-defined]  # the registry looks up `prepare` on the factory

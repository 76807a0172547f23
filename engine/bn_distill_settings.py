"""Settings of the `bn-distill` generator (BN-statistics distillation of a classifier); no torch here.

Every field changes the pixels, so all enter the pool's config hash, the batch size included: BN
statistics are batch statistics, so a batch is optimised jointly and each image depends on its
batch mates. The batch size is the run's `--batch-size` unless set here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.pairing import check_pairing
from engine.settings import Choice, Flag, Float, GeneratorSettings, Int, setting

if TYPE_CHECKING:
    from engine.config import GenerateConfig

METHODS = ("generator", "pixels")
#: pixel marginals of the written images (engine.pixel_marginal)
MARGINALS = ("none", "gauss", "gauss-fit")
LOSS_FORMS = ("mse", "norm")
#: Learning rate of the latents (the decoder's is a tenth of it) or of the pixels.
DEFAULT_LR = {"generator": 0.1, "pixels": 0.1}
#: generator_options keys of pools made before these settings existed (see `from_legacy`).
_LEGACY_OPTIONS = {"bn_loss", "method", "lr", "ce_weight", "swing", "iters", "distill_batch"}


@dataclass(frozen=True)
class BNDistillSettings(GeneratorSettings):
    """How bn-distill optimises its images (see engine.bn_distill for the algorithm)."""

    presets = {"bn-distill": {}}
    default_preset = "bn-distill"
    needs_classifier = True

    iterations: int = setting(400, Int(1), "optimisation steps per batch (default 400)", aliases=("--steps",))
    method: str = setting(
        "generator", Choice(METHODS), "optimise a small generator's latents (Genie-D, default) or the pixels",
        flag="--distill-method",
    )  # fmt: skip
    lr: float | None = setting(
        None, Float(0.0, strict=True), "learning rate (default 0.1)", flag="--distill-lr"
    )
    bn_loss: str = setting(
        "mse", Choice(LOSS_FORMS), "BN-statistics error: Genie-D's mean square (default) or ZeroQ's norm",
        flag="--distill-loss",
    )  # fmt: skip
    ce_weight: float = setting(
        0.1,
        Float(0.0),
        "weight of the class loss against the BN loss (default 0.1)",
        flag="--distill-ce-weight",
    )
    swing: bool = setting(
        True, Flag(), "jitter strided convolutions' inputs (Genie-D's swing conv; default on)",
        flag="--distill-swing",
    )  # fmt: skip
    marginal: str = setting(
        "none", Choice(MARGINALS),
        "pixel marginal of the written images: as optimised (none), or each image's channels mapped "
        "to the normalization's Gaussian after distillation (gauss: full pixel range, for other tools' "
        "min/max calibrators), or at every step, so BN statistics are matched on the written pixels "
        "(gauss-fit: also for tools that correct biases from the calibration means)",
        flag="--distill-marginal", added=True,
    )  # fmt: skip
    batch_size: int | None = setting(
        None, Int(1), "images optimised jointly (default: --batch-size)", cli=False
    )

    def resolve(self, cfg: GenerateConfig) -> BNDistillSettings:
        s = self.checked()
        batch = s.batch_size if s.batch_size is not None else cfg.batch_size
        if not isinstance(batch, int) or isinstance(batch, bool):
            raise EngineError(f"bn-distill needs a number of images per batch, got batch size {batch!r}")
        check_pairing("bn-distill", cfg.pairing)
        lr = DEFAULT_LR[s.method] if s.lr is None else s.lr
        return dataclasses.replace(s, batch_size=batch, lr=lr).checked()

    @classmethod
    def from_legacy(cls, config: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
        """Old pools kept iterations in `steps`, the rest in `generator_options` (only options given
        on the command line), and the batch size only in `stats.runtime`, the last run's."""
        options = dict(config["generator_options"])
        if "bn_loss" not in options:  # before it: ZeroQ's norm and a narrower decoder
            raise EngineError("it was distilled by an older bn-distill recipe")
        unknown = sorted(set(options) - _LEGACY_OPTIONS)
        if unknown:
            raise EngineError(f"its bn-distill option {unknown[0]!r} is unknown to this dfq")
        batch = options.get("distill_batch") or dict(stats.get("runtime") or {}).get("batch_size")
        if batch is None:
            raise EngineError("its manifest does not record the batch size it was distilled with")
        method = options.get("method", "generator")
        legacy = cls(
            iterations=options.get("iters") or config["steps"] or 400,
            method=method,
            lr=DEFAULT_LR.get(method) if options.get("lr") is None else options["lr"],
            bn_loss=options["bn_loss"],
            ce_weight=options.get("ce_weight", 0.1),
            swing=bool(options.get("swing", True)),
            batch_size=batch,
        )
        return legacy.checked().content()

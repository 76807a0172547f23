"""Settings of the `enhancing-dfq` generator (a trained, class-conditional generator); no torch here.

Every field but the two bookkeeping rates (`checkpoint_every`, `log_every`) shapes the trained
generator, so it enters the pool's config hash and the training checkpoint's hash. The number of
mixed classes is the run's generic `--k` (k=1: no mixing). Each part of the method has a switch,
for the paper's ablation (Table 3); see engine.enhancing_dfq for what each does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.pairing import check_pairing
from engine.settings import Flag, Float, GeneratorSettings, Int, Text, setting

if TYPE_CHECKING:
    from engine.config import GenerateConfig


@dataclass(frozen=True)
class EnhancingDFQSettings(GeneratorSettings):
    """How enhancing-dfq trains its generator (see engine.enhancing_dfq for the algorithm)."""

    presets = {"enhancing-dfq": {}}
    default_preset = "enhancing-dfq"
    needs_classifier = True

    iterations: int = setting(
        400, Int(1), "generator training iterations (default 400)", flag="--edfq-iterations"
    )
    train_batch: int = setting(32, Int(2), "images per training iteration (default 32)", flag="--edfq-batch")
    lr: float = setting(
        1e-3, Float(0.0, strict=True), "generator learning rate (default 1e-3)", flag="--edfq-lr"
    )
    mlp_lr: float = setting(
        1e-2, Float(0.0, strict=True), "learning rate of the label-embedding MLPs (default 1e-2)",
        flag="--edfq-mlp-lr",
    )  # fmt: skip
    warmup: int = setting(
        50,
        Int(0),
        "warm-up iterations that train the label-embedding MLPs (default 50)",
        flag="--edfq-warmup",
    )
    layers: str = setting(
        "", Text(), "comma-separated module names of the J feature layers (default: the last 3 blocks)",
        flag="--edfq-layers",
    )  # fmt: skip
    embed_dim: int = setting(
        64, Int(4), "class-embedding and token width (default 64)", flag="--edfq-embed-dim"
    )
    flow_depth: int = setting(
        2,
        Int(1),
        "affine coupling layers in each level's normalizing flow (default 2)",
        flag="--edfq-flow-depth",
    )
    ce_weight: float = setting(
        1.0, Float(0.0), "weight of the cross-entropy loss (default 1)", flag="--edfq-ce-weight"
    )
    sim_weight: float = setting(
        0.1,
        Float(0.0),
        "weight of SimLoss1, the class-feature similarity (default 0.1)",
        flag="--edfq-sim-weight",
    )
    diversity_weight: float = setting(
        2.0, Float(0.0), "weight of the batch diversity term: mean feature cosine between images (default 2)",
        flag="--edfq-diversity-weight",
    )  # fmt: skip
    stats_weight: float = setting(
        0.1, Float(0.0), "weight of the BN-statistics loss, or of the patch-similarity entropy loss for models "
        "without BN (default 0.1)", flag="--edfq-stats-weight",
    )  # fmt: skip
    ema: float = setting(
        0.9, Float(0.0), "momentum of SimLoss1's moving class-feature averages, in [0, 1) (default 0.9)",
        flag="--edfq-ema",
    )  # fmt: skip
    label_embed: bool = setting(
        True, Flag(), "class embeddings from multi-layer MLPs (off: random learnable, as GDFQ)",
        flag="--edfq-label-embed",
    )  # fmt: skip
    mixer: bool = setting(
        True, Flag(), "attention mixer: soft labels from a mixed embedding (off: the mixing weights)",
        flag="--edfq-mixer",
    )  # fmt: skip
    flow_attention: bool = setting(
        True, Flag(), "normalizing-flow attention levels (off: a plain GDFQ-style decoder)",
        flag="--edfq-flow-attention",
    )  # fmt: skip
    simloss1: bool = setting(True, Flag(), "SimLoss1 diversity loss", flag="--edfq-simloss1")
    bn_loss: bool = setting(
        True,
        Flag(),
        "BN-statistics loss (patch-similarity entropy for models without BN)",
        flag="--edfq-bn-loss",
    )
    checkpoint_every: int = setting(
        50, Int(1), "iterations between training checkpoints (default 50)", flag="--edfq-checkpoint-every",
        content=False,
    )  # fmt: skip
    threads: int = setting(
        0, Int(0), "CPU threads of the training (default 0: torch's default); 1 is bit-reproducible",
        flag="--edfq-threads", content=False,
    )  # fmt: skip
    log_every: int = setting(
        25, Int(1), "iterations between progress lines (default 25)", flag="--edfq-log-every", content=False
    )

    def resolve(self, cfg: GenerateConfig) -> EnhancingDFQSettings:
        s = self.checked()
        if s.ema >= 1.0:
            raise EngineError(f"ema must be in [0, 1), got {s.ema!r}")
        if s.warmup >= s.iterations and s.label_embed:
            raise EngineError(
                f"warmup ({s.warmup}) must be shorter than the training ({s.iterations} iterations)"
            )
        check_pairing("enhancing-dfq", cfg.pairing)
        names = [n.strip() for n in s.layers.split(",")] if s.layers.strip() else []
        if any(not n for n in names):
            raise EngineError(f"layers must be comma-separated module names, got {s.layers!r}")
        return s

    def layer_names(self) -> list[str]:
        return [n.strip() for n in self.layers.split(",")] if self.layers.strip() else []

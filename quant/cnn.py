"""The CNN path: block reconstruction of a convolutional network (`quantize_cnn`).

The recipe: build the quantized twin (BN folded, blocks found, `quant.blocks`), then for each unit
in execution order (`quant.capture.walk_units`): calibrate its grids on the input the quantized
prefix gives it, and, unless the method is `rtn`, reconstruct it against the float model's output
(`quant.reconstruct`). Methods (`quant.methods`): `rtn`, `brecq`/`adaround` (AdaRound + LSQ),
`qdrop` (+ QDrop dropping), `genie-m` (+ learned weight step; the default).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import PLACEMENTS, build_quantized_twin
from .capture import walk_units
from .errors import QuantError
from .gptq import unit_start_weights
from .grad_trace import GradNormTrace
from .methods import CNN, DEFAULT_METHOD, fill_preset
from .modules import act_quantizers, set_quant_state, weight_layers
from .quantizers import check_bits, check_device
from .reconstruct import ReconResult, ReconSettings, reconstruct_unit

# Images whose activations set the initial activation grids (QDrop uses 256).
ACT_CALIB_IMAGES = 256


@dataclass(frozen=True)
class CNNSettings:
    """What the CNN path quantizes to and how. `None` fields take the method's preset values
    (`quant.methods`); the rest default to the published QDrop/Genie-M settings."""

    wbits: int = 4
    abits: int = 4
    method: str = DEFAULT_METHOD[CNN]
    #: reconstruction iterations per unit (None: the method's, 20,000; `rtn`: 0)
    iters: int | None = None
    batch_size: int = 32
    #: bits of the first and last layers' weights and of the inputs to the second and last (None: as the rest)
    first_last_bits: int | None = 8
    #: QDrop: probability that an activation element stays float during reconstruction
    drop_prob: float | None = None
    #: AdaRound regulariser weight (Genie-M 1.0: hard decisions within short budgets; QDrop/BRECQ 0.01)
    round_weight: float | None = None
    #: Genie-M: learn the per-channel weight step jointly with the rounding
    learn_weight_step: bool | None = None
    lr_alpha: float = 1e-3
    lr_act: float = 4e-5
    lr_wscale: float = 1e-4
    #: which tensors carry activation quantizers: `block-output` (QDrop: the residual stream is
    #: quantized) or `layer-input` (Genie: conv/linear inputs; identity skips stay float)
    placement: str = "block-output"
    #: cross-layer equalization of conv pairs after BN folding (`quant.equalize`)
    equalize: bool = False
    #: AdaRound starts from GPTQ's compensated weights (`quant.gptq`), not each layer's own rounded
    gptq_start: bool = True
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        fill_preset(self, CNN)
        self.validate()

    @property
    def reconstructs(self) -> bool:
        return self.iters > 0

    def validate(self) -> None:
        """Raise `QuantError` for any value that cannot be run."""
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for name in ("equalize", "gptq_start", "learn_weight_step"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.placement not in PLACEMENTS:
            raise QuantError(f"unknown placement {self.placement!r}: use {' or '.join(PLACEMENTS)}")
        for name in ("iters", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise QuantError(f"{name} must be an integer, got {v!r}")
        if self.iters < 0:
            raise QuantError(f"iters must be >= 0, got {self.iters}")
        if self.method == "rtn" and self.iters:
            raise QuantError(f"rtn does not reconstruct: iters must be 0, got {self.iters}")
        if self.batch_size < 1:
            raise QuantError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0.0 <= self.drop_prob < 1.0):
            raise QuantError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        for name in ("round_weight", "lr_alpha", "lr_act", "lr_wscale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise QuantError(f"{name} must be a finite number >= 0, got {v!r}")
        check_device(self.device)

    def recon_settings(self) -> ReconSettings:
        """The reconstruction hyper-parameters of one unit."""
        return ReconSettings(
            iters=self.iters,
            batch_size=self.batch_size,
            lr_alpha=self.lr_alpha,
            lr_act=self.lr_act,
            lr_wscale=self.lr_wscale,
            round_weight=self.round_weight,
            drop_prob=self.drop_prob,
            learn_wscale=self.learn_weight_step,
        )


def calibrate_unit(unit: nn.Module, x: torch.Tensor) -> None:
    """Initial grids of one unit: per-channel weight MSE search, then activation ranges in order."""
    for layer in weight_layers(unit):
        layer.calibrate_weight()
    set_quant_state(unit, weights=True, acts=True)
    acts = act_quantizers(unit)
    for q in acts:
        q.observing = True
    unit(x)
    for q in acts:
        q.observing = False


def _set_threads(device: torch.device) -> None:
    """On a CPU, one torch thread per core this process may use, unless OMP_NUM_THREADS says how
    many (jobs run side by side set it: two threads each on a shared pair of cores run several
    times slower than one)."""
    if device.type == "cpu":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        given = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(max(1, min(n, int(given)) if given.isdigit() and int(given) > 0 else n))


def quantize_cnn(
    model: nn.Module,
    calib: torch.Tensor,
    settings: CNNSettings,
    progress: bool = False,
    trace: GradNormTrace | None = None,
) -> tuple[nn.Module, dict[str, ReconResult]]:
    """A fake-quantized copy of `model` calibrated on `calib` (N, C, H, W), deterministic per seed,
    and the per-unit reconstruction results (empty for `rtn`); `trace` gets each reconstructed unit's
    gradient norms. `model` itself is not modified."""
    device = torch.device(settings.device)
    _set_threads(device)
    calib = calib.to(device=device, dtype=torch.float32)
    qmodel, units, chained = build_quantized_twin(
        model,
        calib[:2].to(_device_of(model)),
        settings.wbits,
        settings.abits,
        settings.first_last_bits,
        settings.placement,
        equalize=settings.equalize,
    )
    qmodel.to(device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    recon = settings.recon_settings()
    train = settings.reconstructs
    results: dict[str, ReconResult] = {}
    for step in walk_units(qmodel, units, calib, chained, targets=train):
        x_q = step.x_q
        calibrate_unit(step.unit, x_q[:ACT_CALIB_IMAGES])
        if train:
            starts = unit_start_weights(step.unit, x_q[:ACT_CALIB_IMAGES]) if settings.gptq_start else None
            results[step.name] = reconstruct_unit(
                step.unit, x_q, step.x_fp, step.y_fp, recon, generator, progress,
                desc=f"[{step.index + 1}/{len(units)}] {step.name}", start_weights=starts,
                trace=trace.unit(step.name) if trace is not None else None,
            )  # fmt: skip
    qmodel.requires_grad_(False)
    return qmodel.eval(), results


def rebuild_cnn(model: nn.Module, settings: CNNSettings, input_shape: tuple[int, ...]) -> nn.Module:
    """The module tree `quantize_cnn` builds for `model`, uncalibrated (a saved state loads into it).

    No equalization: it changes weights, not the tree, and the saved (equalized) weights load after."""
    example = torch.zeros(2, *input_shape, device=_device_of(model))
    qmodel, _, _ = build_quantized_twin(
        model, example, settings.wbits, settings.abits, settings.first_last_bits, settings.placement
    )
    return qmodel


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device

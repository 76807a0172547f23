"""The transformer path: RepQ-ViT-style calibration of a vision transformer from one batch.

The steps, in order (`quantize_transformer`):
1. copy the model; with `rotate_heads` (the default) fold a per-head Hadamard rotation into the
   copy's q and k weights (`rotate.py`: q @ k^T is unchanged, the 4-bit q and k grids see evened-out
   channel ranges); swap its layers for fake-quantized ones (`convert.py`): per-channel weight
   grids; per-tensor activation grids, except per-channel grids on the inputs of Linears fed by a
   LayerNorm; a log grid on post-softmax attention (log-sqrt2, or a finer power-of-two base where
   the bits allow);
2. one forward pass over the calibration batch fits every activation grid in execution order, so
   each grid sees the already-quantized outputs of the layers before it; per-tensor grids minimise
   the error of the op they feed, per-channel ones their own error;
3. scale re-parameterization (`reparam.py`): each per-channel post-LayerNorm grid is folded into
   its LayerNorm and Linear, leaving per-tensor grids only, and those Linears' weight grids are
   refitted to their new weights;
3b. GPTQ weight rounding on those grids (`gptq.py`, `gptq=True`, the default): each Linear's
   rounding error is compensated on the calibration inputs instead of rounding to nearest;
4. optionally (`iters > 0`), block reconstruction on top (`reconstruct.py`: AdaRound + learned
   weight and activation steps + QDrop's input mix, block by block against the float outputs). It
   learns the rounding itself, starting from GPTQ's compensated weights (so from GPTQ's rounding)
   when `gptq` is on, else from the weights themselves (round-to-nearest).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantError
from ..grad_trace import GradNormTrace
from ..methods import DEFAULT_METHOD, TRANSFORMER, fill_preset
from ..modules import QuantConv2d
from ..quantizers import check_bits, check_calibration, check_device, grid_from_range
from ..reconstruct import ReconResult, ReconSettings
from .convert import convert_to_quantized, norm_linear_pairs
from .gptq import gptq_round
from .reconstruct import reconstruct_vit
from .reparam import fold_input_scales
from .rotate import rotate_heads


@dataclass(frozen=True)
class TransformerSettings:
    """What the transformer path quantizes to and how (defaults: RepQ-ViT's recipe plus the head
    rotation and GPTQ rounding, which measured better on held-out images; docs/results.md)."""

    wbits: int = 4
    abits: int = 4
    method: str = DEFAULT_METHOD[TRANSFORMER]
    #: block reconstruction iterations per block on top of the calibration (None: the method's, 0)
    iters: int | None = None
    #: images the calibration pass and GPTQ read (the first of the calibration set; RepQ-ViT used 32)
    calib_size: int = 64
    #: bits of the patch embedding (weights and image input) and of the classifier weights
    #: (None: `wbits` / `abits` there too)
    first_last_bits: int | None = 8
    #: fold the per-channel post-LayerNorm grids (the classifier's input's too, where pooling
    #: commutes with them) into the LayerNorm and next Linear (RepQ-ViT); False: keep them per channel
    reparam: bool = True
    #: post-softmax grid pinned to log-sqrt2 (RepQ-ViT); False: a finer base where the bits allow
    log_sqrt2_only: bool = False
    #: fold a per-head Hadamard rotation into q and k before calibration (q @ k^T is unchanged)
    rotate_heads: bool = True
    #: GPTQ weight rounding after calibration (False: round to nearest, as RepQ-ViT)
    gptq: bool = True
    #: (lowest, highest) model input: the patch-embedding input grid covers it instead of being
    #: fitted to the calibration images (`quant.data.input_range`; for pools that may not span it)
    input_range: tuple[float, float] | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        fill_preset(self, TRANSFORMER)
        if isinstance(self.input_range, list):
            object.__setattr__(self, "input_range", tuple(self.input_range))
        self.validate()

    def validate(self) -> None:
        """Raise `QuantError` for any value that cannot be run."""
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for name in ("reparam", "log_sqrt2_only", "gptq", "rotate_heads"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.input_range is not None:
            r = self.input_range
            if (
                not isinstance(r, tuple)
                or len(r) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
                or not r[0] < r[1]
            ):
                raise QuantError(f"input_range must be (low, high) numbers with low < high, got {r!r}")
        for name, low in (("calib_size", 1), ("iters", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise QuantError(f"{name} must be an integer >= {low}, got {v!r}")
        check_device(self.device)


def _fix_input_grids(qmodel: nn.Module, value_range: tuple[float, float]) -> None:
    """Give the model-input quantizers (the patch embedding's convolution) a grid over `value_range`.

    Installed before the calibration pass, which then leaves them alone (they are initialized) and
    fits every later grid to what they pass on.
    """
    lo, hi = (torch.tensor(float(v)) for v in value_range)
    for module in qmodel.modules():
        if (
            isinstance(module, QuantConv2d)
            and module.input_quantizer is not None
            and module.input_quantizer.enabled
        ):
            quantizer = module.input_quantizer
            scale, zero_point = grid_from_range(lo, hi, quantizer.qmin, quantizer.qmax, symmetric=False)
            quantizer.set_grid(scale, zero_point)


@torch.no_grad()
def quantize_transformer(
    model: nn.Module,
    calib: torch.Tensor,
    settings: TransformerSettings,
    progress: bool = False,
    trace: GradNormTrace | None = None,
) -> tuple[nn.Module, dict[str, ReconResult], float]:
    """A fake-quantized copy of a transformer calibrated on `calib` (the first `calib_size` images;
    reconstruction, if any, reads all), its per-block reconstruction results, and the seconds steps
    1-3 took; `trace` gets each reconstructed block's gradient norms. `model` itself is not modified."""
    check_calibration(calib)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    qmodel = copy.deepcopy(model).eval().to(device).requires_grad_(False)  # only quantizer params train
    if settings.rotate_heads:
        rotate_heads(qmodel)
    pairs = _convert(qmodel, settings)
    if settings.input_range is not None:
        _fix_input_grids(qmodel, settings.input_range)
    first = calib[: settings.calib_size].to(device)
    qmodel(first)
    if settings.reparam:
        for norm_name, linear_name in pairs:
            linear = qmodel.get_submodule(linear_name)
            if linear.input_quantizer.enabled:  # float activations (abits 32): nothing to fold
                fold_input_scales(qmodel.get_submodule(norm_name), linear)
    gptq_weights = gptq_round(qmodel, first) if settings.gptq else None
    seconds = time.perf_counter() - start
    results: dict[str, ReconResult] = {}
    if settings.iters > 0:
        recon = ReconSettings(iters=settings.iters, round_weight=1.0)  # Genie-M's published values
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        results = reconstruct_vit(
            qmodel, calib.to(device), recon, generator, progress, start_weights=gptq_weights, trace=trace
        )
    return qmodel, results, seconds


def _convert(qmodel: nn.Module, settings: TransformerSettings) -> list[tuple[str, str]]:
    """Swap the layers for quantized ones; returns the (LayerNorm, Linear) pairs to fold."""
    pairs = norm_linear_pairs(qmodel)
    edge_w = settings.first_last_bits or settings.wbits
    edge_a = settings.first_last_bits or settings.abits
    convert_to_quantized(
        qmodel,
        settings.wbits,
        settings.abits,
        patch_bits=(edge_w, edge_a),
        head_wbits=edge_w,
        per_channel_inputs=frozenset(linear for _, linear in pairs),
        log_sqrt2_only=settings.log_sqrt2_only,
    )
    return pairs


def rebuild_transformer(
    model: nn.Module, settings: TransformerSettings, input_shape: tuple[int, ...]
) -> nn.Module:
    """The module tree `quantize_transformer` builds for `model`, uncalibrated (a saved state loads
    into it; the head rotation and re-parameterization changed weights, which the state holds)."""
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    _convert(qmodel, settings)
    return qmodel

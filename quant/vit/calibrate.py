"""RepQ-ViT-style post-training quantization of a timm ViT / DeiT / Swin from one calibration batch.

The steps, in order (`quantize_vit`):
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
4. optionally (`recon_iters > 0`), block reconstruction on top (`reconstruct.py`: AdaRound + learned
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
from ..quantizers import check_bits, grid_from_range
from .convert import convert_to_quantized, norm_linear_pairs
from .layers import QuantConv2d
from .reparam import fold_input_scales
from .rotate import rotate_heads


@dataclass(frozen=True)
class ViTQuantSettings:
    """The settings this path reads from any config object (the CNN `QuantConfig` included)."""

    wbits: int
    abits: int
    seed: int = 0
    device: str = "cpu"
    #: images the calibration pass and GPTQ read (the first of `calib`). 64, not RepQ-ViT's 32: on the
    #: CIFAR-10 ViT, 64-image grids cut the KL to fp32 on held-out real images by 11-14% at W4A4/W6A6
    #: (README), in about half the peer's 32-image time here
    calib_size: int = 64
    first_last_bits: int | None = 8
    head_wbits: int | None = None
    reparam: bool = True
    fold_head: bool = True
    log_sqrt2_only: bool = False
    #: per-head Hadamard rotation of q and k folded into the attention weights before
    #: calibration (`rotate.py`; False: the weights as given, as RepQ-ViT)
    rotate_heads: bool = True
    #: GPTQ weight rounding after calibration (False: round to nearest, as RepQ-ViT)
    gptq: bool = True
    #: block reconstruction on top of the calibration (0: none); it reads `recon_images` images
    recon_iters: int = 0
    recon_images: int = 1024
    #: (lowest, highest) value of the model input (`quant.data.input_range` of its preprocessing):
    #: the patch-embedding input grid covers it instead of being fitted to the calibration images.
    #: None: fitted (right for real images; data-free pools may not span the input range)
    input_range: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, config: object, **overrides: object) -> ViTQuantSettings:
        """Read attributes duck-typed, with defaults, and validate them."""
        fields = {f: getattr(config, f) for f in cls.__dataclass_fields__ if hasattr(config, f)}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if "wbits" not in fields or "abits" not in fields:
            raise QuantError("the quantization config needs `wbits` and `abits`")
        s = cls(**fields)
        check_bits(s.wbits, "wbits")
        check_bits(s.abits, "abits")
        if s.first_last_bits is not None:
            check_bits(s.first_last_bits, "first_last_bits")
        if s.head_wbits is not None:
            check_bits(s.head_wbits, "head_wbits")
        for name in ("reparam", "fold_head", "log_sqrt2_only", "gptq", "rotate_heads"):
            if not isinstance(getattr(s, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(s, name)!r}")
        if s.input_range is not None:
            r = s.input_range
            if (
                not isinstance(r, (tuple, list))
                or len(r) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
                or not r[0] < r[1]
            ):
                raise QuantError(f"input_range must be (low, high) numbers with low < high, got {r!r}")
        for name, low in (("calib_size", 1), ("recon_iters", 0), ("recon_images", 1)):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise QuantError(f"{name} must be an integer >= {low}, got {v!r}")
        return s


def _fix_input_grids(qmodel: nn.Module, value_range: tuple[float, float]) -> None:
    """Give the model-input quantizers (the patch embedding's convolution) a grid over `value_range`.

    Installed before the calibration pass, which then leaves them alone (they are initialized) and
    fits every later grid to what they pass on.
    """
    lo, hi = (torch.tensor(float(v)) for v in value_range)
    for module in qmodel.modules():
        if isinstance(module, QuantConv2d) and module.input_quantizer.enabled:
            quantizer = module.input_quantizer
            scale, zero_point = grid_from_range(lo, hi, quantizer.qmin, quantizer.qmax, symmetric=False)
            quantizer.set_grid(scale, zero_point)


def _check_calib(calib: torch.Tensor) -> None:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 4 or calib.shape[0] == 0:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise QuantError(f"calibration data must be a non-empty N x C x H x W image tensor, got {shape}")
    if not calib.is_floating_point():
        raise QuantError("calibration images must be preprocessed float tensors (the model's normalization)")


@torch.no_grad()
def quantize_vit(
    model: nn.Module,
    calib: torch.Tensor,
    config: object,
    reparam: bool | None = None,
) -> nn.Module:
    """A fake-quantized copy of a timm transformer, calibrated on (the first `calib_size` of) `calib`.

    `config` needs `wbits` and `abits`; optional: `seed`, `device`, `calib_size` (64),
    `first_last_bits` (8: patch-embedding weights and input; None: `wbits`/`abits` there too),
    `head_wbits` (default `first_last_bits`, else `wbits`), `reparam` (True), `fold_head` (True:
    the classifier input gets a folded per-channel grid too, exact since pooling commutes with it),
    `log_sqrt2_only` (False: the post-softmax log grid may use a finer base than sqrt2 where the
    bits allow; True: RepQ-ViT's log-sqrt2 everywhere), `gptq` (True: GPTQ weight rounding on the
    calibration batch, and reconstruction starts from it; False: nearest rounding), `input_range`
    (None: the patch-embedding input grid is fitted like the others; (low, high): it covers that
    range, see `quant.data.input_range`), `rotate_heads` (True: per-head Hadamard rotation of q and
    k folded into the weights first; False: RepQ-ViT's weights as given). `reparam=False` returns
    the per-channel model before folding, which computes the same function up to the refitted
    weight grids of the folded Linears.
    The input model is left untouched; the copy's `calibration_seconds` attribute says how long
    steps 1-3 took.
    """
    settings = ViTQuantSettings.from_config(config, reparam=reparam)
    _check_calib(calib)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    qmodel = copy.deepcopy(model).eval().to(device).requires_grad_(False)  # only quantizer params train
    if settings.rotate_heads:
        rotate_heads(qmodel)
    pairs = norm_linear_pairs(qmodel, include_head=settings.fold_head)
    edge_w = settings.first_last_bits or settings.wbits
    edge_a = settings.first_last_bits or settings.abits
    convert_to_quantized(
        qmodel,
        settings.wbits,
        settings.abits,
        patch_bits=(edge_w, edge_a),
        head_wbits=settings.head_wbits or edge_w,
        per_channel_inputs=frozenset(linear for _, linear in pairs),
        log_sqrt2_only=settings.log_sqrt2_only,
    )
    if settings.input_range is not None:
        _fix_input_grids(qmodel, settings.input_range)
    qmodel(calib[: settings.calib_size].to(device))
    if settings.reparam:
        for norm_name, linear_name in pairs:
            linear = qmodel.get_submodule(linear_name)
            if linear.input_quantizer.enabled:  # float activations (abits 32): nothing to fold
                fold_input_scales(qmodel.get_submodule(norm_name), linear)
    gptq_weights = None
    if settings.gptq:
        from .gptq import gptq_round

        gptq_weights = gptq_round(qmodel, calib[: settings.calib_size].to(device))
    qmodel.calibration_seconds = time.perf_counter() - start
    if settings.recon_iters > 0:
        from ..reconstruct import ReconSettings
        from .reconstruct import reconstruct_vit

        recon = ReconSettings(iters=settings.recon_iters, round_weight=1.0)  # Genie-M's published values
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        results = reconstruct_vit(
            qmodel, calib[: settings.recon_images].to(device), recon, generator, start_weights=gptq_weights
        )
        qmodel.reconstruction_history = {n: r.loss for n, r in results.items()}
        qmodel.calibration_seconds = time.perf_counter() - start
    return qmodel

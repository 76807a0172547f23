"""Post-training quantization of a CNN: config, the calibration driver, and save/load.

`quantize_model` reads as the recipe: build the quantized twin (BN folded, blocks found), then for
each unit in execution order: capture its float input/output and its input from the already
quantized prefix, calibrate its grids on that input, and (unless `rtn`) reconstruct it.
Transformers go to `quant.vit.quantize_vit` instead.

Methods: `rtn` (MSE-searched grids, nearest rounding, no training), `brecq`/`adaround` (AdaRound +
LSQ), `qdrop` (+ QDrop dropping), `genie-m` (+ learned weight step; the default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
from torch import nn

from .blocks import PLACEMENTS, build_quantized_twin
from .errors import QuantError
from .gptq import unit_start_weights
from .modules import QuantAct, QuantConv2d, QuantLinear, act_quantizers, set_quant_state, weight_layers
from .quantizers import UniformQuantizer, check_bits
from .reconstruct import ReconResult, ReconSettings, reconstruct_unit

METHODS = ("rtn", "brecq", "adaround", "qdrop", "genie-m")
FORMAT = "dfq-quantized-cnn/1"
# Images whose activations set the initial activation grids (QDrop uses 256).
ACT_CALIB_IMAGES = 256


@dataclass
class QuantConfig:
    """What to quantize to and how. Defaults are the published QDrop/Genie-M settings."""

    wbits: int = 4
    abits: int = 4
    method: str = "genie-m"
    iters: int = 20000
    batch_size: int = 32
    first_last_bits: int | None = 8
    drop_prob: float = 0.5
    #: AdaRound regulariser weight; None = the method's published value (Genie-M 1.0, QDrop/BRECQ 0.01).
    #: Genie's 1.0 drives the rounding to hard decisions within its short budgets (2-3k iterations);
    #: QDrop's 0.01 assumes 20k and leaves a soft-to-hard gap when cut short.
    round_weight: float | None = None
    lr_alpha: float = 1e-3
    lr_act: float = 4e-5
    lr_wscale: float = 1e-4
    #: Which tensors carry activation quantizers: `block-output` (QDrop: the residual stream is
    #: quantized) or `layer-input` (Genie: conv/linear inputs; identity skips stay float).
    placement: str = "block-output"
    #: Transformers only: Genie-M block reconstruction iterations a block on top of the RepQ-ViT
    #: calibration (0: calibration alone, RepQ-ViT's recipe). Separate from `iters`, whose default is
    #: the CNN recipe's 20k.
    vit_recon_iters: int = 0
    #: Transformers only: images the RepQ-ViT calibration (activation grids, GPTQ) reads, the first
    #: of the calibration set (64; RepQ-ViT used 32: see `quant.vit.ViTQuantSettings.calib_size`).
    vit_calib_size: int = 64
    #: Cross-layer equalization of conv pairs after BN folding (`quant.equalize`). Off by default:
    #: on MobileNetV1 x0.25 it lifted W8A8 by 3.4-3.8 points but cut its W4A4 genie-m result
    #: (14.7 -> 6.6); the ResNet rows are measured without it.
    equalize: bool = False
    #: CNNs: AdaRound starts from GPTQ's compensated weights (`quant.gptq`) instead of each layer's own
    #: rounded to nearest. Chosen on held-out real images, never the evaluation sets (ResNet-20,
    #: README): at W2A4 it lifts top-1 by 3.5 points and cuts KL to fp32 by a fifth; at W4A4 (real or
    #: data-free) it is level on top-1 and a little closer to fp32. False: the nearest start.
    gptq_start: bool = True
    #: Transformers only: (low, high) of the model input (`quant.data.input_range`); the
    #: patch-embedding input grid covers it instead of being fitted to the calibration images.
    #: `dfq quantize` sets it when calibrating on a pool or noise (see `--input-grid`).
    input_range: tuple[float, float] | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.round_weight is None:
            self.round_weight = 1.0 if self.method == "genie-m" else 0.01
        self.validate()

    def validate(self) -> None:
        """Raise `QuantError` for any value that cannot be run."""
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.method not in METHODS:
            raise QuantError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        for name in ("equalize", "gptq_start"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.placement not in PLACEMENTS:
            raise QuantError(f"unknown placement {self.placement!r}: use {' or '.join(PLACEMENTS)}")
        for name in ("iters", "batch_size", "seed", "vit_recon_iters", "vit_calib_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise QuantError(f"{name} must be an integer, got {v!r}")
        for name in ("iters", "vit_recon_iters"):
            if getattr(self, name) < 0:
                raise QuantError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "vit_calib_size"):
            if getattr(self, name) < 1:
                raise QuantError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0.0 <= self.drop_prob < 1.0):
            raise QuantError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        for name in ("round_weight", "lr_alpha", "lr_act", "lr_wscale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise QuantError(f"{name} must be a finite number >= 0, got {v!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise QuantError(f"bad device {self.device!r}: {e}") from None

    def recon_settings(self) -> ReconSettings:
        """The reconstruction hyper-parameters this method implies."""
        dropping = self.method in ("qdrop", "genie-m")
        return ReconSettings(
            iters=self.iters,
            batch_size=self.batch_size,
            lr_alpha=self.lr_alpha,
            lr_act=self.lr_act,
            lr_wscale=self.lr_wscale,
            round_weight=self.round_weight,
            drop_prob=self.drop_prob if dropping else 0.0,
            learn_wscale=self.method == "genie-m",
        )

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _transformer_quantizer(model: nn.Module) -> Callable | None:
    """`quant.vit.quantize_vit` when `model` is a transformer it handles (the ViT path is optional)."""
    try:
        from . import vit
    except ImportError:
        return None
    is_transformer = getattr(vit, "is_transformer", None)
    if is_transformer is None or not is_transformer(model):
        return None
    return vit.quantize_vit


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture(
    model: nn.Module, unit: nn.Module, data: torch.Tensor, outputs: bool, batch: int = 128
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and outputs) of `unit` over `data`, stopping each forward pass at the unit."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []

    def pre(_m: nn.Module, inp: tuple) -> None:
        xs.append(inp[0].detach().clone())
        if not outputs:
            raise _Stop

    def post(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        ys.append(out.detach().clone())
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre)]
    if outputs:
        handles.append(unit.register_forward_hook(post))
    try:
        for i in range(0, data.shape[0], batch):
            try:
                model(data[i : i + batch])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(xs), (torch.cat(ys) if outputs else None)


@torch.no_grad()
def run_unit(unit: nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """`unit` over `x` in batches, in its current quantization state (NCHW contiguous output)."""
    return torch.cat([unit(x[i : i + batch].contiguous()).contiguous() for i in range(0, x.shape[0], batch)])


@torch.no_grad()
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
    if device.type == "cpu":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, n))


def quantize_model(
    model: nn.Module, calib: torch.Tensor, config: QuantConfig, progress: bool = True
) -> nn.Module:
    """Return a fake-quantized copy of `model`, calibrated on `calib` (N, C, H, W), deterministic per seed.

    `model` itself is not modified. The result carries its per-unit loss history
    (`reconstruction_history`) and timing (`reconstruction_timing`).
    """
    config.validate()
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[0] == 0:
        raise QuantError("calibration data must be a non-empty tensor of images (N, C, H, W)")
    vit_quantize = _transformer_quantizer(model)
    if vit_quantize is not None:  # RepQ-ViT calibration on the first vit_calib_size; reconstruction on all
        vit_config = SimpleNamespace(
            **asdict(config),
            calib_size=config.vit_calib_size,
            recon_iters=config.vit_recon_iters,
            recon_images=int(calib.shape[0]),
        )
        return vit_quantize(model, calib, vit_config)

    device = torch.device(config.device)
    _set_threads(device)
    calib = calib.to(device=device, dtype=torch.float32)
    model_device = next(iter(model.parameters()), torch.empty(0)).device
    qmodel, units = build_quantized_twin(
        model,
        calib[:2].to(model_device),
        config.wbits,
        config.abits,
        config.first_last_bits,
        config.placement,
        equalize=config.equalize,
    )
    qmodel.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    settings = config.recon_settings()
    train = config.method != "rtn" and config.iters > 0
    results: dict[str, ReconResult] = {}
    chained = getattr(qmodel, "_dfq_chained", [False] * len(units))
    prev_fp = prev_q = None  # the previous unit's float output and its quantized output
    for k, name in enumerate(units):
        unit = qmodel.get_submodule(name)
        # A unit fed straight by the previous one takes its inputs from that unit's outputs (one unit
        # forward) instead of re-running the whole prefix (which makes captures quadratic in depth).
        chain = k > 0 and chained[k] and prev_q is not None and (prev_fp is not None or not train)
        x_fp = y_fp = None
        if train:  # the targets: the float model's input to and output of this unit
            set_quant_state(qmodel, weights=False, acts=False)
            if chain:
                x_fp, y_fp = prev_fp, run_unit(unit, prev_fp)
            else:
                x_fp, y_fp = capture(qmodel, unit, calib, outputs=True)
        for j, other in enumerate(units):  # the prefix quantized, the rest float
            set_quant_state(qmodel.get_submodule(other), weights=j < k, acts=j < k)
        if k == 0:
            x_q = calib  # the first unit's input is the (float) image
        elif chain:
            x_q = prev_q
        else:
            x_q, _ = capture(qmodel, unit, calib, outputs=False)
        calibrate_unit(unit, x_q[:ACT_CALIB_IMAGES])
        if train:
            starts = unit_start_weights(unit, x_q[:ACT_CALIB_IMAGES]) if config.gptq_start else None
            results[name] = reconstruct_unit(
                unit, x_q, x_fp, y_fp, settings, generator, progress, desc=f"[{k + 1}/{len(units)}] {name}",
                start_weights=starts,
            )  # fmt: skip
        prev_fp = prev_q = None
        if k + 1 < len(units) and chained[k + 1]:
            set_quant_state(unit, weights=True, acts=True)
            prev_q, prev_fp = run_unit(unit, x_q), y_fp
        del x_fp, y_fp, x_q
    set_quant_state(qmodel, weights=True, acts=True)
    qmodel.requires_grad_(False)
    qmodel._dfq_meta = {  # type: ignore[attr-defined]
        "units": units,
        "input_shape": tuple(calib.shape[1:]),
        "history": {n: r.loss for n, r in results.items()},
        "seconds_per_iter": {n: r.seconds_per_iter for n, r in results.items()},
    }
    return qmodel.eval()


def reconstruction_history(model: nn.Module) -> dict[str, list[float]]:
    """Per-unit reconstruction loss at every iteration (empty for `rtn`)."""
    return dict(getattr(model, "_dfq_meta", {}).get("history", {}))


def reconstruction_timing(model: nn.Module) -> dict[str, float]:
    """Per-unit wall seconds per reconstruction iteration (sum them for one iteration of the model)."""
    return dict(getattr(model, "_dfq_meta", {}).get("seconds_per_iter", {}))


def save_quantized(model: nn.Module, config: QuantConfig, path: str | os.PathLike, model_spec: dict) -> None:
    """One `torch.save` file: the fake-quant state dict, the config, and the spec to rebuild the float model."""
    meta = getattr(model, "_dfq_meta", None)
    if meta is None:
        raise QuantError("not a model returned by quantize_model (nothing to save)")
    torch.save(
        {
            "format": FORMAT,
            "config": asdict(config),
            "model_spec": dict(model_spec),
            "input_shape": list(meta["input_shape"]),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def load_quantized(path: str | os.PathLike, build_model: Callable[[dict], nn.Module]) -> nn.Module:
    """Rebuild the float model from the saved spec, wrap it as `quantize_model` did, load the grids."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise QuantError(f"{path}: not a quantized CNN file ({FORMAT})")
    config = QuantConfig.from_dict(blob["config"])
    model = build_model(blob["model_spec"])
    example = torch.zeros(2, *blob["input_shape"])
    # no equalization here: it changes weights, not the module tree, and the saved (equalized)
    # weights are loaded below
    qmodel, units = build_quantized_twin(
        model, example, config.wbits, config.abits, config.first_last_bits, config.placement
    )
    state = blob["state_dict"]
    for name, mod in qmodel.named_modules():  # grids first: their shapes are set by calibration
        if isinstance(mod, UniformQuantizer) and f"{name}.scale" in state:
            mod.set_grid(state[f"{name}.scale"], state[f"{name}.zero_point"])
        if isinstance(mod, (QuantConv2d, QuantLinear)) and f"{name}.ada.alpha" in state:
            mod.start_adaround(learn_scale=config.method == "genie-m")
    qmodel.load_state_dict(state, strict=True)
    for mod in qmodel.modules():
        if isinstance(mod, (QuantConv2d, QuantLinear)) and mod.ada is not None:
            mod.ada.soft = False
        if isinstance(mod, QuantAct):
            mod.quant.scale.requires_grad_(False)
    qmodel.requires_grad_(False)
    set_quant_state(qmodel, weights=True, acts=True)
    qmodel._dfq_meta = {
        "units": units,
        "input_shape": tuple(blob["input_shape"]),
        "history": {},
        "seconds_per_iter": {},
    }  # type: ignore[attr-defined]
    return qmodel.eval()

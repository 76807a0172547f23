"""The distill path: quantization by training a fake-quantized copy on the pool against the float model.

Methods (`quant.methods`): `kd` (EnhancingDFQ's fine-tuning, CVPR 2023, in GDFQ/Qimera's lineage:
KL(fp || q) on the logits + SimLoss2, the MSE between float and quantized activations, with LSQ
activation ranges [0, beta_l] and weight steps, weights trained through straight-through rounding)
and `nipq` (NIPQ, CVPR 2023: the same student trained with pseudo-quantization noise instead of
rounding, learned truncation and step per layer, then hard quantization at the fixed bit widths).
Both take CNNs and transformers; options: learned rounding (`rounding="adaround"`, kd only), SymReg
(`symreg`, `quant.distill_losses.weight_asymmetry`), SatNL (`satnl`, `quant.satnl`).

The recipe (`quantize_distill`):
1. start: the model family's own path builds and calibrates the quantized copy from the first
   `init_images` of the training images (`init`: `rtn` MSE-searched grids rounded to nearest,
   `minmax` (CNNs) min/max grids, `genie-m` block reconstruction of `init_iters` a block first,
   `repq-vit` (transformers) RepQ-ViT's calibration with head rotation and GPTQ rounding);
2. the teacher: a float copy of that tree (quantization off: the model's function, the same
   module names, so activations are matched by name);
3. trainable: learned roundings baked into the weights (or, with `rounding="adaround"`, a new
   soft rounding from them), every uniform step learnable (LSQ), SatNL swapped in;
4. training (`quant.distill_train`) for `steps` batches streamed from the images (`quant.stream`).

BatchNorm is folded into the convolutions (with its running statistics) before training, so it stays
frozen. GDFQ and Qimera keep BN in eval mode while fine-tuning for the reason that matters here too:
the pool's activation statistics are not the data's, so re-estimating them would drift; and with BN
folded the weight grid being trained is the deployed conv's.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import PLACEMENTS
from .cnn import ACT_CALIB_IMAGES, CNNSettings, quantize_cnn, rebuild_cnn
from .distill_losses import tap_names
from .distill_train import TrainPlan, train_student
from .errors import QuantError
from .grad_trace import GradNormTrace
from .methods import CNN, DISTILL, TRANSFORMER, fill_preset
from .modules import act_quantizers, set_quant_state, weight_layers
from .quantizers import UniformQuantizer, check_bits, check_device
from .reconstruct import ReconResult
from .satnl import observe, saturate
from .stream import ImageStream, Source, first_images
from .vit import TransformerSettings, quantize_transformer, rebuild_transformer

#: where the student starts, per model family
INITS = {CNN: ("rtn", "minmax", "genie-m"), TRANSFORMER: ("rtn", "repq-vit", "genie-m")}
ROUNDINGS = ("ste", "adaround")
#: training steps when neither `steps` nor `epochs` is given
DEFAULT_STEPS = 2000


@dataclass(frozen=True)
class DistillSettings:
    """What the distill path quantizes to and how. `None` fields take the method's preset values
    (`quant.methods`: `kd`, `nipq`); the budget is `steps` batches, or `epochs` passes over the
    training images (neither: `DEFAULT_STEPS`)."""

    wbits: int = 4
    abits: int = 4
    method: str = "kd"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    #: Adam rate of the float parameters (weights, biases, norms), cosine-annealed to 0
    lr: float | None = None
    #: relative Adam rate (in log space) of the weight and activation steps (LSQ) and the SatNL bounds
    lr_scale: float | None = None
    #: Adam rate of the rounding variables with `rounding="adaround"`
    lr_round: float = 1e-3
    kl_weight: float = 1.0
    #: weight of SimLoss2, the MSE between float and quantized activations (kd 1.0, nipq 0)
    act_weight: float | None = None
    #: `ste`: weights trained through straight-through rounding; `adaround`: learned rounding of the
    #: starting weights (kd only: nipq's noise replaces rounding)
    rounding: str | None = None
    #: AdaRound's regulariser weight with `rounding="adaround"`
    round_weight: float = 0.01
    #: NIPQ's pseudo-quantization noise instead of rounding (kd False, nipq True)
    noise: bool | None = None
    #: with `noise`: the fraction of the steps at the end that quantize hard (nipq 0.1)
    hard_fraction: float | None = None
    #: SymReg weight (0: off)
    symreg: float = 0.0
    #: SatNL: saturating nonlinearities in place of ReLU/GELU
    satnl: bool = False
    init: str = "rtn"
    #: block reconstruction iterations a block of `init="genie-m"`
    init_iters: int = 2000
    #: images (the first of the training images) the start calibrates or reconstructs on
    init_images: int = 1024
    #: a new random flip and shift of every training image each time it is drawn
    flip_crop: bool = True
    first_last_bits: int | None = 8
    #: CNNs: activation quantizer placement (`quant.blocks`)
    placement: str = "block-output"
    #: transformers: images the start's RepQ-ViT calibration reads
    calib_size: int = 64
    #: transformers: (lowest, highest) model input the patch-embedding grid covers (`TransformerSettings`)
    input_range: tuple[float, float] | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        fill_preset(self, DISTILL)
        if isinstance(self.input_range, list):
            object.__setattr__(self, "input_range", tuple(self.input_range))
        self.validate()

    def validate(self) -> None:
        """Raise `QuantError` for any value that cannot be run."""
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for name in ("noise", "satnl", "flip_crop"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (
            ("batch_size", 1),
            ("init_iters", 1),
            ("init_images", 1),
            ("calib_size", 1),
            ("seed", 0),
        ):
            _check_int(name, getattr(self, name), low)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        if self.epochs is not None:
            _check_number("epochs", self.epochs)
            if self.epochs <= 0:
                raise QuantError(f"epochs must be > 0, got {self.epochs}")
            if self.steps is not None:
                raise QuantError(f"give steps or epochs, not both (steps {self.steps}, epochs {self.epochs})")
        for name in ("lr", "lr_scale", "lr_round", "kl_weight", "act_weight", "round_weight", "symreg"):
            _check_number(name, getattr(self, name))
        _check_number("hard_fraction", self.hard_fraction)
        if self.hard_fraction > 1:
            raise QuantError(f"hard_fraction must be in [0, 1], got {self.hard_fraction}")
        if self.rounding not in ROUNDINGS:
            raise QuantError(f"unknown rounding {self.rounding!r}: use {' or '.join(ROUNDINGS)}")
        if self.noise and self.rounding != "ste":
            raise QuantError(f"{self.method} trains with noise instead of rounding: rounding must be ste")
        every_init = sorted({i for inits in INITS.values() for i in inits})
        if self.init not in every_init:
            raise QuantError(f"unknown init {self.init!r}: use one of {', '.join(every_init)}")
        if self.placement not in PLACEMENTS:
            raise QuantError(f"unknown placement {self.placement!r}: use {' or '.join(PLACEMENTS)}")
        if self.input_range is not None:
            TransformerSettings(input_range=self.input_range)  # its own check of the pair
        check_device(self.device)

    def check_family(self, family: str) -> None:
        """The start must be one the model family has."""
        if self.init not in INITS[family]:
            raise QuantError(
                f"init {self.init!r} is not one for a {family}: use one of {', '.join(INITS[family])}"
            )

    def resolved_steps(self, n_images: int) -> int:
        """The training budget in batches for `n_images` training images."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        if n_images < 1:
            raise QuantError("epochs need training images of known number: give steps instead")
        return max(1, math.ceil(self.epochs * n_images / self.batch_size))

    def plan(self, steps: int) -> TrainPlan:
        noise_steps = round(steps * (1.0 - self.hard_fraction)) if self.noise else 0
        return TrainPlan(
            steps=steps, lr=self.lr, lr_scale=self.lr_scale, lr_round=self.lr_round,
            kl_weight=self.kl_weight, act_weight=self.act_weight, symreg=self.symreg,
            round_weight=self.round_weight, noise_steps=noise_steps,
        )  # fmt: skip

    def cnn_settings(self) -> CNNSettings:
        """The CNN path's settings of the start (and of the module tree a saved state loads into)."""
        reconstruct = self.init == "genie-m"
        return CNNSettings(
            wbits=self.wbits, abits=self.abits, method="genie-m" if reconstruct else "rtn",
            iters=self.init_iters if reconstruct else 0, first_last_bits=self.first_last_bits,
            placement=self.placement, seed=self.seed, device=self.device,
        )  # fmt: skip

    def transformer_settings(self) -> TransformerSettings:
        """The transformer path's settings of the start (`rtn`: no head rotation, no GPTQ)."""
        plain = self.init == "rtn"
        return TransformerSettings(
            wbits=self.wbits, abits=self.abits, iters=self.init_iters if self.init == "genie-m" else 0,
            calib_size=self.calib_size, first_last_bits=self.first_last_bits, rotate_heads=not plain,
            gptq=not plain, input_range=self.input_range, seed=self.seed, device=self.device,
        )  # fmt: skip


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise QuantError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise QuantError(f"{name} must be a finite number >= 0, got {value!r}")


def _start(
    model: nn.Module,
    family: str,
    images: torch.Tensor,
    s: DistillSettings,
    progress: bool,
    trace: GradNormTrace | None = None,
) -> tuple[nn.Module, dict[str, ReconResult]]:
    """The calibrated quantized copy the training starts from, and its reconstruction results
    (`trace` gets that reconstruction's gradient norms)."""
    if family == TRANSFORMER:
        qmodel, results, _ = quantize_transformer(model, images, s.transformer_settings(), progress, trace)
        return qmodel, results
    qmodel, results = quantize_cnn(model, images, s.cnn_settings(), progress, trace)
    if s.init == "minmax":
        _minmax_grids(qmodel, images[:ACT_CALIB_IMAGES].to(s.device))
    return qmodel, results


@torch.no_grad()
def _minmax_grids(qmodel: nn.Module, images: torch.Tensor) -> None:
    """Refit every grid of a quantized CNN to its tensor's min/max: the weights', and, in one forward
    pass in execution order, each activation's as the quantized layers before it give it."""
    for layer in weight_layers(qmodel):
        layer.weight_quantizer.init = "minmax"
        layer.calibrate_weight(force=True)
    acts = act_quantizers(qmodel)
    for q in acts:
        q.quant.init, q.observing = "minmax", True
    try:
        qmodel(images)
    finally:
        for q in acts:
            q.observing = False


def _learnable_step(q: UniformQuantizer) -> None:
    """Make a calibrated grid's step an `nn.Parameter` (LSQ), keeping its value."""
    if q.enabled and bool(q.initialized) and not isinstance(q.scale, nn.Parameter):
        q.learn_scale = True
        q.set_grid(q.scale, q.zero_point)


@torch.no_grad()
def _bake_rounding(layer: nn.Module) -> None:
    """Replace a layer's hard learned rounding (reconstruction, GPTQ) by the weight it computes, on
    the rounding's grid: straight-through training then starts from exactly that quantized weight."""
    ada = layer.ada
    if ada is None:
        return
    ada.soft = False
    layer.weight.copy_(ada())
    layer.weight_quantizer.set_grid(ada.scale.reshape(-1), ada.zero_point.reshape(-1))
    layer.ada = None


def make_trainable(student: nn.Module, s: DistillSettings, images: torch.Tensor) -> None:
    """Step 3 of the recipe on a calibrated copy (`images` set the SatNL bounds)."""
    for layer in weight_layers(student):
        if not layer.weight_quantizer.enabled:
            continue
        _bake_rounding(layer)
        _learnable_step(layer.weight_quantizer)
        if s.rounding == "adaround":
            layer.start_adaround(learn_scale=True)
    for q in student.modules():
        if isinstance(q, UniformQuantizer):
            _learnable_step(q)
    if s.satnl:
        saturate(student)
        observe(student, images[:ACT_CALIB_IMAGES])


def quantize_distill(
    model: nn.Module,
    family: str,
    calib: Source,
    settings: DistillSettings,
    progress: bool = False,
    trace: GradNormTrace | None = None,
    start_from: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, ReconResult], float]:
    """A fake-quantized copy of `model` (a `family` model) trained on `calib` (an image tensor or a
    dataset of preprocessed images, streamed), its loss histories (the start's reconstruction under
    `init/`), and the seconds the start took. `start_from`, a quantized tree of `model` from the
    family's path at the same bits (`check_start`), is copied and trained instead of making the start
    again. Neither `model` nor `start_from` is modified."""
    s = settings
    s.check_family(family)
    start = time.perf_counter()
    torch.manual_seed(s.seed)  # NIPQ's noise draws
    device = torch.device(s.device)
    stream = ImageStream(calib, s.batch_size, seed=s.seed, flip_crop=s.flip_crop)
    images = first_images(stream.source, s.init_images).to(device)
    if start_from is None:
        student, init_results = _start(model, family, images, s, progress, trace)
    else:
        student, init_results = copy.deepcopy(start_from).to(device), {}
    teacher = copy.deepcopy(student)
    set_quant_state(teacher, False)
    make_trainable(student, s, images)
    seconds = time.perf_counter() - start
    del images
    results = {f"init/{name}": r for name, r in init_results.items()}
    plan = s.plan(s.resolved_steps(stream.size))
    taps = tap_names(student, transformer=family == TRANSFORMER)
    results |= train_student(student, teacher, stream, plan, taps, device, progress, desc=s.method)
    set_quant_state(student, True)
    return student.eval(), results, seconds


def check_start(settings: DistillSettings, start_settings: object) -> None:
    """Refuse a start (`quantize_distill(start_from=)`) whose tree or grids differ from what the
    settings would build: another path, other bits, another activation placement."""
    theirs = {k: getattr(start_settings, k, None) for k in ("wbits", "abits", "first_last_bits", "placement")}
    ours = {"wbits": settings.wbits, "abits": settings.abits, "first_last_bits": settings.first_last_bits}
    if isinstance(start_settings, CNNSettings):
        ours["placement"] = settings.placement
    elif not isinstance(start_settings, TransformerSettings):
        raise QuantError(f"a {settings.method} start must come from block reconstruction or RepQ-ViT, "
                         f"not {type(start_settings).__name__}")  # fmt: skip
    else:
        theirs.pop("placement")
    wrong = {k: (v, ours[k]) for k, v in theirs.items() if v != ours[k]}
    if wrong:
        diff = ", ".join(f"{k} {a!r} (training: {b!r})" for k, (a, b) in wrong.items())
        raise QuantError(f"the start was quantized with {diff}")


def rebuild_distill(
    model: nn.Module, family: str, settings: DistillSettings, input_shape: tuple[int, ...]
) -> nn.Module:
    """The module tree `quantize_distill` trains for `model`, uncalibrated (a saved state loads into it)."""
    if family == TRANSFORMER:
        qmodel = rebuild_transformer(model, settings.transformer_settings(), input_shape)
    else:
        qmodel = rebuild_cnn(model, settings.cnn_settings(), input_shape)
    if settings.satnl:
        saturate(qmodel)
    return qmodel

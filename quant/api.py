"""The quantizer's front door: `quantize(model, calib, settings)` -> `QuantizedModel`, and `load`.

`quantize` dispatches on the model: a network with attention goes to the transformer path
(`quant.vit`), any other conv/linear network to the CNN path (`quant.cnn`), unless the settings
name a method of the distill path (`quant.distill`: `kd`, `nipq`), which trains a quantized copy of
either family on the images. Each path has its own settings dataclass, and a method name
(`quant.methods`) picks a preset of them. A model no path can take is refused before any work, in
one line naming what is unsupported.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .cnn import CNNSettings, quantize_cnn, rebuild_cnn
from .errors import QuantError
from .grad_trace import GradNormTrace
from .methods import CNN, DEFAULT_METHOD, DISTILL, METHODS, TRANSFORMER, get_method
from .modules import QuantConv2d, QuantLinear, set_quant_state
from .quantizers import AdaRoundQuantizer, UniformQuantizer, check_calibration

FORMAT = "dfq-quantized/2"
Settings = Any  # CNNSettings | TransformerSettings | DistillSettings


@dataclass(frozen=True)
class Family:
    """One path: its settings type, how it quantizes, and how it rebuilds a saved tree."""

    settings: type
    quantize: Callable[..., tuple]
    rebuild: Callable[[nn.Module, Any, tuple[int, ...]], nn.Module]


def _families() -> dict[str, Family]:
    from .distill import DistillSettings, quantize_distill, rebuild_distill
    from .vit import TransformerSettings, quantize_transformer, rebuild_transformer

    def cnn(model: nn.Module, calib: torch.Tensor, s: CNNSettings, progress: bool, trace=None) -> tuple:
        qmodel, results = quantize_cnn(model, calib, s, progress, trace)
        return qmodel, results, None

    def distill(model: nn.Module, calib: Any, s: Any, progress: bool, trace=None, start_from=None) -> tuple:
        return quantize_distill(model, model_family(model), calib, s, progress, trace, start_from)

    def rebuild(model: nn.Module, s: Any, input_shape: tuple[int, ...]) -> nn.Module:
        return rebuild_distill(model, model_family(model), s, input_shape)

    return {
        CNN: Family(CNNSettings, cnn, rebuild_cnn),
        TRANSFORMER: Family(TransformerSettings, quantize_transformer, rebuild_transformer),
        DISTILL: Family(DistillSettings, distill, rebuild),
    }


def _paths_for(family: str) -> list[str]:
    """The paths whose methods take a model of `family`."""
    return list(dict.fromkeys(m.family for m in METHODS.values() if family in m.model_families))


def model_family(model: nn.Module) -> str:
    """`transformer` or `cnn`, or `QuantError` naming the part of `model` neither path quantizes."""
    from .vit import transformer_problem

    is_transformer, problem = transformer_problem(model)
    if problem is not None:
        raise QuantError(problem)
    if is_transformer:
        return TRANSFORMER
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and type(m).forward is not nn.Conv2d.forward:
            raise QuantError(
                f"{name or 'the model'}: {type(m).__name__} has its own forward (unsupported conv)"
            )
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
        raise QuantError("no conv or linear layer found to quantize")
    return CNN


def settings_for(family: str, method: str | None = None, **values: Any) -> Settings:
    """Settings of `family`'s path for `method` (None: the family's default) with `values` set."""
    method = method or DEFAULT_METHOD[family]
    cls = _families()[get_method(method, family).family].settings
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise QuantError(f"{cls.__name__} has no setting {unknown[0]!r}")
    return cls(method=method, **values)


def method_settings(method: str, **values: Any) -> Settings:
    """The settings a named method (`quant.METHODS`) runs with, `values` overriding its preset."""
    return settings_for(get_method(method).model_families[0], method, **values)


class QuantizedModel(nn.Module):
    """What `quantize` returns: the fake-quantized model, callable on a batch of images, and what the
    run produced: `settings`, `family`, `model_spec` (how to rebuild the float model, if known),
    per-unit reconstruction `history` (loss per iteration) and `seconds_per_iter`, `seconds`, and with
    `quantize(trace_grad_norm=True)` the gradient-norm trace `grad_norm` (`quant.grad_trace`; not saved)."""

    def __init__(
        self,
        model: nn.Module,
        settings: Settings,
        family: str,
        input_shape: tuple[int, ...],
        model_spec: dict | None = None,
        history: dict[str, list[float]] | None = None,
        seconds_per_iter: dict[str, float] | None = None,
        seconds: float | None = None,
        calibration_seconds: float | None = None,
        grad_norm: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.family = family
        self.input_shape = tuple(input_shape)
        self.model_spec = dict(model_spec) if model_spec else None
        self.history = dict(history or {})
        self.seconds_per_iter = dict(seconds_per_iter or {})
        self.seconds = seconds
        self.calibration_seconds = calibration_seconds
        self.grad_norm = grad_norm

    @property
    def method(self) -> str:
        return self.settings.method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def save(self, path: str | os.PathLike) -> None:
        """One `torch.save` file: the settings, the model spec and the fake-quant state dict."""
        torch.save(
            {
                "format": FORMAT,
                "family": self.family,
                "settings": dataclasses.asdict(self.settings),
                "model_spec": self.model_spec,
                "input_shape": list(self.input_shape),
                "history": {k: torch.tensor(v) for k, v in self.history.items()},
                "seconds_per_iter": self.seconds_per_iter,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            },
            path,
        )


def quantize(
    model: nn.Module,
    calib: torch.Tensor | Dataset,
    settings: Settings | str | None = None,
    *,
    model_spec: dict | None = None,
    progress: bool = False,
    trace_grad_norm: bool = False,
    start: QuantizedModel | None = None,
) -> QuantizedModel:
    """Quantize a copy of `model`, calibrated on `calib` (N, C, H, W images, preprocessed; the
    distill methods also take a Dataset of (image, label) pairs, which they stream).

    `settings`: a `CNNSettings` / `TransformerSettings` / `DistillSettings`, a method name
    (`quant.METHODS`), or None for the family's defaults. `model_spec` ({"model", "checkpoint", "num_classes"} and optionally
    "preprocess", a data config's preprocessing: what `quant.models.spec_args` turns into
    `load_model`'s arguments) lets `load` rebuild the float model. `trace_grad_norm` records the
    gradient norms of the quantization parameters in every reconstructed unit (for `kd` / `nipq`,
    those of the reconstruction they start from)
    (`QuantizedModel.grad_norm`, the dict `quant.grad_trace.save_trace` writes); the result is the
    same with or without it. `start` (distill methods only): a `QuantizedModel` of `model` at the
    same bits from the CNN or transformer path (e.g. genie-m), trained instead of a start of
    `settings.init` made anew, so one reconstruction serves several trainings. `model` itself is
    not modified.
    """
    if isinstance(calib, torch.Tensor) or not isinstance(calib, Dataset):
        check_calibration(calib)
    family = model_family(model)
    if settings is None or isinstance(settings, str):
        settings = settings_for(family, settings)
    paths = {name: _families()[name] for name in _paths_for(family)}
    name = next((n for n, p in paths.items() if isinstance(settings, p.settings)), None)
    if name is None:
        takes = " or ".join(p.settings.__name__ for n, p in paths.items() if n != family)
        takes += (" or " if takes else "") + paths[family].settings.__name__  # the family's own last
        raise QuantError(
            f"a {family} takes {takes}, got {type(settings).__name__} "
            f"(method {getattr(settings, 'method', '?')!r})"
        )
    settings.validate()
    get_method(settings.method, family)
    if not isinstance(calib, torch.Tensor) and name != DISTILL:
        raise QuantError(
            f"method {settings.method!r} calibrates on an image tensor, not a {type(calib).__name__}"
        )
    if start is not None:
        from .distill import check_start

        if name != DISTILL:
            raise QuantError(f"method {settings.method!r} makes its own start; `start` is for kd / nipq")
        check_start(settings, start.settings)
    began = time.perf_counter()
    trace = GradNormTrace() if trace_grad_norm else None
    extra = {} if start is None else {"start_from": start.model}
    qmodel, results, calibration_seconds = paths[name].quantize(
        model, calib, settings, progress, trace, **extra
    )
    return QuantizedModel(
        qmodel,
        settings,
        family,
        _input_shape(calib),
        model_spec,
        history={n: r.loss for n, r in results.items()},
        seconds_per_iter={n: r.seconds_per_iter for n, r in results.items()},
        seconds=time.perf_counter() - began,
        calibration_seconds=calibration_seconds,
        grad_norm=trace.to_dict() if trace is not None else None,
    ).eval()


def _input_shape(calib: torch.Tensor | Dataset) -> tuple[int, ...]:
    """The shape of one image of `calib`."""
    if isinstance(calib, torch.Tensor):
        return tuple(calib.shape[1:])
    from .stream import first_images

    return tuple(first_images(calib, 1).shape[1:])


def load(path: str | os.PathLike, model: nn.Module | None = None) -> QuantizedModel:
    """A `QuantizedModel` saved by `QuantizedModel.save`. The float model is rebuilt from the saved
    spec (`quant.models.load_model`) unless given as `model` (the same architecture)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # bytes no torch.save wrote (torch's message is about weights_only)
        raise QuantError(f"cannot read {path}: not a file torch.save wrote") from None
    except Exception as e:  # a missing file, a truncated archive
        first = (str(e).strip().splitlines() or [""])[0]
        raise QuantError(f"cannot read {path}: {type(e).__name__}: {first}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise QuantError(f"{path}: not a quantized model file ({FORMAT})")
    family = _families()[get_method(blob["settings"]["method"]).family]  # the path that made it
    settings = family.settings(**blob["settings"])
    if model is None:
        if not blob["model_spec"]:
            raise QuantError(f"{path} was saved without a model spec: pass the float model as model=")
        from .models import load_model, spec_args

        model, _ = load_model(**spec_args(blob["model_spec"]))
    input_shape = tuple(blob["input_shape"])
    qmodel = family.rebuild(model, settings, input_shape)
    load_quantized_state(qmodel, blob["state_dict"])
    return QuantizedModel(
        qmodel,
        settings,
        blob["family"],
        input_shape,
        blob["model_spec"],
        history={k: v.tolist() for k, v in blob["history"].items()},
        seconds_per_iter=blob["seconds_per_iter"],
    ).eval()


@torch.no_grad()
def load_quantized_state(qmodel: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a calibrated state into a freshly rebuilt (uncalibrated) quantized tree.

    Calibration gave some tensors their shapes (per-channel grids folded to per tensor, a bias or a
    LayerNorm affine created by re-parameterization, learned roundings): those are adopted first, so
    the strict load below then checks every name."""
    modules = dict(qmodel.named_modules())
    for name, module in modules.items():
        if isinstance(module, (QuantConv2d, QuantLinear)) and f"{name}.ada.alpha" in state:
            module.start_adaround(learn_scale=False)
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue  # the strict load names it
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and current.shape == value.shape:
            continue
        if attr in owner._buffers:
            owner._buffers[attr] = value.clone()
        elif attr in owner._parameters or current is None:
            owner._parameters[attr] = nn.Parameter(value.clone(), requires_grad=False)
    for module in qmodel.modules():
        if isinstance(module, UniformQuantizer) and module.ch_axis is not None and module.scale.dim() == 0:
            module.ch_axis = None  # a per-channel input grid that re-parameterization made per tensor
    qmodel.load_state_dict(state, strict=True)
    for module in qmodel.modules():
        if isinstance(module, AdaRoundQuantizer):
            module.soft = False
    qmodel.requires_grad_(False)
    set_quant_state(qmodel, True)
    qmodel.eval()

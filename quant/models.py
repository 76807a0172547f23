"""Turn a model spec into (model in eval mode, data config), so everything downstream is spec-agnostic.

Specs, tried in this order:
- a dfq zoo name (`quant.zoo.REGISTRY`, e.g. `cifar_resnet20`, `mobilenetv1_x0.25`);
- `timm:<name>` or a bare timm name (`resnet18`, `vit_tiny_patch16_224.augreg_in21k`);
- `tv:<name>` / `torchvision:<name>` (torchvision.models.get_model);
- `package.module:factory` or `path/to/net.py:factory` (imported, or loaded from the file, and called;
  it returns the model, or `(model, data_config)`).

The data config travels with the model, as timm's `pretrained_cfg` does: keys `input_size`, `mean`,
`std`, `crop_pct`, `interpolation`, `num_classes`. A `Preprocess` (the CLI's `--input-size`, `--mean`,
`--std`) overrides it or completes it; a model that ends up without an input size, mean, std or class
count is refused, naming the flags to give, rather than silently given ImageNet's preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import QuantError
from .zoo import REGISTRY

IMAGENET_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "num_classes": 1000,
}
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
#: what every model's data config must hold, and the flag that supplies it
REQUIRED = (("input_size", "--input-size"), ("mean", "--mean"), ("std", "--std"))


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing stated outside the model (the CLI's `--input-size`, `--mean`, `--std`; a saved
    run's spec): each field set overrides the model's data config, or completes it where the model
    carries none (a factory returning a bare module)."""

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.input_size is not None and (len(self.input_size) != 3 or min(self.input_size) < 1):
            raise QuantError(f"input size must be (channels, height, width) >= 1, got {self.input_size}")
        if self.std is not None and min(self.std) <= 0:
            raise QuantError(f"std must be > 0, got {self.std}")

    def given(self) -> dict[str, Any]:
        """The fields that are set, as data config entries."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def of(cls, data_config: Mapping[str, Any]) -> Preprocess:
        """The preprocessing part of a data config (what a saved run records to rebuild it)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data_config.items() if k in names})


def load_model(
    spec: str,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    preprocess: Preprocess | None = None,
) -> tuple[nn.Module, dict]:
    """Build the model named by `spec`, load `checkpoint` (strict) if given; return it in eval mode
    with its data config (`preprocess` overriding the model's own; `num_classes` completing it where
    a factory does not take it). A config left without input size, mean, std or class count is
    refused in one line naming the flags that supply them."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise QuantError(f"checkpoint {checkpoint} does not exist")
    model, config = _build(spec, num_classes, pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    config = {**(config or {}), **(preprocess.given() if preprocess else {})}
    config["num_classes"] = num_classes or config.get("num_classes") or _guess_num_classes(model)
    missing = [flag for key, flag in REQUIRED if not config.get(key)]
    missing += ["--num-classes"] if not config["num_classes"] else []
    if missing:
        raise QuantError(
            f"model '{spec}' comes without its preprocessing: give {', '.join(missing)} "
            "(or have its factory return (model, data_config))"
        )
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
    channels = config["input_size"][0]
    for key, flag in REQUIRED[1:]:
        if len(config[key]) != channels:
            raise QuantError(
                f"{key} {config[key]} has {len(config[key])} values for {channels} input channels ({flag})"
            )
    config.setdefault("crop_pct", 1.0)
    config.setdefault("interpolation", "bilinear")
    return model.eval(), config


def resolve_spec(spec: str) -> str:
    """`spec` with a model file's path made absolute (Ray actors and later `quant.load` calls may run
    elsewhere); every other spec unchanged."""
    target, _, attr = spec.rpartition(":")
    if _is_file_spec(target):
        return f"{os.path.abspath(os.path.expanduser(target))}:{attr}"
    return spec


def model_spec(
    spec: str, checkpoint: str | None, num_classes: int | None, data_config: Mapping[str, Any]
) -> dict[str, Any]:
    """What a saved run records to rebuild its float model anywhere (`spec_args` reads it back): the
    spec with a model file's path made absolute, the checkpoint's absolute path, the class count
    asked for, and the preprocessing the run used (so a bare-module factory needs no flags again)."""
    return {
        "model": resolve_spec(spec),
        "checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
        "num_classes": num_classes,
        "preprocess": {
            k: list(v) if isinstance(v, tuple) else v for k, v in Preprocess.of(data_config).given().items()
        },
    }


def spec_args(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`load_model`'s keyword arguments from a saved model spec (`model_spec`; older files lack
    "preprocess": the model's own config then)."""
    preprocess = spec.get("preprocess")
    return {
        "spec": spec["model"],
        "checkpoint": spec.get("checkpoint"),
        "num_classes": spec.get("num_classes"),
        "preprocess": Preprocess.of(preprocess) if preprocess else None,
    }


def check_forward(model: nn.Module, data_config: Mapping[str, Any]) -> None:
    """Run one zero image of the configured input size through `model`: a wrong `--input-size` or
    `--num-classes` fails here, in one line, instead of deep inside calibration."""
    size = tuple(data_config["input_size"])
    shown = "x".join(str(v) for v in size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *size, device=device))
    except Exception as e:  # any failure of the user's forward is a config mismatch to report
        raise QuantError(
            f"the model's forward fails on one {shown} image (the input size; set --input-size): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise QuantError(f"the model returns {what} for one {shown} image, not (1, classes) logits")
    n = data_config.get("num_classes")
    if n is not None and out.shape[1] != n:
        raise QuantError(f"the model gives {out.shape[1]} logits for one image, num_classes is {n}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _build(spec: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, dict | None]:
    if spec in REGISTRY:
        return _build_zoo(spec, num_classes, pretrained)
    prefix, _, name = spec.partition(":")
    if prefix == "timm":
        return _build_timm(name, num_classes, pretrained, spec)
    if prefix in ("tv", "torchvision"):
        return _build_torchvision(name, num_classes, pretrained, spec)
    if ":" in spec:
        return _build_factory(spec, num_classes, pretrained)
    import timm

    if timm.is_model(spec):
        return _build_timm(spec, num_classes, pretrained, spec)
    if _is_file_spec(spec):
        raise QuantError(f"model file spec '{spec}' names no factory: give {spec}:<function>")
    raise QuantError(_unknown(spec))


def _unknown(spec: str) -> str:
    return f"unknown model '{spec}': not a dfq zoo name, timm model, torchvision model or module:factory"


def _build_zoo(name: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, dict]:
    factory, config = REGISTRY[name]
    if pretrained:
        raise QuantError(f"zoo model '{name}' has no hub weights: pass its checkpoint file instead")
    if num_classes is not None and num_classes != config["num_classes"]:
        raise QuantError(f"zoo model '{name}' has {config['num_classes']} classes, not {num_classes}")
    return factory(), dict(config)


def _build_timm(name: str, num_classes: int | None, pretrained: bool, spec: str) -> tuple[nn.Module, dict]:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        raise QuantError(_unknown(spec))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as e:  # hub download failures when offline
        raise QuantError(f"cannot create timm model '{name}' (pretrained={pretrained}): {e}") from None
    cfg = resolve_data_config({}, model=model)
    config = {
        "input_size": tuple(cfg["input_size"]),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "crop_pct": float(cfg["crop_pct"]),
        "interpolation": cfg["interpolation"],
        "num_classes": model.num_classes,
    }
    return model, config


def _build_torchvision(
    name: str, num_classes: int | None, pretrained: bool, spec: str
) -> tuple[nn.Module, dict]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise QuantError(_unknown(spec))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        raise QuantError(f"cannot create torchvision model '{name}' (pretrained={pretrained}): {e}") from None
    return model, {**_torchvision_config(name), "num_classes": num_classes or _guess_num_classes(model)}


def _torchvision_config(name: str) -> dict:
    """The eval preprocessing torchvision's weights declare (no download needed), else ImageNet's."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
        return {
            "input_size": (3, crop, crop),
            "mean": tuple(preset.mean),
            "std": tuple(preset.std),
            "crop_pct": crop / resize,
            "interpolation": preset.interpolation.value,
        }
    except (ValueError, AttributeError, TypeError, IndexError):
        return dict(IMAGENET_CONFIG)


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py")


def _build_factory(spec: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, dict | None]:
    """Call a `module:factory` or `file.py:factory` target; its data config is what it returns, a
    `data_config` attribute of the model, or a timm model's `pretrained_cfg` (None if none of these:
    timm's resolver would answer ImageNet's defaults for any module, which is no config at all)."""
    target, _, attr = spec.rpartition(":")
    if _is_file_spec(target):
        module = _import_file(target)
        missing = f"model file {target} has no callable '{attr}'"
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise QuantError(f"{_unknown(spec)} (import failed: {e})") from None
        missing = f"{_unknown(spec)} (module '{target}' has no callable '{attr}')"
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise QuantError(missing)
    kwargs: dict = {}
    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    if pretrained:
        kwargs["pretrained"] = True
    try:
        out = factory(**kwargs)
    except Exception as e:  # the user's code: report it in one line, naming the call
        raise QuantError(
            f"model factory '{spec}' failed with {kwargs or 'no arguments'}: {type(e).__name__}: "
            f"{_first_line(e)}"
        ) from None
    model, config = out if isinstance(out, tuple) else (out, None)
    if not isinstance(model, nn.Module):
        raise QuantError(f"model factory '{spec}' returned {type(model).__name__}, not an nn.Module")
    if config is None:
        config = getattr(model, "data_config", None)
    if config is None and (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        from timm.data import resolve_data_config  # reads pretrained_cfg / default_cfg

        config = {**resolve_data_config({}, model=model), "num_classes": None}
    return model, None if config is None else dict(config)


def _import_file(target: str) -> ModuleType:
    """Load a model file as a module of its own (named after its absolute path, so two `net.py`
    never collide); its folder joins the end of sys.path so it can import its neighbours."""
    path = os.path.abspath(os.path.expanduser(target))
    if not os.path.isfile(path):
        raise QuantError(f"model file {target} does not exist")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"_dfq_model_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise QuantError(f"model file {target} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    if os.path.dirname(path) not in sys.path:
        sys.path.append(os.path.dirname(path))
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # SyntaxError, ImportError, anything the file raises at import
        del sys.modules[name]
        raise QuantError(f"cannot import model file {target}: {type(e).__name__}: {_first_line(e)}") from None
    return module


def _accepts(fn: Any, name: str) -> bool:
    """Whether `fn` takes a keyword `name` (True when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _guess_num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


# ----------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a raw state dict, or one under 'state_dict'/'model'/
    'model_state_dict'; a 'module.' (DDP) or '_orig_mod.' (torch.compile) prefix is removed."""
    if not os.path.isfile(path):
        raise QuantError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refuses anything that is not plain tensors/containers
        raise QuantError(
            f"cannot read checkpoint {path} as tensors: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    for key in STATE_DICT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QuantError(
            f"checkpoint {path} holds no state dict (looked at the top level and {STATE_DICT_KEYS})"
        )
    state = {}
    for k, v in obj.items():
        for prefix in STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        state[k] = v
    return state


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Strict load of `path` into `model`; every mismatch is reported on one line."""
    state = read_state_dict(path)
    own = model.state_dict()
    for k in own:  # pre-1.0 BatchNorm checkpoints lack this counter; eval never reads it
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:3])}{more}")
        raise QuantError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)

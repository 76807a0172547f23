"""Turn a model spec into (model in eval mode, data config), so everything downstream is spec-agnostic.

Specs, tried in this order:
- a dfq zoo name (`quant.zoo.REGISTRY`, e.g. `cifar_resnet20`, `mobilenetv1_x0.25`);
- `timm:<name>` or a bare timm name (`resnet18`, `vit_tiny_patch16_224.augreg_in21k`);
- `tv:<name>` / `torchvision:<name>` (torchvision.models.get_model);
- `package.module:factory` (imported and called; it may return `(model, data_config)`).

The data config travels with the model, as timm's `pretrained_cfg` does: keys `input_size`, `mean`,
`std`, `crop_pct`, `interpolation`, `num_classes`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

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


def load_model(
    spec: str, checkpoint: str | None = None, num_classes: int | None = None, pretrained: bool = False
) -> tuple[nn.Module, dict]:
    """Build the model named by `spec`, load `checkpoint` (strict) if given; return it in eval mode
    with its data config."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise QuantError(f"checkpoint {checkpoint} does not exist")
    model, config = _build(spec, num_classes, pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    config = dict(config)
    config["num_classes"] = config.get("num_classes") or _guess_num_classes(model)
    return model.eval(), config


def _build(spec: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, dict]:
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


def _build_factory(spec: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, dict]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise QuantError(f"{_unknown(spec)} (import failed: {e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise QuantError(f"{_unknown(spec)} (module '{module_name}' has no callable '{attr}')")
    kwargs: dict = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained:
        kwargs["pretrained"] = True
    try:
        out = factory(**kwargs)
    except TypeError as e:
        raise QuantError(f"model factory '{spec}' failed with {kwargs or 'no arguments'}: {e}") from None
    model, config = out if isinstance(out, tuple) else (out, None)
    if not isinstance(model, nn.Module):
        raise QuantError(f"model factory '{spec}' returned {type(model).__name__}, not an nn.Module")
    if config is None:
        config = getattr(model, "data_config", None)
    if config is None:
        from timm.data import resolve_data_config  # reads pretrained_cfg / default_cfg when present

        config = {**IMAGENET_CONFIG, **resolve_data_config({}, model=model), "num_classes": None}
    return model, dict(config)


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

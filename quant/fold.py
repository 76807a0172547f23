"""Fold eval-mode BatchNorm into the convolution that feeds it.

Quantized inference runs conv+BN as one integer conv, so the weight grid must be chosen for the folded
weight `w * gamma / sqrt(var + eps)` (per output channel), not for the raw conv weight. Which BN
follows which conv is found by running the model once and watching tensors (a BN is folded only when
its input *is* the output of a conv), so functional forwards (`F.relu(self.bn1(self.conv1(x)))`),
timm's `BatchNormAct2d` and torchvision's `Conv2dNormActivation` are all handled without knowing
the model's code. A BN whose input is anything else (pre-activation nets) stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold `bn` into `conv` in place: `bn(conv(x)) == conv'(x)` for eval-mode statistics."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        w = conv.weight.double() * factor.reshape(-1, *[1] * (conv.weight.dim() - 1))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
        b = (b - bn.running_mean.double()) * factor + beta
        conv.weight.data = w.to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.data = b.to(conv.bias.dtype)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a folded BN: nothing, or the activation of a timm `BatchNormAct2d`."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes exactly the conv's output tensor."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    seen_bn: set[nn.Module] = set()
    handles = []

    def after_conv(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        produced[id(out)] = (mod, out)  # keep `out` alive so its id is not reused

    def before_bn(mod: nn.Module, inp: tuple) -> None:
        if mod in seen_bn:
            return
        seen_bn.add(mod)
        hit = produced.get(id(inp[0]))
        if hit is not None and hit[1] is inp[0] and hit[0].out_channels == mod.num_features:
            pairs.append((names[hit[0]], names[mod]))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    convs_used = [c for c, _ in pairs]
    # A conv called twice (shared weights) could pair with two BNs; folding would be wrong then.
    return [(c, b) for c, b in pairs if convs_used.count(c) == 1]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (Sequential indices included)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every conv->BN pair of `model` (eval mode, in place); returns how many were folded."""
    was_training = model.training
    model.eval()
    pairs = find_conv_bn_pairs(model, example)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        fold_conv_bn(conv, bn)
        set_submodule(model, bn_name, _bn_replacement(bn))
    model.train(was_training)
    return len(pairs)

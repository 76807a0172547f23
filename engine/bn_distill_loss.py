"""The batch-norm statistics objective of data-free distillation (ZeroQ, Genie-D).

A trained BN layer remembers the mean and variance its inputs had over the training set
(`running_mean`, `running_var`). Images whose batch statistics at every BN input match those
running statistics look, to the network, like the training distribution: that is the whole
signal a classifier-only generator has. Forward hooks collect the statistics during an ordinary
forward pass, so any model with BN layers works without surgery.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.bn_distill_settings import LOSS_FORMS

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BN layers that carry running statistics, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BN_TYPES) and m.track_running_stats and m.running_mean is not None
    ]


def stats_distance(d_mean: torch.Tensor, d_std: torch.Tensor, form: str) -> torch.Tensor:
    """One layer's term from its per-channel mean and std errors.

    "mse" (Genie-D): ||d_mean||^2 / C + ||d_std||^2 / C, the mean squared error per channel: a layer
    far off pulls harder, so the optimisation spends its few hundred steps on the worst-matched
    layers. "norm" (ZeroQ): ||d_mean|| + ||d_std||, unsquared, every layer's gradient of equal size.
    """
    if form == "mse":
        return (d_mean.square().sum() + d_std.square().sum()) / d_mean.shape[-1]
    return torch.linalg.vector_norm(d_mean) + torch.linalg.vector_norm(d_std)


class BNStatsMatcher:
    """Forward hooks that turn each BN input's batch statistics into one loss term.

    Per layer: `stats_distance` between (mu_batch, sigma_batch) and (running_mean,
    sqrt(running_var + eps)), with statistics over every dim but the channel one (unbiased
    variance, as BN's running_var is).

    Use as a context manager; after each forward, `loss()` is the sum over layers since `reset()`.
    Targets are copied once at entry, so the hooks do no host work and no host syncs.
    """

    def __init__(self, model: nn.Module, form: str = "mse") -> None:
        if form not in LOSS_FORMS:
            raise ValueError(f"unknown BN loss form {form!r}; choose one of {', '.join(LOSS_FORMS)}")
        self.form = form
        self.layers = bn_layers(model)
        self._terms: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> BNStatsMatcher:
        for layer in self.layers:
            mean = layer.running_mean.detach().clone()
            std = torch.sqrt(layer.running_var.detach() + layer.eps)
            self._targets[id(layer)] = (mean, std)
            self._handles.append(layer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._terms.clear()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        if x.numel() // x.shape[1] < 2:  # one value per channel: no variance to match
            return
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        target_mean, target_std = self._targets[id(module)]
        std = torch.sqrt(var + module.eps)
        self._terms.append(stats_distance(mean - target_mean, std - target_std, self.form))

    def reset(self) -> None:
        """Forget the terms of the previous forward (call before each one)."""
        self._terms.clear()

    def loss(self) -> torch.Tensor:
        """Sum of the per-layer terms collected since `reset()`; raises if the model has no BN."""
        if not self._terms:
            raise ValueError("no batch-norm layer with running statistics saw an input")
        return torch.stack(self._terms).sum()


def bn_stats_loss(model: nn.Module, x: torch.Tensor, form: str = "mse") -> torch.Tensor:
    """The BN-statistics loss of batch `x` under `model` (one forward pass, differentiable in `x`).

    The model should be in eval mode, so the forward normalizes with (and does not update) the
    running statistics we compare against.
    """
    with BNStatsMatcher(model, form) as matcher:
        model(x)
        return matcher.loss()

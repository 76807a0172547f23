"""Adam for the reconstruction loop: torch's fused Adam kernel, called without `torch.optim`'s wrapper.

`torch.optim.Adam(fused=True).step()` spends ~0.25 ms of Python per call on CPU (grouping tensors by
device and dtype, state lookups, hooks) around a ~25 us kernel; the loop calls two of them every
iteration, which was ~5% of a small unit's iteration. The parameter groups here never change, so
the state lists are built once and each step is one `_foreach_add_` and one `_fused_adam_` per
group: the same kernel, the same arithmetic, the same result as `torch.optim.Adam(fused=True)`
(pinned by a test). Devices without the fused kernel get `torch.optim.Adam` behind the same calls.
"""

from __future__ import annotations

import torch


class LoopAdam:
    """Adam over fixed groups `[(params, lr), ...]`; `step(lr_scale)` scales every group's lr."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], betas=(0.9, 0.999), eps: float = 1e-8):
        groups = [(list(ps), float(lr)) for ps, lr in groups if ps]
        self.params = [p for ps, _ in groups for p in ps]
        self.betas, self.eps = betas, eps
        devices = {p.device.type for p in self.params}
        self._fallback = None
        if not devices <= {"cpu", "cuda"} or not hasattr(torch, "_fused_adam_"):
            self._fallback = torch.optim.Adam(
                [{"params": ps, "lr": lr} for ps, lr in groups], betas=betas, eps=eps
            )
            self._base = [lr for _, lr in groups]
            return
        self.groups = []
        for ps, lr in groups:
            state = (
                [torch.zeros_like(p, memory_format=torch.preserve_format) for p in ps],
                [torch.zeros_like(p, memory_format=torch.preserve_format) for p in ps],
                [torch.zeros((), dtype=torch.float32, device=p.device) for p in ps],
            )
            self.groups.append((ps, lr, *state))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr_scale: float = 1.0) -> None:
        if self._fallback is not None:
            for group, base in zip(self._fallback.param_groups, self._base):
                group["lr"] = base * lr_scale
            self._fallback.step()
            return
        b1, b2 = self.betas
        for ps, lr, m, v, steps in self.groups:
            live = [i for i, p in enumerate(ps) if p.grad is not None]  # as torch.optim: no grad, no step
            if not live:
                continue
            if len(live) < len(ps):
                ps, m, v, steps = ([t[i] for i in live] for t in (ps, m, v, steps))
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                ps, [p.grad for p in ps], m, v, [], steps,
                amsgrad=False, lr=lr * lr_scale, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps,
                maximize=False, grad_scale=None, found_inf=None,
            )  # fmt: skip

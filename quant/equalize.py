"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization").

Why: after BN folding, a depthwise conv can carry per-channel gains that differ by 100x (a BN with a
tiny running variance), and the conv that feeds it then produces a channel whose values are 100x
smaller than its neighbours. A per-tensor activation grid rounds that channel to one or two levels
and the depthwise gain amplifies the error (on MobileNetV1 x0.25 one 8-bit activation grid alone
flips a fifth of the predictions: docs/notes.md).

For two convs joined by a positively homogeneous activation (`f(x / s) = f(x) / s` for `s > 0`:
ReLU, LeakyReLU, or none), scaling output channel `i` of the first by `1 / s_i` and input channel `i`
of the second by `s_i` leaves the network's function unchanged. Choosing `s_i = sqrt(r1_i / r2_i)`
(`r` = the channel's largest absolute weight) gives both convs the same per-channel range, and the
small activation channel grows by the same factor. Chains (conv -> conv -> conv ...) are swept until
the scales settle.

Which pairs qualify is found by running the model once: the second conv's input must *be* the first
conv's output, directly or through one homogeneous activation module, and no other operation may
read either tensor (a residual add would see the rescaled channels). Uses are counted with a
`TorchFunctionMode`, so functional forwards are seen too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: Activations with f(x / s) = f(x) / s for every s > 0 (ReLU6, SiLU, GELU, hardswish are not).
#: "No activation" qualifies too: a folded BN's `nn.Identity` returns the conv's output tensor itself.
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)


def is_depthwise(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups > 1
        and conv.groups == conv.in_channels == conv.out_channels
    )


def _equalizable(first: nn.Conv2d, second: nn.Conv2d) -> bool:
    if first.out_channels != second.in_channels:
        return False
    # the second conv must see every input channel on its own: plain conv (groups 1) or depthwise
    return (second.groups == 1 or is_depthwise(second)) and (first.groups == 1 or is_depthwise(first))


class _UseCounter(TorchFunctionMode):
    """Counts, per tensor, the torch calls that read it and return a tensor (metadata reads don't count)."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keep inputs alive so their ids are not reused

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)
        ):
            for a in [*args, *(kwargs or {}).values()]:
                for t in a if isinstance(a, (tuple, list)) else (a,):
                    if isinstance(t, torch.Tensor):
                        self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                        self.keep.append(t)
        return out


def find_equalizable_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(first conv, second conv) names of every pair that can be equalized without changing `model`."""
    names = {m: n for n, m in model.named_modules()}
    conv_out: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # conv output id -> (conv, tensor)
    act_out: dict[int, tuple[nn.Conv2d, nn.Module, torch.Tensor, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    candidates: list[tuple[nn.Conv2d, nn.Module | None, nn.Conv2d, torch.Tensor, torch.Tensor]] = []

    def conv_pre(mod: nn.Module, inp: tuple) -> None:
        x = inp[0]
        via = act_out.get(id(x))  # first: an in-place activation returns the conv's own output
        if via is not None and via[3] is x:
            candidates.append((via[0], via[1], mod, via[2], x))
            return
        src = conv_out.get(id(x))
        if src is not None and src[1] is x:
            candidates.append((src[0], None, mod, x, x))

    def conv_post(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        conv_out[id(out)] = (mod, out)

    def act_post(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        calls[mod] = calls.get(mod, 0) + 1
        src = conv_out.get(id(inp[0]))
        if src is not None and src[1] is inp[0] and isinstance(out, torch.Tensor):
            act_out[id(out)] = (src[0], mod, inp[0], out)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles += [m.register_forward_pre_hook(conv_pre), m.register_forward_hook(conv_post)]
        elif isinstance(m, HOMOGENEOUS):
            handles.append(m.register_forward_hook(act_post))
    counter = _UseCounter()
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for first, act, second, y, z in candidates:
        if calls.get(first) != 1 or calls.get(second) != 1 or (act is not None and calls.get(act) != 1):
            continue  # shared modules would be rescaled for every call site
        if not _equalizable(first, second):
            continue
        # the only readers: the activation (if any) and the second conv; an in-place activation
        # returns `y` itself, so both reads land on the same tensor
        expected = 1 if act is None else 2
        reads = counter.uses.get(id(y), 0) + (counter.uses.get(id(z), 0) if z is not y else 0)
        if reads == expected:
            pairs.append((names[first], names[second]))
    return pairs


def _in_channel_range(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().abs()
    return w.flatten(1).amax(1) if is_depthwise(conv) else w.amax(dim=(0, 2, 3))


def _out_channel_range(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(1)


@torch.no_grad()
def equalize_pair(first: nn.Conv2d, second: nn.Conv2d) -> torch.Tensor:
    """Equalize one pair in place; returns the scales `s` (first's channel i divided by s_i)."""
    r1 = _out_channel_range(first).double()
    r2 = _in_channel_range(second).double()
    s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1))
    s = s.clamp(1e-8, 1e8)
    first.weight.mul_((1 / s).to(first.weight.dtype).reshape(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.mul_((1 / s).to(first.bias.dtype))
    shape = (-1, 1, 1, 1) if is_depthwise(second) else (1, -1, 1, 1)
    second.weight.mul_(s.to(second.weight.dtype).reshape(shape))
    return s


def equalize(model: nn.Module, example: torch.Tensor, sweeps: int = 20, tol: float = 1e-4) -> int:
    """Cross-layer equalize `model` in place (BN must be folded first); returns the number of pairs.

    Sweeps over the pairs in execution order until no scale moves by more than `tol` (relative).
    """
    pairs = [
        (model.get_submodule(a), model.get_submodule(b)) for a, b in find_equalizable_pairs(model, example)
    ]
    for _ in range(sweeps):
        moved = max((float((equalize_pair(a, b).log().abs()).max()) for a, b in pairs), default=0.0)
        if moved < tol:
            break
    return len(pairs)

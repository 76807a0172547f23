"""Capturing a unit's inputs and outputs, and the walk over units that both paths calibrate with.

Block-wise calibration visits the model's units (CNN blocks and layers, transformer blocks) in
execution order. Unit k learns to map the input the *quantized* prefix gives it (`x_q`) to the
*float* model's output (`y_fp`), with the float input (`x_fp`) at hand for QDrop's mix. Capturing
those by running the model up to the unit costs a prefix forward per unit (quadratic in depth), so
a unit fed straight by the previous one takes its inputs from that unit's outputs instead: one unit
forward each (`walk_units`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .modules import set_quant_state


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
    if not xs:
        raise RuntimeError("the forward pass never reached the unit being captured")
    return torch.cat(xs), (torch.cat(ys) if outputs else None)


@torch.no_grad()
def run_unit(unit: nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """`unit` over `x` in batches, in its current quantization state (contiguous output)."""
    return torch.cat([unit(x[i : i + batch].contiguous()).contiguous() for i in range(0, x.shape[0], batch)])


@dataclass
class UnitStep:
    """What unit `index` is calibrated on: its quantized-prefix input and, with targets, the float
    model's input and output of the unit."""

    index: int
    name: str
    unit: nn.Module
    x_q: torch.Tensor
    x_fp: torch.Tensor | None
    y_fp: torch.Tensor | None


def walk_units(
    model: nn.Module, names: Sequence[str], data: torch.Tensor, chained: Sequence[bool], targets: bool = True
) -> Iterator[UnitStep]:
    """Yield each unit of `model` in order with its inputs; the caller calibrates it before the next.

    When a step is yielded, the unit and those before it are quantized, those after it float. After
    the caller returns, if `chained[k + 1]` (unit k + 1 takes
    exactly unit k's output), unit k + 1's inputs come from unit k's outputs, float and quantized,
    instead of a capture through the prefix. `targets=False` skips the float input and output (a
    calibration without reconstruction). On return the whole model is quantized.
    """
    units = [model.get_submodule(name) for name in names]
    prev_fp = prev_q = None  # the previous unit's float output and its quantized output
    for k, (name, unit) in enumerate(zip(names, units)):
        chain = k > 0 and chained[k] and prev_q is not None and (prev_fp is not None or not targets)
        x_fp = y_fp = None
        if targets:
            set_quant_state(model, False)
            if chain:
                x_fp, y_fp = prev_fp, run_unit(unit, prev_fp)
            else:
                x_fp, y_fp = capture(model, unit, data, outputs=True)
        set_quant_state(model, True)  # the prefix and this unit quantized, the rest float
        for later in units[k + 1 :]:
            set_quant_state(later, False)
        x_q = prev_q if chain else capture(model, unit, data, outputs=False)[0]
        yield UnitStep(k, name, unit, x_q, x_fp, y_fp)
        prev_fp = prev_q = None
        if k + 1 < len(names) and chained[k + 1]:
            set_quant_state(unit, True)
            prev_q, prev_fp = run_unit(unit, x_q), y_fp
        del x_fp, y_fp, x_q
    set_quant_state(model, True)

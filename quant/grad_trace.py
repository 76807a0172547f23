"""Gradient-norm trace of block reconstruction: per unit and iteration, the L2 norm of the loss's
gradient with respect to the quantization parameters, per group (AdaRound rounding variables, weight
steps, activation steps) and over all of them (`total`). After the warm-up the loss holds AdaRound's
rounding regulariser, whose gradient depends on the rounding variables alone and swamps the data's
in the rounding group; `rounding_data` and `total_data` leave it out (the reconstruction term's;
taken out of the float32 total, so resolved to about 1e-7 of the `rounding` norm).

Why: mixup-class prompting (arXiv 2507.21947, its Fig. 3) ties a lower gradient norm of the
quantization parameters late in calibration to a tighter generalization bound, and shows it lower
for mixed-class pools; the trace measures it for any pool. The bound's summary is the mean norm over
the last 10% of a unit's iterations (`TAIL`), per unit and averaged over units.

Recording keeps the norms on the device (no host read inside the loop) and only reads gradients,
which the optimiser steps read too, so a traced run computes the same quantized model as an untraced
one; off, the loop pays one `is None` test an iteration.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import QuantError

FORMAT = "dfq-grad-norm/1"
#: parameter groups, in the order they are stored
GROUPS = ("rounding", "weight_step", "act_step")
#: the rounding variables' gradient of the reconstruction term alone (after the warm-up, the
#: rounding regulariser's gradient, which does not depend on the data, is left out)
ROUNDING_DATA = "rounding_data"
#: the norm over all groups, and the same with `rounding_data` in place of `rounding`
TOTAL, TOTAL_DATA = "total", "total_data"
SERIES = ("rounding", ROUNDING_DATA, "weight_step", "act_step", TOTAL, TOTAL_DATA)
#: the share of a unit's last iterations the summary averages over
TAIL = 0.1


class UnitTrace:
    """One unit's gradient norms: `bind` names the parameter groups, `record(i)` stores iteration i's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, int] = {}
        self.norms: torch.Tensor | None = None
        self._total = self._total_data = torch.zeros(0, dtype=torch.long)

    def bind(self, groups: Mapping[str, Sequence[torch.Tensor]], iters: int, device: torch.device) -> None:
        """The parameters of each group (empty groups are left out) and the number of iterations."""
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown gradient group {sorted(unknown)[0]!r}: use {', '.join(GROUPS)}")
        self.groups = {g: list(groups[g]) for g in GROUPS if g in groups and groups[g]}
        present = (
            set(self.groups) | {TOTAL, TOTAL_DATA} | ({ROUNDING_DATA} if "rounding" in self.groups else set())
        )
        self.rows = {n: k for k, n in enumerate(n for n in SERIES if n in present)}
        self.norms = torch.zeros(len(self.rows), iters, device=device)
        data = [g for g in (ROUNDING_DATA, "weight_step", "act_step") if g in self.rows]
        self._total = torch.tensor([self.rows[g] for g in self.groups], dtype=torch.long, device=device)
        self._total_data = torch.tensor([self.rows[g] for g in data], dtype=torch.long, device=device)

    @torch.no_grad()
    def record(self, i: int, reg_grads: Sequence[torch.Tensor] | None = None) -> None:
        """Store the current gradients' norms as iteration `i` (a parameter without a gradient counts
        0); `reg_grads`, the rounding regulariser's gradients of the `rounding` parameters, are
        taken out of them for `rounding_data`."""
        assert self.norms is not None, "bind first"
        norms, rows = self.norms, self.rows
        for group, params in self.groups.items():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norms[rows[group], i] = _norm(grads)
            if group == "rounding":
                data = grads if reg_grads is None else torch._foreach_sub(grads, list(reg_grads))
                norms[rows[ROUNDING_DATA], i] = _norm(data)
        column = norms[:, i]
        column[rows[TOTAL]] = torch.linalg.vector_norm(column.index_select(0, self._total))
        column[rows[TOTAL_DATA]] = torch.linalg.vector_norm(column.index_select(0, self._total_data))

    def series(self) -> dict[str, list[float]]:
        """{series: norm per iteration}, those present (one host read)."""
        if self.norms is None:
            return {}
        return dict(zip(self.rows, self.norms.cpu().tolist()))


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all elements of `tensors` together."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


class GradNormTrace:
    """The traces of one quantization run, one `UnitTrace` per reconstructed unit in order."""

    def __init__(self) -> None:
        self.units: list[UnitTrace] = []

    def unit(self, name: str) -> UnitTrace:
        trace = UnitTrace(name)
        self.units.append(trace)
        return trace

    def to_dict(self, tail: float = TAIL) -> dict:
        """The trace as `save_trace` writes it (see `summarize`)."""
        units = [{"name": u.name, "series": u.series()} for u in self.units if u.norms is not None]
        for u in units:
            u["iters"] = len(u["series"][TOTAL])
        return summarize({"format": FORMAT, "units": units}, tail)


def _tail_mean(values: Sequence[float], tail: float) -> float | None:
    if not values:
        return None
    n = max(1, math.ceil(tail * len(values)))
    return sum(values[-n:]) / n


def summarize(trace: dict, tail: float = TAIL) -> dict:
    """`trace` with the summary the bound uses: each unit's `tail_mean` (per series, the mean over its
    last `tail` share of iterations, at least one) and `summary.tail_mean` (the units' average)."""
    if not 0.0 < tail <= 1.0:
        raise QuantError(f"tail must be a fraction in (0, 1], got {tail}")
    units = trace["units"]
    for u in units:
        u["tail_mean"] = {g: _tail_mean(v, tail) for g, v in u["series"].items()}
    overall = {}
    for g in SERIES:
        values = [u["tail_mean"][g] for u in units if u["tail_mean"].get(g) is not None]
        if values:
            overall[g] = sum(values) / len(values)
    trace["tail_fraction"] = tail
    trace["groups"] = [g for g in SERIES if g in overall]
    trace["summary"] = {"units": len(units), "tail_mean": overall}
    return trace


def save_trace(trace: dict, path: str | os.PathLike) -> Path:
    """Write `trace` (a `GradNormTrace.to_dict()`) as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, separators=(",", ":")) + "\n")
    return path


def load_trace(trace: dict | str | os.PathLike) -> dict:
    """A trace dict, from a dict or a `save_trace` file (checked for its format)."""
    if isinstance(trace, dict):
        data = trace
    else:
        try:
            data = json.loads(Path(trace).read_text())
        except (OSError, ValueError) as e:
            raise QuantError(f"cannot read gradient-norm trace {trace}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise QuantError(f"{trace if not isinstance(trace, dict) else 'trace'} is not a {FORMAT} trace")
    return data


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the per-iteration norms of one minibatch are noisy)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantError("plots need matplotlib: pip install 'dfq[plot]'") from None
    return plt


def plot_trace(trace: dict | str | os.PathLike, path: str | os.PathLike) -> Path:
    """grad_norm.png: one panel per series, the norm against the iteration per unit (moving average
    over 1% of the iterations), log scale."""
    trace = load_trace(trace)
    plt = _pyplot()
    order = [TOTAL, TOTAL_DATA, "rounding", ROUNDING_DATA, "weight_step", "act_step"]
    groups = [g for g in order if g in trace["groups"]]
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    colors = plt.get_cmap("tab20").colors  # a colour per unit up to 20 (tab10 repeats after 10)
    for ax, group in zip(axes.flat, groups):
        for k, u in enumerate(trace["units"]):
            values = u["series"].get(group)
            if values:
                smooth = _smooth(values, max(1, len(values) // 100))
                ax.plot(smooth, lw=1, label=u["name"], color=colors[k % len(colors)])
        ax.set_yscale("log")
        ax.set_title(f"{group} gradient norm", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("L2 norm (moving average)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trace_comparison(
    traces: Mapping[str, dict | str | os.PathLike], path: str | os.PathLike, group: str = TOTAL
) -> dict[str, float | None]:
    """The paper's Fig. 3 across runs ({label: trace or file}): left, `group`'s norm against the
    iteration averaged over units (moving average over 1%); right, each unit's tail mean per run.
    Returns {label: overall tail mean of `group`} (what the bound compares)."""
    if not traces:
        raise QuantError("no traces to compare")
    loaded = {label: load_trace(t) for label, t in traces.items()}
    plt = _pyplot()
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    names: list[str] = []
    for t in loaded.values():
        names += [u["name"] for u in t["units"] if u["name"] not in names]
    width = 0.8 / len(loaded)
    summary: dict[str, float | None] = {}
    for k, (label, t) in enumerate(loaded.items()):
        series = [u["series"][group] for u in t["units"] if u["series"].get(group)]
        summary[label] = t["summary"]["tail_mean"].get(group)
        if series:
            length = min(len(s) for s in series)
            mean = [sum(s[i] for s in series) / len(series) for i in range(length)]
            tail = summary[label]
            curve.plot(_smooth(mean, max(1, length // 100)), lw=1.2, label=f"{label} (tail {tail:.3g})")
        tails = {u["name"]: u["tail_mean"].get(group) for u in t["units"]}
        xs = [i + (k - (len(loaded) - 1) / 2) * width for i in range(len(names))]
        bars.bar(xs, [tails.get(n) or 0.0 for n in names], width, label=label)
    curve.set_yscale("log")
    curve.set_xlabel("iteration")
    curve.set_ylabel(f"{group} gradient norm (mean over units)")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    bars.set_yscale("log")
    bars.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    bars.set_ylabel(f"mean over the last {loaded[next(iter(loaded))]['tail_fraction']:.0%}")
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
    return summary

"""Result files of the benchmarks, in the formats benchmarks/README.md fixes (so every reader finds the same fields).

`accuracy.json` is a list of rows keyed by (model, dataset, wbits, abits, calib, method, iters, n_calib):
a new run replaces its own row and keeps the others. Beside it `accuracy.md` (the table) and
`accuracy.png` (top-1 against bits, one line per calibration source). A row measured on a CPU in the
tiny CI form never reaches the committed files: CI writes into a temp dir.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path

import torch

ROW_FIELDS = (
    "model", "dataset", "wbits", "abits", "calib", "method", "top1", "top5", "fp_top1",
    "n_calib", "n_eval", "iters", "seconds", "device", "date",
)  # fmt: skip
CALIB_SOURCES = ("real", "noise", "sd-mixup", "sd-single", "bn-distill", "enhancing-dfq", "none")
METHODS = ("fp32", "rtn", "brecq", "qdrop", "genie-m", "repq-vit", "kd", "nipq")
#: the methods that train on the images (`quant.distill`); their rows carry the training options
DISTILL_METHODS = ("kd", "nipq")
KEY = ("model", "dataset", "wbits", "abits", "calib", "method", "iters", "n_calib")


def row_key(row: dict) -> tuple:
    """What makes two rows the same measurement: KEY, the CNN activation placement, the draw, the run
    seed (rows without one ran with seed 0), CLE, the ViT weight rounding, input grid, head rotation,
    calibration batch size, for generated pools their engine seed, variant and training length, the
    sample selection and oversampling (`dfq bench generators --select`; rows without one selected
    nothing), a kd/nipq row's training options, and the augmented copies reconstruction read."""
    return tuple(row.get(k) for k in KEY) + (
        placement(row),
        row.get("draw"),
        row.get("seed") or 0,
        bool(row.get("equalize")),
        weight_rounding(row),
        input_grid(row),
        head_rotation(row),
        calib_images(row),
        row.get("pool_seed"),
        row.get("variant"),
        row.get("gen_iterations"),
        row.get("select"),
        row.get("oversample"),
        distill_options(row),
        row.get("augment") or 1,
    )


def distill_options(row: dict) -> tuple | None:
    """A kd/nipq row's training options that change the result: where it started (and the start's
    reconstruction budget and copies), the batch, the weight rate, SymReg, SatNL and the flip/crop draws."""
    if row.get("method") not in DISTILL_METHODS:
        return None
    return (
        row.get("init") or "rtn",
        row.get("init_iters") or 0,
        row.get("batch_size"),
        row.get("lr"),
        row.get("symreg") or 0.0,
        bool(row.get("satnl")),
        row.get("flip_crop", True),
        row.get("init_augment") or 1,
    )


def weight_rounding(row: dict) -> str | None:
    """A ViT row's weight rounding: GPTQ's or nearest, or with reconstruction the rounding it
    started from (rows written before GPTQ are `nearest`). A CNN reconstruction row's: where its
    learned rounding started (`gptq_start`; rows written before it existed started from nearest)."""
    if row.get("method") == "repq-vit":
        return row.get("weight_rounding") or "nearest"
    if row.get("method") in ("brecq", "qdrop", "genie-m") and row.get("iters"):
        return "gptq" if row.get("gptq_start") else "nearest"
    return None


def input_grid(row: dict) -> str | None:
    """A ViT row's patch-embedding input grid: `calibrated` (fitted to the calibration images; rows
    from before the option) or `preprocess` (over the normalization's range)."""
    if row.get("method") != "repq-vit":
        return None
    return row.get("input_grid") or "calibrated"


def head_rotation(row: dict) -> str | None:
    """A ViT row's attention-head rotation: `hadamard` (`quant.vit.rotate`) or `none` (rows from
    before the option)."""
    if row.get("method") != "repq-vit":
        return None
    return row.get("head_rotation") or "none"


def calib_images(row: dict) -> int | None:
    """How many images a ViT row's RepQ-style calibration (grids and GPTQ) read: its draw size. Rows
    with reconstruction read more (`n_calib`) for that; rows from before the field used 32."""
    if row.get("method") != "repq-vit":
        return None
    return row.get("calib_images") or 32


def placement(row: dict) -> str | None:
    """A CNN row's activation placement (rows written before the option existed are block-output)."""
    if row.get("method") in ("fp32", "repq-vit"):
        return None
    return row.get("placement") or "block-output"


def method_label(row: dict) -> str:
    """The method as tables and plots show it: Genie's placement named, QDrop's the unmarked default,
    cross-layer equalization as `+cle`, the ViT's head rotation as `+rot`, GPTQ weight rounding (a
    CNN's: the reconstruction's start) as `+gptq`, its block reconstruction as `+genie-m` (as `dfq quantize` names it), its image
    grid over the normalization's range as `(preprocess input)`, and a run seed other than 0. (A ViT
    row's reconstruction reads `n_calib` images; the label says how many its grids were fitted on.)"""
    label = row["method"] + ("+cle" if row.get("equalize") else "")
    label += "+rot" if head_rotation(row) == "hadamard" else ""
    label += "+gptq" if weight_rounding(row) == "gptq" else ""
    if row["method"] == "repq-vit" and row.get("iters"):  # block reconstruction (more images than the grids)
        label += f"+genie-m (grids on {calib_images(row)})"
    label += " (preprocess input)" if input_grid(row) == "preprocess" else ""
    label = f"{label} (layer-input)" if placement(row) == "layer-input" else label
    if row["method"] in DISTILL_METHODS:
        label += "+symreg" if row.get("symreg") else ""
        label += "+satnl" if row.get("satnl") else ""
        label += f" (from {row.get('init') or 'rtn'})"
    return f"{label} seed {row['seed']}" if row.get("seed") else label


def device_string() -> str:
    """Which machine a number came from: GPU name, or CPU model and the threads torch used."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu} x{os.cpu_count()} ({torch.get_num_threads()} torch threads)"


def today() -> str:
    return _dt.date.today().isoformat()


def make_row(**fields) -> dict:
    """A result row with every accuracy.json field (benchmarks/README.md), validated."""
    row = {k: fields.get(k) for k in ROW_FIELDS}
    row["device"] = row["device"] or device_string()
    row["date"] = row["date"] or today()
    if row["calib"] not in CALIB_SOURCES:
        raise ValueError(f"calib {row['calib']!r} not one of {CALIB_SOURCES}")
    if row["method"] not in METHODS:
        raise ValueError(f"method {row['method']!r} not one of {METHODS}")
    extra = {k: v for k, v in fields.items() if k not in ROW_FIELDS}
    row.update(extra)  # e.g. "draw", "note": informational, ignored by readers that don't know them
    return row


def merge_rows(path: Path, rows: Iterable[dict]) -> list[dict]:
    """Add `rows` to the JSON list at `path`, replacing rows with the same key; write atomically."""
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else []
    new = list(rows)
    keys = {row_key(r) for r in new}
    kept = [r for r in existing if row_key(r) not in keys]
    merged = kept + new
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return merged


def _bits(row: dict) -> str:
    return "fp32" if row["wbits"] == 32 else f"W{row['wbits']}A{row['abits']}"


def accuracy_markdown(rows: list[dict]) -> str:
    """One table per (model, dataset): bits x calibration x method, top-1/top-5, delta to fp32, time."""
    out = [
        "# Accuracy",
        "",
        "Generated by `dfq bench` from `accuracy.json`; every row names its machine.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    for (model, dataset), rs in sorted(groups.items()):
        out += [f"## {model} on {dataset}", ""]
        out += [
            "| bits | calib | method | n_calib | iters | top-1 | top-5 | Δ fp32 | seconds | device | date |"
        ]
        out += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        rs = sorted(
            rs, key=lambda r: (-r["wbits"], -r["abits"], r["calib"], method_label(r), r.get("iters") or 0)
        )
        for r in rs:
            delta = "" if r.get("fp_top1") is None or r["wbits"] == 32 else f"{r['top1'] - r['fp_top1']:+.2f}"
            top5 = "" if r.get("top5") is None else f"{r['top5']:.2f}"
            secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
            out.append(
                f"| {_bits(r)} | {r['calib']} | {method_label(r)} | {r.get('n_calib') or ''} | {r.get('iters') or 0} "
                f"| {r['top1']:.2f} | {top5} | {delta} | {secs} | {r['device']} | {r['date']} |"
            )
        out.append("")
    return "\n".join(out)


def plot_accuracy(rows: list[dict], path: Path) -> bool:
    """Top-1 against bits, one line per calibration source (and method), one panel per model/dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    n = max(1, len(groups))
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    order = ["W8A8", "W6A6", "W4A4", "W3A3", "W2A4"]  # fixed positions: fewer bits to the right
    for ax, ((model, dataset), rs) in zip(axes.flat, sorted(groups.items())):
        fp = [r["top1"] for r in rs if r["wbits"] == 32]
        if fp:
            ax.axhline(fp[0], color="k", ls="--", lw=1, label="fp32")
        lines: dict[str, dict[str, list[float]]] = {}
        for r in rs:
            if r["wbits"] == 32:
                continue
            label = f"{r['calib']} / {method_label(r)}"
            lines.setdefault(label, {}).setdefault(_bits(r), []).append(r["top1"])
        for label, pts in sorted(lines.items()):
            xs = [b for b in order if b in pts]
            ax.plot(
                [order.index(b) for b in xs], [sum(pts[b]) / len(pts[b]) for b in xs], marker="o", label=label
            )
        ax.set_xticks(range(len(order)), order)
        ax.set_title(f"{model}\n{dataset}", fontsize=9)
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_accuracy(results_dir: Path, rows: list[dict]) -> list[dict]:
    """Merge rows into results_dir/accuracy.json and rewrite accuracy.md and accuracy.png."""
    results_dir = Path(results_dir)
    merged = merge_rows(results_dir / "accuracy.json", rows)
    (results_dir / "accuracy.md").write_text(accuracy_markdown(merged) + "\n")
    plot_accuracy(merged, results_dir / "accuracy.png")
    return merged


def pool_fields(source: object) -> dict:
    """`pool_seed` (the engine seed in a dfq pool's manifest) for a pool source, so rows of several
    pools of one generator stay apart; nothing for other sources."""
    if not isinstance(source, (str, os.PathLike)) or source in ("real", "noise"):
        return {}
    manifest = Path(source) / "manifest.json"
    if not manifest.is_file():
        return {}
    seed = json.loads(manifest.read_text()).get("config", {}).get("seed")
    return {} if seed is None else {"pool_seed": seed}

"""The diagnostics report on disk: `index.html`, one self-contained page (figures embedded as base64
PNG, drawn with matplotlib), and `report.json`, the numbers (`quant.diagnostics.diagnose`'s dict)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import QuantError
from .feature_stats import cosine_matrix, subsample_indices

if TYPE_CHECKING:
    from .diagnostics import Diagnosis, FeatureSet

COLORS = {"pool": "tab:orange", "reference": "tab:blue"}
_MORE = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_SHORT = {"pool": "pool", "reference": "ref"}


def _color(role: str, roles: list[str]) -> str:
    """The pool orange, the reference blue, further sets the next colours in their order."""
    if role in COLORS:
        return COLORS[role]
    extra = [r for r in roles if r not in COLORS]
    return _MORE[extra.index(role) % len(_MORE)] if role in extra else "k"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantError("the report needs matplotlib: pip install 'dfq[diagnostics]'") from None
    return plt


def _png(fig, dpi: int = 100) -> str:
    """The figure as a base64 PNG (and closed); pixel pictures (samples, similarity matrices) pass a
    lower dpi that draws them near their own size, which keeps the page small."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _samples(sets: list[FeatureSet]) -> str | None:
    plt = _pyplot()
    shown = [fs for fs in sets if len(fs.thumbnails)]
    if not shown:
        return None
    cols = max(len(fs.thumbnails) for fs in shown)
    cols = min(cols, 16)
    rows = sum(-(-len(fs.thumbnails) // cols) for fs in shown)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.05), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    r = 0
    for fs in shown:
        for i, image in enumerate(fs.thumbnails):
            ax = axes[r + i // cols, i % cols]
            ax.imshow(image, interpolation="nearest")
            ax.set_title(f"{_SHORT.get(fs.role, fs.role)} {fs.classes[i]}", fontsize=6)
        r += -(-len(fs.thumbnails) // cols)
    fig.tight_layout(pad=0.2)
    return _png(fig, dpi=60)


def _embedding(report: dict) -> str | None:
    emb = report.get("embedding")
    if not emb:
        return None
    plt = _pyplot()
    fig, (by_set, by_class) = plt.subplots(1, 2, figsize=(11, 5))
    markers = {"pool": "o", "reference": "x"}
    roles = list(emb["sets"])
    for role, data in emb["sets"].items():
        xy = np.asarray(data["xy"]).reshape(-1, 2)
        by_set.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, c=_color(role, roles), label=role)
        by_class.scatter(
            xy[:, 0], xy[:, 1], s=8, alpha=0.7, c=np.asarray(data["classes"]) % 20, cmap="tab20",
            marker=markers.get(role, "o"), label=role, linewidths=0.6,
        )  # fmt: skip
    by_set.set_title("t-SNE of penultimate features, each set", fontsize=10)
    by_class.set_title("coloured by class (x reference, o the others)", fontsize=10)
    by_set.legend(fontsize=8, markerscale=2)
    for ax in (by_set, by_class):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _png(fig)


def _similarity(sets: list[FeatureSet], size: int, seed: int) -> str | None:
    if size < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(sets), figsize=(5 * len(sets) + 0.8, 4.6), squeeze=False, layout="constrained"
    )
    image = None
    for ax, fs in zip(axes.flat, sets):
        idx = subsample_indices(len(fs.features), size, seed)
        classes = fs.classes[idx]
        order = np.argsort(classes, kind="stable")
        sim = cosine_matrix(fs.features[idx][order])
        image = ax.imshow(
            sim, vmin=-1 if sim.min() < 0 else 0, vmax=1, cmap="viridis", interpolation="nearest"
        )
        bounds = np.flatnonzero(np.diff(classes[order])) + 0.5
        for b in bounds:
            ax.axhline(b, color="w", lw=0.4)
            ax.axvline(b, color="w", lw=0.4)
        ax.set_title(f"{fs.role}: cosine, {len(idx)} samples sorted by class", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes.flat), shrink=0.9)
    return _png(fig, dpi=64)


def _per_class(report: dict, roles: list[str]) -> str | None:
    plt = _pyplot()
    panels = [("diversity", "mean pairwise cosine within the class")]
    frechet = report.get("frechet_of") or {}
    if any(f["per_class"] for f in frechet.values()):
        panels.append(("frechet", "Fréchet distance to the reference's class"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, (what, title) in zip(axes.flat, panels):
        if what == "diversity":
            width = 0.8 / len(roles)
            for k, role in enumerate(roles):
                per = report[role]["diversity"]["per_class"]
                xs = np.asarray(sorted(per), dtype=float) + (k - (len(roles) - 1) / 2) * width
                ax.bar(xs, [per[c] for c in sorted(per)], width, color=_color(role, roles), label=role)
            ax.legend(fontsize=8)
        else:
            width = 0.8 / len(frechet)
            for k, (role, f) in enumerate(frechet.items()):
                per = f["per_class"]
                xs = np.asarray(sorted(per), dtype=float) + (k - (len(frechet) - 1) / 2) * width
                ax.bar(xs, [per[c] for c in sorted(per)], width, color=_color(role, roles), label=role)
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("class")
        if report["num_classes"] <= 20:
            ax.set_xticks(range(report["num_classes"]))
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def _predictions(report: dict, roles: list[str]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    num = report["num_classes"]
    width = 0.8 / len(roles) if num <= 100 else 1.0
    for k, role in enumerate(roles):
        counts = np.asarray(report[role]["prediction_histogram"], dtype=float)
        share = counts / max(counts.sum(), 1.0)
        offset = (k - (len(roles) - 1) / 2) * width if num <= 100 else 0.0
        ax.bar(np.arange(num) + offset, share, width, color=_color(role, roles), alpha=0.8, label=role)
    if num <= 20:
        ax.set_xticks(range(num))
    ax.set_title("predicted classes (share of each set's images)", fontsize=10)
    ax.set_xlabel("class")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_rows(report: dict, roles: list[str]) -> list[tuple[str, list]]:
    def get(role: str, *keys):
        value = report[role]
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    frechet = report.get("frechet_of") or {}
    rows = [
        ("source", [get(r, "source") for r in roles]),
        ("Fréchet distance to the reference", [frechet.get(r, {}).get("overall") for r in roles]),
        ("... mean over classes", [frechet.get(r, {}).get("mean_per_class") for r in roles]),
        ("images", [get(r, "n") for r in roles]),
        ("classes from", [get(r, "label_source") for r in roles]),
        ("mean pairwise cosine, all (1 = identical)", [get(r, "diversity", "overall") for r in roles]),
        ("mean pairwise cosine within a class", [get(r, "diversity", "mean_per_class") for r in roles]),
        ("top-1 in prompted classes / label", [get(r, "fidelity", "top1") for r in roles]),
        (f"top-{report['settings']['top_k']} holds a prompted class / label", [get(r, "fidelity", "top_k") for r in roles]),
        ("classes predicted", [get(r, "coverage", "predicted_classes") for r in roles]),
        ("prediction entropy (1 = uniform)", [get(r, "coverage", "predicted_entropy") for r in roles]),
        ("mean top-1 confidence", [get(r, "confidence") for r in roles]),
    ]  # fmt: skip
    return rows


def render_html(diagnosis: Diagnosis, matrix: int, seed: int) -> str:
    """The page: a summary table, then each figure with a line saying what it shows."""
    report, sets = diagnosis.report, diagnosis.sets
    roles = [fs.role for fs in sets]
    table = ["<table><tr><th></th>" + "".join(f"<th>{r}</th>" for r in roles) + "</tr>"]
    for name, values in _summary_rows(report, roles):
        table.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in values))
    table.append("</table>")
    fd = report.get("frechet")
    others = [r for r in roles if r not in ("pool", "reference")]
    headline = (
        f"<p class='big'>Fréchet distance of penultimate features, pool to reference: "
        f"<b>{_fmt(fd['overall'])}</b> (mean over {len(fd['per_class'])} classes: "
        f"{_fmt(fd['mean_per_class'])})"
        + "".join(f"; {html.escape(r)}: <b>{_fmt(report['frechet_of'][r]['overall'])}</b>" for r in others)
        + "</p>"
        if fd
        else "<p>No reference: no Fréchet distance (give real images with --reference).</p>"
    )
    figures = [
        ("Samples (after the model's preprocessing) with their class", _samples(sets)),
        ("Feature embedding: does the pool cover the reference's distribution?", _embedding(report)),
        ("Intra-class similarity (EnhancingDFQ Fig. 4): bright blocks off the diagonal mean "
         "collapsed samples", _similarity(sets, matrix, seed)),
        ("Per class", _per_class(report, roles)),
        ("Prediction histogram: class coverage", _predictions(report, roles)),
    ]  # fmt: skip
    body = [
        f"<h1>Pool diagnostics: {html.escape(str(report['pool']['source']))}</h1>",
        f"<p>model {html.escape(str(report.get('model')))}, {report['num_classes']} classes, "
        f"{report['feature_dim']}-d penultimate features</p>",
        headline,
        *table,
    ]
    for caption, png in figures:
        if png is not None:
            body.append(
                f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}.big{font-size:18px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dfq pool diagnostics</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(diagnosis: Diagnosis, out_dir: Path, matrix: int = 256, seed: int = 0) -> dict:
    """Write `index.html` and `report.json` into `out_dir`; their paths go into the report's `files`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantError(f"cannot create report directory {out_dir}: {e.strerror}") from None
    files = {"html": str(out_dir / "index.html"), "json": str(out_dir / "report.json")}
    diagnosis.report["files"] = files
    page = render_html(diagnosis, matrix, seed)
    Path(files["html"]).write_text(page, encoding="utf-8")
    Path(files["json"]).write_text(json.dumps(diagnosis.report, indent=1) + "\n", encoding="utf-8")
    return files

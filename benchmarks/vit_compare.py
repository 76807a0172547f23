"""`dfq bench vit`: our ViT path against RepQ-ViT (docs/results.md) on the CIFAR-10 ViT, side by side.

The real CIFAR-10 ViT (benchmarks/README.md; `cifar10_vit/best_vit_cifar10.pth`, loaded into timm's
`VisionTransformer`) is quantized by our ViT path (`quant.quantize`, which sends it to
the transformer path) at each bit setting, calibrated on one batch of real images: 64 by
default (`--draw-size`; our path's default), or 32 as the peer was. Calibration from a single batch
varies from batch to batch, so each setting runs on several batches ("draws"): draw k is images
S*k .. S*k+S-1 of the real calibration draw (benchmarks/README.md) for draw size S, in drawn order (draw 0 of size 32
is the peer's batch; of size 64 it holds the peer's batch and the next 32 images). Evaluation: the
lossless 1,017 slice and the JPEG 7,959 set.

Rows (one per bits x draw x evaluation set, plus fp32) go to accuracy.json with an extra `draw`
field; `vit_compare.md` puts the mean (min-max) over draws next to the peer's figures and
`vit_compare.json` holds the same numbers with the machine and date.

`--tiny` is the CI form: a random small timm ViT and random tensors, one setting, one draw, results
into a temp dir (or `--results`); it checks the machinery, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import accuracy, report

MODEL = "cifar10_vit"
METHOD = "repq-vit"  # accuracy.json's method name for this path (RepQ-ViT-style calibration, no iterations)
CHECKPOINT = "cifar10_vit/best_vit_cifar10.pth"
#: the peer's calibration batch (RepQ-ViT: 32 images) and our default (`quant.TransformerSettings.calib_size`)
PEER_DRAW_SIZE = 32
DRAW_SIZE = 64
LOSSLESS, JPEG = "cifar10-lossless-1017", "cifar10-jpeg-7959"
BITS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A4": (4, 4), "W3A3": (3, 3)}

#: RepQ-ViT on this ViT (docs/results.md, section Peers), one 32-image batch (draw 0): bits -> (lossless, JPEG, seconds).
PEER = {
    "fp32": (71.88, 69.66, None),
    "W8A8": (71.19, 69.62, 7.2),
    "W6A6": (70.99, 69.47, 7.2),
    "W4A4": (69.71, 69.04, 7.1),
}
#: RepQ-ViT's W4A4 on four other 32-image batches of the draw (lossless range, JPEG range).
PEER_W4A4_OTHER_BATCHES = ((69.03, 70.60), (68.80, 69.17))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--assets",
        default=None,
        help="assets folder, laid out as benchmarks/README.md describes (default $DFQ_ASSETS or ../shared/assets)",
    )
    p.add_argument("--results", default="benchmarks/results", help="where accuracy.json and vit_compare.* go")
    p.add_argument("--bits", default="W8A8,W6A6,W4A4,W3A3", help=f"comma list of {', '.join(BITS)}")
    p.add_argument("--draws", type=int, default=5, help="calibration batches: the first N slices of the draw")
    p.add_argument(
        "--draw-size",
        type=int,
        default=DRAW_SIZE,
        help=f"images per calibration batch (default {DRAW_SIZE}, our path's; {PEER_DRAW_SIZE}: the peer's)",
    )
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG 7,959 set (lossless slice only)")
    p.add_argument("--device", default="cpu", help="torch device for calibration and evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--calib",
        default="real",
        help="real (the calibration draw of benchmarks/README.md) or <label>=<pool dir>, e.g. bn-distill=pool/ (draws from the pool)",
    )
    p.add_argument(
        "--recon-iters", type=int, default=0, help="block reconstruction iterations per block (0: none)"
    )
    p.add_argument("--recon-images", type=int, default=1024, help="images the reconstruction reads")
    p.add_argument(
        "--weight-rounding",
        default="gptq",
        choices=["gptq", "nearest"],
        help="GPTQ weight rounding (our default; reconstruction starts from it) or nearest (RepQ-ViT's)",
    )
    p.add_argument(
        "--head-rotation",
        default="hadamard",
        choices=["hadamard", "none"],
        help="per-head Hadamard rotation of q and k folded into the weights (our default) or none (RepQ-ViT's)",
    )
    p.add_argument(
        "--input-grid",
        choices=["auto", "calibrated", "preprocess"],
        default="auto",
        help="patch-embedding input grid: fitted to the draw, or over the normalization's range "
        "(auto: preprocess for pools, calibrated for real images)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CI form: random small ViT and tensors, temp results")


# ------------------------------------------------------------------------------------------ data
def data_config() -> dict:
    from benchmarks.vit_checkpoint import CIFAR_VIT_MEAN, CIFAR_VIT_STD

    return {
        "input_size": (3, 32, 32),
        "mean": CIFAR_VIT_MEAN,
        "std": CIFAR_VIT_STD,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


def materialise(data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset as an (images, labels) tensor pair, so the JPEGs are decoded once, not once per run."""
    if isinstance(data, tuple):
        return data
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat([torch.as_tensor(lab) for lab in labels])


def calibration_draws(assets: Path, transform, draws: int, size: int = DRAW_SIZE) -> list[torch.Tensor]:
    """The first `draws` consecutive `size`-image slices of the real calibration draw (drawn order)."""
    from benchmarks import splits

    if size < 1 or draws < 1:
        raise SystemExit(f"--draws {draws} / --draw-size {size}: both must be at least 1")
    ds = splits.cifar10_calibration(assets, transform)
    if draws * size > len(ds):
        raise SystemExit(f"--draws {draws} x --draw-size {size}: the calibration draw holds {len(ds)} images")
    images = torch.stack([ds[i][0] for i in range(draws * size)])
    return [images[k * size : (k + 1) * size] for k in range(draws)]


# ------------------------------------------------------------------------------------------ runs
def run_settings(
    model_name: str,
    model,
    evals: dict,
    draws: list[torch.Tensor],
    bits: list[str],
    results: Path,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    calib_label: str = "real",
    recon_iters: int = 0,
    pool: torch.Tensor | None = None,
    weight_rounding: str = "gptq",
    input_range: tuple[float, float] | None = None,
    head_rotation: str = "hadamard",
) -> list[dict]:
    """fp32 rows, then one quantized row per bits x draw x eval set; written as they come; merged rows.

    With `recon_iters`, each draw is followed by block reconstruction on `pool` (draw k moved first,
    so the RepQ initialisation still sees exactly draw k) and rows carry `iters=recon_iters`; rows
    carry `weight_rounding` (gptq or nearest: the rounding, or where reconstruction started),
    `input_grid` (preprocess when `input_range` fixes the patch-embedding input grid, else calibrated)
    and `head_rotation` (hadamard or none).
    """
    import quant

    fp = accuracy.fp_scores(model, evals)
    rows = accuracy.fp_rows(model_name, fp)
    merged = _write(results, rows, calib_label)
    for name in bits:
        wbits, abits = BITS[name]
        for k, calib in enumerate(draws):
            extra = {
                "weight_rounding": weight_rounding,
                "input_grid": "calibrated" if input_range is None else "preprocess",
                "head_rotation": head_rotation,
            }
            size = int(calib.shape[0])
            extra["calib_images"] = size
            if recon_iters:
                calib = _draw_first(calib, pool, k)
            settings = quant.TransformerSettings(
                wbits=wbits, abits=abits, seed=seed, device=device, calib_size=size, iters=recon_iters,
                gptq=weight_rounding == "gptq", input_range=input_range, rotate_heads=head_rotation == "hadamard",
            )  # fmt: skip
            scores, qmodel = _quantize_and_evaluate(model, calib, settings, evals)
            # calibration time alone, as the peer's figure; with reconstruction, everything
            seconds = qmodel.seconds if recon_iters else qmodel.calibration_seconds
            new = accuracy.rows_for(
                model_name, fp, scores, wbits=wbits, abits=abits, calib=calib_label, method=METHOD,
                n_calib=int(calib.shape[0]), iters=recon_iters, seconds=round(seconds, 2), draw=k, **extra,
            )  # fmt: skip
            rows += new
            merged = _write(results, rows, calib_label)
            if progress:
                line = " ".join(f"{r['dataset']} {r['top1']:.2f}" for r in new)
                print(
                    f"{model_name} {name} draw {k}: {line} (fp {fp_line(fp)}) calib {seconds:.2f}s",
                    flush=True,
                )
    return merged


def _draw_first(draw: torch.Tensor, pool: torch.Tensor | None, k: int) -> torch.Tensor:
    """The reconstruction set: draw k (the pool's images S*k..S*k+S-1 for draws of S), then the pool's
    other images."""
    if pool is None:
        return draw
    size = int(draw.shape[0])
    lo, hi = k * size, (k + 1) * size
    if not torch.equal(pool[lo:hi], draw):
        raise ValueError(f"draw {k} is not images {lo}..{hi - 1} of the reconstruction pool")
    return torch.cat([pool[lo:hi], pool[:lo], pool[hi:]])


def _quantize_and_evaluate(model, calib: torch.Tensor, settings, evals: dict) -> tuple:
    """(scores on `evals` with fidelity to `model`, quantized model): the transformer path on `calib`
    (its first `settings.calib_size` images calibrate; reconstruction, if any, reads all)."""
    import quant
    from quant.evaluate import evaluate

    qmodel = quant.quantize(model, calib, settings)
    scores = {name: evaluate(qmodel, data, progress=False, reference=model) for name, data in evals.items()}
    return scores, qmodel


def fp_line(fp: dict) -> str:
    return " ".join(f"{s['top1']:.2f}" for s in fp.values())


def _write(results: Path, rows: list[dict], calib_label: str) -> list[dict]:
    merged = report.write_accuracy(results, rows)
    write_compare(results, merged, rows[0]["model"], calib_label)
    return merged


# ------------------------------------------------------------------------------------------ side by side
def _bits_name(row: dict) -> str:
    return "fp32" if row["wbits"] == 32 else f"W{row['wbits']}A{row['abits']}"


def summarise(rows: list[dict], model_name: str, calib_label: str = "real") -> dict:
    """bits -> dataset -> {mean, min, max, n, draws}, and bits -> calibration seconds summary."""
    top1: dict[str, dict[str, list[tuple[int, float]]]] = {}
    secs: dict[str, dict[int, float]] = {}
    fidelity: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        if r["model"] != model_name:
            continue
        if r["method"] == "fp32":
            top1.setdefault("fp32", {}).setdefault(r["dataset"], []).append((0, r["top1"]))
        elif r["method"] == METHOD and r["calib"] == calib_label and r.get("draw") is not None:
            name = _bits_name(r) + (f" +recon {r['iters']}" if r.get("iters") else "")
            if report.calib_images(r) != DRAW_SIZE:
                name += f" {report.calib_images(r)}-image"
            if report.weight_rounding(r) == "nearest":
                name += " nearest"
            if report.head_rotation(r) == "none":
                name += " unrotated"
            grid = report.input_grid(r)
            if grid != ("calibrated" if calib_label == "real" else "preprocess"):  # not the default
                name += f" {grid}-input"
            top1.setdefault(name, {}).setdefault(r["dataset"], []).append((r["draw"], r["top1"]))
            secs.setdefault(name, {})[r["draw"]] = r["seconds"]
            if r.get("fp_agree") is not None:  # rows measured before fidelity was recorded have none
                fid = fidelity.setdefault(name, {}).setdefault(r["dataset"], {"agree": [], "kl": []})
                fid["agree"].append(r["fp_agree"])
                fid["kl"].append(r["fp_kl"])

    def stats(values: list[float], digits: int = 2) -> dict:
        return {
            "mean": round(statistics.fmean(values), digits),
            "min": round(min(values), digits),
            "max": round(max(values), digits),
            "n": len(values),
        }

    out: dict = {"top1": {}, "seconds": {}, "fidelity": {}}
    for name, by_ds in top1.items():
        out["top1"][name] = {
            ds: {
                **stats([v for _, v in pts]),
                "draws": sorted(d for d, _ in pts),
                "by_draw": dict(sorted(pts)),
            }
            for ds, pts in by_ds.items()
        }
    for name, by_draw in secs.items():
        out["seconds"][name] = stats(list(by_draw.values()))
    for name, by_ds in fidelity.items():
        out["fidelity"][name] = {
            ds: {"agree": stats(f["agree"]), "kl": stats(f["kl"], 4)} for ds, f in by_ds.items()
        }
    return out


def _cell(s: dict | None, digits: int = 2) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def compare_markdown(rows: list[dict], model_name: str, calib_label: str = "real") -> str:
    summary = summarise(rows, model_name, calib_label)
    mine = [r for r in rows if r["model"] == model_name]
    devices = sorted({r["device"] for r in mine})
    dates = sorted({r["date"] for r in mine})
    datasets = sorted({r["dataset"] for r in mine}, key=lambda d: (d != LOSSLESS, d != JPEG, d))
    peer_col = {LOSSLESS: 0, JPEG: 1}
    order = ["fp32", *BITS]
    # grouped by bits (fp32, W8A8 ... W3A3), each setting's variants (+recon, nearest) under it
    names = sorted(
        summary["top1"],
        key=lambda n: (order.index(n.split(" ")[0]) if n.split(" ")[0] in order else len(order), n),
    )
    lines = [
        f"# Side by side with RepQ-ViT, {model_name}",
        "",
        "Ours: `quant.quantize`'s transformer path (per-head Hadamard rotation of q and k folded into the qkv weights,",
        "per-channel weights, per-channel post-LayerNorm activations folded into the LayerNorm and next",
        "Linear, log post-softmax grid, patch-embedding weights and input and head weights at 8 bits, GPTQ",
        f"weight rounding), calibrated on one batch of {DRAW_SIZE} real images (our default), no iterations;",
        f"`{PEER_DRAW_SIZE}-image` rows on batches of {PEER_DRAW_SIZE} as the peer was; `nearest` rows round weights to",
        "nearest as RepQ-ViT does, `unrotated` rows keep the weights as given. Each setting runs on several",
        "batches: draw k is images S*k..S*k+S-1 of the calibration draw (benchmarks/README.md) for batches of S (draw 0",
        f"of {PEER_DRAW_SIZE} is the peer's batch; draw 0 of {DRAW_SIZE} holds it and the next {DRAW_SIZE - PEER_DRAW_SIZE}). "
        "Cells: mean (min-max)",
        "of top-1 over the draws; the peer's figure is its single run on draw 0. Calibration seconds: ours",
        "mean (min-max) over draws against the peer's.",
        "",
        f"Machine: {', '.join(devices) or '-'}; date: {', '.join(dates) or '-'}.",
        "",
    ]
    header = "| bits | draws |"
    rule = "|---|---|"
    for ds in datasets:
        header += f" ours {ds} | RepQ-ViT {ds} | Δ mean |"
        rule += "---|---|---|"
    header += " ours calib s | RepQ-ViT calib s |"
    rule += "---|---|"
    lines += [header, rule]
    for name in names:
        by_ds = summary["top1"][name]
        peer = PEER.get(name.split(" ")[0])
        draws = sorted({d for s in by_ds.values() for d in s["draws"]}) if name != "fp32" else []
        cells = f"| {name} | {','.join(map(str, draws)) or '-'} |"
        for ds in datasets:
            s = by_ds.get(ds)
            p = peer[peer_col[ds]] if peer and ds in peer_col else None
            delta = f"{s['mean'] - p:+.2f}" if s and p is not None else "-"
            cells += f" {_cell(s)} | {'-' if p is None else f'{p:.2f}'} | {delta} |"
        ours_s = summary["seconds"].get(name)
        secs = "-" if not ours_s else f"{ours_s['mean']:.2f} ({ours_s['min']:.2f}-{ours_s['max']:.2f})"
        peer_s = "-" if not peer or peer[2] is None else f"~{peer[2]:.1f}"
        if name == "fp32":
            secs = "-"
        cells += f" {secs} | {peer_s} |"
        lines.append(cells)
    lines += [
        "",
        f"Draw 0 only, {PEER_DRAW_SIZE}-image rows (the peer's batch, so the same calibration images on both sides):",
        "",
        "| bits |" + "".join(f" ours {ds} | RepQ-ViT {ds} |" for ds in datasets),
        "|---|" + "---|---|" * len(datasets),
    ]
    for name in names:
        if name == "fp32" or f" {PEER_DRAW_SIZE}-image" not in name:
            continue
        peer = PEER.get(name.split(" ")[0])
        cells = f"| {name} |"
        for ds in datasets:
            v = summary["top1"][name].get(ds, {}).get("by_draw", {}).get(0)
            p = peer[peer_col[ds]] if peer and ds in peer_col else None
            cells += f" {'-' if v is None else f'{v:.2f}'} | {'-' if p is None else f'{p:.2f}'} |"
        lines.append(cells)
    lines += fidelity_markdown(summary["fidelity"], names, datasets)
    (lo_l, hi_l), (lo_j, hi_j) = PEER_W4A4_OTHER_BATCHES
    lines += [
        "",
        "Notes:",
        "",
        "- RepQ-ViT was not run at W3A3 on this ViT, so that row has no peer figure.",
        "- Plain bits rows: q and k rotated per head (`quant.vit.rotate`, the default) and GPTQ weight rounding",
        "  (`quant.vit.gptq`, the default) on the same images and grids; `nearest` rows: round-to-nearest",
        "  weights (RepQ-ViT's rounding); `unrotated` rows: without the rotation (rows measured before it).",
        f"- RepQ-ViT's W4A4 (docs/results.md, section Peers) on four other 32-image batches gave {lo_l:.2f}-{hi_l:.2f} on the",
        f"  lossless slice and {lo_j:.2f}-{hi_j:.2f} on the JPEG set; its single draw-0 figure is one",
        "  sample of that spread, so compare our mean and range with it, not one draw.",
        *(
            [
                "- `+recon N` rows: the same RepQ-ViT calibration on the draw's images, then block reconstruction",
                "  (`quant.vit.reconstruct`: AdaRound + learned weight and activation steps + QDrop's input mix,",
                "  N iterations per block, batch 32) on 1,024 images of the calibration draw with draw k's first;",
                "  their seconds include the reconstruction. AdaRound starts from GPTQ's rounding (its compensated",
                "  weights), or in `nearest` rows from the weights themselves. The peer column repeats RepQ-ViT's figure.",
            ]
            if any("+recon" in n for n in names)
            else ["- No block-reconstruction rows in this file (`--recon-iters` adds them)."]
        ),
        "- Data-free: bn-distill needs BatchNorm statistics and this ViT has LayerNorm only, so it cannot",
        "  distill from the ViT itself; `--calib bn-distill=<pool>` calibrates on a pool distilled from another",
        "  CIFAR-10 model (the ResNet-20) instead: see 'Other calibration sources' below when present.",
        "- Calibration seconds are the wall time of our calibration (copy, convert, one forward pass over",
        "  the draw's images, re-parameterization, GPTQ where used) on the machine above; the peer's ~7 s are",
        "  from its runs here (docs/results.md, section Peers).",
        "",
    ]
    return "\n".join(lines)


def fidelity_markdown(fidelity: dict, names: list[str], datasets: list[str]) -> list[str]:
    """The fidelity-to-fp32 table (agreement of top-1, KL) for the settings whose rows record it."""
    names = [n for n in names if n in fidelity]
    if not names:
        return []
    lines = [
        "",
        "Fidelity to the fp32 model, where recorded: agreement = percent of images whose top-1 class is",
        "the fp32 model's, KL = mean KL(fp32 || quantized) of the softmax outputs (nats); mean (min-max)",
        "over the draws. Prediction changes between two quantized models fall mostly on images the fp32",
        "model itself is unsure of (a near-tie of two classes), so they move top-1 by chance either way;",
        "these columns separate settings that top-1 on these sets cannot.",
        "",
        "| bits |" + "".join(f" agreement {ds} | KL {ds} |" for ds in datasets),
        "|---|" + "---|---|" * len(datasets),
    ]
    for name in names:
        cells = f"| {name} |"
        for ds in datasets:
            f = fidelity[name].get(ds, {})
            cells += f" {_cell(f.get('agree'))} | {_cell(f.get('kl'), 4)} |"
        lines.append(cells)
    return lines


def other_pools_markdown(rows: list[dict], model_name: str, main_label: str) -> str:
    """A section per other calibration source (data-free pools): mean (min-max) over draws and the
    gap to the main source's mean."""
    labels = sorted({r["calib"] for r in rows} - {"none", main_label})
    if not labels:
        return ""
    main = summarise(rows, model_name, main_label)["top1"]
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d != LOSSLESS, d != JPEG, d))
    lines = [
        "## Other calibration sources",
        "",
        "Same path and draw sizes, taken from the pool (draw k of size S = its images S*k..S*k+S-1);",
        f"Δ is against the {main_label}-image mean of the same setting.",
        "Rows from a pool take the patch-embedding input grid over the range the model's normalization",
        "allows (`quant.data.input_range`); `calibrated-input` rows fit it to the pool's images instead, as",
        "for real images. A pool that never reaches some pixel values then clips those of real images:",
        "the image grid is the one quantizer that sees raw pixels, and a pool's colour range is the",
        "statistic least like real data.",
        "",
    ]
    for label in labels:
        summary = summarise(rows, model_name, label)["top1"]
        lines += [
            f"### {label}",
            "",
            "| bits |" + "".join(f" {ds} | Δ {main_label} |" for ds in datasets),
            "|---|" + "---|---|" * len(datasets),
        ]
        for name in sorted(n for n in summary if n != "fp32"):
            cells = f"| {name} |"
            for ds in datasets:
                # against the real row of the same setting (the real one fits its input grid)
                real_name = name.removesuffix(" calibrated-input")
                cur, ref = summary[name].get(ds), main.get(real_name, {}).get(ds)
                delta = f"{cur['mean'] - ref['mean']:+.2f}" if cur and ref else "-"
                cells += f" {_cell(cur)} | {delta} |"
            lines.append(cells)
        lines.append("")
    return "\n".join(lines)


def write_compare(results: Path, merged: list[dict], model_name: str, calib_label: str = "real") -> None:
    """`vit_compare.md` and `vit_compare.json` from the rows of `model_name` in the merged accuracy.json."""
    results = Path(results)
    mine = [r for r in merged if r["model"] == model_name and (r["method"] in ("fp32", METHOD))]
    main_label = "real" if any(r["calib"] == "real" for r in mine) else calib_label
    text = compare_markdown(mine, model_name, main_label) + other_pools_markdown(mine, model_name, main_label)
    (results / "vit_compare.md").write_text(text)
    payload = {
        "device": sorted({r["device"] for r in mine}),
        "date": report.today(),
        "model": model_name,
        "peer": {k: {"lossless": v[0], "jpeg": v[1], "seconds": v[2]} for k, v in PEER.items()},
        "summary": summarise(mine, model_name, main_label),
        "summary_by_calib": {
            label: summarise(mine, model_name, label)
            for label in sorted({r["calib"] for r in mine} - {"none"})
        },
        "rows": mine,
    }
    tmp = results / "vit_compare.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, results / "vit_compare.json")


# ------------------------------------------------------------------------------------------ entry
def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        return _run_tiny(args)
    from benchmarks.splits import assets_dir
    from benchmarks.vit_checkpoint import load_cifar_vit
    from quant.data import build_transform, input_grid_for, input_range

    bits = args.bits.split(",")
    unknown = [b for b in bits if b not in BITS]
    if unknown:
        raise SystemExit(f"--bits: unknown {unknown}; use {', '.join(BITS)}")
    assets = assets_dir(args.assets or os.environ.get("DFQ_ASSETS") or "../shared/assets")
    model = load_cifar_vit(assets / CHECKPOINT).to(args.device)
    cfg = data_config()
    transform = build_transform(cfg)
    which = ["lossless"] if args.no_jpeg else ["lossless", "jpeg"]
    evals = {
        name: materialise(data)
        for name, data in accuracy.eval_sets("cifar10", assets, cfg, transform, which).items()
    }
    label = "real"
    if args.calib == "real":
        draws = calibration_draws(assets, transform, args.draws, args.draw_size)
        pool = None
        if args.recon_iters:
            if not args.draws * args.draw_size <= args.recon_images <= 1024:
                raise SystemExit(
                    f"--recon-images {args.recon_images}: the reconstruction reads the draws' "
                    f"{args.draws * args.draw_size} images and more, up to the calibration draw's 1,024"
                )
            pool = torch.cat(calibration_draws(assets, transform, 1, args.recon_images))
    else:
        from quant.data import load_calibration

        label, _, source = args.calib.partition("=")
        if not source or label not in report.CALIB_SOURCES:
            raise SystemExit(
                f"--calib {args.calib!r}: use real or <{'|'.join(report.CALIB_SOURCES)}>=<pool dir>"
            )
        n = max(args.draws * args.draw_size, args.recon_images if args.recon_iters else 0)
        pool = load_calibration(source, transform, n)
        draws = [pool[k * args.draw_size : (k + 1) * args.draw_size] for k in range(args.draws)]
    results = Path(args.results)
    grid = input_grid_for(args.input_grid, real_images=label == "real")
    run_settings(
        MODEL, model, evals, draws, bits, results, device=args.device, seed=args.seed, calib_label=label,
        recon_iters=args.recon_iters, pool=pool, weight_rounding=args.weight_rounding,
        input_range=input_range(cfg) if grid == "preprocess" else None, head_rotation=args.head_rotation,
    )  # fmt: skip
    print(results / "vit_compare.md")
    return 0


def _run_tiny(args: argparse.Namespace) -> int:
    """CI form: random small timm ViT, random tensors (calib "noise"), W4A4, one draw of `--draw-size`
    (reconstruction on all 96 tensors); rows into a temp dir."""
    from timm.models.vision_transformer import VisionTransformer

    from quant.data import input_grid_for

    # noise is not real images: the input grid over a normalization's range, as `auto` does
    # (this random model has no normalization: +-3 standard deviations of its Gaussian inputs)
    fixed_grid = input_grid_for(args.input_grid, real_images=False) == "preprocess"
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2, num_classes=10
    ).eval()
    images, labels = torch.randn(96, 3, 32, 32), torch.randint(0, 10, (96,))
    evals = {"random-64": (images[:64], labels[:64])}
    out = (
        Path(args.results)
        if args.results != "benchmarks/results"
        else Path(tempfile.mkdtemp(prefix="dfq-vit-"))
    )
    run_settings(
        f"{MODEL}-random",
        model,
        evals,
        [images[: args.draw_size]],
        ["W4A4"],
        out,
        progress=False,
        calib_label="noise",
        recon_iters=args.recon_iters,
        pool=images if args.recon_iters else None,
        input_range=(-3.0, 3.0) if fixed_grid else None,
    )
    print(out / "vit_compare.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

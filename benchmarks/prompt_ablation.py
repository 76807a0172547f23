"""`dfq bench prompts`: the prompt ablation, with any generator: how many classes a sample mixes and
how they are paired, against mixing single-class images at calibration time.

Variants (`--variants`), each a pool recipe plus a calibration-time mixing:

    single          k=1                   the generator's single-class pool
    random          k=2, random pairing   (the paper's mixup-class prompts)
    similar         k=2, the classes' nearest neighbours   (diffusion: CLIP text embeddings;
    dissimilar      k=2, their farthest                     bn-distill / enhancing-dfq: the
                                                            classifier's head rows, engine.pairing)
    k3              k=3, random pairing
    single+mixup    the single pool, each augmented copy blended with another (pixel Mixup)
    single+cutmix   the single pool, each augmented copy with a box of another pasted in (CutMix)

For the generator (`--generator`: bn-distill, whose k=2 mixes two class targets; enhancing-dfq, its
mixer's k; diffusion, the paper's own ablation, which needs Stable Diffusion weights, or its tiny
preset with `--tiny`), each pool seed and each variant's pool (built through
`benchmarks.generator_compare.make_pool`, reused from `--pools`), the model is quantized with the
same recipe as `dfq bench generators` (genie-m, `--iters`, the pool plus `--augment`-1 copies) at
each `--bits` and each quantization seed (`--seeds`), and evaluated on the fixed splits.

Outputs in `--results`: rows into `prompt_ablation.json` (`{"rows": [...]}`, one per variant, pool
seed, seed, bits and evaluation set, rerun rows replaced) and `accuracy.json` (via report);
`prompt_ablation.md`, a variant x bits table of mean (min-max) over pools and seeds with the
difference to `random` and whether the two ranges are disjoint, and the rank correlations;
`prompt_ablation.png`. `--trace` records the reconstruction's gradient norms (quant.grad_trace) of
one run per variant and pool at `--trace-bits` into `grad_norm.json` / `grad_norm.png`;
`--diagnose REF` measures each pool against a reference source (quant.diagnostics; `real`: the
CIFAR-10 calibration draw of `--assets`) and correlates the pools' Fréchet distance and prompt
fidelity with their top-1 at W4A4 (Spearman).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import accuracy, generator_compare, report
from benchmarks.argtypes import area_fraction, positive_float, positive_int, seed_list
from benchmarks.errors import BenchmarkError

GENERATORS = ("bn-distill", "enhancing-dfq", "diffusion")
BITS = generator_compare.BITS
RESULT = "prompt_ablation"
TRACE_RESULT = "grad_norm"
SD15 = "runwayml/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Variant:
    """A pool recipe (k classes a sample, their pairing) and the mixing applied at calibration time."""

    k: int
    pairing: str = "random"
    mixing: str | None = None  # "mixup" or "cutmix": on the augmented copies of the pool


VARIANTS = {
    "single": Variant(1),
    "random": Variant(2),
    "similar": Variant(2, "similar"),
    "dissimilar": Variant(2, "dissimilar"),
    "k3": Variant(3),
    "single+mixup": Variant(1, mixing="mixup"),
    "single+cutmix": Variant(1, mixing="cutmix"),
}
#: what keys a row of prompt_ablation.json (a rerun replaces its own rows)
ROW_KEY = (
    "model",
    "generator",
    "variant",
    "wbits",
    "abits",
    "pool_seed",
    "seed",
    "dataset",
    "iters",
    "n_calib",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", default=None, help="assets folder (default $DFQ_ASSETS or ../shared/assets)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--model", default="cifar_resnet20", choices=generator_compare.MODELS)
    p.add_argument("--generator", default="bn-distill", choices=GENERATORS)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--bits", default="W2A4,W3A3,W4A4", help=f"comma list of {', '.join(BITS)}")
    p.add_argument("--pool-seeds", type=seed_list, default=[0, 1], help="engine seeds, one pool each")
    p.add_argument("--seeds", type=seed_list, default=[0], help="quantization seeds, one run each")
    p.add_argument("--images", type=positive_int, default=256, help="images a pool (default 256)")
    p.add_argument("--iters", type=positive_int, default=2000, help="CNN reconstruction iterations a block")
    p.add_argument("--augment", type=positive_int, default=8, help="CNN: pool + N-1 augmented copies")
    p.add_argument("--mixup-alpha", type=positive_float, default=1.0, help="single+mixup: Beta(a, a) weights")
    p.add_argument("--cutmix-area", type=area_fraction, default=0.5, help="single+cutmix: largest box area")
    p.add_argument("--bn-distill-iters", type=positive_int, default=400)
    p.add_argument("--edfq-iterations", type=positive_int, default=400)
    p.add_argument("--edfq-set", default="", help="enhancing-dfq settings overrides, key=value,...")
    p.add_argument("--sd-model", default=SD15, help="diffusion: a local diffusers folder or a cached hub id")
    p.add_argument("--pools", default=None, help="folder keeping the pools (reused when complete)")
    p.add_argument("--heldout", action="store_true", help="evaluate on the held-out real draw only")
    p.add_argument("--trace", action="store_true", help="record gradient-norm traces (grad_norm.json/.png)")
    p.add_argument("--trace-bits", default="W4A4", help="the bit setting the traces are taken at")
    p.add_argument("--diagnose", default=None, metavar="REF", help="pool diagnostics against REF (`real`: the "
                   "CIFAR-10 calibration draw) and their rank correlation with W4A4 top-1")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--tiny", action="store_true", help="CI form: a random tiny model, a few iterations")
    p.add_argument("--merge", default="", metavar="DIRS", help="comma list of other runs' --results folders "
                   "(e.g. one pool seed a machine): merge their rows, diagnostics and trace summaries into "
                   "--results and rewrite the tables; quantizes nothing")  # fmt: skip


# ------------------------------------------------------------------------------------------ checks
def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(variants, bits) as asked, refusing a bad name or a diffusion run without weights in one line."""
    variants = [v for v in args.variants.split(",") if v]
    bits = [b for b in args.bits.split(",") if b]
    for v in variants:
        if v not in VARIANTS:
            raise BenchmarkError(f"prompts: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    for b in [*bits, args.trace_bits]:
        if b not in BITS:
            raise BenchmarkError(f"prompts: unknown bits {b!r} (choose from {', '.join(BITS)})")
    if not variants or not bits:
        raise BenchmarkError("prompts: give at least one variant and one bit setting")
    if args.model == "cifar10_vit" and args.generator == "bn-distill":
        raise BenchmarkError(
            "prompts: the ViT has no BatchNorm for bn-distill; use --generator enhancing-dfq"
        )
    mixing = [v for v in variants if VARIANTS[v].mixing]
    if mixing and (args.augment < 2 or args.model == "cifar10_vit"):
        raise BenchmarkError(
            f"prompts: {mixing[0]} mixes the CNN path's augmented copies; give --augment N > 1 (not the ViT)"
        )
    if args.generator == "diffusion" and not args.tiny and not sd_weights_present(args.sd_model):
        raise BenchmarkError(
            f"prompts: diffusion needs Stable Diffusion weights; {args.sd_model!r} is neither a local folder "
            "nor in the Hugging Face cache (give --sd-model DIR, or --tiny for the CI form)"
        )
    return variants, bits


def sd_weights_present(model: str) -> bool:
    """A local diffusers folder, or a hub id whose model_index.json is in the local cache."""
    local = os.path.expanduser(model)
    if os.path.isdir(local) or os.path.isabs(local) or model.startswith((".", "~")):
        return os.path.isfile(os.path.join(local, "model_index.json"))
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except (ImportError, ValueError):  # no hub client, or not a hub id
        return False


# ------------------------------------------------------------------------------------------ run
def pool_dir(work: Path, model: str, generator: str, variant: Variant, seed: int) -> Path:
    """The pool of a variant's recipe: the mixing variants share the single-class pool."""
    return work / f"{model}-{generator}-k{variant.k}-{variant.pairing}-s{seed}"


def calib_label(generator: str, variant: Variant) -> str:
    """accuracy.json's calibration source of a row (its known sources name diffusion pools by k)."""
    if generator != "diffusion":
        return generator
    return "sd-single" if variant.k == 1 else "sd-mixup"


def run(args: argparse.Namespace) -> int:
    if args.merge:
        sources = [Path(d) for d in args.merge.split(",") if d]
        merge_results(Path(args.results), sources)
        print(Path(args.results) / f"{RESULT}.md")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.images, args.bn_distill_iters, args.augment, args.edfq_iterations = 8, 2, 2, 4
        args.edfq_set = args.edfq_set or "train_batch=4,warmup=1,embed_dim=16"
    variants, bits = check_args(args)
    if args.tiny and args.results == "benchmarks/results":
        args.results = tempfile.mkdtemp(prefix="dfq-prompts-")
    work = Path(args.pools or tempfile.mkdtemp(prefix="dfq-prompt-pools-"))
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    from quant.data import load_calibration

    bench = generator_compare.Bench(args, work)
    fp = accuracy.fp_scores(bench.model, bench.evals)
    acc_rows = [] if args.heldout else accuracy.fp_rows(bench.name, fp)
    rows: list[dict] = []
    traces: dict[str, dict] = {}
    pools: dict[tuple[int, str, int], Path] = {}
    for pool_seed in args.pool_seeds:
        for name in variants:
            v = VARIANTS[name]
            pool_key = (v.k, v.pairing, pool_seed)
            if pool_key not in pools:
                out = pool_dir(work, bench.name, args.generator, v, pool_seed)
                pools[pool_key], gen_seconds = generator_compare.make_pool(
                    args.generator, bench.spec, bench.checkpoint, out, pool_seed, args, k=v.k, pairing=v.pairing
                )  # fmt: skip
                print(f"{out.name}: pool in {gen_seconds:.1f} s", flush=True)
            pool = pools[pool_key]
            mixing = {"mixup": {"mixup": args.mixup_alpha}, "cutmix": {"cutmix": args.cutmix_area}}
            images = load_calibration(str(pool), bench.transform, args.images)
            calib = bench.calibration(images, args, **mixing.get(v.mixing or "", {}))
            for b in bits:
                wbits, abits = BITS[b]
                for seed in args.seeds:
                    settings = bench.settings(wbits, abits, args)
                    if hasattr(settings, "seed"):
                        settings = dataclasses.replace(settings, seed=seed)
                    trace = args.trace and b == args.trace_bits and seed == args.seeds[0]
                    t0 = time.perf_counter()
                    q_seconds, scores, qmodel = accuracy.quantize_and_evaluate(
                        bench.model, calib, settings, bench.evals, progress=False, trace_grad_norm=trace
                    )
                    if trace:
                        traces[f"{name} s{pool_seed}"] = qmodel.grad_norm
                    fields = dict(
                        wbits=wbits, abits=abits, calib=calib_label(args.generator, v),
                        method="repq-vit" if bench.name == "cifar10_vit" else "genie-m", n_calib=args.images,
                        iters=0 if bench.name == "cifar10_vit" else settings.iters, seconds=round(q_seconds, 1),
                        pool_seed=pool_seed, seed=seed, variant=f"prompts:{name}", generator=args.generator,
                        k=v.k, pairing=v.pairing, mixing=v.mixing, augment=args.augment, pool=str(pool),
                        gen_settings=generator_compare.recipe(args.generator, args)["settings"],
                    )  # fmt: skip
                    new = accuracy.rows_for(bench.name, fp, scores, **fields)
                    acc_rows += new
                    rows += [{**r, "variant": name} for r in new]
                    print(f"{name} s{pool_seed} {b} seed {seed}:",
                          " ".join(f"{r['dataset']} {r['top1']:.2f}" for r in new),
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
                    report.write_accuracy(results, acc_rows)
                    merged = merge_rows(results / f"{RESULT}.json", rows)
                    write_outputs(results, merged)
    diagnostics = diagnose_pools(bench, pools, args) if args.diagnose else None
    merged = merge_rows(results / f"{RESULT}.json", rows, diagnostics)
    write_outputs(results, merged)
    if traces:
        write_traces(results, traces, merged, args.trace_bits, args.seeds[0])
    if args.tiny and not args.pools:
        shutil.rmtree(work, ignore_errors=True)
    print(results / f"{RESULT}.md")
    return 0


# ------------------------------------------------------------------------------------------ files
def merge_rows(path: Path, rows: list[dict], diagnostics: list[dict] | None = None) -> dict:
    """prompt_ablation.json with `rows` merged in (same ROW_KEY replaced) and the pools' diagnostics."""
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if isinstance(data, list):
        data = {"rows": data}
    keys = {tuple(r.get(k) for k in ROW_KEY) for r in rows}
    data["rows"] = [r for r in data["rows"] if tuple(r.get(k) for k in ROW_KEY) not in keys] + rows
    if diagnostics is not None:
        data["diagnostics"] = diagnostics
        data["rank_correlation"] = diagnostic_correlations(data["rows"], diagnostics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, min, max and count of top-1 over pools and seeds per (model, generator, dataset, variant, bits)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[
            (r["model"], r["generator"], r["dataset"], r["variant"], f"W{r['wbits']}A{r['abits']}")
        ].append(r["top1"])
    return [
        {
            "model": m,
            "generator": g,
            "dataset": d,
            "variant": v,
            "bits": b,
            "n": len(t),
            "mean": float(np.mean(t)),
            "min": float(min(t)),
            "max": float(max(t)),
        }  # fmt: skip
        for (m, g, d, v, b), t in sorted(groups.items())
    ]


def _order(values: list[str], known: list[str]) -> list[str]:
    return sorted(set(values), key=lambda x: (known.index(x) if x in known else len(known), x))


def markdown(data: dict) -> str:
    summary = summarise(data["rows"])
    lines = [
        "# Prompt ablation: classes a sample mixes and how they are paired",
        "",
        "Written by `dfq bench prompts` (benchmarks/prompt_ablation.py). Top-1 mean (min-max) over pools",
        "and quantization seeds; Δ random: the mean's difference to `random` (k=2, random pairing),",
        "marked * where the two ranges do not overlap.",
        "",
    ]
    cells = {(s["model"], s["generator"], s["dataset"], s["variant"], s["bits"]): s for s in summary}
    for model, generator, dataset in sorted({(s["model"], s["generator"], s["dataset"]) for s in summary}):
        sub = [
            s for s in summary if (s["model"], s["generator"], s["dataset"]) == (model, generator, dataset)
        ]
        bits = _order([s["bits"] for s in sub], list(BITS))
        variants = _order([s["variant"] for s in sub], list(VARIANTS))
        lines += [f"## {model}, {generator}, {dataset}", ""]
        lines += ["| variant | " + " | ".join(f"{b} | Δ random" for b in bits) + " | runs |"]
        lines += ["|---|" + "---|---|" * len(bits) + "---|"]
        for v in variants:
            row, n = [], 0
            for b in bits:
                s, ref = (
                    cells.get((model, generator, dataset, v, b)),
                    cells.get((model, generator, dataset, "random", b)),
                )
                if s is None:
                    row += ["", ""]
                    continue
                n = max(n, s["n"])
                row.append(f"{s['mean']:.2f} ({s['min']:.2f}-{s['max']:.2f})")
                if ref is None or v == "random":
                    row.append("")
                else:
                    apart = s["min"] > ref["max"] or s["max"] < ref["min"]
                    row.append(f"{s['mean'] - ref['mean']:+.2f}{'*' if apart else ''}")
            lines.append(f"| {v} | " + " | ".join(row) + f" | {n} |")
        lines.append("")
    corr = data.get("rank_correlation")
    if corr:
        lines += ["## Pool diagnostics against W4A4 top-1", "",
                  f"Spearman rank correlation over {corr['pools']} pools (reference: {corr['reference']}; "
                  f"top-1 on {corr['dataset']}):", ""]  # fmt: skip
        lines += [
            f"- {name}: {rho:+.3f}" if rho is not None else f"- {name}: n/a"
            for name, rho in corr["rho"].items()
        ]
        lines += ["", "| pool | variant | Fréchet | fidelity top-1 | W4A4 top-1 |", "|---|---|---|---|---|"]
        for p in corr["table"]:
            lines.append(
                f"| {p['pool']} | {p['variant']} | {_fmt(p['frechet'])} | {_fmt(p['fidelity'])} | {_fmt(p['top1'])} |"
            )
        lines.append("")
    devices = sorted({f"{r['device']}, {r['date']}" for r in data["rows"]})
    lines += ["Measured on: " + "; ".join(devices), ""]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def plot(data: dict, path: Path) -> bool:
    """Top-1 per variant per bit width (mean, min-max bars), one panel per (model, generator, dataset)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = summarise(data["rows"])
    panels = sorted({(s["model"], s["generator"], s["dataset"]) for s in summary})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        sub = [s for s in summary if (s["model"], s["generator"], s["dataset"]) == panel]
        bits = _order([s["bits"] for s in sub], list(BITS))
        variants = _order([s["variant"] for s in sub], list(VARIANTS))
        width = 0.8 / len(variants)
        for j, v in enumerate(variants):
            pts = [(i, s) for i, b in enumerate(bits) for s in sub if s["variant"] == v and s["bits"] == b]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i, _ in pts]
            means = [s["mean"] for _, s in pts]
            err = [[s["mean"] - s["min"] for _, s in pts], [s["max"] - s["mean"] for _, s in pts]]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=v)
        lo, hi = min(s["min"] for s in sub), max(s["max"] for s in sub)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)  # differences of tenths of a point are invisible from 0
        ax.set_xticks(range(len(bits)), bits)
        ax.set_title(" / ".join(panel), fontsize=9)
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(results: Path, data: dict) -> None:
    (results / f"{RESULT}.md").write_text(markdown(data))
    plot(data, results / f"{RESULT}.png")


# ------------------------------------------------------------------------------------------ analyses
def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 points or no spread."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for value in np.unique(a):
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def pool_top1(rows: list[dict], bits: str = "W4A4") -> dict[str, float]:
    """Per pool (the variant's own: mixing variants left out), its mean top-1 at `bits` on the first
    evaluation set (over quantization seeds)."""
    datasets = _order([r["dataset"] for r in rows], [])
    out: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if f"W{r['wbits']}A{r['abits']}" == bits and r["dataset"] == datasets[0] and not r.get("mixing"):
            out[r["pool"]].append(r["top1"])
    return {p: float(np.mean(v)) for p, v in out.items()}


def diagnose_pools(bench: generator_compare.Bench, pools: dict, args: argparse.Namespace) -> list[dict]:
    """The diagnostics of every pool against the reference: Fréchet distance, prompt fidelity, diversity."""
    from quant.diagnostics import DiagnosticsSettings, run_diagnostics

    reference = reference_source(args, Path(args.results))
    settings = DiagnosticsSettings(n_images=args.images, embed=0)
    out = []
    for (k, pairing, seed), pool in sorted(pools.items()):
        report_ = run_diagnostics(bench.model, bench.data_config, str(pool), reference, settings).report
        fidelity = report_["pool"]["fidelity"]
        out.append({
            "pool": str(pool), "k": k, "pairing": pairing, "pool_seed": seed, "reference": args.diagnose,
            "frechet": report_["frechet"]["overall"], "fidelity_top1": fidelity["top1"] if fidelity else None,
            "confidence": report_["pool"]["confidence"],
            "predicted_entropy": report_["pool"]["coverage"]["predicted_entropy"],
        })  # fmt: skip
    return out


def reference_source(args: argparse.Namespace, results: Path) -> str:
    """The reference as a source the diagnostics read: `real` is the CIFAR-10 calibration draw of
    `--assets` (written once as an .npz beside the pools); the tiny form's `real` is seeded noise images."""
    if args.diagnose != "real":
        return args.diagnose
    work = Path(args.pools or tempfile.mkdtemp(prefix="dfq-prompt-ref-"))
    path = work / ("reference-tiny.npz" if args.tiny else "reference-cifar10-calibration.npz")
    if not path.exists():
        if args.tiny:
            g = np.random.default_rng(0)
            images, labels = g.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 10
        else:
            from benchmarks import splits

            ds = splits.cifar10_calibration(splits.assets_dir(args.assets or os.environ.get("DFQ_ASSETS")
                                                              or "../shared/assets"))  # fmt: skip
            images = np.stack([np.asarray(img.convert("RGB")) for img, _ in ds])
            labels = np.asarray([label for _, label in ds])
        np.savez(path, images=images, labels=labels)
    return str(path)


def diagnostic_correlations(rows: list[dict], diagnostics: list[dict]) -> dict:
    """Spearman correlations over the pools between each diagnostic and the pool's W4A4 top-1."""
    top1 = pool_top1(rows)
    variant_of = {r["pool"]: r["variant"] for r in rows if not r.get("mixing")}
    table = [{"pool": Path(d["pool"]).name, "variant": variant_of.get(d["pool"], ""), "frechet": d["frechet"],
              "fidelity": d["fidelity_top1"], "top1": top1.get(d["pool"])} for d in diagnostics]  # fmt: skip
    have = [t for t in table if t["top1"] is not None]

    def rho(key: str) -> float | None:
        pts = [t for t in have if t[key] is not None]
        return spearman([t[key] for t in pts], [t["top1"] for t in pts])

    return {
        "reference": diagnostics[0]["reference"] if diagnostics else None,
        "dataset": _order([r["dataset"] for r in rows], [])[0] if rows else None,
        "pools": len(have),
        "rho": {"frechet_vs_top1": rho("frechet"), "fidelity_vs_top1": rho("fidelity")},
        "table": table,
    }


def write_traces(results: Path, traces: dict[str, dict], data: dict, bits: str, seed: int) -> dict:
    """grad_norm.json: per variant and pool the traced run's overall tail means and its top-1, per
    variant their means, and the Spearman correlation of the total norm with top-1 over the runs;
    grad_norm.png: one trace per variant (the first pool's), plot_trace_comparison."""
    from quant.grad_trace import plot_trace_comparison

    top1: dict[tuple[str, int], list[float]] = defaultdict(list)
    first = _order([r["dataset"] for r in data["rows"]], [])[0]
    for r in data["rows"]:
        if f"W{r['wbits']}A{r['abits']}" == bits and r["dataset"] == first and r["seed"] == seed:
            top1[(r["variant"], r["pool_seed"])].append(r["top1"])
    runs: list[dict] = []
    for label, trace in traces.items():
        variant, _, seed = label.rpartition(" s")
        t = top1.get((variant, int(seed)))
        runs.append({"variant": variant, "pool_seed": int(seed), "bits": bits, "dataset": first,
                     "units": trace["summary"]["units"], "tail_mean": trace["summary"]["tail_mean"],
                     "top1": t[-1] if t else None})  # fmt: skip
    out = trace_summary(runs, bits, data["rows"])
    (results / f"{TRACE_RESULT}.json").write_text(json.dumps(out, indent=1) + "\n")
    firsts: dict[str, dict] = {}
    for label, trace in traces.items():
        firsts.setdefault(label.rpartition(" s")[0], trace)
    plot_trace_comparison(firsts, results / f"{TRACE_RESULT}.png")
    return out


def trace_summary(runs: list[dict], bits: str, rows: list[dict]) -> dict:
    """grad_norm.json's content from its traced runs: per variant the mean tail norm and top-1, and the
    Spearman correlation of the total norm with top-1 over the runs; each run names the device and
    date of its row in `rows`."""
    from quant.grad_trace import TOTAL

    measured = {(r["variant"], r["pool_seed"], f"W{r['wbits']}A{r['abits']}"): r for r in rows}
    for run in runs:
        row = measured.get((run["variant"], run["pool_seed"], run["bits"]), {})
        run.setdefault("device", row.get("device"))
        run.setdefault("date", row.get("date"))
    by_variant = {}
    for v in _order([r["variant"] for r in runs], list(VARIANTS)):
        rs = [r for r in runs if r["variant"] == v]
        norms = [r["tail_mean"].get(TOTAL) for r in rs if r["tail_mean"].get(TOTAL) is not None]
        accs = [r["top1"] for r in rs if r["top1"] is not None]
        by_variant[v] = {"tail_mean_total": float(np.mean(norms)) if norms else None,
                         "top1": float(np.mean(accs)) if accs else None, "runs": len(rs)}  # fmt: skip
    pts = [r for r in runs if r["tail_mean"].get(TOTAL) is not None and r["top1"] is not None]
    out = {
        "format": "dfq-prompt-grad-norm/1", "series": TOTAL, "bits": bits,
        "device": "; ".join(sorted({str(r["device"]) for r in runs})),
        "date": "; ".join(sorted({str(r["date"]) for r in runs})), "runs": runs, "by_variant": by_variant,
        "spearman_norm_vs_top1": spearman([r["tail_mean"][TOTAL] for r in pts], [r["top1"] for r in pts]),
    }  # fmt: skip
    return out


def merge_results(results: Path, sources: list[Path]) -> dict:
    """Fold other runs' results folders into `results`: their rows (a rerun's replace), accuracy rows,
    pool diagnostics (one per pool) and traced runs (one per variant, pool seed and bits); the tables
    and correlations are recomputed over everything. Every source is read and checked before anything
    is written, and each file is written once. Traces themselves are not kept, so the trace plot stays
    `results`' own, or the first source's where `results` has none."""
    own, trace_json = results / f"{RESULT}.json", results / f"{TRACE_RESULT}.json"
    diagnostics: dict[str, dict] = {}
    runs: dict[tuple, dict] = {}
    rows: list[dict] = []
    accuracy_rows: list[dict] = []
    bits, plots = None, []
    for folder in [results, *sources]:
        if not (folder / f"{RESULT}.json").is_file():
            if folder == results:
                continue
            raise BenchmarkError(f"prompts: --merge {folder} holds no {RESULT}.json")
        data = json.loads((folder / f"{RESULT}.json").read_text())
        data = {"rows": data} if isinstance(data, list) else data
        rows += data["rows"] if folder != results else []
        diagnostics.update({d["pool"]: d for d in data.get("diagnostics") or []})
        if folder != results and (folder / "accuracy.json").is_file():
            accuracy_rows += json.loads((folder / "accuracy.json").read_text())
        if (folder / f"{TRACE_RESULT}.json").is_file():
            theirs = json.loads((folder / f"{TRACE_RESULT}.json").read_text())
            if bits not in (None, theirs["bits"]):
                raise BenchmarkError(
                    f"prompts: --merge {folder} traced {theirs['bits']}, others traced {bits}"
                )
            bits = theirs["bits"]
            runs.update({(r["variant"], r["pool_seed"], r["bits"]): r for r in theirs["runs"]})
            plots += [folder / f"{TRACE_RESULT}.png"] if (folder / f"{TRACE_RESULT}.png").exists() else []
    results.mkdir(parents=True, exist_ok=True)
    if accuracy_rows:  # the fp32 rows come with every source: one per key, the last
        report.write_accuracy(results, list({report.row_key(r): r for r in accuracy_rows}.values()))
    merged = merge_rows(own, rows, list(diagnostics.values()) if diagnostics else None)
    write_outputs(results, merged)
    if runs:
        summary = trace_summary(list(runs.values()), bits, merged["rows"])
        trace_json.write_text(json.dumps(summary, indent=1) + "\n")
        if plots and plots[0] != results / f"{TRACE_RESULT}.png":
            shutil.copyfile(plots[0], results / f"{TRACE_RESULT}.png")
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_ablation")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""`dfq bench tools`: other PTQ tools (quant/integrations) calibrated from each given source, side by side.

For every installed tool (`--tools`, default all of `quant.integrations.installed()`), the tool's own
W8A8 flow (W4A8 / W4A4 with `--bits` where the tool has one) of one model, calibrated on the first
`--n-calib` images (all, of a smaller source) of each `--calib NAME=SOURCE` (a pool, image folder, tar, .npz, `noise`, or `real`:
the CIFAR-10 calibration draw of benchmarks/README.md from `--assets`), and, with `--mct-datagen`,
on images from MCT's own data-free generator (`default`: its default recipe for `--n-calib` images;
an integer N: N images, its image budget; the generator's wall time is recorded). Each quantized
model is evaluated on each `--eval NAME=SOURCE` (any source with labels, or `lossless` / `jpeg`: the
CIFAR-10 evaluation splits from `--assets`): top-1 and agreement with the fp32 model's top-1.

Rows (fields in benchmarks/README.md) go to `tools.json`, keyed by (tool, calib, model, dataset,
wbits, abits, n_calib) and the device kind, so a CPU run never replaces a GPU row; `tools.md` holds
the tables and `tools.png` the top-1 per tool and calibration source. A tool that fails on the model
gets a row with `error` (its one-line message) and no top-1.

`--tiny` is the CI form: a random small CNN, noise and a hand-made .npz, results into a temp dir.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report
from benchmarks.argtypes import positive_int
from benchmarks.errors import BenchmarkError

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
KEY = ("tool", "calib", "model", "dataset", "wbits", "abits", "n_calib", "pool_seed")
SPLITS = {"lossless": "cifar10-lossless-1017", "jpeg": "cifar10-jpeg-7959"}
VIT = "cifar10_vit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cifar_resnet20", help=f"a `dfq quantize --model` spec, or {VIT}")
    p.add_argument("--checkpoint", default=None, help="the model's weights")
    p.add_argument(
        "--calib",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="calibration source (repeat): pool, image folder, tar, .npz, noise, or real (needs --assets)",
    )
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="evaluation set (repeat): image folder, tar, .npz, pool, or lossless / jpeg (need --assets)",
    )
    p.add_argument("--tools", default="", help="comma list of quant.integrations tools (default: installed)")
    p.add_argument(
        "--bits", default="W8A8", help=f"comma list of {', '.join(BITS)} (each where a tool has it)"
    )
    p.add_argument("--n-calib", type=positive_int, default=1024)
    p.add_argument("--n-eval", type=positive_int, default=None, help="evaluate on the first N of each set")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--mct-datagen",
        default="",
        help="comma list: default (MCT's generator, --n-calib images) and/or image budgets N",
    )
    p.add_argument(
        "--mct-datagen-iters", type=positive_int, default=None, help="override MCT's 500 iterations"
    )
    p.add_argument(
        "--mct-datagen-seeds",
        default="0",
        help="comma list of seeds, one MCT-generated pool each (torch and numpy seeded; rows keep it as pool_seed)",
    )
    p.add_argument("--assets", default=None, help="assets folder for real / lossless / jpeg (or $DFQ_ASSETS)")
    p.add_argument("--results", default="benchmarks/results", help="where tools.json/.md/.png go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="CI form: random small CNN, temp results")


# ------------------------------------------------------------------------------------------ inputs
def _pair(text: str, flag: str) -> tuple[str, str]:
    """NAME=SOURCE, or a bare SOURCE named after itself."""
    name, sep, source = text.partition("=")
    if not sep:
        name, source = text, text
    if not name or not source:
        raise BenchmarkError(f"{flag} {text!r}: expected NAME=SOURCE")
    return name, source


def build_model(spec: str, checkpoint: str | None) -> tuple[torch.nn.Module, dict]:
    """(eval-mode model, data config): the CIFAR-10 ViT of benchmarks/README.md, or any `dfq quantize` spec."""
    if spec == VIT:
        from benchmarks.vit_checkpoint import build_cifar_vit, load_cifar_vit
        from benchmarks.vit_compare import data_config

        return (load_cifar_vit(checkpoint) if checkpoint else build_cifar_vit().eval()), data_config()
    from quant.models import load_model

    model, data_config = load_model(spec, checkpoint=checkpoint)
    return model.eval(), data_config


def _assets(args: argparse.Namespace) -> Path:
    from benchmarks.splits import assets_dir

    return assets_dir(args.assets or os.environ.get("DFQ_ASSETS"))


def calibration_sources(args: argparse.Namespace, transform) -> list[tuple[str, object]]:
    """(label, source) per --calib: `real` becomes the first n images of the calibration draw as a tensor."""
    from quant.data import source_kind

    out = []
    for text in args.calib:
        name, source = _pair(text, "--calib")
        if source not in ("real", "noise"):
            source_kind(
                source
            )  # a missing or unreadable source is the user's error, not every tool's failure
        if source == "real":
            from benchmarks import splits

            ds = splits.cifar10_calibration(_assets(args), transform)
            source = torch.stack([ds[i][0] for i in range(min(args.n_calib, len(ds)))])
        out.append((name, source))
    return out


def calibration_count(source: object, n_calib: int) -> int:
    """Images a source calibrates with: all of a tensor, n_calib of noise, else up to n_calib of what
    the source holds (a 256-image pool calibrates on 256 in a 1,024-image run; rows record n_calib)."""
    from quant.data import open_dataset

    if isinstance(source, torch.Tensor):
        return int(len(source))
    if source == "noise":
        return n_calib
    return min(n_calib, len(open_dataset(str(source), None)))


def eval_sets(args: argparse.Namespace, transform) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (images, labels), decoded once; `lossless` / `jpeg` are the CIFAR-10 splits of --assets."""
    from benchmarks import splits
    from benchmarks.vit_compare import materialise
    from quant.data import ArrayImageDataset, open_dataset

    out = {}
    for text in args.eval:
        name, source = _pair(text, "--eval")
        if source == "lossless":
            images, labels = splits.cifar10_lossless_eval(_assets(args))
            data = ArrayImageDataset(images.numpy(), labels.numpy(), transform)
            name = SPLITS[source] if name == source else name
        elif source == "jpeg":
            data = splits.cifar10_jpeg_eval(_assets(args), transform)
            name = SPLITS[source] if name == source else name
        else:
            data = open_dataset(source, transform)
        if args.n_eval is not None and args.n_eval < _length(data):
            data, name = _first(data, args.n_eval), f"{name}-first{args.n_eval}"
        out[name] = materialise(data)
    return out


def _length(data) -> float:
    try:
        return len(data)
    except TypeError:
        return float("inf")


def _first(data, n: int):
    """The first n items of a dataset (an IterableDataset's first n, as a list)."""
    if isinstance(data, torch.utils.data.IterableDataset):
        import itertools

        return list(itertools.islice(data, n))
    return torch.utils.data.Subset(data, range(n))


# ------------------------------------------------------------------------------------------ rows
def device_kind(row: dict) -> str:
    return "gpu" if str(row.get("device", "")).startswith("cuda") else "cpu"


def row_key(row: dict) -> tuple:
    """What makes two rows the same measurement; the device kind too, so a CPU run never replaces a GPU row."""
    return tuple(row.get(k) for k in KEY) + (device_kind(row),)


def make_row(**fields) -> dict:
    row = {"device": report.device_string(), "date": report.today(), "pool_seed": None, **fields}
    missing = [k for k in (*KEY, "top1", "fp_agree", "seconds") if k not in row]
    if missing:
        raise ValueError(f"row lacks {missing}")
    return row


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Add `rows` to the JSON list at `path`, replacing rows with the same key; written atomically."""
    existing = json.loads(path.read_text()) if path.exists() else []
    keys = {row_key(r) for r in rows}
    merged = [r for r in existing if row_key(r) not in keys] + list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return merged


def _bits(row: dict) -> str:
    return "fp32" if row["wbits"] == 32 else f"W{row['wbits']}A{row['abits']}"


def tools_markdown(rows: list[dict]) -> str:
    """One table per (model, dataset): tool x calibration x bits, top-1, delta to fp32, agreement, time."""
    out = [
        "# Other PTQ tools calibrated from dfq pools",
        "",
        "Generated by `dfq bench tools` from `tools.json`: each tool's own W8A8 flow (W4A8/W4A4 where it has",
        "one), calibrated on each source; agree = % of images with the fp32 model's top-1. Every row names its machine.",
        "",
    ]
    out += summary_markdown(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    for (model, dataset), rs in sorted(groups.items()):
        fp = next((r for r in rs if r["tool"] == "fp32"), None)
        out += [f"## {model} on {dataset}", ""]
        if fp is not None:
            out += [f"fp32 top-1 {fp['top1']:.2f} ({fp['n_eval']} images).", ""]
        out += ["| tool | calib | pool | bits | n_calib | top-1 | Δ fp32 | agree | seconds | device | date |"]
        out += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(
            rs,
            key=lambda r: (
                r["tool"] != "fp32", r["tool"], r["calib"], -r["wbits"], -r["abits"], r.get("pool_seed") or 0
            ),
        ):  # fmt: skip
            if r["tool"] == "fp32":
                continue
            secs = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
            secs += f" (+{r['gen_seconds']:.0f} gen)" if r.get("gen_seconds") else ""
            if r.get("error"):
                cells = f"failed: {r['error'][:120]} | | "
            else:
                delta = "" if fp is None else f"{r['top1'] - fp['top1']:+.2f}"
                cells = f"{r['top1']:.2f} | {delta} | {r['fp_agree']:.2f}"
            out.append(
                f"| {r['tool']} | {r['calib']} | {'' if r.get('pool_seed') is None else r['pool_seed']} | {_bits(r)} | {r['n_calib']} | {cells} | {secs} "
                f"| {r['device']} | {r['date']} |"
            )
        out.append("")
    return "\n".join(out)


def summary_markdown(rows: list[dict]) -> list[str]:
    """Per (model, dataset, bits): each tool's top-1 per calibration source as the mean [min-max] over
    its pools (n), and the mean's difference to the same tool calibrated on real images."""
    ok = [r for r in rows if r["tool"] != "fp32" and not r.get("error") and r.get("top1") is not None]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["model"], r["dataset"], r["wbits"], r["abits"]), []).append(r)
    out = ["## Summary: mean [min-max] over pools (n), and Δ to the same tool on real images", ""]
    for (model, dataset, wbits, abits), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], -kv[0][3])
    ):
        calibs = sorted({r["calib"] for r in rs}, key=lambda c: (c != "real", c))
        out += [f"### {model} on {dataset}, W{wbits}A{abits}", ""]
        out += ["| tool | " + " | ".join(calibs) + " |", "|---|" + "---|" * len(calibs)]
        for tool in sorted({r["tool"] for r in rs}):
            by = {c: [r["top1"] for r in rs if r["tool"] == tool and r["calib"] == c] for c in calibs}
            real = sum(by["real"]) / len(by["real"]) if by.get("real") else None
            cells = []
            for c in calibs:
                v = by[c]
                if not v:
                    cells.append("")
                    continue
                mean = sum(v) / len(v)
                text = f"{mean:.2f}" + (f" [{min(v):.2f}-{max(v):.2f}] ({len(v)})" if len(v) > 1 else "")
                if real is not None and c != "real":
                    text += f", {mean - real:+.2f}"
                cells.append(text)
            out.append(f"| {tool} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot_tools(rows: list[dict], path: Path) -> bool:
    """Grouped bars per (model, dataset): top-1 of each tool (W8A8) per calibration source (the mean over
    its pools), fp32 dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, ((model, dataset), rs) in zip(axes.flat, sorted(groups.items())):
        ok = [r for r in rs if r["tool"] != "fp32" and not r.get("error") and r["wbits"] == 8]
        calibs = sorted({r["calib"] for r in ok})
        tools = sorted({r["tool"] for r in ok})
        width = 0.8 / max(1, len(tools))
        for j, tool in enumerate(tools):
            by_calib: dict[str, list[float]] = {}
            for r in ok:
                if r["tool"] == tool:
                    by_calib.setdefault(r["calib"], []).append(r["top1"])
            top1 = {c: sum(v) / len(v) for c, v in by_calib.items()}  # the mean over pools
            xs = [i for i, c in enumerate(calibs) if c in top1]
            ax.bar([x + j * width for x in xs], [top1[calibs[x]] for x in xs], width, label=tool)
        for r in rs:
            if r["tool"] == "fp32":
                ax.axhline(r["top1"], color="k", ls="--", lw=1, label="fp32")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(calibs))], calibs, fontsize=8)
        values = [r["top1"] for r in rs if r["tool"] == "fp32" or r in ok]
        if values:  # the differences are tenths of a point: do not start the axis at 0
            ax.set_ylim(min(values) - 1.0, max(values) + 0.5)
        ax.set_title(f"{model} W8A8\n{dataset}", fontsize=9)
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(results: Path, rows: list[dict]) -> list[dict]:
    """Merge rows into results/tools.json, rewrite tools.md and tools.png."""
    results = Path(results)
    merged = merge_rows(results / "tools.json", rows)
    (results / "tools.md").write_text(tools_markdown(merged) + "\n")
    plot_tools(merged, results / "tools.png")
    return merged


# ------------------------------------------------------------------------------------------ runs
def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def run_tools(
    model_name: str,
    model: torch.nn.Module,
    data_config: dict,
    calibs: list[tuple[str, object, dict]],
    evals: dict,
    tools: list[str],
    bits: list[str],
    n_calib: int,
    results: Path,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """fp32 rows, then per calibration source x tool x bits one row per eval set; written as they come."""
    from quant.evaluate import evaluate
    from quant.integrations import TOOLS, quantize_int8

    for tool in tools:  # imported before any timing: seconds are the tool's work, not its import
        importlib.import_module(TOOLS[tool].package)
    fp = {name: evaluate(model, data, progress=False) for name, data in evals.items()}
    rows = [
        make_row(
            tool="fp32",
            calib="none",
            model=model_name,
            dataset=name,
            wbits=32,
            abits=32,
            n_calib=0,
            top1=round(s["top1"], 2),
            top5=round(s["top5"], 2),
            fp_top1=round(s["top1"], 2),
            fp_agree=100.0,
            n_eval=s["n"],
            seconds=0.0,
        )  # fmt: skip
        for name, s in fp.items()
    ]
    write_results(results, rows)
    for label, source, extra in calibs:
        n = calibration_count(source, n_calib)
        for tool in tools:
            for name in bits:
                wbits, abits = BITS[name]
                if (wbits, abits) not in TOOLS[tool].bits:
                    continue
                common = dict(tool=tool, calib=label, model=model_name, wbits=wbits, abits=abits, n_calib=n)
                t0 = time.perf_counter()
                try:
                    qmodel = quantize_int8(
                        tool, model, data_config, source, n, batch_size=batch_size, seed=seed, wbits=wbits, abits=abits
                    )  # fmt: skip
                    seconds = time.perf_counter() - t0
                    scores = {
                        ds: evaluate(qmodel, data, progress=False, reference=model)
                        for ds, data in evals.items()
                    }
                except Exception as e:  # a tool failing on a model is a result, not a crash of the benchmark
                    error = _one_line(e)
                    print(f"{model_name} {tool} {name} {label}: failed: {error}", flush=True)
                    new = [
                        make_row(
                            **common, dataset=ds, top1=None, fp_agree=None, seconds=None, error=error, **extra
                        )
                        for ds in evals
                    ]
                else:
                    new = [
                        make_row(
                            **common,
                            dataset=ds,
                            top1=round(s["top1"], 2),
                            top5=round(s["top5"], 2),
                            fp_top1=round(fp[ds]["top1"], 2),
                            fp_agree=round(s["agree"], 2),
                            fp_kl=round(s["kl"], 5),
                            n_eval=s["n"],
                            seconds=round(seconds, 2),
                            **extra,
                        )  # fmt: skip
                        for ds, s in scores.items()
                    ]
                    line = " ".join(
                        f"{r['dataset']} {r['top1']:.2f} (agree {r['fp_agree']:.1f})" for r in new
                    )
                    print(f"{model_name} {tool} {name} {label}: {line}, {seconds:.1f}s", flush=True)
                rows += new
                write_results(results, rows)
    return rows


def mct_datagen_sources(
    entries: str,
    model: torch.nn.Module,
    data_config: dict,
    n_calib: int,
    iters: int | None,
    seeds: str = "0",
) -> list[tuple[str, torch.Tensor, dict]]:
    """(label, images, row fields) per --mct-datagen entry and seed: `default` (n_calib images) or an
    image budget N; MCT draws from torch's and numpy's global generators, seeded here per pool."""
    from quant.integrations import tool_module

    entries_list = [e for e in entries.split(",") if e]
    for entry in entries_list:
        if entry != "default" and not entry.isdigit():
            raise BenchmarkError(f"--mct-datagen {entry!r}: use default or an image count")
    try:
        seed_list = [int(v) for v in seeds.split(",")]
    except ValueError:
        raise BenchmarkError(f"--mct-datagen-seeds {seeds!r}: use a comma list of integers") from None
    out = []
    for entry in entries_list:
        n = n_calib if entry == "default" else int(entry)
        label = "mct-datagen" if entry == "default" else f"mct-datagen-{n}"
        label += f"-{iters}it" if iters else ""
        for seed in seed_list:
            torch.manual_seed(seed)
            np.random.seed(seed)
            images, seconds = tool_module("mct").generate_images(model, data_config, n, n_iter=iters)
            print(f"mct.data_generation seed {seed}: {n} images in {seconds:.1f}s", flush=True)
            fields = {"gen_seconds": round(seconds, 1), "gen_images": n, "gen_iters": iters or 500}
            out.append((label, images, {**fields, "pool_seed": seed}))
    return out


def _tool_list(text: str) -> list[str]:
    from quant.integrations import TOOLS, installed

    tools = [t for t in text.split(",") if t] or installed()
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise BenchmarkError(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(TOOLS)})")
    missing = [t for t in tools if t not in installed()]
    if missing:
        extras = ",".join(TOOLS[t].extra for t in missing)
        raise BenchmarkError(f"--tools: {', '.join(missing)} not installed (pip install 'dfq[{extras}]')")
    return tools


def run(args: argparse.Namespace) -> int:
    from quant.data import build_transform

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        return _run_tiny(args)
    bits = args.bits.split(",")
    if any(b not in BITS for b in bits):
        raise BenchmarkError(f"--bits {args.bits!r}: use a comma list of {', '.join(BITS)}")
    tools = _tool_list(args.tools)
    if not args.eval:
        raise BenchmarkError("give at least one --eval NAME=SOURCE")
    model, data_config = build_model(args.model, args.checkpoint)
    transform = build_transform(data_config)
    calibs = [
        (label, source, report.pool_fields(source)) for label, source in calibration_sources(args, transform)
    ]
    calibs += mct_datagen_sources(
        args.mct_datagen, model, data_config, args.n_calib, args.mct_datagen_iters, args.mct_datagen_seeds
    )
    if not calibs:
        raise BenchmarkError("give at least one --calib NAME=SOURCE or --mct-datagen")
    evals = eval_sets(args, transform)
    model_name = args.model
    run_tools(
        model_name, model, data_config, calibs, evals, tools, bits, args.n_calib, Path(args.results),
        args.batch_size, args.seed,
    )  # fmt: skip
    print(Path(args.results) / "tools.json")
    return 0


def tiny_model() -> tuple[torch.nn.Module, dict]:
    """A random conv-bn-relu CNN on 16 x 16 inputs with BN statistics from noise, and its data config."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    config = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
    return model.eval(), config


def _run_tiny(args: argparse.Namespace) -> int:
    """CI form: the tiny CNN, calibrated on noise and a random .npz, evaluated on another .npz."""
    out = (
        Path(args.results)
        if args.results != "benchmarks/results"
        else Path(tempfile.mkdtemp(prefix="dfq-tools-"))
    )
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in (("calib", 16), ("eval", 24)):
        images = rng.integers(0, 256, (count, 3, 16, 16), dtype=np.uint8)
        np.savez(out / f"{name}.npz", images=images, labels=rng.integers(0, 10, count))
    args.calib, args.eval = ["noise", f"random={out / 'calib.npz'}"], [f"random-24={out / 'eval.npz'}"]
    args.n_calib, args.results = 16, str(out)
    model, data_config = tiny_model()
    from quant.data import build_transform

    transform = build_transform(data_config)
    calibs = [(label, source, {}) for label, source in calibration_sources(args, transform)]
    bits = args.bits.split(",")
    run_tools(
        "tiny-cnn-random", model, data_config, calibs, eval_sets(args, transform), _tool_list(args.tools), bits,
        args.n_calib, out, batch_size=8,
    )  # fmt: skip
    print(out / "tools.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

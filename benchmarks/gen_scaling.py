"""`dfq bench scaling`: images/s of the real `engine.generate` against the number of Ray actors.

For each actor count (`--actors 1,2,4`; CPU actors with the tiny preset, or one actor per GPU up to
the GPUs there are) a fresh pool is generated into a temp dir by `engine.driver.generate`, with
`--images-per-actor` images per actor (weak scaling: each actor has the same work), on one Ray session
started up front (so Ray's own start is not timed; actor start and pipeline load are). A row reports
end-to-end images/s, the efficiency against linear scaling from the first row
(`img_per_s / (actors * img_per_s_1 / actors_1)`) and the driver's CPU time per image
(`time.process_time()` of this process over the run / images): well under the time an actor spends
per image means the driver is never the bottleneck.

`--random-weights` (GPU): the SD1.5 architecture with random weights, saved once to a temp dir as a
local diffusers model. Results: `gen_scaling.json` (benchmarks/README.md) and `gen_scaling.md`; a CPU run never
replaces a GPU result (it writes `gen_scaling.cpu.json` then, as `dfq bench gen` does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

STEM = "gen_scaling"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.config import COMPILE_MODES

    p.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    p.add_argument("--preset", choices=("sd15", "tiny"), default="tiny")
    p.add_argument("--random-weights", action="store_true", help="SD1.5 architecture, random weights")
    p.add_argument("--model", default=None, help="diffusers model id or path (default: the preset's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--images-per-actor", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--batch", default="8", help="batch size or auto (default 8)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--results", default="benchmarks/results", help="output directory")


def run(args: argparse.Namespace) -> int:
    from benchmarks.gen_throughput import write_report

    report = measure(args)
    paths = write_report(report, Path(args.results), STEM, markdown)
    print(markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from benchmarks.report import device_string, today
    from engine.pipeline import resolve_device

    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(args.device)
    counts = sorted({int(a) for a in str(args.actors).split(",") if a.strip()})
    if device == "cuda":
        gpus = torch.cuda.device_count()
        skipped = [n for n in counts if n > gpus]
        counts = [n for n in counts if n <= gpus] or [1]
        if skipped:
            print(f"dfq bench scaling: {gpus} GPU(s): skipping actor counts {skipped}", file=sys.stderr)
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="dfq-bench-scaling-") as tmp:
        model = args.model
        if args.random_weights:
            model = save_random_sd15(os.path.join(tmp, "sd15-random"), device)
        started = False
        if not ray.is_initialized():
            ray.init(
                num_cpus=max(os.cpu_count() or 1, max(counts)),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            started = True
        try:
            for n in counts:
                row, extra = run_one(args, n, model, device, os.path.join(tmp, f"pool-{n}"))
                rows.append(row)
                details.append(extra)
                print(f"dfq bench scaling: {row}", file=sys.stderr)
        finally:
            if started:
                ray.shutdown()
    base = rows[0]["img_per_s"] / rows[0]["actors"]
    for row in rows:
        row["efficiency"] = round(row["img_per_s"] / (row["actors"] * base), 4)
    return {
        "device": device_string() if device == "cuda" else _cpu_device(),
        "rows": rows,
        "date": today(),
        "details": {
            "preset": args.preset,
            "model": "random:sd15" if args.random_weights else (model or args.preset),
            "images_per_actor": args.images_per_actor,
            "shard_size": args.shard_size,
            "batch": args.batch,
            "compile": args.compile,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "rows": details,
        },
    }


def _cpu_device() -> str:
    from benchmarks.report import device_string

    return device_string().rsplit(" (", 1)[0] + " (1 torch thread per actor)"


def run_one(args: argparse.Namespace, n: int, model: str | None, device: str, out: str) -> tuple[dict, dict]:
    """One fresh pool with `n` actors: (gen_scaling.json row, extra numbers)."""
    from engine.config import GenerateConfig
    from engine.driver import generate

    images = args.images_per_actor * n
    cfg = GenerateConfig(
        out=out,
        preset=args.preset,
        model=model,
        settings={"steps": args.steps, "size": (args.size, args.size) if args.size else None},
        num_images=images,
        shard_size=args.shard_size,
        workers=n,
        batch_size="auto" if args.batch == "auto" else int(args.batch),
        device=device,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        compile=args.compile,
        compile_mode=args.compile_mode,
        progress=False,
    )
    import tqdm  # noqa: F401

    import engine.worker  # noqa: F401  (imports are not the driver's per-image work)

    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = generate(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if not summary["complete"] or summary["images_written"] != images:
        raise RuntimeError(f"scaling run with {n} actors did not finish: {summary}")
    busy = _busy_rate(out)
    row = {
        "actors": n,
        "img_per_s": round(images / wall, 4),
        "efficiency": None,
        "driver_cpu_ms_per_image": round(1000 * cpu / images, 4),
    }
    extra = {
        "actors": n,
        "images": images,
        "wall_seconds": round(wall, 3),
        "driver_cpu_seconds": round(cpu, 3),
        "busy_img_per_s": round(busy, 4),
        "actor_ms_per_image": round(1000 * n / busy, 2) if busy else None,
        "workers": len(summary["workers"]),
    }
    return row, extra


def _busy_rate(out: str) -> float:
    """Sum over actors of images / seconds spent in run_unit (the manifest's per-shard stats)."""
    import json

    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    sizes = {str(e["shard"]): e["nsamples"] for e in manifest["shardlist"]}
    images, seconds = defaultdict(int), defaultdict(float)
    for shard, stats in manifest["stats"]["shards"].items():
        images[stats["worker"]] += sizes.get(shard, 0)
        seconds[stats["worker"]] += stats["seconds"]
    return sum(images[w] / seconds[w] for w in images if seconds[w] > 0)


def save_random_sd15(path: str, device: str) -> str:
    """The SD1.5-architecture random pipeline as a local diffusers folder (fp16 on a GPU)."""
    import torch

    from benchmarks.flops import sd15_random_pipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = sd15_random_pipeline(device, dtype)
    pipe.save_pretrained(path)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def markdown(r: dict[str, Any]) -> str:
    d = r.get("details", {})
    extra = {e["actors"]: e for e in d.get("rows", [])}
    lines = [
        "# Generation scaling",
        "",
        f"Device: {r['device']}; {r['date']}. `engine.generate` on a fresh pool per actor count, "
        f"{d.get('images_per_actor')} images per actor (model {d.get('model')}, batch {d.get('batch')}, "
        f"shards of {d.get('shard_size')}). Generated by `dfq bench scaling`.",
        "",
        "| actors | img/s | efficiency | driver CPU ms/image | actor ms/image (busy) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        e = extra.get(row["actors"], {})
        lines.append(
            f"| {row['actors']} | {row['img_per_s']:.3g} | {row['efficiency']:.0%} | "
            f"{row['driver_cpu_ms_per_image']:.3g} | {e.get('actor_ms_per_image', 'n/a')} | "
            f"{e.get('wall_seconds', 'n/a')} |"
        )
    lines += [
        "",
        "img/s is end to end (actor start and pipeline load included, Ray's start excluded); efficiency is "
        "against linear scaling from the first row. The driver is not the bottleneck while its CPU ms per "
        "image stays far below an actor's ms per image.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gen_scaling", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

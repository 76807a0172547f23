"""`dfq bench gen`: images/s of the plain diffusers loop against our worker, on one model, one process.

Three measurements on the same weights and settings (steps, guidance, size, dtype):

1. plain diffusers at batch 1: `pipe(prompts, num_inference_steps, guidance_scale, generator=...,
   output_type="pil")`, eager, as a user writes it;
2. the same call at a large batch (`--plain-batch`, default 48 on a GPU);
3. our worker: the same pipeline object put in the engine's running state (channels_last, fused QKV,
   torch.compile of UNet and VAE decoder, compile paid in the actor's warm-up), generating shards
   through `ShardWorker.run_unit` (PNG encoding and tar writing overlapped with denoising) into a
   temp dir. Its batch is `--batch` (default auto: from free GPU memory).

FLOPs per image come from torch.utils.flop_counter (benchmarks/flops.py); the roofline is
`--peak-tflops` (default 800, an H100's dense fp16/bf16 matmul rate) on a GPU and a measured fp32 matmul
rate on a CPU. Results: `gen_throughput.json` (fields in benchmarks/README.md; extra numbers under `details`) and
`gen_throughput.md`. A CPU run never replaces a GPU result: if the existing `gen_throughput.json` names
a GPU and this run is on a CPU, it writes `gen_throughput.cpu.json` / `.cpu.md` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FIELDS = (
    "device", "settings", "flops_per_image", "roofline_img_per_s", "plain_bs1_img_per_s",
    "plain_large_batch", "plain_large_img_per_s", "ours_img_per_s", "ours_batch",
    "speedup_vs_plain_large_batch", "roofline_fraction", "compile_seconds", "peak_mem_gib", "date",
)  # fmt: skip
STEM = "gen_throughput"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.config import ATTENTIONS, COMPILE_MODES

    p.add_argument(
        "--preset", choices=("sd15", "tiny"), default="sd15", help="sd15 (512 px, 50 steps) or tiny"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="SD1.5 architecture with random weights (no hub access); tiny is always random",
    )
    p.add_argument("--model", default=None, help="diffusers model id or path (default: the preset's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--size", type=int, default=None, help="square image side in pixels")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    p.add_argument("--plain-batch", type=int, default=None, help="plain loop's large batch (GPU 48, CPU 8)")
    p.add_argument("--batch", default="auto", help="our worker's batch: an integer or auto (default)")
    p.add_argument(
        "--images", type=int, default=None, help="images in our timed run, one shard (default 3 batches)"
    )
    p.add_argument(
        "--plain-images", type=int, default=None, help="images in each plain timing (default 1 call)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for CUDA, off on CPU",
    )
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    p.add_argument("--no-overlap", action="store_true", help="encode/write on the main thread")
    p.add_argument("--skip-bs1", action="store_true", help="skip the batch-1 plain run")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="roofline peak (GPU default 800; CPU measured)"
    )
    p.add_argument("--results", default="benchmarks/results", help="output directory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    paths = write_report(report, Path(args.results))
    print(markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ measure
def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.flops import H100_PEAK_TFLOPS, cpu_matmul_peak, image_flops, sd15_random_pipeline
    from benchmarks.report import device_string, today
    from engine.config import GenerateConfig
    from engine.diffusion_settings import DiffusionSettings
    from engine.pipeline import build_pipeline, resolve_device, resolve_dtype
    from engine.tiny import TINY_MODEL_ID, build_tiny_pipeline

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device == "cuda"
    preset = DiffusionSettings.presets[args.preset]
    steps = args.steps or preset["steps"]
    guidance = preset["guidance"] if args.guidance is None else args.guidance
    size = args.size or preset["size"][0]
    plain_batch = args.plain_batch or (48 if on_gpu else 8)
    compile_ = on_gpu if args.compile is None else args.compile
    batch: int | str = "auto" if args.batch == "auto" else int(args.batch)
    random_weights = args.random_weights or args.preset == "tiny"
    model = args.model or (TINY_MODEL_ID if args.preset == "tiny" else preset["model"])

    # one pipeline: plain runs first on it, then it is put in our running state in place
    t0 = time.perf_counter()
    if model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline()
    elif random_weights:
        pipe = sd15_random_pipeline(device, dtype)
        model = "random:sd15"
    else:
        base = GenerateConfig(out="/tmp/unused", model=model, device=device, dtype=args.dtype)
        pipe = build_pipeline(dataclasses.replace(base, preset=args.preset).resolved(), device, compile=False)
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    flops = image_flops(pipe, size, size, steps, guidance)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "argument"
    elif on_gpu:
        peak, peak_source = H100_PEAK_TFLOPS, "H100 dense fp16/bf16 matmul (docs/results.md)"
    else:
        peak, peak_source = cpu_matmul_peak(), "measured fp32 matmul, this CPU"

    plain_bs1 = None
    if not args.skip_bs1:
        plain_bs1 = plain_img_per_s(pipe, 1, args.plain_images or (4 if on_gpu else 2), steps, guidance, size)
    plain_large = plain_img_per_s(pipe, plain_batch, args.plain_images or plain_batch, steps, guidance, size)

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ours = ours_img_per_s(
        pipe,
        device=device,
        dtype=dtype,
        preset=args.preset,
        model=model,
        steps=steps,
        guidance=guidance,
        size=size,
        batch=batch,
        images=args.images,
        compile_=compile_,
        compile_mode=args.compile_mode,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        attention=args.attention,
        overlap=not args.no_overlap,
        dtype_name=args.dtype,
    )
    if on_gpu:
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    roofline = peak * 1e12 / flops["per_image"]
    report = {
        "device": device_string() if on_gpu or device == "cpu" else device,
        "settings": {
            "model": model,
            "random_weights": random_weights,
            "preset": args.preset,
            "dtype": str(dtype).replace("torch.", ""),
            "size": size,
            "steps": steps,
            "guidance": guidance,
            "scheduler": type(pipe.scheduler).__name__,
            "compile": compile_,
            "compile_mode": args.compile_mode if compile_ else None,
            "channels_last": args.channels_last,
            "fuse_qkv": args.fuse_qkv,
            "attention": args.attention,
            "overlap_writer": not args.no_overlap,
            "peak_tflops": round(peak, 4),
            "peak_source": peak_source,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "flops_per_image": flops["per_image"],
        "roofline_img_per_s": roofline,
        "plain_bs1_img_per_s": plain_bs1,
        "plain_large_batch": plain_batch,
        "plain_large_img_per_s": plain_large,
        "ours_img_per_s": ours["img_per_s"],
        "ours_batch": ours["batch"],
        "speedup_vs_plain_large_batch": ours["img_per_s"] / plain_large,
        "roofline_fraction": ours["img_per_s"] / roofline,
        "compile_seconds": ours["compile_seconds"],
        "peak_mem_gib": peak_mem,
        "date": today(),
        "details": {
            "unet_tflop_per_sample_forward": flops["unet_forward_per_sample"] / 1e12,
            "vae_decode_tflop": flops["vae_decode"] / 1e12,
            "ours_tflops_per_s": ours["img_per_s"] * flops["per_image"] / 1e12,
            "plain_large_tflops_per_s": plain_large * flops["per_image"] / 1e12,
            "speedup_vs_plain_bs1": ours["img_per_s"] / plain_bs1 if plain_bs1 else None,
            "ours_images": ours["images"],
            "ours_seconds": ours["seconds"],
            "denoise_step_seconds": ours["step_seconds"],
            "batch_fixed_seconds": ours["batch_fixed_seconds"],
            "denoise_bound_img_per_s": ours["denoise_bound_img_per_s"],
            "pipeline_efficiency": ours["img_per_s"] / ours["denoise_bound_img_per_s"],
            "warmup_seconds": ours["warmup_seconds"],
            "rejected": ours["rejected"],
            "load_seconds": load_seconds,
            "peak_mem_kind": "torch.cuda.max_memory_allocated (ours)" if on_gpu else "ru_maxrss (process)",
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }
    return _rounded(report)


def _prompts(n: int, offset: int = 0) -> list[str]:
    return [f"a photo of class {offset + i} and class {offset + i + 1}" for i in range(n)]


def plain_img_per_s(pipe: Any, batch: int, images: int, steps: int, guidance: float, size: int) -> float:
    """The plain diffusers loop, eager: one untimed short call, then `images` images in calls of `batch`."""
    import torch

    def call(n: int, k: int, offset: int) -> None:
        generators = [torch.Generator(device="cpu").manual_seed(offset + i) for i in range(n)]
        with torch.inference_mode():
            pipe(
                _prompts(n, offset),
                num_inference_steps=k,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=generators,
                output_type="pil",
            )

    call(batch, min(steps, 2), 10_000)  # warm-up: kernels, allocator, cuDNN autotuning
    _sync()
    calls = max(1, -(-images // batch))
    start = time.perf_counter()
    for c in range(calls):
        call(batch, steps, c * batch)
    _sync()
    return calls * batch / (time.perf_counter() - start)


def ours_img_per_s(
    pipe: Any, *, device: str, dtype: Any, images: int | None, overlap: bool, **kw: Any
) -> dict:
    """Our worker on `pipe` (made fast in place): warm-up (compile) at construction, then timed shards."""
    from engine.config import GenerateConfig
    from engine.diffusion import DiffusionGenerator
    from engine.pipeline import prepare_pipeline
    from engine.worker import ShardWorker

    with tempfile.TemporaryDirectory(prefix="dfq-bench-gen-") as out:
        cfg = GenerateConfig(
            out=out,
            preset=kw["preset"],
            model=kw["model"] if kw["model"] != "random:sd15" else None,
            settings={"steps": kw["steps"], "guidance": kw["guidance"], "size": (kw["size"], kw["size"])},
            batch_size=kw["batch"],
            device=device,
            dtype=kw["dtype_name"],
            attention=kw["attention"],
            channels_last=kw["channels_last"],
            fuse_qkv=kw["fuse_qkv"],
            compile=kw["compile_"],
            compile_mode=kw["compile_mode"],
            progress=False,
        )
        cfg = dataclasses.replace(cfg.resolved(), model=kw["model"])  # model: metadata only here
        # eager state now; DiffusionGenerator sizes the batch on eager modules, then compiles
        pipe = prepare_pipeline(pipe, cfg, device, dtype, compile=False)
        start = time.perf_counter()
        worker = ShardWorker(cfg, generator=DiffusionGenerator(cfg, pipe=pipe), overlap=overlap)
        warm = worker.warmup or {}
        if not cfg.compile:  # no compile to pay: one untimed batch warms kernels and the allocator
            worker.generator.denoise(_prompts(worker.batch_size), list(range(worker.batch_size)), steps=2)
        warmup_seconds = time.perf_counter() - start
        batch = worker.batch_size
        n = images or 3 * batch
        n = max(batch, n // batch * batch)  # whole batches
        # one shard of several batches, as production shards (256 images) hold: encoding a batch
        # overlaps the next batch's denoising, and only the last batch's encoding is not hidden
        cfg = dataclasses.replace(cfg, num_images=n, shard_size=n, out=out)
        worker.cfg = cfg
        _sync()
        start = time.perf_counter()
        rejected = sum(worker.run_unit(s)["rejected"] for s in range(cfg.num_shards))
        _sync()
        seconds = time.perf_counter() - start
        split = time_split(worker.generator, batch, kw["steps"])
    return {
        **split,
        "img_per_s": n / seconds,
        "batch": batch,
        "images": n,
        "seconds": seconds,
        "rejected": rejected,
        "compile_seconds": warm.get("compile_seconds", 0.0),
        "warmup_seconds": warm.get("warmup_seconds", warmup_seconds),
    }


def time_split(generator: Any, batch: int, steps: int, short: int = 2, long: int = 12) -> dict[str, float]:
    """Where a batch's time goes: two untimed-path `denoise` calls of `short` and `long` steps give
    the seconds of one denoising step and the fixed part of a batch (prompt encoding, VAE decode,
    post-processing to host floats); with them, the img/s our worker would reach if encoding and
    writing cost nothing (`denoise_bound_img_per_s`)."""
    long = min(long, steps) if steps > short else short + 1
    prompts, seeds = _prompts(batch, 20_000), list(range(batch))
    times = {}
    for k in (short, long):
        _sync()
        start = time.perf_counter()
        generator.denoise(prompts, seeds, steps=k)  # returns host arrays: synchronised
        times[k] = time.perf_counter() - start
    step = max(0.0, (times[long] - times[short]) / (long - short))
    fixed = max(0.0, times[short] - short * step)
    return {
        "step_seconds": step,
        "batch_fixed_seconds": fixed,
        "denoise_bound_img_per_s": batch / (steps * step + fixed) if step or fixed else float("nan"),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------ report
def result_paths(results: Path, device: str, stem: str = STEM) -> tuple[Path, Path]:
    """Where a run's JSON/Markdown go: `<stem>.json`, or `<stem>.cpu.json` when this run is on a CPU
    and the existing `<stem>.json` came from a GPU (a tiny CPU run never replaces a GPU result)."""
    main = results / f"{stem}.json"
    if not device.startswith("cuda") and main.exists():
        try:
            existing = json.loads(main.read_text()).get("device", "")
        except (OSError, ValueError, AttributeError):
            existing = ""
        if str(existing).startswith("cuda"):
            return results / f"{stem}.cpu.json", results / f"{stem}.cpu.md"
    return main, results / f"{stem}.md"


def write_report(report: dict[str, Any], results: Path, stem: str = STEM, md: Any = None) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    json_path, md_path = result_paths(results, report["device"], stem)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, json_path)
    md_path.write_text((md or markdown)(report) + "\n")
    return [json_path, md_path]


def markdown(r: dict[str, Any]) -> str:
    s, d = r["settings"], r.get("details", {})

    def num(v: Any, fmt: str = ".3g") -> str:
        return "n/a" if v is None else format(v, fmt)

    return "\n".join(
        [
            "# Generation throughput",
            "",
            f"Device: {r['device']}; {r['date']}. Model {s['model']} ({s['dtype']}, {s['size']} px, "
            f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance']}). Generated by `dfq bench gen`.",
            "",
            f"One image = {num(r['flops_per_image'] / 1e12)} TFLOP "
            f"(UNet {num(d.get('unet_tflop_per_sample_forward'))} TFLOP a sample-forward, "
            f"VAE decode {num(d.get('vae_decode_tflop'))} TFLOP); roofline {num(r['roofline_img_per_s'])} img/s "
            f"at {s['peak_tflops']} TFLOP/s ({s['peak_source']}).",
            "",
            "| run | batch | img/s | TFLOP/s | of roofline |",
            "|---|---|---|---|---|",
            f"| plain diffusers | 1 | {num(r['plain_bs1_img_per_s'])} | "
            f"{num(_tflops(r, r['plain_bs1_img_per_s']))} | {num(_frac(r, r['plain_bs1_img_per_s']), '.1%')} |",
            f"| plain diffusers | {r['plain_large_batch']} | {num(r['plain_large_img_per_s'])} | "
            f"{num(_tflops(r, r['plain_large_img_per_s']))} | {num(_frac(r, r['plain_large_img_per_s']), '.1%')} |",
            f"| ours (dfq worker) | {r['ours_batch']} | {num(r['ours_img_per_s'])} | "
            f"{num(_tflops(r, r['ours_img_per_s']))} | {num(r['roofline_fraction'], '.1%')} |",
            "",
            f"Speedup over plain batch {r['plain_large_batch']}: {num(r['speedup_vs_plain_large_batch'])}x "
            f"(over batch 1: {num(d.get('speedup_vs_plain_bs1'))}x). Compile {num(r['compile_seconds'])} s "
            f"(once per actor, in its warm-up). Peak memory {num(r['peak_mem_gib'])} GiB "
            f"({d.get('peak_mem_kind', '')}).",
            "",
            f"Where our batch of {r['ours_batch']} goes: {num(d.get('denoise_step_seconds'))} s a denoising step "
            f"(CFG batch through the UNet, guidance, scheduler), {num(d.get('batch_fixed_seconds'))} s fixed "
            f"(prompt encoding, VAE decode, post-processing): {num(d.get('denoise_bound_img_per_s'))} img/s "
            f"if encoding and writing were free; the worker reaches {num(d.get('pipeline_efficiency'), '.1%')} "
            "of that.",
            "",
            f"Ours: compile={s['compile']} ({s['compile_mode']}), channels_last={s['channels_last']}, "
            f"fused QKV={s['fuse_qkv']}, attention={s['attention']}, overlapped writer={s['overlap_writer']}.",
        ]
    )


def _tflops(r: dict[str, Any], img_per_s: float | None) -> float | None:
    return None if img_per_s is None else img_per_s * r["flops_per_image"] / 1e12


def _frac(r: dict[str, Any], img_per_s: float | None) -> float | None:
    return None if img_per_s is None else img_per_s / r["roofline_img_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gen_throughput", description=__doc__.split("\n")[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

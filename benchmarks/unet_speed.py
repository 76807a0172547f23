"""Where the denoising time goes: one CFG UNet forward of SD1.5 under several running states.

`dfq bench gen` measures whole images; this times the part that is 97% of an image's FLOPs (the
UNet forward at the CFG batch) under named *variants* of the running state, each in a fresh
subprocess (torch.compile and inductor settings are process-global), and optionally profiles one
variant's CUDA kernels by kind (convolution, matmul, attention, Triton-fused elementwise, other).
It is the tool the worker's defaults were chosen with (issue 5); results go to `unet_speed.json`.

A variant is a `+`-joined list of switches, e.g. `cl+fuse+compile+tuned`:
`cl` channels_last, `fuse` fused QKV projections, `compile` torch.compile (default mode),
`autotune` torch.compile mode max-autotune-no-cudagraphs, `graphs` mode reduce-overhead,
`tuned` inductor settings (1x1 convs as matmuls, coordinate-descent tuning, no epilogue fusion),
`bench` cudnn.benchmark, and an attention backend `cudnn`, `flash` or `efficient` (default: PyTorch's
choice). `eager` is the empty list.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SWITCHES = ("cl", "fuse", "compile", "autotune", "graphs", "tuned", "bench", "cudnn", "flash", "efficient")


def parse_variant(text: str) -> tuple[str, ...]:
    """`cl+fuse+compile` -> ('cl', 'fuse', 'compile'); `eager` -> (); unknown switches are an error."""
    if text == "eager":
        return ()
    parts = tuple(p for p in text.split("+") if p)
    bad = [p for p in parts if p not in SWITCHES]
    if bad:
        raise SystemExit(f"unknown switch {bad[0]!r} in variant {text!r} (choose from {', '.join(SWITCHES)})")
    return parts


def apply_switches(unet: Any, switches: tuple[str, ...]) -> Any:
    """Put `unet` (a diffusers UNet2DConditionModel on CUDA) in the state the switches name."""
    import torch

    if "bench" in switches:
        torch.backends.cudnn.benchmark = True
    for name, flag in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "mem_efficient")):
        if name in switches:  # only this SDPA backend
            for other in ("flash", "mem_efficient", "math", "cudnn"):
                getattr(torch.backends.cuda, f"enable_{other}_sdp")(other == flag)
    if "tuned" in switches:
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        inductor.epilogue_fusion = False
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if "cl" in switches:
        unet.to(memory_format=torch.channels_last)
    if "fuse" in switches:
        unet.fuse_qkv_projections()
    mode = next((m for s, m in (("autotune", "max-autotune-no-cudagraphs"), ("graphs", "reduce-overhead"),
                                ("compile", "default")) if s in switches), None)  # fmt: skip
    if mode is not None:
        unet = torch.compile(unet, **({} if mode == "default" else {"mode": mode}))
    return unet


def build_unet(preset: str) -> tuple[Any, str, Any]:
    """(UNet, device, dtype): SD1.5's architecture in fp16 on CUDA, or the tiny preset's in fp32 on CPU."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.flops import SD15_UNET

    if preset == "sd15":
        if not torch.cuda.is_available():
            raise SystemExit("unet_speed --preset sd15 needs a CUDA GPU (use --preset tiny on a CPU)")
        torch.manual_seed(0)
        with torch.device("cuda"):
            return UNet2DConditionModel(**SD15_UNET).eval().half(), "cuda", torch.float16
    from engine.tiny import build_tiny_pipeline

    return build_tiny_pipeline().unet.eval(), "cpu", torch.float32


def time_variant(variant: str, batch: int, reps: int, profile: bool, preset: str = "sd15") -> dict[str, Any]:
    """Median ms of one UNet forward at CFG batch 2*batch (CUDA events on a GPU), after compile and
    warm-up, and its relative error against the eager fp16 forward on the same input."""
    import torch
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode

    switches = parse_variant(variant)
    unet, device, dtype = build_unet(preset)
    on_gpu = device == "cuda"
    n, c, size = 2 * batch, unet.config.in_channels, unet.config.sample_size
    gen = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(n, c, size, size, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    ctx = torch.randn(n, 77, unet.config.cross_attention_dim, device=device, dtype=dtype, generator=gen)
    if "cl" in switches:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    t = torch.tensor(500, device=device)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(xs[0][:2], t, encoder_hidden_states=ctx[:2], return_dict=False)
        flops_per_sample = counter.get_total_flops() / 2
        ref = unet(xs[0], t, encoder_hidden_states=ctx, return_dict=False)[0].float()
        model = apply_switches(unet, switches)
        counters.clear()
        start = time.perf_counter()
        out = model(xs[0], t, encoder_hidden_states=ctx, return_dict=False)[0]
        sync()
        first = time.perf_counter() - start
        breaks = dict(counters["graph_break"])
        graphs = counters["stats"].get("unique_graphs", 0)
        err = float((out.float() - ref).norm() / ref.norm())
        for i in range(2):
            model(xs[i % 3], t, encoder_hidden_states=ctx, return_dict=False)
        sync()
        times = []
        for i in range(reps):
            if on_gpu:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(xs[i % 3], t, encoder_hidden_states=ctx, return_dict=False)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                start = time.perf_counter()
                model(xs[i % 3], t, encoder_hidden_states=ctx, return_dict=False)
                times.append((time.perf_counter() - start) * 1e3)
        kinds = profile_kernels(model, xs, t, ctx, on_gpu) if profile else None
    times.sort()
    ms = times[len(times) // 2]
    return {
        "variant": variant,
        "device": device,
        "preset": preset,
        "cfg_batch": n,
        "ms": round(ms, 3),
        "ms_min": round(times[0], 3),
        "tflops": round(flops_per_sample * n / ms / 1e9, 4),
        "unet_img_per_s_50_steps": round(batch / (50 * ms / 1e3), 3),
        "first_call_s": round(first, 2),
        "graphs": graphs,
        "graph_breaks": {str(k)[:200]: v for k, v in breaks.items()},
        "rel_err_vs_eager": round(err, 5),
        "kernels": kinds,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("fmha", "flash", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in low for k in ("conv", "implicit", "fprop", "dgrad", "nhwc", "xmma_fprop")):
        return "convolution"
    if any(
        k in low
        for k in ("gemm", "cutlass", "xmma", "matmul", "cublas", "mm_", "nvjet", "addmm", "aten::mm", "bmm")
    ):
        return "matmul"
    if low.startswith("triton"):
        return "triton-fused"
    if any(k in low for k in ("norm", "elementwise", "reduce", "copy", "cat", "silu", "gelu", "softmax")):
        return "eager-elementwise"
    return "other"


def profile_kernels(model: Any, xs: list[Any], t: Any, ctx: Any, on_gpu: bool = True) -> dict[str, Any]:
    """Time of two forwards by kind (CUDA kernels on a GPU, operators' self time on a CPU), and the
    12 largest entries."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for i in range(2):
            model(xs[i], t, encoder_hidden_states=ctx, return_dict=False)
        if on_gpu:
            torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    rows = []
    for ev in prof.key_averages():
        if on_gpu:
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
                continue
        else:
            us = ev.self_cpu_time_total
        if not us:
            continue
        kind = kernel_kind(ev.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 2e3  # ms per forward
        rows.append((us / 2e3, ev.count // 2, kind, ev.key[:120]))
    rows.sort(reverse=True)
    total = sum(by_kind.values())
    return {
        "ms_per_forward": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "total_ms": round(total, 2),
        "top": [{"ms": round(ms, 2), "calls": c, "kind": k, "name": nm} for ms, c, k, nm in rows[:12]],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table of the variants (time, rate, error, compile) and, per profiled variant, time by kind."""
    lines = [
        "# UNet forward by running state",
        "",
        "Generated by `python -m benchmarks.unet_speed`: one CFG UNet forward (random weights), median of "
        "repeated runs after warm-up; `first` is the first call (compile included).",
        "",
        "| variant | device | CFG batch | ms | TFLOP/s | img/s (UNet only, 50 steps) | first call s | rel. err. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('error', '?')} | | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['device']} | {r['cfg_batch']} | {r['ms']:.1f} | {r['tflops']:.4g} | "
            f"{r['unet_img_per_s_50_steps']:.3g} | {r['first_call_s']} | {r['rel_err_vs_eager']:.2g} |"
        )
    for r in rows:
        k = r.get("kernels")
        if k:
            parts = ", ".join(
                f"{kind} {ms:.1f} ms ({ms / k['total_ms']:.0%})" for kind, ms in k["ms_per_forward"].items()
            )
            lines += ["", f"{r['variant']} (CFG batch {r['cfg_batch']}), time by kind: {parts}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unet_speed", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="eager,cl+fuse,cl+fuse+compile", help="comma-separated variants")
    p.add_argument(
        "--preset", choices=("sd15", "tiny"), default="sd15", help="sd15 (CUDA, fp16) or tiny (CPU)"
    )
    p.add_argument("--batch", type=int, default=48, help="images per forward (the UNet sees twice this)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", default="", help="comma-separated variants to profile by kernel kind")
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run one variant, print JSON
    args = p.parse_args(argv)
    if args.one is not None:
        result = time_variant(args.one, args.batch, args.reps, args.profile == "1", args.preset)
        print("RESULT " + json.dumps(result))
        return 0
    for v in args.variants.split(","):
        parse_variant(v)
    profiled = set(args.profile.split(",")) - {""}
    rows = []
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    for v in args.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.unet_speed", "--one", v, "--batch", str(args.batch),
               "--preset", args.preset,
               "--reps", str(args.reps), "--profile", "1" if v in profiled else "0"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            rows.append({"variant": v, "error": f"timed out after {args.timeout:.0f} s"})
        else:
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                rows.append({"variant": v, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
            else:
                rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(f"{v:40s} " + (f"{r['ms']:8.1f} ms  {r['tflops']:8.4g} TFLOP/s  first {r['first_call_s']} s  "
                             f"err {r['rel_err_vs_eager']}" if "ms" in r else r["error"]), flush=True)  # fmt: skip
        (out / "unet_speed.json").write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=1) + "\n")
        (out / "unet_speed.md").write_text(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

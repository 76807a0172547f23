"""`dfq bench <name>`: the benchmarks of `benchmarks/`, each a module with `add_arguments` and `run`.

Every benchmark writes JSON + Markdown (and a plot where one says more) into `--results`
(default `benchmarks/results`), naming the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "accuracy": ("benchmarks.accuracy", "accuracy table: fp32/W8A8/W4A4/W3A3/W2A4 per calibration source"),
    "peer": ("benchmarks.peer_compare", "side by side with Genie on CIFAR-10 ResNet-20"),
    "recon-speed": (
        "benchmarks.recon_speed",
        "reconstruction ms/iteration: ours against a Genie-style loop, same run",
    ),
    "vit": ("benchmarks.vit_compare", "side by side with RepQ-ViT on the CIFAR-10 ViT"),
    "distill": (
        "benchmarks.distill_compare",
        "kd / nipq (training on the images) against genie-m, several seeds: top-1 per bits and source",
    ),
    "generators": (
        "benchmarks.generator_compare",
        "data-free pools of bn-distill and enhancing-dfq, quantized the same way",
    ),
    "prompts": (
        "benchmarks.prompt_ablation",
        "prompt ablation: k=1/2/3, random/similar/dissimilar pairing, Mixup/CutMix baselines, per generator",
    ),
    "tools": (
        "benchmarks.tool_compare",
        "other PTQ tools (NNCF, ModelOpt, MCT, ...) calibrated from each source",
    ),
    "gen": ("benchmarks.gen_throughput", "generation img/s: plain diffusers vs our worker"),
    "scaling": ("benchmarks.gen_scaling", "generation img/s against the number of Ray actors"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(BENCHMARKS) + ")")
    names = p.add_subparsers(dest="bench", metavar="{" + ",".join(BENCHMARKS) + "}", parser_class=type(p))
    names.required = True
    for name, (module, help_text) in BENCHMARKS.items():
        q = names.add_parser(name, help=help_text)
        q.set_defaults(func=run, bench_module=module)
        try:
            importlib.import_module(module).add_arguments(q)
        except ModuleNotFoundError:
            q.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    from launch.errors import UsageError

    raise UsageError(f"dfq bench: error: benchmark {args.bench!r} is not available in this install")


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args.bench_module).run(args) or 0)

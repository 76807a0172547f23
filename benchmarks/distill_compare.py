"""`dfq bench distill`: quantization by distillation (`kd`, `nipq`) against block reconstruction (`genie-m`).

For a model (default the CIFAR-10 ResNet-20, benchmarks/README.md), each calibration source, bit
setting, method and seed: quantize on the source's images, evaluate on the fixed splits, and write
one accuracy.json row per evaluation set (fields as `dfq bench accuracy`'s, benchmarks/README.md,
plus `seed` and, for kd/nipq, `init`, `init_iters`, `steps`, `epochs`, `batch_size`, `lr`, `symreg`,
`satnl`, `flip_crop`; a kd/nipq row's `iters` is its training steps). The methods see the same images:
the source's first `--n-calib` (the real draw, a pool's manifest order), which kd/nipq read as a
stream of `--batch-size` batches (`quant.stream`); genie-m reconstructs on them and `--augment N - 1`
flipped/shifted copies. With `--init genie-m`, kd and nipq train the genie-m row's model of the same
bits and seed (`quant.quantize(start=)`), and their `seconds` include its reconstruction.

`--model cifar10_vit`: the CIFAR-10 ViT, whose baseline is the transformer path (`repq-vit`: RepQ-ViT's
calibration with GPTQ rounding on the first 64 images, as `dfq bench vit`'s pool rows) in genie-m's
place; kd and nipq start from its model the same way.

`--tiny` is the CI form: a random ResNet-20, random tensors, two steps each; rows into a temp dir (or
`--results`); it checks the machinery, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import accuracy, report
from benchmarks.argtypes import nonnegative_float, positive_float, positive_int, seed_list
from benchmarks.errors import BenchmarkError

METHODS = ("kd", "nipq", "genie-m", "repq-vit")
VIT = "cifar10_vit"
#: the block-path method of each model family: the rows kd / nipq are compared with and start from
BASELINE = {"cnn": "genie-m", "transformer": "repq-vit"}
#: images the ViT's RepQ-ViT start calibrates on (the pool rows of `dfq bench vit` and `generators`)
VIT_CALIB = 64
BITS = {"W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4), "W8A8": (8, 8)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--assets",
        default=None,
        help="assets folder, laid out as benchmarks/README.md describes (default $DFQ_ASSETS or ../shared/assets)",
    )
    p.add_argument("--results", default="benchmarks/results", help="where accuracy.json/.md/.png go")
    p.add_argument("--model", default="cifar_resnet20", choices=[*accuracy.MODELS, VIT])
    p.add_argument("--bits", default="W4A4,W3A3,W2A4", help=f"comma list of {', '.join(BITS)}")
    p.add_argument(
        "--calib",
        default="real",
        help="comma list: real, noise, or <source>=<pool dir> (e.g. bn-distill=pool/)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument(
        "--seeds", type=seed_list, default=[0, 1, 2], help="comma list of run seeds (default 0,1,2)"
    )
    p.add_argument("--n-calib", type=positive_int, default=1024, help="images per source (default 1024)")
    p.add_argument("--steps", type=positive_int, default=2000, help="kd/nipq training batches (default 2000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="kd/nipq training batch (default 64)")
    p.add_argument("--lr", type=positive_float, help="kd/nipq weight rate (default: the method's)")
    p.add_argument(
        "--init",
        default=None,
        choices=["rtn", "minmax", "genie-m", "repq-vit"],
        help="where kd/nipq start (default the model's baseline, genie-m or repq-vit: the same model as "
        "its rows, then training)",
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=2000,
        help="genie-m reconstruction iterations a block, for the genie-m rows and --init genie-m (default 2000)",
    )
    p.add_argument(
        "--augment",
        type=positive_int,
        default=1,
        help="genie-m reconstructs on the images + N-1 flipped/shifted copies (default 1: none)",
    )
    p.add_argument(
        "--placement", default=None, choices=["block-output", "layer-input"],
        help="CNN activation quantizer placement of genie-m and kd/nipq (default the quantizer's, block-output)",
    )  # fmt: skip
    p.add_argument("--symreg", type=nonnegative_float, default=0.0, help="kd/nipq SymReg weight (default 0)")
    p.add_argument("--satnl", action="store_true", help="kd/nipq with saturating nonlinearities")
    p.add_argument("--evals", default="lossless,jpeg", help="cifar10 evaluation sets: lossless, jpeg")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="CI form: random ResNet-20, temp results")


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise BenchmarkError(f"--{what}: unknown {bad or text!r}; use a comma list of {', '.join(allowed)}")
    return items


def settings_for(method: str, wbits: int, abits: int, seed: int, args: argparse.Namespace, input_range=None):
    """The settings of one run: genie-m's reconstruction, RepQ-ViT's calibration (`input_range`: the
    ViT's preprocessed input bounds), or kd/nipq with the run's training options."""
    import quant

    if method == "genie-m":
        placement = {"placement": args.placement} if args.placement else {}
        return quant.CNNSettings(
            wbits=wbits, abits=abits, method="genie-m", iters=args.iters, seed=seed, device=args.device, **placement
        )  # fmt: skip
    if method == "repq-vit":
        return quant.TransformerSettings(
            wbits=wbits, abits=abits, seed=seed, device=args.device, calib_size=VIT_CALIB, input_range=input_range
        )  # fmt: skip
    values = {"lr": args.lr} if args.lr is not None else {}
    if input_range is not None:
        values.update(calib_size=VIT_CALIB, input_range=input_range)
    elif args.placement:
        values["placement"] = args.placement
    return quant.method_settings(
        method, wbits=wbits, abits=abits, steps=args.steps, batch_size=args.batch_size, init=args.init,
        init_iters=args.iters, symreg=args.symreg, satnl=args.satnl, seed=seed, device=args.device, **values,
    )  # fmt: skip


def row_fields(settings, n_calib: int) -> dict:
    """accuracy.json fields of a run beyond the scores (benchmarks/README.md)."""
    if settings.method == "genie-m":
        return {"iters": settings.iters, "placement": settings.placement, "gptq_start": settings.gptq_start}
    if not hasattr(settings, "steps"):  # the transformer path (repq-vit)
        return {"iters": 0, "calib_images": settings.calib_size}
    steps = settings.resolved_steps(n_calib)
    return {
        "iters": steps,
        "steps": steps,
        "epochs": round(steps * settings.batch_size / n_calib, 2),
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "init": settings.init,
        "init_iters": settings.init_iters if settings.init == "genie-m" else 0,
        "symreg": settings.symreg,
        "satnl": settings.satnl,
        "flip_crop": settings.flip_crop,
        "placement": settings.placement,
    }


def run_grid(
    model_name: str,
    model,
    evals: dict,
    sources: list,
    bits: list[str],
    methods: list[str],
    args,
    input_range=None,
) -> list[dict]:
    """Quantize and evaluate every (source, bits, method, seed); rows written after each run.
    `input_range` (the ViT's): the transformer path, with repq-vit as the baseline."""
    fp = accuracy.fp_scores(model, evals)
    rows = accuracy.fp_rows(model_name, fp)
    report.write_accuracy(Path(args.results), rows)
    from quant.data import augment_calibration

    baseline = BASELINE["transformer" if input_range is not None else "cnn"]
    # kd / nipq from the baseline start from its model, reconstructed once on the same (augmented)
    # images whether or not its own rows were asked for
    reuse = args.init == baseline and any(m != baseline for m in methods)
    order = [baseline, *(m for m in methods if m != baseline)] if reuse else methods
    for label, calib, pool in sources:
        n = int(calib.shape[0])
        augment = args.augment if baseline == "genie-m" else 1
        copies = augment_calibration(calib, augment, seed=0) if augment > 1 else calib
        for name in bits:
            wbits, abits = BITS[name]
            for seed in args.seeds:
                start, start_seconds = None, 0.0
                for method in order:
                    settings = settings_for(method, wbits, abits, seed, args, input_range)
                    base, wanted = method == baseline, method in methods  # unwanted: only the others' start
                    seconds, scores, qmodel = accuracy.quantize_and_evaluate(
                        model, copies if base else calib, settings, evals if wanted else {},
                        progress=not args.tiny, start=None if base else start,
                    )  # fmt: skip
                    if base and reuse:
                        start, start_seconds = qmodel, seconds
                    if not wanted:
                        continue
                    extra = {}
                    if baseline == "genie-m":  # the copies genie-m reconstructed on
                        extra = {"augment": augment} if base else {"init_augment": augment} if start else {}
                    if start is not None and not base:
                        seconds += start_seconds  # the reconstruction it started from is part of its cost
                    new = accuracy.rows_for(
                        model_name, fp, scores, wbits=wbits, abits=abits, calib=label, method=method,
                        n_calib=n, seconds=round(seconds, 1), seed=seed, **row_fields(settings, n), **extra, **pool,
                    )  # fmt: skip
                    rows += new
                    report.write_accuracy(Path(args.results), rows)
                    for r in new:
                        print(
                            f"{model_name} {name} {label} {method} seed {seed}: {r['dataset']} "
                            f"{r['top1']:.2f} ({r['fp_top1']:.2f} fp) {seconds:.0f}s"
                        )
    return rows


def _check_family(args: argparse.Namespace, methods: list[str]) -> None:
    """genie-m is the CNNs' baseline, repq-vit the ViT's: the other is refused, and `--init`
    defaults to the model's own."""
    family = "transformer" if args.model == VIT else "cnn"
    other = BASELINE["cnn" if family == "transformer" else "transformer"]
    if other in methods:
        raise BenchmarkError(f"--methods: {other} does not quantize {args.model}; use {BASELINE[family]}")
    if args.init is None:
        args.init = BASELINE[family]
    else:
        from quant.distill import INITS

        if args.init not in INITS[family]:
            raise BenchmarkError(
                f"--init {args.init} does not start {args.model}; use {', '.join(INITS[family])}"
            )


def run(args: argparse.Namespace) -> int:
    bits = _choices(args.bits, BITS, "bits")
    methods = _choices(args.methods, METHODS, "methods")
    _check_family(args, methods)
    if args.tiny:
        return _run_tiny(args, bits[:1], methods)
    from benchmarks.splits import assets_dir
    from quant.data import build_transform, input_range
    from quant.models import load_model

    assets = assets_dir(args.assets or os.environ.get("DFQ_ASSETS") or "../shared/assets")
    vit_range = None
    if args.model == VIT:  # loaded as `dfq bench vit` loads it
        from benchmarks.vit_checkpoint import load_cifar_vit
        from benchmarks.vit_compare import CHECKPOINT
        from benchmarks.vit_compare import data_config as vit_data_config

        family, model, data_config = "cifar10", load_cifar_vit(assets / CHECKPOINT), vit_data_config()
        vit_range = input_range(data_config)
    else:
        ckpt, family = accuracy.MODELS[args.model]
        model, data_config = load_model(args.model, checkpoint=str(assets / ckpt))
    transform = build_transform(data_config)
    evals = accuracy.eval_sets(family, assets, data_config, transform, args.evals.split(","))
    sources = [
        (*accuracy.calibration(kind, family, assets, data_config, transform, args.n_calib, 0),
         report.pool_fields(kind.split("=", 1)[-1]))
        for kind in args.calib.split(",")
    ]  # fmt: skip
    run_grid(args.model, model, evals, sources, bits, methods, args, input_range=vit_range)
    print(Path(args.results) / "accuracy.md")
    return 0


def _run_tiny(args: argparse.Namespace, bits: list[str], methods: list[str]) -> int:
    """CI form: random ResNet-20 (or, with `--model cifar10_vit`, a random one-block ViT), 16 random
    images, 2 steps / iterations, one seed."""
    vit_range = None
    if args.model == VIT:
        from benchmarks.vit_checkpoint import build_cifar_vit

        torch.manual_seed(0)
        model = build_cifar_vit(patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
        vit_range = (-3.0, 3.0)  # the random model's Gaussian inputs, +-3 standard deviations
    else:
        model, _ = accuracy.tiny_resnet20()
    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    args.steps, args.iters, args.batch_size, args.seeds = 2, 2, 8, args.seeds[:1]
    if args.results == "benchmarks/results":
        args.results = tempfile.mkdtemp(prefix="dfq-distill-")
    run_grid(
        f"{VIT if vit_range else 'cifar_resnet20'}-random", model, {"random-32": (images[:32], labels[:32])}, [("noise", images[32:], {})],
        bits, methods, args, input_range=vit_range,
    )  # fmt: skip
    print(Path(args.results) / "accuracy.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

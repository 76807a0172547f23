"""`dfq bench generators`: data-free pools from the classifier-based generators, quantized the same way.

For each generator (`--generators`: bn-distill at the peer recipe, enhancing-dfq at `--edfq-iterations`)
and each pool seed, a pool of `--images` images is generated through the engine (its wall time
recorded, or read back from the pool when it is reused), then quantized at each `--bits`:

- CIFAR-10 ResNet-20 (`--model cifar_resnet20`): genie-m, `--iters` iterations a block, layer-input
  placement, run seed 0, from the pool plus `--augment`-1 flipped/shifted copies (as `dfq bench peer`);
- CIFAR-10 ViT (`--model cifar10_vit`): the transformer path (RepQ-ViT-style calibration on the pool's
  first 64 images, the preprocessing's input grid, as pools get in `dfq bench vit`); enhancing-dfq
  pools are generated from the ViT itself.

Evaluation: the lossless slice and the JPEG set, or with `--heldout` only the real calibration draw
(1,024 JPEGs held out from both evaluation sets; dataset `cifar10-heldout-1024`), on which settings
are chosen. `--variant NAME --edfq-set key=value,...` names an ablation (settings overrides);
`--curve N1,N2,...` generates enhancing-dfq pools trained for each number of iterations (the cost
curve). `--select energy,bn-sensitivity --oversample R` generates pools of R x `--images` images and
quantizes, from each, the `--images` each selector keeps (`quant.select_samples`, GenQ's filters) and,
as the no-selection baseline at the same generation budget, the pool's first `--images` (`select`
"none"). Rows go to accuracy.json with `calib` = the generator and `pool_seed`, `variant`,
`gen_seconds`, `gen_recipe` (and `select`, `oversample`, `n_scored` with R > 1);
`generators.md`/`.json` summarise them (mean and range over pools).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks import accuracy, report
from benchmarks.argtypes import oversample_ratio, positive_int, seed_list
from benchmarks.errors import BenchmarkError

GENERATORS = ("bn-distill", "enhancing-dfq")
MODELS = ("cifar_resnet20", "cifar10_vit")
BITS = {"W8A8": (8, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
HELDOUT = "cifar10-heldout-1024"
GEN_RECORD = "generation.json"  # what make_pool leaves in a pool: wall time and recipe
VIT_SPEC = "benchmarks.vit_checkpoint:cifar_vit"
VIT_CALIB = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", default=None, help="assets folder (default $DFQ_ASSETS or ../shared/assets)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--model", default="cifar_resnet20", choices=MODELS)
    p.add_argument(
        "--generators", default="enhancing-dfq,bn-distill", help="comma list of " + ", ".join(GENERATORS)
    )
    p.add_argument("--bits", default="W4A4,W3A3", help=f"comma list of {', '.join(BITS)}")
    p.add_argument("--pool-seeds", type=seed_list, default=[0, 1, 2], help="engine seeds, one pool each")
    p.add_argument("--images", type=positive_int, default=256, help="images a pool (default 256)")
    p.add_argument("--iters", type=positive_int, default=2000, help="CNN reconstruction iterations a block")
    p.add_argument("--augment", type=positive_int, default=8, help="CNN: pool + N-1 augmented copies")
    p.add_argument("--bn-distill-iters", type=positive_int, default=400)
    p.add_argument("--edfq-iterations", type=positive_int, default=400)
    p.add_argument("--edfq-set", default="", help="enhancing-dfq settings overrides, key=value,...")
    p.add_argument("--variant", default="default", help="row label of these settings (ablations)")
    p.add_argument(
        "--k", type=positive_int, default=2,
        help="classes mixed a sample (default 2; 1: no mixing); the variant label defaults to kK",
    )  # fmt: skip
    p.add_argument("--curve", default="", help="comma list of enhancing-dfq training lengths (cost curve)")
    p.add_argument(
        "--select", default="", help="comma list of selectors (energy, bn-sensitivity) run on each pool"
    )
    p.add_argument(
        "--oversample", type=oversample_ratio, default=1.0,
        help="with --select: pools of R x --images images, of which each selector keeps --images",
    )  # fmt: skip
    p.add_argument("--pools", default=None, help="folder keeping the pools (reused when complete)")
    p.add_argument("--heldout", action="store_true", help="evaluate on the held-out real draw only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--tiny", action="store_true", help="CI form: a random tiny model, a few iterations")


# ------------------------------------------------------------------------------------------ pools
def parse_overrides(text: str) -> dict:
    """`key=value,...` -> settings dict (numbers and true/false parsed)."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchmarkError(f"generators: --edfq-set item {item!r} is not key=value")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def pool_images(args: argparse.Namespace) -> int:
    """Images a pool: --images, or R x --images with --oversample R (at least one more)."""
    if getattr(args, "oversample", 1) == 1:
        return args.images
    return max(args.images + 1, math.ceil(args.oversample * args.images - 1e-9))


def recipe(generator: str, args: argparse.Namespace, iterations: int | None = None) -> dict:
    """The generator's settings for this run (the pool's config), the batch size, and for diffusion
    the config fields that differ (the SD model, the preset: `tiny` in the CI form)."""
    if generator == "diffusion":
        tiny = bool(getattr(args, "tiny", False))
        config = {"model": None if tiny else args.sd_model, "checkpoint": None, "preset": "tiny" if tiny else None,
                  "device": "cpu" if tiny else "auto"}  # fmt: skip
        return {"settings": {}, "batch_size": 8 if tiny else 16, "workers": 1, "config": config}
    if generator == "bn-distill":
        batch = min(128, pool_images(args))
        settings = {"iterations": args.bn_distill_iters, "bn_loss": "mse", "ce_weight": 0.1}
        return {"settings": settings, "batch_size": batch, "workers": 2}
    settings = {"iterations": iterations or args.edfq_iterations, **parse_overrides(args.edfq_set)}
    if args.threads:
        settings["threads"] = args.threads
    return {"settings": settings, "batch_size": 64, "workers": 1}


def make_pool(
    generator: str, spec: str, checkpoint: str, out: Path, seed: int, args: argparse.Namespace,
    iterations: int | None = None, k: int = 2, pairing: str = "random",
) -> tuple[Path, float]:  # fmt: skip
    """Generate (or reuse, when complete) one pool of k classes a sample, paired by `pairing`;
    (path, generation wall seconds)."""
    from engine.config import GenerateConfig
    from engine.driver import generate
    from launch.classifier import distill_context

    record = out / GEN_RECORD
    if record.is_file():
        return out, float(json.loads(record.read_text())["seconds"])
    r = recipe(generator, args, iterations)
    context, _ = distill_context(spec, checkpoint, None)
    fields = dict(
        out=str(out), num_images=pool_images(args), shard_size=r["batch_size"], generator=generator, model=spec,
        checkpoint=checkpoint, vocab="cifar10", k=k, pairing=pairing, batch_size=r["batch_size"],
        settings=r["settings"], workers=r["workers"], device="cpu", seed=seed,
    )  # fmt: skip
    cfg = GenerateConfig(**{**fields, **r.get("config", {})})
    t0 = time.perf_counter()
    generate(cfg, context)
    wall = time.perf_counter() - t0
    saved = {"seconds": round(wall, 1), "generator": generator, "seed": seed, "settings": r["settings"],
             "k": k, "pairing": pairing, "device": report.device_string(), "date": report.today()}  # fmt: skip
    record.write_text(json.dumps(saved, indent=1) + "\n")
    return out, wall


def _recipe_text(generator: str, settings: dict, images: int) -> str:
    return f"{generator}: {images} images, " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def selectors(args: argparse.Namespace) -> list[str]:
    return [n for n in args.select.split(",") if n]


def check_selection(args: argparse.Namespace) -> None:
    """Refuse selection options that cannot go together, before any pool is generated."""
    from quant.select import SELECTORS

    names = selectors(args)
    bad = [n for n in names if n not in SELECTORS]
    if bad:
        raise BenchmarkError(f"generators: unknown selector {bad[0]!r}; use {', '.join(SELECTORS)}")
    if bool(names) != (args.oversample != 1):
        raise BenchmarkError("generators: --select and --oversample R > 1 go together")
    if args.model == "cifar10_vit" and "bn-sensitivity" in names:
        raise BenchmarkError("generators: the ViT has no BatchNorm for --select bn-sensitivity")


# ------------------------------------------------------------------------------------------ models
class Bench:
    """The model, its spec/checkpoint for the engine, its transform and the evaluation sets."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from benchmarks.splits import assets_dir
        from quant.data import build_transform
        from quant.models import load_model

        self.name = args.model
        if args.tiny:
            model, data_config = accuracy.tiny_resnet20()
            self.checkpoint = str(work / "resnet20-random.pt")
            torch.save(model.state_dict(), self.checkpoint)
            self.spec, self.model, self.data_config = "cifar_resnet20", model, data_config
            g = torch.Generator().manual_seed(0)
            images, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
            self.transform = build_transform(data_config)
            self.evals = {"random-32": (images, labels)}
            return
        assets = assets_dir(args.assets or os.environ.get("DFQ_ASSETS") or "../shared/assets")
        if args.model == "cifar_resnet20":
            self.spec = "cifar_resnet20"
            self.checkpoint = str(assets / accuracy.MODELS["cifar_resnet20"][0])
            self.model, self.data_config = load_model(self.spec, checkpoint=self.checkpoint)
        else:
            from benchmarks.vit_checkpoint import convert_for_timm
            from benchmarks.vit_compare import CHECKPOINT

            self.spec = VIT_SPEC
            self.checkpoint = str(work / "cifar10_vit_timm.pth")
            convert_for_timm(assets / CHECKPOINT, self.checkpoint)
            self.model, self.data_config = load_model(self.spec, checkpoint=self.checkpoint)
        self.transform = build_transform(self.data_config)
        if args.heldout:
            from benchmarks import splits
            from benchmarks.vit_compare import materialise

            self.evals = {HELDOUT: materialise(splits.cifar10_calibration(assets, self.transform))}
        else:
            self.evals = accuracy.eval_sets(
                "cifar10", assets, self.data_config, self.transform, ["lossless", "jpeg"]
            )

    def settings(self, wbits: int, abits: int, args: argparse.Namespace):
        import quant
        from quant.data import input_range

        if self.name == "cifar10_vit":
            return quant.TransformerSettings(
                wbits=wbits, abits=abits, calib_size=VIT_CALIB, input_range=input_range(self.data_config)
            )
        iters = 3 if args.tiny else args.iters
        return quant.CNNSettings(
            wbits=wbits, abits=abits, method="genie-m", iters=iters, placement="layer-input"
        )

    def calibration(
        self, images: torch.Tensor, args: argparse.Namespace, cutmix: float = 0.0, mixup: float = 0.0
    ) -> torch.Tensor:
        """A pool's calibration images (the CNN: plus `--augment`-1 copies, mixed by CutMix / Mixup if asked)."""
        from quant.data import augment_calibration

        if self.name == "cifar10_vit":
            return images[:VIT_CALIB]
        return augment_calibration(images, args.augment, seed=0, cutmix=cutmix, mixup=mixup)

    def choices(self, pool: Path, args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, dict]]:
        """The pool's --images calibration images per selection ("none": its first --images), and
        each row's selection fields (none without --oversample)."""
        from quant.data import load_calibration
        from quant.select import select_samples

        images = load_calibration(str(pool), self.transform, pool_images(args))
        if args.oversample == 1:
            return {"none": (images, {})}
        fields = {"oversample": args.oversample, "n_scored": len(images)}
        out = {"none": (images[: args.images], {"select": "none", **fields})}
        for name in selectors(args):
            chosen = select_samples(self.model, images, args.images, name)
            out[name] = (images[chosen.indices], {"select": name, **fields, "select_summary": chosen.summary})
        return out


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    generators = [g for g in args.generators.split(",") if g]
    bad = [g for g in generators if g not in GENERATORS] + [b for b in args.bits.split(",") if b not in BITS]
    if bad:
        raise BenchmarkError(f"generators: unknown generator or bits {bad[0]!r}")
    if args.model == "cifar10_vit" and "bn-distill" in generators:
        raise BenchmarkError(
            "generators: the ViT has no BatchNorm for bn-distill; use --generators enhancing-dfq"
        )
    check_selection(args)
    if args.k != 2 and args.variant == "default":
        args.variant = f"k{args.k}"
    curve = [int(n) for n in args.curve.split(",") if n]
    if args.tiny:
        args.images, args.bn_distill_iters, args.augment = 8, 2, 2
        args.edfq_iterations = 4
        args.edfq_set = args.edfq_set or "train_batch=4,warmup=1,embed_dim=16"
        if args.results == "benchmarks/results":
            args.results = tempfile.mkdtemp(prefix="dfq-gens-")
    work = Path(args.pools or tempfile.mkdtemp(prefix="dfq-gen-pools-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    results = Path(args.results)
    fp = accuracy.fp_scores(bench.model, bench.evals)
    rows = [] if args.heldout else accuracy.fp_rows(bench.name, fp)
    jobs = [(g, None) for g in generators] if not curve else [("enhancing-dfq", n) for n in curve]
    for generator, iterations in jobs:
        for seed in args.pool_seeds:
            r = recipe(generator, args, iterations)
            parts = [generator, args.variant, f"it{r['settings']['iterations']}", f"s{seed}"]
            tag = "-".join(parts + ([f"n{pool_images(args)}"] if args.oversample != 1 else []))
            pool, seconds = make_pool(
                generator, bench.spec, bench.checkpoint, work / f"{bench.name}-{tag}", seed, args, iterations,
                k=args.k,
            )  # fmt: skip
            print(f"{tag}: pool {pool} in {seconds:.1f} s", flush=True)
            for (choice, (images, select_fields)), bits in itertools.product(
                bench.choices(pool, args).items(), args.bits.split(",")
            ):
                calib = bench.calibration(images, args)
                wbits, abits = BITS[bits]
                settings = bench.settings(wbits, abits, args)
                q_seconds, scores, _ = accuracy.quantize_and_evaluate(
                    bench.model, calib, settings, bench.evals, progress=False
                )
                new = accuracy.rows_for(
                    bench.name, fp, scores, wbits=wbits, abits=abits, calib=generator,
                    method="repq-vit" if bench.name == "cifar10_vit" else "genie-m",
                    n_calib=args.images, iters=0 if bench.name == "cifar10_vit" else settings.iters,
                    seconds=round(q_seconds, 1), pool_seed=seed, seed=0, variant=args.variant,
                    **({"k": args.k} if args.k != 2 else {}),
                    gen_seconds=round(seconds, 1), gen_iterations=r["settings"]["iterations"],
                    gen_recipe=_recipe_text(generator, r["settings"], pool_images(args)), **select_fields,
                    **({"augment": args.augment} if bench.name != "cifar10_vit" else {"calib_images": VIT_CALIB}),
                )  # fmt: skip
                rows += new
                print(tag, choice, bits, " ".join(f"{x['dataset']} {x['top1']:.2f}" for x in new), flush=True)
                merged = report.write_accuracy(results, rows)
                write_summary(results, merged)
    if args.tiny and not args.pools:  # the temp pools of the CI form; a given --pools folder stays
        shutil.rmtree(work, ignore_errors=True)
    print(results / "generators.md")
    return 0


# ------------------------------------------------------------------------------------------ tables
def summarise(rows: list[dict]) -> list[dict]:
    """Mean, range and count over pools per (model, generator, variant, training length, selection, bits,
    dataset)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("calib") in GENERATORS and "gen_seconds" in r:
            key = (r["model"], r["calib"], r.get("variant", "default"), r.get("gen_iterations"),
                   f"W{r['wbits']}A{r['abits']}", r["dataset"], r.get("method"), r.get("iters"),
                   selection_label(r))  # fmt: skip
            groups[key].append(r)
    out = []
    for (model, gen, variant, gen_iters, bits, dataset, method, iters, select), rs in sorted(
        groups.items(), key=str
    ):
        top1 = np.array([r["top1"] for r in rs])
        out.append({
            "model": model, "generator": gen, "variant": variant, "gen_iterations": gen_iters, "bits": bits,
            "dataset": dataset, "method": method, "iters": iters, "select": select, "pools": len(rs),
            "pool_seeds": sorted(r["pool_seed"] for r in rs), "top1_mean": round(float(top1.mean()), 2),
            "top1_min": float(top1.min()), "top1_max": float(top1.max()), "fp_top1": rs[0]["fp_top1"],
            "fp_kl_mean": round(float(np.mean([r.get("fp_kl", np.nan) for r in rs])), 5),
            "gen_seconds_mean": round(float(np.mean([r["gen_seconds"] for r in rs])), 1),
            "device": rs[-1]["device"], "date": rs[-1]["date"],
        })  # fmt: skip
    return out


def selection_label(row: dict) -> str:
    """`-` (no oversampling), or the selector and R: `energy of 4x`, `none of 4x` (the first --images)."""
    if not row.get("select"):
        return "-"
    return f"{row['select']} of {row['oversample']:g}x"


def write_summary(results: Path, rows: list[dict]) -> None:
    summary = summarise(rows)
    (results / "generators.json").write_text(json.dumps({"rows": summary}, indent=1) + "\n")
    lines = [
        "# Generators: pools from the classifier, quantized the same way",
        "",
        "Written by `dfq bench generators` (benchmarks/generator_compare.py); top-1 mean [min-max] over",
        "pools (one engine seed each), KL to fp32 averaged; generation seconds per pool on the named device.",
        "",
        "| model | generator | variant | gen it | select | bits | dataset | top-1 | fp32 | KL | pools | gen s | "
        "device, date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['generator']} | {s['variant']} | {s['gen_iterations']} | {s['select']} | "
            f"{s['bits']} | "
            f"{s['dataset']} | {s['top1_mean']:.2f} [{s['top1_min']:.2f}-{s['top1_max']:.2f}] | "
            f"{s['fp_top1']:.2f} | {s['fp_kl_mean']:.4f} | {s['pools']} | {s['gen_seconds_mean']:.0f} | "
            f"{s['device']}, {s['date']} |"
        )
    (results / "generators.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generator_compare")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

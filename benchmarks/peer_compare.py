"""`dfq bench peer`: our pipeline against Genie (docs/results.md) on the CIFAR-10 ResNet-20, side by side.

The three settings of Genie's run, with the same layers at 8 bits (first conv W8 with float input, its
output A8, last linear W8A8), the same calibration draw (benchmarks/README.md) and the same iteration budgets:

1. W4A4, real calibration (1,024 images), 3,000 iterations per block;
2. W4A4, data-free: our bn-distill generator at the peer's budget (256 images = 2 batches of 128,
   400 iterations) through the engine into a pool, then 2,000 iterations per block from that pool
   and 7 flipped/shifted copies of each image (`--distill-augment`, default 8: no new information,
   but a 256-image pool read ~250 times over is otherwise fitted image by image; `--distill-cutmix`
   pastes boxes between copies, off by default); each run seed
   distils its own pool (engine seed = run seed, `--distill-pools per-seed`), so the mean over seeds
   covers the pool draw as well as the reconstruction's;
3. W2A4, real calibration, 2,000 iterations per block;

plus round-to-nearest at W4A4 and W2A4. Rows go to accuracy.json; `peer_compare.md` puts them next
to Genie's figures (accuracy on the lossless slice and the JPEG set, wall time).

`--iters N` runs every reconstruction setting at N iterations a block instead, e.g. 20,000, Genie's
published default, which the peer run cut to fit its time: such rows sit beside the peer-budget ones in
the table (one row per setting, placement and budget) and compare accuracy only, as the peer never
ran that budget here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import accuracy, report
from benchmarks.argtypes import area_fraction, nonnegative_float, positive_int, seed_list
from benchmarks.errors import BenchmarkError

#: Genie's run on the CPU machine (docs/results.md, section Peers): (lossless 1,017, JPEG 7,959, seconds)
PEER = {
    ("rtn", 4, "real"): (90.95, 78.04, 23),
    ("genie-m", 4, "real"): (91.45, 80.29, 994),
    ("genie-m", 4, "bn-distill"): (91.25, 80.05, 739),
    ("rtn", 2, "real"): (23.99, 23.78, 19),
    ("genie-m", 2, "real"): (89.77, 77.76, 758),
}
PEER_DISTILL_SECONDS = 624
PEER_DISTILL_S_PER_ITER = 0.75
#: what `distill_pool` leaves in a pool it distilled: its wall time and recipe, so that a rerun on
#: the same pools (`--pool`) reports the distillation that made them
DISTILL_RECORD = "distill.json"
SETTINGS = [  # (method, wbits, calib, iters)
    ("rtn", 4, "real", 0),
    ("genie-m", 4, "real", 3000),
    ("genie-m", 4, "bn-distill", 2000),
    ("rtn", 2, "real", 0),
    ("genie-m", 2, "real", 2000),
]
#: argument defaults, and the tiny form's values for them (3 + 2 iterations, 16 distilled images)
DEFAULTS = {"iters_scale": 1.0, "distill_iters": 400, "distill_images": 256, "distill_batch": 128,
            "distill_workers": 2, "distill_augment": 8, "distill_cutmix": 0.0,
            "distill_ce_weight": 0.1}  # fmt: skip
TINY = {
    "iters_scale": 0.001,
    "distill_iters": 2,
    "distill_images": 16,
    "distill_batch": 8,
    "distill_workers": 1,
    "distill_augment": 2,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--assets",
        default=None,
        help="assets folder, laid out as benchmarks/README.md describes (default $DFQ_ASSETS or ../shared/assets)",
    )
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument(
        "--settings", default="all", help="comma list of indices into the settings (0..4) or 'all'"
    )
    p.add_argument(
        "--iters-scale", type=float, default=DEFAULTS["iters_scale"], help="scale every iteration budget"
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="iterations a block for every reconstruction setting instead of the peer's budgets "
        "(e.g. 20000, Genie's published default); overrides --iters-scale",
    )
    p.add_argument("--distill-iters", type=int, default=DEFAULTS["distill_iters"])
    p.add_argument("--distill-images", type=int, default=DEFAULTS["distill_images"])
    p.add_argument("--distill-batch", type=int, default=DEFAULTS["distill_batch"])
    p.add_argument("--distill-workers", type=int, default=DEFAULTS["distill_workers"])
    p.add_argument(
        "--distill-ce-weight",
        type=nonnegative_float,
        default=DEFAULTS["distill_ce_weight"],
        help="weight of the distillation's class term (two classes at 0.5/0.5 per image) against its BN "
        "statistics term; 0 = BN statistics only, Genie-D's objective (default 0.1)",
    )
    p.add_argument(
        "--distill-augment",
        type=positive_int,
        default=DEFAULTS["distill_augment"],
        help="reconstruct on the distilled images plus N-1 flipped/shifted copies (quant.data.augment_calibration)",
    )
    p.add_argument(
        "--distill-cutmix",
        type=area_fraction,
        default=DEFAULTS["distill_cutmix"],
        help="paste into each copy a box from a randomly drawn copy, of up to about this fraction of the image (0: none)",
    )
    p.add_argument(
        "--distill-pools",
        default="per-seed",
        choices=["per-seed", "shared"],
        help="per-seed: run seed s reconstructs from a pool distilled with engine seed s (default); "
        "shared: one pool (engine seed 0) for every run seed",
    )
    p.add_argument(
        "--pool",
        type=pool_list,
        default=None,
        help="reuse bn-distill pools instead of distilling: one folder for every seed, or a comma list "
        "with one per seed (in --seeds order); a pool this benchmark distilled keeps its wall time "
        "(distill.json), which the rows then report",
    )
    p.add_argument(
        "--placement",
        default="layer-input",
        choices=["layer-input", "block-output"],
        help="activation quantizers; layer-input is the graph the Genie run quantized (default)",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=[0],
        help="comma list of run seeds (QDrop masks, minibatch order); the calibration draw stays benchmarks/README.md's. "
        "Each setting runs once per seed and the table shows the mean and the range",
    )
    p.add_argument("--tiny", action="store_true", help="CI form: random model and images, a few iterations")


@dataclass
class Setup:
    """What the settings loop needs: the model (and its checkpoint, for the distilling actors), the
    evaluation sets, the real calibration draw, and the eval-set names that map to the peer's columns."""

    name: str
    model: torch.nn.Module
    checkpoint: str
    transform: Callable
    evals: dict
    real: torch.Tensor
    lossless: str
    jpeg: str


def real_setup(args: argparse.Namespace) -> Setup:
    """The CIFAR-10 ResNet-20, both evaluation sets and the 1,024-image real calibration draw."""
    from benchmarks.splits import assets_dir
    from quant.data import build_transform
    from quant.models import load_model

    assets = assets_dir(args.assets or os.environ.get("DFQ_ASSETS") or "../shared/assets")
    ckpt = str(assets / accuracy.MODELS["cifar_resnet20"][0])
    model, data_config = load_model("cifar_resnet20", checkpoint=ckpt)
    transform = build_transform(data_config)
    evals = accuracy.eval_sets("cifar10", assets, data_config, transform, ["lossless", "jpeg"])
    _, real = accuracy.calibration("real", "cifar10", assets, data_config, transform, 1024, 0)
    return Setup(
        "cifar_resnet20", model, ckpt, transform, evals, real, "cifar10-lossless-1017", "cifar10-jpeg-7959"
    )


def tiny_setup(args: argparse.Namespace) -> Setup:
    """CI form: a random-weight ResNet-20 (BN statistics from noise, saved as a checkpoint the
    distilling actors load), 64 random labelled images as both evaluation sets, 32 as the draw."""
    from quant.data import build_transform

    model, data_config = accuracy.tiny_resnet20()
    ckpt = os.path.join(tempfile.mkdtemp(prefix="dfq-peer-model-"), "resnet20-random.pt")
    torch.save(model.state_dict(), ckpt)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    evals = {"random-64": (images, labels)}
    return Setup("cifar_resnet20-random", model, ckpt, build_transform(data_config), evals, images[:32],
                 "random-64", "random-64")  # fmt: skip


def distill_pool(setup: Setup, out: str, args: argparse.Namespace, seed: int = 0) -> tuple[str, float]:
    """Run the engine's bn-distill generator (engine seed `seed`) for the ResNet-20 into `out`;
    (pool, wall seconds)."""
    from engine.config import GenerateConfig
    from engine.driver import generate
    from launch.classifier import distill_context

    context, _ = distill_context("cifar_resnet20", setup.checkpoint, None)
    cfg = GenerateConfig(
        out=out, num_images=args.distill_images, shard_size=args.distill_batch, generator="bn-distill",
        model="cifar_resnet20", checkpoint=setup.checkpoint, vocab="cifar10", k=2, batch_size=args.distill_batch,
        settings={"iterations": args.distill_iters, "bn_loss": "mse", "ce_weight": args.distill_ce_weight},
        workers=args.distill_workers, device="cpu", seed=seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    generate(cfg, context)
    wall = time.perf_counter() - t0
    record = {"seconds": round(wall, 1), "engine_seed": seed, "device": report.device_string(),
              "date": report.today(), **_distill_recipe(args)}  # fmt: skip
    (Path(out) / DISTILL_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out, wall


def pool_list(text: str) -> list[str]:
    """`--pool`: one or more existing pool folders, comma-separated."""
    paths = [p for p in text.split(",") if p]
    missing = [p for p in paths if not Path(p).is_dir()]
    if not paths or missing:
        raise argparse.ArgumentTypeError(f"no such pool folder: {(missing[0] if missing else text)!r}")
    return paths


def _distill_recipe(args: argparse.Namespace) -> dict:
    """The distillation's settings as rows name them."""
    batches = max(1, args.distill_images // args.distill_batch)
    return {
        "distill_recipe": f"{batches} x {args.distill_batch}, {args.distill_iters} iterations, "
        f"{_class_term(args.distill_ce_weight)}, {args.distill_workers} CPU actors",
        "distill_ce_weight": args.distill_ce_weight,
    }


def run(args: argparse.Namespace) -> int:
    from quant import CNNSettings
    from quant.data import augment_calibration

    if args.tiny:
        for name, value in TINY.items():  # the CI scale, unless asked otherwise
            if getattr(args, name) == DEFAULTS[name]:
                setattr(args, name, value)
        if args.results == "benchmarks/results":
            args.results = tempfile.mkdtemp(prefix="dfq-peer-")
    setup = tiny_setup(args) if args.tiny else real_setup(args)
    torch.set_num_threads(os.cpu_count() or 1)
    results = Path(args.results)
    fp = accuracy.fp_scores(setup.model, setup.evals)
    rows = accuracy.fp_rows(setup.name, fp)
    chosen = range(len(SETTINGS)) if args.settings == "all" else [int(i) for i in args.settings.split(",")]
    side: list[dict] = []
    for i in chosen:
        method, wbits, calib_kind, iters = SETTINGS[i]
        if iters:
            iters = args.iters or max(1, int(round(iters * args.iters_scale)))
        if calib_kind == "real":
            calibs, extra, run_fields = {seed: setup.real for seed in args.seeds}, {}, {}
        else:
            calibs, extra, run_fields = distilled_calibration(setup, args)
        peer = PEER[(method, wbits, calib_kind)]
        peer_iters = SETTINGS[i][3]
        comparable = args.iters is None or iters == peer_iters
        runs, fidelity = [], []
        for seed in args.seeds:
            config = CNNSettings(
                wbits=wbits, abits=4, method=method, iters=iters, placement=args.placement, seed=seed
            )
            calib = calibs[seed]
            # one seed's row takes the setting's scalars and its own pool's (the side row keeps the lists)
            per_run = {k: v for k, v in extra.items() if not isinstance(v, list)}
            per_run.update(run_fields.get(seed, {}))
            t0 = time.perf_counter()  # the copies are part of our pipeline's time
            images = augment_calibration(
                calib, extra.get("augment", 1), seed=seed, cutmix=extra.get("cutmix", 0.0)
            )
            t_aug = time.perf_counter() - t0
            seconds, scores, qmodel = accuracy.quantize_and_evaluate(
                setup.model, images, config, setup.evals, progress=not args.tiny
            )
            seconds += t_aug
            s_iter = sum(qmodel.seconds_per_iter.values()) if iters else 0.0
            new = accuracy.rows_for(
                setup.name, fp, scores, wbits=wbits, abits=4, calib=calib_kind, method=method,
                n_calib=int(calib.shape[0]), iters=iters, seconds=round(seconds, 1),
                s_per_iter_all_units=round(s_iter, 4), placement=args.placement, seed=seed, **per_run,
                **_start_field(config),
            )  # fmt: skip
            rows += new
            report.write_accuracy(results, rows)
            by = {r["dataset"]: r for r in new}
            jpeg_row = by[setup.jpeg]
            runs.append((by[setup.lossless]["top1"], jpeg_row["top1"], seconds, s_iter))
            fidelity.append((jpeg_row["fp_agree"], jpeg_row["fp_kl"]))
        lossless, jpeg, secs, s_iters = (np.array(col, dtype=float) for col in zip(*runs))
        agree, kl = (np.array(col, dtype=float) for col in zip(*fidelity))
        side.append(
            {
                "setting": _label(method, wbits, calib_kind), "placement": args.placement, "iters": iters,
                "n_calib": int(calib.shape[0]), "seeds": list(args.seeds),
                "ours_lossless": round(float(lossless.mean()), 2), "peer_lossless": peer[0],
                "ours_jpeg": round(float(jpeg.mean()), 2), "peer_jpeg": peer[1],
                "ours_lossless_per_seed": lossless.tolist(), "ours_jpeg_per_seed": jpeg.tolist(),
                "ours_seconds": round(float(secs.mean()), 1), "peer_seconds": peer[2],
                # an --iters budget is not the peer's: accuracy only ('-' in the table)
                "time_ratio": round(float(secs.mean()) / peer[2], 3) if comparable else None,
                "peer_iters": peer_iters,
                "s_per_iter_all_units": round(float(s_iters.mean()), 4),
                "ours_jpeg_agree": round(float(agree.mean()), 2), "ours_jpeg_kl": round(float(kl.mean()), 5),
                **_start_field(config), **extra,
                "device": report.device_string(), "date": report.today(),
            }
        )  # fmt: skip
        print(json.dumps(side[-1]))
        _write_side(results, side, setup)
    if args.tiny:  # the random model's checkpoint only existed for the distilling actors to load
        shutil.rmtree(Path(setup.checkpoint).parent, ignore_errors=True)
    return 0


def distilled_calibration(
    setup: Setup, args: argparse.Namespace
) -> tuple[dict[int, torch.Tensor], dict, dict[int, dict]]:
    """The data-free setting's calibration images for each run seed, the side row's fields about
    them, and each run's own fields (its pool's engine seed and distillation time).

    Per seed (the default), run seed s reconstructs from a pool the engine distils with seed s: the
    pool draw (initial latents, decoder weights, swing offsets) moves the W4A4 result by as much as
    the reconstruction seed does, so only then is the mean over seeds what a user running the
    recipe once should expect. Distillation seconds are the mean over the pools. `--pool` reuses
    pools instead (see `_reused_pools`).
    """
    from quant.data import load_calibration

    if args.pool is not None:
        return _reused_pools(setup, args)
    per_seed = args.distill_pools == "per-seed"
    pool_seeds = [seed if per_seed else 0 for seed in args.seeds]
    images: dict[int, torch.Tensor] = {}
    seconds: dict[int, float] = {}
    for pool_seed in dict.fromkeys(pool_seeds):
        out = tempfile.mkdtemp(prefix="dfq-peer-pool-")
        path, seconds[pool_seed] = distill_pool(setup, out, args, seed=pool_seed)
        images[pool_seed] = load_calibration(path, setup.transform, args.distill_images)
        if args.tiny:  # the tiny form's pool is litter, a real one worth reusing
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"distilled pool (engine seed {pool_seed}) kept at {path} (reuse it with --pool {path})")
    extra = _augment_fields(args)
    extra.update(
        pool_seeds=pool_seeds, **_distill_fields(list(seconds.values()), args), **_distill_recipe(args)
    )
    runs = {
        seed: {"pool_seed": ps, "distill_seconds": round(seconds[ps], 1)}
        for seed, ps in zip(args.seeds, pool_seeds)
    }
    return {seed: images[ps] for seed, ps in zip(args.seeds, pool_seeds)}, extra, runs


def _reused_pools(
    setup: Setup, args: argparse.Namespace
) -> tuple[dict[int, torch.Tensor], dict, dict[int, dict]]:
    """`--pool`: one pool for every seed, or one per seed. Each pool's engine seed comes from its
    manifest; its distillation time and recipe from the record `distill_pool` left in it, so a
    rerun on the pools of an earlier run (e.g. after a quantizer change) still reports the
    distillation that made them. A pool without that record gives rows without distillation time."""
    from quant.data import load_calibration

    paths = args.pool if len(args.pool) > 1 else args.pool * len(args.seeds)
    if len(paths) != len(args.seeds):
        raise BenchmarkError(
            f"peer: --pool names {len(args.pool)} pools for {len(args.seeds)} seeds (give one, or one per seed)"
        )
    images: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    engine_seed: dict[str, int] = {}
    for path in dict.fromkeys(paths):
        images[path] = load_calibration(path, setup.transform, args.distill_images)
        engine_seed[path] = int(json.loads((Path(path) / "manifest.json").read_text())["config"]["seed"])
        record = Path(path) / DISTILL_RECORD
        if record.is_file():
            records[path] = json.loads(record.read_text())
    extra = _augment_fields(args)
    extra["pool_seeds"] = [engine_seed[p] for p in paths]
    runs = {seed: {"pool_seed": engine_seed[p], "pool": p} for seed, p in zip(args.seeds, paths)}
    if len(records) == len(images):  # every pool says how long it took
        recipes = {r["distill_recipe"] for r in records.values()}
        if len(recipes) > 1:
            raise BenchmarkError(
                f"peer: --pool mixes pools distilled by different recipes: {sorted(recipes)}"
            )
        first = next(iter(records.values()))
        extra.update(
            **_distill_fields([r["seconds"] for r in records.values()], args),
            distill_recipe=first["distill_recipe"], distill_ce_weight=first["distill_ce_weight"],
            distilled_on=sorted({r["date"] for r in records.values()}),
        )  # fmt: skip
        for seed, p in zip(args.seeds, paths):
            runs[seed]["distill_seconds"] = records[p]["seconds"]
    return {seed: images[p] for seed, p in zip(args.seeds, paths)}, extra, runs


def _augment_fields(args: argparse.Namespace) -> dict:
    """The row fields of the copies the reconstruction reads."""
    extra: dict = {"augment": args.distill_augment}
    if args.distill_augment > 1 and args.distill_cutmix > 0:
        extra["cutmix"] = args.distill_cutmix
    return extra


def _distill_fields(seconds: list[float], args: argparse.Namespace) -> dict:
    """Distillation wall time over the pools, and per iteration per batch (the peer's unit)."""
    batches = max(1, args.distill_images // args.distill_batch)
    mean = float(np.mean(seconds))
    return {
        "distill_seconds": round(mean, 1),
        "distill_seconds_per_pool": [round(t, 1) for t in seconds],
        "distill_s_per_iter_per_batch": round(mean / args.distill_iters / batches, 3),
    }


def _class_term(ce_weight: float) -> str:
    """The distillation objective beyond the BN statistics, as the table names it."""
    return (
        "BN statistics only"
        if ce_weight == 0
        else f"+ {ce_weight:g} x cross-entropy to two classes at 0.5/0.5"
    )


def _label(method: str, wbits: int, calib_kind: str) -> str:
    return f"W{wbits}A4 {method} {calib_kind}"


def _merge_side(results: Path, side: list[dict], setup: Setup) -> list[dict]:
    """This run's rows plus the earlier ones (same model) of settings it did not run, in SETTINGS order.

    Re-measuring one setting (`--settings 2`) must not drop the others from the side-by-side table;
    each row keeps its own device and date.
    """
    path = results / "peer_compare.json"
    earlier: list[dict] = []
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = {}
        if saved.get("model", setup.name) == setup.name:
            for row in saved.get("rows", []):
                earlier.append({"device": saved.get("device"), "date": saved.get("date"), **row})
    now = {_side_key(r) for r in side}
    merged = [r for r in earlier if _side_key(r) not in now] + side
    order = [_label(m, w, c) for m, w, c, _ in SETTINGS]
    return sorted(
        merged,
        key=lambda r: (order.index(r["setting"]) if r["setting"] in order else len(order), r.get("iters", 0)),
    )


def _side_key(row: dict) -> tuple:
    """What one side-by-side row measures: the setting, the activation placement and the budget."""
    return row["setting"], row.get("placement"), row.get("iters")


def _write_side(results: Path, side: list[dict], setup: Setup) -> None:
    side = _merge_side(results, side, setup)
    devices = ", ".join(sorted({r["device"] for r in side if r.get("device")}))
    dates = ", ".join(sorted({r["date"] for r in side if r.get("date")}))
    distill = next((r for r in side if r.get("distill_seconds")), None)
    lines = [
        "# Side by side with Genie, CIFAR-10 ResNet-20",
        "",
        *(
            [
                f"**Tiny CI form** ({setup.name}, {setup.lossless}): shape of the report only, not a comparison.",
                "",
            ]
            if setup.name != "cifar_resnet20"
            else []
        ),
        f"Ours measured by `dfq bench peer` on {devices}, {dates}; "
        "peer figures: Genie run unmodified on the same machine kind (docs/results.md, section Peers; same split, same layers at 8 bits).",
        "",
        "| setting | iters/block | n_calib | seeds | ours lossless | Genie lossless | ours JPEG 7,959 | Genie JPEG | ours s | Genie s | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in side:
        lines.append(
            f"| {r['setting']}{', ' + r['placement'] if r.get('placement') else ''}{_start_mark(r)} | {r['iters']} "
            f"| {_n_calib(r)} "
            f"| {len(r.get('seeds', [0]))} "
            f"| {_spread(r, 'lossless')} | {r['peer_lossless']:.2f} "
            f"| {_spread(r, 'jpeg')} | {r['peer_jpeg']:.2f} | {r['ours_seconds']:.0f} | {r['peer_seconds']} "
            f"| {_ratio(r)} |"
        )
    if any(_start_mark(r) for r in side):
        lines += [
            "",
            "Reconstruction starts each layer's learned rounding from GPTQ's compensated weights (`quant.gptq`, "
            "the default since 2026-11-25); rows marked *nearest start* were measured before that, from each "
            "layer's own weights rounded to nearest.",
        ]
    longer = sorted({r["iters"] for r in side if _ratio(r) == "-"})
    if longer:
        lines += [
            "",
            f"Rows at {', '.join(f'{n:,}' for n in longer)} iterations a block (`--iters`; 20,000 is Genie's published "
            "default, which the Genie run cut to fit its time) compare accuracy only: the Genie figures beside them "
            "are its runs at the setting's own budget, so there is no time ratio.",
        ]
    if any(len(r.get("seeds", [0])) > 1 for r in side):
        lines += [
            "",
            "Where a setting ran with several seeds (QDrop masks, minibatch order, augmented copies; the "
            "same real calibration images), ours is the mean with the range in brackets and the time is the "
            "mean run; Genie's is its one run.",
        ]
    pools = {len(set(r["pool_seeds"])) for r in side if len(set(r.get("pool_seeds", []))) > 1}
    if pools:
        lines += [
            "",
            f"bn-distill with several seeds: each seed reconstructs from its own pool, distilled with the engine "
            f"seed equal to the run seed ({max(pools)} pools), so the range covers the pool draw too.",
        ]
    if any(r.get("augment", 1) > 1 for r in side):
        lines += [
            "",
            "xN flip/shift: the reconstruction reads each calibration image and N-1 copies of it, flipped "
            "left-right with probability 1/2 and shifted by up to 1/8 of the image (reflect padding; "
            "`quant.data.augment_calibration`, `dfq quantize --augment N`); the copies' time is in ours.",
        ]
    cut = sorted({r["cutmix"] for r in side if r.get("cutmix")})
    if cut:
        lines += [
            "",
            f"cutmix {', '.join(map(str, cut))}: each copy also gets a box pasted from a randomly drawn copy, of "
            "an area drawn uniformly up to about that fraction of the image, at a uniform position (MixMix's "
            "data mixing; `dfq quantize --augment-cutmix F`).",
        ]
    fid = [r for r in side if r.get("ours_jpeg_agree") is not None]
    if fid:
        lines += [
            "",
            "Fidelity to the fp32 model on the JPEG set (ours, mean over seeds; rows measured before it was "
            "recorded have none): "
            + "; ".join(
                f"{r['setting']} at {r['iters']:,} iterations: top-1 agreement {r['ours_jpeg_agree']:.2f}%, "
                f"KL {r['ours_jpeg_kl']:.4f}"
                for r in fid
            )
            + ". Genie's run did not record it.",
        ]
    if distill is not None:
        lines += [
            "",
            f"Distillation (bn-distill, {distill['n_calib']} images, {distill.get('distill_recipe', '')}): "
            f"{distill['distill_seconds']:.0f} s wall{_pool_range(distill)} against Genie-D's "
            f"{PEER_DISTILL_SECONDS} s, "
            f"{distill['distill_s_per_iter_per_batch']:.3f} s per iteration per batch against "
            f"{PEER_DISTILL_S_PER_ITER}.{_reused(distill)}",
        ]
    (results / "peer_compare.md").write_text("\n".join(lines) + "\n")
    (results / "peer_compare.json").write_text(
        json.dumps({"model": setup.name, "rows": side}, indent=1) + "\n"
    )


def _ratio(row: dict) -> str:
    """Our time over the peer's, where the row ran the peer's budget ('-' for `--iters` rows)."""
    ratio = row.get("time_ratio")
    return "-" if ratio is None else f"{ratio:.2f}"


def _start_field(config) -> dict:
    """Where the reconstruction's learned rounding started, for rows that reconstruct."""
    return {"gptq_start": config.gptq_start} if config.iters and config.method != "rtn" else {}


def _start_mark(row: dict) -> str:
    """A reconstruction row measured from nearest rounding (before GPTQ's start was the default)."""
    reconstructs = row.get("iters") and not row["setting"].split()[1] == "rtn"
    return ", *nearest start*" if reconstructs and row.get("gptq_start") is not True else ""


def _reused(row: dict) -> str:
    """Where the row reran on earlier pools (`--pool`): when they were distilled."""
    days = row.get("distilled_on")
    return f" The pools were distilled on {', '.join(days)} and reused with `--pool`." if days else ""


def _pool_range(row: dict) -> str:
    """`(mean of N pools, min-max)` where the row distilled several pools."""
    per = row.get("distill_seconds_per_pool", [])
    return f" (mean of {len(per)} pools, {min(per):.0f}-{max(per):.0f} s)" if len(per) > 1 else ""


def _n_calib(row: dict) -> str:
    """The calibration images, and how many copies the reconstruction saw of each."""
    copies = row.get("augment", 1)
    if copies <= 1:
        return str(row["n_calib"])
    return f"{row['n_calib']} (x{copies} flip/shift{', cutmix ' + str(row['cutmix']) if row.get('cutmix') else ''})"


def _spread(row: dict, col: str) -> str:
    """`mean (min-max)` over the seeds, or the one value where they all agree (e.g. round-to-nearest)."""
    per = row.get(f"ours_{col}_per_seed") or [row[f"ours_{col}"]]
    mean = f"{row[f'ours_{col}']:.2f}"
    return mean if min(per) == max(per) else f"{mean} ({min(per):.2f}-{max(per):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

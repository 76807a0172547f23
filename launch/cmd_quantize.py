"""`dfq quantize`: calibrate a model on a pool (or real images, or noise), evaluate it, save it.

A thin layer over `quant`: load_model -> load_calibration -> quant.quantize -> evaluate -> save.
The distill methods (`kd`, `nipq`) train on the images instead, streamed (`quant.data.
training_images`). Everything that can be checked is checked before the first image is read (bits,
method, paths, model spec, settings), so a mistake costs a one-line error, not a half-run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from pathlib import Path

from launch.argtypes import (
    area_fraction,
    bits,
    nonnegative_float,
    nonnegative_int,
    oversample_ratio,
    positive_float,
    positive_int,
)
from launch.model_flags import add_preprocess_flags, given_flags, preprocess_of

_CNN, _VIT, _DISTILL = "cnn", "transformer", "distill"
#: flags that set a setting of some paths only, for some model families:
#: (flag, settings field, paths (`quant.methods`), model families)
_PATH_FLAGS = (
    ("--placement", "placement", (_CNN, _DISTILL), (_CNN,)),
    ("--equalize", "equalize", (_CNN,), (_CNN,)),
    ("--gptq-start", "gptq_start", (_CNN,), (_CNN,)),
    ("--batch-size", "batch_size", (_CNN, _DISTILL), (_CNN, _VIT)),
    ("--calib-size", "calib_size", (_VIT, _DISTILL), (_VIT,)),
    ("--input-grid", None, (_VIT, _DISTILL), (_VIT,)),
    ("--steps", "steps", (_DISTILL,), (_CNN, _VIT)),
    ("--epochs", "epochs", (_DISTILL,), (_CNN, _VIT)),
    ("--lr", "lr", (_DISTILL,), (_CNN, _VIT)),
    ("--symreg", "symreg", (_DISTILL,), (_CNN, _VIT)),
    ("--satnl", "satnl", (_DISTILL,), (_CNN, _VIT)),
    ("--init", "init", (_DISTILL,), (_CNN, _VIT)),
    ("--flip-crop", "flip_crop", (_DISTILL,), (_CNN, _VIT)),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from quant.methods import METHODS, methods_help

    p = sub.add_parser(
        "quantize",
        help="calibrate a CNN/ViT on a pool or real images and evaluate it",
        description="Quantize a model: block reconstruction for CNNs, RepQ-ViT-style calibration for "
        "transformers (chosen from the model). Methods: " + methods_help() + ".",
    )
    p.add_argument(
        "--model",
        required=True,
        help="zoo name, timm name, tv:<name>, module:factory or path/to/net.py:factory",
    )
    p.add_argument("--checkpoint", help="state dict to load into the model")
    add_preprocess_flags(p)
    p.add_argument(
        "--calib",
        required=True,
        help="dfq pool dir/URL, ImageFolder dir, tar of images, .npz, or 'noise' (Gaussian)",
    )
    p.add_argument("--n-calib", type=positive_int, default=1024, help="calibration images (default 1024)")
    p.add_argument(
        "--augment",
        type=positive_int,
        default=1,
        help="reconstruct on the images plus N-1 flipped and shifted copies (small pools; default 1: none)",
    )
    p.add_argument(
        "--augment-cutmix",
        type=area_fraction,
        default=0.0,
        help="with --augment N > 1: paste into each copy a box from a randomly drawn copy, of up to "
        "about this fraction of the image's area (default 0: none)",
    )
    _add_select_flags(p)
    p.add_argument(
        "--augment-mixup",
        type=nonnegative_float,
        default=0.0,
        metavar="ALPHA",
        help="with --augment N > 1: blend each copy pixel by pixel with a randomly drawn copy, weight "
        "~ Beta(ALPHA, ALPHA) (Mixup; default 0: none)",
    )
    p.add_argument(
        "--verify",
        choices=["none", "size", "sha256"],
        default="size",
        help="check a pool's shards against its manifest first (default size; sha256 reads every byte)",
    )
    p.add_argument("--wbits", type=bits, default=4)
    p.add_argument("--abits", type=bits, default=4)
    p.add_argument(
        "--first-last-bits", type=bits, default=8, help="first conv / last linear bits (default 8)"
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        help="a named preset (default: genie-m for CNNs, repq-vit for transformers)",
    )
    p.add_argument(
        "--iters",
        "--vit-recon-iters",
        dest="iters",
        type=nonnegative_int,
        help="reconstruction iterations per block (default: the method's: 20000 for CNN methods but "
        "rtn, 0 for repq-vit, i.e. calibration alone)",
    )
    p.add_argument(
        "--placement",
        choices=["block-output", "layer-input"],
        help="CNNs: activation quantizers on every stored block output, residual stream included "
        "(QDrop, default), or on conv/linear inputs only, identity skips in float (Genie)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        default=None,
        help="CNNs: cross-layer equalize conv pairs after BN folding (helps depthwise nets at 8 bits)",
    )
    p.add_argument(
        "--gptq-start",
        action=argparse.BooleanOptionalAction,
        help="CNNs: learned rounding starts from GPTQ's compensated weights (default); --no-gptq-start: "
        "from each layer's own weights rounded to nearest",
    )
    p.add_argument(
        "--calib-size",
        "--vit-calib-size",
        dest="calib_size",
        type=positive_int,
        help="transformers: images (the first of --n-calib) the RepQ-ViT calibration reads (default 64; "
        "RepQ-ViT used 32)",
    )
    p.add_argument(
        "--input-grid",
        choices=["auto", "calibrated", "preprocess"],
        help="transformers: patch-embedding input grid fitted to the calibration images, or covering "
        "the input range the model's normalization allows (default auto: preprocess for pools and "
        "noise, which may not span it, calibrated for real images)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help="CNNs: reconstruction batch (default 32); kd/nipq: training batch (default 64)",
    )
    t = p.add_argument_group("distill methods (kd, nipq): training on the images against the float model")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="training batches (default 2000)")
    budget.add_argument(
        "--epochs", type=positive_float, help="training passes over the --n-calib images, instead of --steps"
    )
    t.add_argument("--lr", type=positive_float, help="Adam rate of the weights (default: the method's, 1e-5)")
    t.add_argument(
        "--symreg", type=nonnegative_float, help="SymReg weight-symmetry regularizer weight (default 0)"
    )
    t.add_argument(
        "--satnl",
        action="store_true",
        default=None,
        help="saturating nonlinearities (learned clamp) in place of ReLU/GELU",
    )
    t.add_argument(
        "--init",
        choices=["rtn", "minmax", "genie-m", "repq-vit"],
        help="where training starts: rtn (default), minmax (CNNs), repq-vit (transformers), or genie-m "
        "(block reconstruction first, --iters a block, default 2000)",
    )
    t.add_argument(
        "--flip-crop",
        action=argparse.BooleanOptionalAction,
        help="a new random flip and shift of each image every time it is drawn (default on)",
    )
    p.add_argument("--eval", help="evaluation data (pool, ImageFolder, tar, .npz); omit to skip evaluation")
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    p.add_argument("--out", required=True, help="output directory (quantized.pt, result.json)")
    p.add_argument(
        "--trace-grad-norm",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="record the gradient norm of the quantization parameters per reconstructed unit and "
        "iteration into FILE (default <out>/grad_norm.json; a plot beside it as .png) and its mean over "
        "the last 10%% of iterations into result.json (mixup-class prompting, arXiv 2507.21947, Fig. 3)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _add_select_flags(p: argparse.ArgumentParser) -> None:
    from quant.select import SELECTORS

    p.add_argument(
        "--select",
        choices=list(SELECTORS),
        help="keep the best --n-calib of --oversample R times as many images, scored by the float model: "
        "energy (lowest free energy) or bn-sensitivity (the samples that keep the BN statistics closest "
        "to the running ones; BN models) (GenQ's filters)",
    )
    p.add_argument(
        "--oversample",
        type=oversample_ratio,
        default=1.0,
        help="with --select: score R x --n-calib images of the source (default 1: no selection)",
    )
    p.add_argument(
        "--select-balance",
        action="store_true",
        help="with --select: keep each class's share of the scored images (pool .cls / folder labels)",
    )


def _check_select(args: argparse.Namespace) -> None:
    """Refuse, before any slow work, selection flags that cannot go together."""
    from quant.errors import QuantError

    if args.select is None:
        if args.oversample != 1:
            raise QuantError(
                f"--oversample {args.oversample:g} scores extra images for --select: give --select"
            )
        if args.select_balance:
            raise QuantError("--select-balance applies to --select")
        return
    if args.oversample == 1:
        raise QuantError(f"--select {args.select} keeps all of 1 x --n-calib images: give --oversample R > 1")
    if args.calib == "noise":
        raise QuantError(f"--select {args.select} chooses among pool or real images, not noise")


def _check_select_model(args: argparse.Namespace, model) -> None:
    from quant.errors import QuantError
    from quant.select import bn_layers

    if args.select == "bn-sensitivity" and not bn_layers(model):
        raise QuantError(f"--select bn-sensitivity needs BatchNorm layers; {args.model} has none")


def _selected_calibration(args: argparse.Namespace, model, transform) -> tuple:
    """The --n-calib images --select keeps of the first (pools) or drawn (others) R x --n-calib of the
    source, and the result fields that describe the choice. A source with fewer is refused: the
    budget the row reports is the one that was scored."""
    import math

    import torch

    from quant.data import iter_labelled
    from quant.errors import QuantError
    from quant.select import select_samples

    n_scored = max(args.n_calib + 1, math.ceil(args.oversample * args.n_calib - 1e-9))
    items = list(iter_labelled(args.calib, transform, n_scored, seed=args.seed))
    if len(items) < n_scored:
        raise QuantError(
            f"--oversample {args.oversample:g} scores {n_scored} images but {args.calib} has only {len(items)}"
        )
    images = torch.stack([x for x, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items])
    t0 = time.perf_counter()
    chosen = select_samples(
        model, images, args.n_calib, args.select, labels=labels, balance=args.select_balance
    )
    fields = {
        "select": args.select,
        "oversample": args.oversample,
        "select_balance": args.select_balance,
        "n_scored": n_scored,
        "select_seconds": round(time.perf_counter() - t0, 2),
        "select_summary": chosen.summary,
    }
    return images[chosen.indices], fields


def _check_source(source: str, what: str) -> None:
    from quant.errors import QuantError

    if source == "noise" or "://" in source:
        return
    if not Path(source).exists():
        raise QuantError(f"{what} {source!r} does not exist")


def _check_out(out: Path) -> None:
    """Refuse, before any slow work, an --out that cannot become a directory (creating nothing)."""
    import os

    from quant.errors import QuantError

    if out.exists() and not out.is_dir():
        raise QuantError(f"cannot create output directory {out}: a file is in the way")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QuantError(f"cannot create output directory {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantError(f"cannot create output directory {out}: {parent} is not writable")


def _trace_path(args: argparse.Namespace, out: Path) -> Path | None:
    """Where `--trace-grad-norm` writes (None: no trace); a FILE that is a directory is refused."""
    from quant.errors import QuantError

    if args.trace_grad_norm is None:
        return None
    path = Path(args.trace_grad_norm) if args.trace_grad_norm else out / "grad_norm.json"
    if path.is_dir():
        raise QuantError(f"--trace-grad-norm {path}: a directory is in the way of the trace file")
    return path


def _write_trace(trace: dict, path: Path) -> dict:
    """Save the trace and its plot; the result.json fields that point at them."""
    import sys

    from quant.errors import QuantError
    from quant.grad_trace import TOTAL, plot_trace, save_trace

    save_trace(trace, path)
    fields = {"grad_norm": str(path), "grad_norm_tail": trace["summary"]["tail_mean"].get(TOTAL)}
    try:
        plot_trace(trace, path.with_suffix(".png"))
    except QuantError as e:  # no matplotlib: the JSON is the trace, the plot a convenience
        print(f"dfq quantize: no gradient-norm plot ({e})", file=sys.stderr)
    return fields


def method_path(method: str | None, family: str) -> str:
    """The path (`quant.methods`) a `--method` runs on for a model of `family`."""
    from quant.methods import DEFAULT_METHOD, get_method

    return get_method(method or DEFAULT_METHOD[family], family).family


def _refuse_other_paths(args: argparse.Namespace, family: str, path: str) -> dict:
    """The path-specific settings the flags give; a flag of another path or model family is refused
    in one line."""
    from quant.errors import QuantError
    from quant.methods import DEFAULT_METHOD, METHODS

    method = args.method or DEFAULT_METHOD[family]
    values: dict = {}
    for flag, field, paths, families in _PATH_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if family not in families:
            raise QuantError(
                f"{flag} applies to {' and '.join(f + 's' for f in families)}; {args.model} is a {family}"
            )
        if path not in paths:
            names = ", ".join(
                n for n, m in METHODS.items() if m.family in paths and family in m.model_families
            )
            raise QuantError(f"{flag} applies to the {' and '.join(paths)} methods ({names}), not {method}")
        if field is not None:
            values[field] = value
    if path == _DISTILL:
        if args.augment != 1:
            raise QuantError(
                f"--augment {args.augment} makes fixed copies for reconstruction; {method} draws a new "
                "flip and shift of each image every step (--flip-crop)"
            )
        if args.iters is not None and values.get("init") != "genie-m":
            raise QuantError(
                f"--iters {args.iters} sets the reconstruction of --init genie-m; train with --steps"
            )
    return values


def _settings(args: argparse.Namespace, family: str, input_range: tuple[float, float] | None):
    """The path's settings from the flags; a flag of another path is refused in one line."""
    from quant import settings_for

    path = method_path(args.method, family)
    values = _refuse_other_paths(args, family, path)
    if family == "transformer" and input_range is not None:
        values["input_range"] = input_range
    if args.iters is not None:
        values["init_iters" if path == _DISTILL else "iters"] = args.iters
    settings = settings_for(
        family,
        args.method,
        wbits=args.wbits,
        abits=args.abits,
        first_last_bits=args.first_last_bits,
        seed=args.seed,
        device=args.device,
        **values,
    )
    if path == _DISTILL:
        settings.check_family(family)
    return settings


def _method_label(settings) -> str:
    """The method as result rows name it (the transformer path's options as `+` suffixes)."""
    if settings.method != "repq-vit":
        return settings.method
    label = "repq-vit" + ("+rot" if settings.rotate_heads else "")
    return label + ("+genie-m" if settings.iters else "+gptq" if settings.gptq else "")


def _distill_fields(settings, n_calib: int) -> dict:
    """A distill run's own result fields (its `iters` is the training steps)."""
    steps = settings.resolved_steps(n_calib)
    return {
        "steps": steps,
        "epochs": round(steps * settings.batch_size / n_calib, 2),  # passes over the training images
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "init": settings.init,
        "init_iters": settings.init_iters if settings.init == "genie-m" else 0,
        "symreg": settings.symreg,
        "satnl": settings.satnl,
        "flip_crop": settings.flip_crop,
    }


def run(args: argparse.Namespace) -> int:
    import quant
    from quant.data import (
        augment_calibration,
        build_transform,
        input_grid_for,
        input_range,
        load_calibration,
        noise_calibration,
        open_dataset,
        source_kind,
        training_images,
    )
    from quant.errors import QuantError
    from quant.evaluate import evaluate
    from quant.models import check_forward, load_model, model_spec
    from quant.reader import shard_urls

    if args.augment_cutmix > 0 and args.augment == 1:
        raise QuantError(
            f"--augment-cutmix {args.augment_cutmix} mixes augmented copies: give --augment N > 1 too"
        )
    if args.augment_mixup > 0 and args.augment == 1:
        raise QuantError(
            f"--augment-mixup {args.augment_mixup} mixes augmented copies: give --augment N > 1 too"
        )
    _check_select(args)
    _check_source(args.calib, "calibration source")
    from_pool = args.calib != "noise" and source_kind(args.calib) == "pool"
    if from_pool:
        shard_urls(args.calib, verify=args.verify)  # a corrupt shard fails here, naming it
    if args.eval:
        _check_source(args.eval, "evaluation data")
    out = Path(args.out)
    _check_out(out)  # created only once there is something to write: a refused run leaves nothing
    trace_path = _trace_path(args, out)

    model, data_config = load_model(
        args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, preprocess=preprocess_of(args)
    )
    check_forward(model, data_config)  # a wrong input size or class count: one line, before any data
    _check_select_model(args, model)
    family = quant.model_family(model)
    real_images = not (from_pool or args.calib == "noise")
    input_grid = input_grid_for(args.input_grid or "auto", real_images=real_images)
    settings = _settings(args, family, input_range(data_config) if input_grid == "preprocess" else None)
    distill = method_path(args.method, family) == _DISTILL
    if distill:  # the trace is of the reconstruction a distill run starts from
        recon_iters, hint = (settings.init_iters if settings.init == "genie-m" else 0), "--init genie-m"
    else:
        recon_iters, hint = settings.iters, "--iters N"
    if trace_path is not None and not recon_iters:
        raise QuantError(
            f"--trace-grad-norm traces block reconstruction, which {settings.method} as set does not "
            f"run: give {hint}"
        )
    transform = build_transform(data_config)
    progress = not args.no_progress

    start = time.perf_counter()
    select_fields: dict = {"select": None, "oversample": 1.0}
    if args.select:  # scored and chosen in memory; a distill run trains on the chosen tensor
        calib, select_fields = _selected_calibration(args, model, transform)
    elif args.calib == "noise":
        calib = noise_calibration(args.n_calib, data_config["input_size"], seed=args.seed)
    elif distill:  # streamed while training
        calib = training_images(args.calib, transform, args.n_calib, seed=args.seed)
    else:
        calib = load_calibration(args.calib, transform, args.n_calib, seed=args.seed)
    n_calib = len(calib)
    if not distill:
        calib = augment_calibration(
            calib, args.augment, seed=args.seed, cutmix=args.augment_cutmix, mixup=args.augment_mixup
        )
    spec = model_spec(args.model, args.checkpoint, args.num_classes, data_config)
    qmodel = quant.quantize(
        model, calib, settings, model_spec=spec, progress=progress, trace_grad_norm=trace_path is not None
    )
    seconds = time.perf_counter() - start

    cnn = family == "cnn"
    result: dict = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "preprocess_flags": given_flags(args),  # --input-size/--mean/--std/--num-classes as given
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "family": family,
        "calib": args.calib,
        "n_calib": n_calib,
        "augment": args.augment,
        "augment_cutmix": args.augment_cutmix,
        "augment_mixup": args.augment_mixup,
        **select_fields,
        "wbits": args.wbits,
        "abits": args.abits,
        "first_last_bits": args.first_last_bits,
        "method": _method_label(settings),
        "placement": settings.placement if cnn else None,
        "equalize": settings.equalize if cnn and not distill else None,
        "gptq_start": settings.gptq_start if cnn and not distill else None,
        "input_grid": None if cnn else input_grid,
        "calib_images": None if cnn else min(n_calib * args.augment, settings.calib_size),
        "iters": settings.resolved_steps(n_calib) if distill else settings.iters,
        "seconds": round(seconds, 2),
        "device": args.device,
        "date": _dt.date.today().isoformat(),
    }
    if distill:
        result.update(_distill_fields(settings, n_calib))
    if args.eval:
        data = open_dataset(args.eval, transform)
        fp = evaluate(model, data, batch_size=args.eval_batch_size, device=args.device, progress=progress)
        q = evaluate(
            qmodel,
            data,
            batch_size=args.eval_batch_size,
            device=args.device,
            progress=progress,
            reference=model,
        )
        result.update(
            eval=args.eval,
            n_eval=q["n"],
            fp_top1=fp["top1"],
            fp_top5=fp["top5"],
            top1=q["top1"],
            top5=q["top5"],
            fp_agree=q["agree"],  # percent of images whose top-1 is the fp model's
            fp_kl=q["kl"],  # mean KL(fp || quantized), nats
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantError(f"cannot create output directory {out}: {e.strerror}") from None
    qmodel.save(out / "quantized.pt")
    if trace_path is not None:
        result.update(_write_trace(qmodel.grad_norm, trace_path))
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0

"""`dfq quantize`: calibrate a model on a pool (or real images, or noise), evaluate it, save it.

A thin layer over `quant`: load_model -> load_calibration -> quantize_model -> evaluate -> save.
Everything that can be checked is checked before the first image is read (bits, method, paths,
model spec), so a mistake costs a one-line error, not a half-run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from pathlib import Path

from launch.argtypes import area_fraction, bits, nonnegative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="calibrate a CNN/ViT on a pool or real images and evaluate it",
        description="Quantize a model with block reconstruction (CNNs) or RepQ-ViT calibration (ViTs).",
    )
    p.add_argument("--model", required=True, help="zoo name, timm name, tv:<name> or module:factory")
    p.add_argument("--checkpoint", help="state dict to load into the model")
    p.add_argument("--num-classes", type=positive_int)
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
    p.add_argument("--method", default="genie-m", choices=["rtn", "brecq", "adaround", "qdrop", "genie-m"])
    p.add_argument(
        "--placement",
        default="block-output",
        choices=["block-output", "layer-input"],
        help="CNN activation quantizers: on every stored block output, residual stream included "
        "(QDrop, default), or on conv/linear inputs only, identity skips in float (Genie)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        help="CNNs: cross-layer equalize conv pairs after BN folding (helps depthwise nets at 8 bits)",
    )
    p.add_argument(
        "--iters", type=nonnegative_int, default=20000, help="CNN reconstruction iterations per block"
    )
    p.add_argument(
        "--gptq-start",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CNNs: learned rounding starts from GPTQ's compensated weights (default); --no-gptq-start: "
        "from each layer's own weights rounded to nearest",
    )
    p.add_argument(
        "--vit-recon-iters",
        type=nonnegative_int,
        default=0,
        help="transformers: block reconstruction iterations on top of RepQ-ViT calibration (default 0: none)",
    )
    p.add_argument(
        "--vit-calib-size",
        type=positive_int,
        default=64,
        help="transformers: images (the first of --n-calib) the RepQ-ViT calibration reads (default 64; "
        "RepQ-ViT used 32)",
    )
    p.add_argument(
        "--input-grid",
        choices=["auto", "calibrated", "preprocess"],
        default="auto",
        help="transformers: patch-embedding input grid fitted to the calibration images, or covering "
        "the input range the model's normalization allows (auto: preprocess for pools and noise, "
        "which may not span it, calibrated for real images)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--eval", help="evaluation data (pool, ImageFolder, tar, .npz); omit to skip evaluation")
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    p.add_argument("--out", required=True, help="output directory (quantized.pt, result.json)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    import torch

    from quant.data import (
        augment_calibration,
        build_transform,
        input_grid_for,
        input_range,
        load_calibration,
        noise_calibration,
        open_dataset,
        source_kind,
    )
    from quant.errors import QuantError
    from quant.evaluate import evaluate
    from quant.models import load_model
    from quant.ptq import QuantConfig, quantize_model, save_quantized
    from quant.reader import shard_urls

    config = QuantConfig(
        wbits=args.wbits,
        abits=args.abits,
        method=args.method,
        iters=args.iters,
        batch_size=args.batch_size,
        first_last_bits=args.first_last_bits,
        placement=args.placement,
        equalize=args.equalize,
        gptq_start=args.gptq_start,
        vit_recon_iters=args.vit_recon_iters,
        vit_calib_size=args.vit_calib_size,
        seed=args.seed,
        device=args.device,
    )
    if args.augment_cutmix > 0 and args.augment == 1:
        raise QuantError(
            f"--augment-cutmix {args.augment_cutmix} mixes augmented copies: give --augment N > 1 too"
        )
    _check_source(args.calib, "calibration source")
    from_pool = args.calib != "noise" and source_kind(args.calib) == "pool"
    if from_pool:
        shard_urls(args.calib, verify=args.verify)  # a corrupt shard fails here, naming it
    if args.eval:
        _check_source(args.eval, "evaluation data")
    out = Path(args.out)
    _check_out(out)  # created only once there is something to write: a refused run leaves nothing

    model, data_config = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    transform = build_transform(data_config)
    input_grid = input_grid_for(args.input_grid, real_images=not (from_pool or args.calib == "noise"))
    if input_grid == "preprocess":
        config.input_range = input_range(data_config)
    progress = not args.no_progress

    start = time.perf_counter()
    if args.calib == "noise":
        calib = noise_calibration(args.n_calib, data_config["input_size"], seed=args.seed)
    else:
        calib = load_calibration(args.calib, transform, args.n_calib, seed=args.seed)
    n_calib = int(calib.shape[0])
    calib = augment_calibration(calib, args.augment, seed=args.seed, cutmix=args.augment_cutmix)
    qmodel = quantize_model(model, calib, config, progress=progress)
    seconds = time.perf_counter() - start

    vit = not hasattr(qmodel, "_dfq_meta")  # the transformer path (RepQ-ViT calibration)
    if vit:
        method, iters = (
            ("repq-vit+rot+genie-m" if args.vit_recon_iters else "repq-vit+rot+gptq"),
            args.vit_recon_iters,
        )
    else:
        method, iters = args.method, (args.iters if args.method != "rtn" else 0)
    result: dict = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "calib": args.calib,
        "n_calib": n_calib,
        "augment": args.augment,
        "augment_cutmix": args.augment_cutmix,
        "wbits": args.wbits,
        "abits": args.abits,
        "first_last_bits": args.first_last_bits,
        "method": method,
        "placement": None if vit else args.placement,
        "equalize": None if vit else args.equalize,
        "gptq_start": None if vit else args.gptq_start,
        "input_grid": input_grid if vit else None,
        "calib_images": min(n_calib * args.augment, args.vit_calib_size) if vit else None,
        "iters": iters,
        "seconds": round(seconds, 2),
        "device": args.device,
        "date": _dt.date.today().isoformat(),
    }
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
    spec = {"model": args.model, "checkpoint": args.checkpoint, "num_classes": args.num_classes}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantError(f"cannot create output directory {out}: {e.strerror}") from None
    if not vit:
        save_quantized(qmodel, config, out / "quantized.pt", spec)
    else:  # transformer path: the fake-quant state dict with the config beside it
        torch.save(
            {"config": vars(config), "model_spec": spec, "state_dict": qmodel.state_dict()},
            out / "quantized.pt",
        )
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0

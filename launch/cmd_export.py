"""`dfq export`: a run saved by `dfq quantize --out RUN_DIR` as a QDQ ONNX model.

A thin layer over `quant.load` (which rebuilds the float model from the spec the run saved: model,
checkpoint, class count and preprocessing) and `quant.export_onnx.export_qdq`, which checks the file
in ONNX Runtime against the torch quantized model on a few images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launch.argtypes import nonnegative_int, positive_int
from launch.errors import UsageError

#: export formats: name -> default file name in the run directory
FORMATS = {"onnx": "quantized.onnx"}
SAVED = "quantized.pt"  # what `dfq quantize --out` writes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a quantized run (dfq quantize --out) as a QDQ ONNX model, checked in ONNX Runtime",
        description="Export the model saved by `dfq quantize --out RUN_DIR` (integer weights + "
        "DequantizeLinear, activations as QuantizeLinear/DequantizeLinear pairs) and compare ONNX "
        "Runtime's outputs with the torch quantized model's. Needs `pip install dfq[onnx]`.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of dfq quantize")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="default onnx")
    p.add_argument("--out", help="output file (default RUN_DIR/quantized.onnx)")
    p.add_argument(
        "--data",
        help="images to check on (pool, ImageFolder, tar, .npz), with the run's preprocessing "
        "(default: random images)",
    )
    p.add_argument("--n-check", type=positive_int, default=16, help="images to check on (default 16)")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the random check images (default 0)"
    )
    p.set_defaults(func=run)


def _saved_model(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise UsageError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory: give the --out directory of dfq quantize")
    path = run_dir / SAVED
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no {SAVED}: not a run saved by dfq quantize --out")
    return path


def check_images(data_config: dict, n: int, seed: int, source: str | None = None):  # -> torch.Tensor
    """`n` preprocessed images: from `source` (any `--calib` kind) or random pixels in [0, 1]
    normalized as the model expects (seeded)."""
    import torch

    from quant.data import build_transform, load_calibration

    if source is not None:
        if "://" not in source and not Path(source).exists():
            raise UsageError(f"check data {source!r} does not exist")
        return load_calibration(source, build_transform(data_config), n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, *data_config["input_size"], generator=g)
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


def run(args: argparse.Namespace) -> int:
    import quant
    from quant.export_onnx import export_qdq
    from quant.models import load_model, spec_args

    run_dir = Path(args.run_dir)
    saved = _saved_model(run_dir)
    out = Path(args.out) if args.out else run_dir / FORMATS[args.format]
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory: give a file name")
    qmodel = quant.load(saved)  # rebuilds the float model from the saved spec
    spec = qmodel.model_spec or {}
    data_config = spec.get("preprocess")
    if not data_config:  # saved before runs recorded their preprocessing: the model's own
        _, data_config = load_model(**spec_args(spec))
    images = check_images(data_config, args.n_check, args.seed, args.data)
    report = export_qdq(qmodel, images, out)
    summary = {
        "onnx": str(report.path),
        "format": args.format,
        "model": spec.get("model"),
        "family": qmodel.family,
        "weight_layers": report.weight_layers,
        "act_quantizers": report.act_quantizers,
        "check_images": int(images.shape[0]),
        "check_data": args.data or "random",
        "max_abs_diff": report.max_abs_diff,  # ORT, optimiser off (ONNX semantics) vs torch
        "logit_scale": report.logit_scale,
        "argmax_agreement": report.argmax_agreement,
        "max_abs_diff_optimized": report.max_abs_diff_optimized,  # ORT's integer kernels
        "argmax_agreement_optimized": report.argmax_agreement_optimized,
    }
    print(json.dumps(summary, indent=1))
    return 0

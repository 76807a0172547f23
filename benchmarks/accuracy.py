"""`dfq bench accuracy`: top-1 of the real models (benchmarks/README.md), fp32 and quantized, per calibration source.

For each model: the fp32 row on each evaluation set, then for each bit setting x calibration source
x method a quantized row (accuracy.json fields, benchmarks/README.md). Calibration sources: `real` (the
fixed draw of 1,024 held-out CIFAR JPEGs), `noise` (Gaussian in the normalised input space),
or a pool directory written by `dfq generate` (`bn-distill=<dir>`, `sd-mixup=<dir>`, ...).

`--tiny` is the CI form: a random zoo model, a hand-made calibration set, a few iterations, results
into a temp dir; it checks that the machinery produces well-formed rows, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import report

#: model name -> (checkpoint under the assets dir, evaluation family)
MODELS = {
    "cifar_resnet20": ("cifar10_resnet/resnet20-12fca82f.th", "cifar10"),
    "cifar_resnet56": ("cifar10_resnet/resnet56-4bfd9763.th", "cifar10"),
    "mobilenetv1_x0.25": ("imagenet_mobilenetv1_x0.25/mobilenetV1X0.25_pretrain.tar", "imagenet"),
}
BITS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--assets",
        default=None,
        help="assets folder, laid out as benchmarks/README.md describes (default $DFQ_ASSETS or ../shared/assets)",
    )
    p.add_argument("--results", default="benchmarks/results", help="where accuracy.json/.md/.png go")
    p.add_argument("--models", default="cifar_resnet20", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--bits", default="W8A8,W4A4,W3A3,W2A4", help=f"comma list of {', '.join(BITS)}")
    p.add_argument(
        "--calib",
        default="real,noise",
        help="comma list: real, noise, or <source>=<pool dir> (e.g. bn-distill=pool/)",
    )
    p.add_argument("--methods", default="genie-m,rtn", help="comma list of rtn, brecq, qdrop, genie-m")
    p.add_argument("--iters", type=int, default=1000, help="reconstruction iterations per block")
    p.add_argument(
        "--rtn-only", default="", help="comma list of bit settings that get round-to-nearest rows only"
    )
    p.add_argument(
        "--placement",
        default="block-output",
        choices=["block-output", "layer-input"],
        help="CNN activation quantizers (as `dfq quantize --placement`)",
    )
    p.add_argument(
        "--equalize",
        action="store_true",
        help="cross-layer equalization (rows carry equalize: true; tables show +cle)",
    )
    p.add_argument("--n-calib", type=int, default=1024)
    p.add_argument("--evals", default="lossless,jpeg", help="cifar10 evaluation sets: lossless, jpeg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CI form: random tiny model, temp results")


# ------------------------------------------------------------------------------------------ data
def _normalise(images_uint8: torch.Tensor, data_config: dict) -> torch.Tensor:
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def eval_sets(family: str, assets: Path, data_config: dict, transform: Callable, which: list[str]) -> dict:
    """name -> data accepted by quant.evaluate (tensor pair or Dataset), named as accuracy.json's `dataset`."""
    from benchmarks import splits

    if family == "imagenet":
        return {"imagenet-sample-1000": splits.imagenet_sample(assets, transform)}
    out: dict = {}
    if "lossless" in which:
        images, labels = splits.cifar10_lossless_eval(assets)
        out["cifar10-lossless-1017"] = (_normalise(images, data_config), labels)
    if "jpeg" in which:
        out["cifar10-jpeg-7959"] = splits.cifar10_jpeg_eval(assets, transform)
    return out


def calibration(
    kind: str, family: str, assets: Path, data_config: dict, transform: Callable, n: int, seed: int
):
    """(calib label for accuracy.json, images tensor)."""
    from quant.data import load_calibration, noise_calibration

    if kind == "real":
        if family != "cifar10":
            raise SystemExit(
                "real-image calibration exists only for CIFAR-10 here (ImageNet has no held-out set)"
            )
        from benchmarks import splits

        ds = splits.cifar10_calibration(assets, transform)
        return "real", torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    if kind == "noise":
        return "noise", noise_calibration(n, data_config["input_size"], seed=seed)
    if "=" not in kind:
        raise SystemExit(f"calibration {kind!r}: use real, noise or <source>=<pool dir>")
    label, pool = kind.split("=", 1)
    return label, load_calibration(pool, transform, n, seed=seed)


# ------------------------------------------------------------------------------------------ runs
def quantize_and_evaluate(
    model,
    calib: torch.Tensor,
    config,
    evals: dict,
    progress: bool = True,
    start=None,
    trace_grad_norm: bool = False,
) -> tuple:
    """(seconds for calibration + reconstruction, {eval name: evaluate() result}, quantized model).

    The scores carry the fidelity to `model` (evaluate's 'agree' and 'kl'), which rows_for records;
    `start` is a distill method's start (`quant.quantize`); with `trace_grad_norm` the quantized model
    carries the reconstruction's gradient-norm trace."""
    import quant
    from quant.evaluate import evaluate

    t0 = time.perf_counter()
    extra = {"start": start} if start is not None else {}
    qmodel = quant.quantize(model, calib, config, progress=progress, trace_grad_norm=trace_grad_norm, **extra)
    seconds = time.perf_counter() - t0
    scores = {name: evaluate(qmodel, data, progress=False, reference=model) for name, data in evals.items()}
    return seconds, scores, qmodel


def fp_scores(model, evals: dict) -> dict:
    from quant.evaluate import evaluate

    return {name: evaluate(model, data, progress=False) for name, data in evals.items()}


def rows_for(model_name: str, fp: dict, scores: dict, **fields) -> list[dict]:
    return [
        report.make_row(
            model=model_name,
            dataset=name,
            top1=round(s["top1"], 2),
            top5=round(s["top5"], 2),
            fp_top1=round(fp[name]["top1"], 2),
            n_eval=s["n"],
            **{f"fp_{k}": round(s[k], digits) for k, digits in (("agree", 2), ("kl", 5)) if k in s},
            **fields,
        )  # fmt: skip
        for name, s in scores.items()
    ]


def fp_rows(model_name: str, fp: dict) -> list[dict]:
    return rows_for(
        model_name, fp, fp, wbits=32, abits=32, calib="none", method="fp32", n_calib=0, iters=0, seconds=0.0
    )


def run(args: argparse.Namespace) -> int:
    from quant import CNNSettings
    from quant.data import build_transform
    from quant.models import load_model

    if args.tiny:
        return _run_tiny(args)
    from benchmarks.splits import assets_dir

    assets = assets_dir(args.assets or os.environ.get("DFQ_ASSETS") or "../shared/assets")
    torch.set_num_threads(os.cpu_count() or 1)
    rows: list[dict] = []
    for model_name in args.models.split(","):
        ckpt, family = MODELS[model_name]
        model, data_config = load_model(model_name, checkpoint=str(assets / ckpt))
        transform = build_transform(data_config)
        evals = eval_sets(family, assets, data_config, transform, args.evals.split(","))
        fp = fp_scores(model, evals)
        rows += fp_rows(model_name, fp)
        report.write_accuracy(Path(args.results), rows)
        for kind in args.calib.split(","):
            label, calib = calibration(kind, family, assets, data_config, transform, args.n_calib, args.seed)
            for bits in args.bits.split(","):
                wbits, abits = BITS[bits]
                for method in args.methods.split(","):
                    iters = 0 if method == "rtn" else args.iters
                    if method != "rtn" and bits in args.rtn_only.split(","):
                        continue
                    config = CNNSettings(
                        wbits=wbits,
                        abits=abits,
                        method=method,
                        iters=iters,
                        seed=args.seed,
                        placement=args.placement,
                        equalize=args.equalize,
                    )
                    seconds, scores, _ = quantize_and_evaluate(model, calib, config, evals)
                    new = rows_for(
                        model_name, fp, scores, wbits=wbits, abits=abits, calib=label, method=method,
                        n_calib=int(calib.shape[0]), iters=iters, seconds=round(seconds, 1),
                        placement=args.placement, equalize=args.equalize,
                        **({"gptq_start": config.gptq_start} if iters else {}),
                    )  # fmt: skip
                    rows += new
                    report.write_accuracy(Path(args.results), rows)
                    for r in new:
                        print(
                            f"{model_name} {bits} {label} {method}: {r['dataset']} {r['top1']:.2f} ({r['fp_top1']:.2f} fp) {seconds:.0f}s"
                        )
    return 0


def _run_tiny(args: argparse.Namespace) -> int:
    """CI form: random cifar_resnet20, random labelled images, 2 iterations; rows into a temp dir."""
    tiny_rows(args)
    return 0


def tiny_resnet20() -> tuple[torch.nn.Module, dict]:
    """The tiny forms' model: a random-weight ResNet-20 with BN statistics from noise (seeded), and
    its data config."""
    from quant.models import load_model

    model, data_config = load_model("cifar_resnet20")
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 32, 32))
    return model.eval(), data_config


def tiny_rows(args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """Run the tiny form and return (results dir, rows written), for benchmarks built on it."""
    from quant import CNNSettings

    model, _ = tiny_resnet20()
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    evals = {"random-64": (images, labels)}
    fp = fp_scores(model, evals)
    rows = fp_rows("cifar_resnet20-random", fp)
    config = CNNSettings(wbits=4, abits=4, method="genie-m", iters=2, batch_size=8)
    seconds, scores, _ = quantize_and_evaluate(model, images[:16], config, evals, progress=False)
    rows += rows_for(
        "cifar_resnet20-random", fp, scores, wbits=4, abits=4, calib="noise", method="genie-m",
        n_calib=16, iters=2, seconds=round(seconds, 2),
    )  # fmt: skip
    out = (
        Path(args.results)
        if args.results != "benchmarks/results"
        else Path(tempfile.mkdtemp(prefix="dfq-acc-"))
    )
    report.write_accuracy(out, rows)
    print(out / "accuracy.json")
    return out, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

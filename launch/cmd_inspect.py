"""`dfq inspect <dir>`: manifest summary, class coverage and a captioned contact sheet of a pool;
with `--model`, diagnostics of any image source through that classifier (features against real
images, diversity, prompt fidelity, coverage) as an HTML report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile

from launch.argtypes import nonnegative_int, positive_int
from launch.errors import UsageError

#: flags that only the diagnostics (--model) read: (flag, default)
_MODEL_FLAGS = (("--checkpoint", None), ("--num-classes", None), ("--reference", None), ("--report", None))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize a generated pool and write a contact sheet; with --model, diagnose it",
        description="Print a pool's manifest summary (samples, shards, complete?, config) and class "
        "coverage, and write a contact-sheet PNG of its first samples captioned with their prompts. "
        "With --model: read the source (a pool, ImageFolder, tar, .npz or 'noise') through that "
        "classifier and write a report (index.html + report.json): the Fréchet distance of its "
        "penultimate features to --reference real images, overall and per class, a t-SNE of both, "
        "intra-class similarity, prompt fidelity and class coverage.",
    )
    p.add_argument("pool", help="pool directory (or fsspec URL) holding manifest.json; with --model any "
                   "source --calib takes")  # fmt: skip
    p.add_argument(
        "--num", type=nonnegative_int, default=16, help="samples on the contact sheet (default 16; 0: none)"
    )
    p.add_argument("--columns", type=positive_int, default=4, help="contact sheet columns (default 4)")
    p.add_argument(
        "--sheet", default=None, help="contact sheet path (default <pool>/contact_sheet.png for local pools)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    d = p.add_argument_group("diagnostics (with --model)")
    d.add_argument("--model", help="classifier: zoo name, timm name, tv:<name> or module:factory")
    d.add_argument("--checkpoint", help="state dict to load into the model")
    d.add_argument("--num-classes", type=positive_int)
    d.add_argument(
        "--reference", help="real images to compare with: ImageFolder, tar, .npz, pool (or 'noise')"
    )
    d.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="another set to measure beside POOL against the same reference (repeat): one report ranks them",
    )
    d.add_argument(
        "--report",
        help="report directory (default <pool>/report for a local dfq pool, else ./inspect-report)",
    )
    d.add_argument(
        "--n-images", type=positive_int, default=1024, help="images read from each source (default 1024)"
    )
    d.add_argument(
        "--embed", type=nonnegative_int, default=500, help="t-SNE points a set (default 500; 0: no t-SNE)"
    )
    d.add_argument("--batch-size", type=positive_int, default=256)
    d.add_argument("--seed", type=nonnegative_int, default=0, help="draw of non-pool sources (as --calib)")
    d.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        return run_diagnostics(args)
    for flag, default in _MODEL_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise UsageError(f"{flag} needs --model (the classifier to diagnose with)")
    return run_summary(args)


def run_summary(args: argparse.Namespace) -> int:
    """Today's `dfq inspect`: the manifest summary and a contact sheet."""
    from PIL import UnidentifiedImageError

    from engine.errors import EngineError
    from engine.inspect import format_report, inspect_pool
    from engine.writer import is_local, local_path

    sheet = args.sheet
    if sheet is None and args.num > 0:
        sheet = (
            os.path.join(local_path(args.pool), "contact_sheet.png")
            if is_local(args.pool)
            else "contact_sheet.png"
        )
    try:
        report = inspect_pool(args.pool, num=args.num, sheet=sheet, columns=args.columns)
    except (OSError, tarfile.TarError, ValueError, UnidentifiedImageError) as exc:
        if isinstance(exc, EngineError):
            raise
        # a listed shard that is missing, truncated or holds a corrupt sample: one line, no traceback
        raise EngineError(f"cannot read pool {args.pool}: {type(exc).__name__}: {exc}") from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _check_source(source: str, what: str) -> None:
    """A missing or unreadable source fails before the model loads, in one line naming the flag."""
    from quant.data import source_kind
    from quant.errors import QuantError

    if source == "noise":
        return
    try:
        source_kind(source)
    except QuantError as e:
        raise QuantError(f"{what}: {e}") from None


def _default_report(pool: str) -> str:
    from quant.data import source_kind

    if pool != "noise" and "://" not in pool and source_kind(pool) == "pool":
        return os.path.join(pool.removesuffix("manifest.json"), "report")
    return "inspect-report"


def format_diagnostics(report: dict) -> str:
    """A few lines: the headline numbers of each set and where the report went."""

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    lines = []
    for role, fd in (report.get("frechet_of") or {}).items():
        lines.append(
            f"{role}: Fréchet distance to the reference {num(fd['overall'])} "
            f"(mean per class {num(fd['mean_per_class'])})"
        )
    for role in report.get("sets") or ("pool", "reference"):
        r = report.get(role)
        if not r:
            continue
        fid = r["fidelity"]
        fid_text = f", top-{fid['k']} holds a prompted class/label: {num(fid['top_k'])}" if fid else ""
        lines.append(
            f"{role}: {r['n']} images, mean pairwise cosine {num(r['diversity']['overall'])} "
            f"(within a class {num(r['diversity']['mean_per_class'])}){fid_text}, "
            f"{r['coverage']['predicted_classes']}/{r['coverage']['num_classes']} classes predicted"
        )
    if report.get("files"):
        lines.append(f"report: {report['files']['html']} and {report['files']['json']}")
    return "\n".join(lines)


def run_diagnostics(args: argparse.Namespace) -> int:
    """`dfq inspect POOL --model M`: the pool's diagnostics report (quant.diagnostics)."""
    from quant.diagnostics import DiagnosticsSettings, check_roles, diagnose
    from quant.models import load_model

    _check_source(args.pool, "POOL")
    if args.reference is not None:
        _check_source(args.reference, "--reference")
    others = []
    for text in args.also:
        name, sep, source = text.partition("=")
        if not sep or not name or not source:
            raise UsageError(f"--also {text!r}: give NAME=SOURCE")
        _check_source(source, f"--also {name}")
        others.append((name, source))
    check_roles(others)
    settings = DiagnosticsSettings(
        n_images=args.n_images,
        batch_size=args.batch_size,
        embed=args.embed,
        seed=args.seed,
        device=args.device,
    )
    report_dir = args.report or _default_report(args.pool)
    model, data_config = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    report = diagnose(
        model,
        data_config,
        args.pool,
        reference=args.reference,
        settings=settings,
        report_dir=report_dir,
        model_name=args.model,
        progress=lambda line: print(f"dfq inspect: {line}", file=sys.stderr, flush=True),
        others=others,
    )
    print(json.dumps(report, indent=1) if args.json else format_diagnostics(report))
    return 0

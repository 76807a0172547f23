"""`dfq inspect <dir>`: manifest summary, class coverage and a captioned contact sheet of a pool."""

from __future__ import annotations

import argparse
import json
import os
import tarfile

from launch.argtypes import nonnegative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize a generated pool and write a contact sheet",
        description="Print a pool's manifest summary (samples, shards, complete?, config) and class "
        "coverage, and write a contact-sheet PNG of its first samples captioned with their prompts.",
    )
    p.add_argument("pool", help="pool directory (or fsspec URL) holding manifest.json")
    p.add_argument(
        "--num", type=nonnegative_int, default=16, help="samples on the contact sheet (default 16; 0: none)"
    )
    p.add_argument("--columns", type=positive_int, default=4, help="contact sheet columns (default 4)")
    p.add_argument(
        "--sheet", default=None, help="contact sheet path (default <pool>/contact_sheet.png for local pools)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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

"""`dfq generate`: build (or resume) a synthetic calibration pool; a thin layer over `engine.generate`.

Generic options (pool layout, classes, seed, execution) are declared here; each generator's own
options come from its settings dataclass (engine.settings), so a new generator needs no code here.
A flag several generators declare (`--steps`: diffusion's denoising steps, bn-distill's iterations)
is one option; a generator's flag given with another `--generator` is refused. Options left unset
take their value from the generator's `--preset` (`sd15`: the paper's SD v1.5 settings; `tiny`: a
small random offline pipeline for tests and demos; `bn-distill`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from launch.argtypes import nonnegative_int, positive_int
from launch.errors import UsageError
from launch.model_flags import add_preprocess_flags, given_flags, preprocess_of


def batch_size_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engine.config import ATTENTIONS, COMPILE_MODES, DEVICES, DTYPES, IMAGE_FORMATS, PAIRINGS
    from engine.generators import GENERATORS, settings_class

    p = sub.add_parser(
        "generate",
        help="generate a synthetic calibration pool (WebDataset shards) with Stable Diffusion on Ray",
        description="Generate (or resume) a calibration pool: mixup-class prompts -> Stable Diffusion "
        "(or another generator) on Ray actors -> WebDataset shards + manifest.json (see SHARDS.md). "
        "Re-running the same command on the same --out resumes.",
    )
    g = p.add_argument_group("pool")
    g.add_argument("--out", required=True, help="output directory (or fsspec URL)")
    g.add_argument("--num-images", type=positive_int, default=1024, help="samples in the pool (default 1024)")
    g.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard (default 256)")
    g.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    g.add_argument("--name", default=None, help="pool name in the manifest (default: the directory name)")
    g.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png", help="default png")
    g.add_argument("--quality", type=positive_int, default=95, help="jpg/webp quality (default 95)")

    g = p.add_argument_group("classes")
    g.add_argument(
        "--vocab",
        default=None,
        help="imagenet (default), cifar10, cifar100, or a file with one class name a line "
        "(classifier-based generators: default picked from the classifier's number of classes)",
    )
    g.add_argument("--k", type=positive_int, default=2, help="classes per sample; 1 = single-class baseline")
    g.add_argument(
        "--pairing", choices=PAIRINGS, default="random", help="how classes are combined (default random)"
    )
    g.add_argument("--seed", type=nonnegative_int, default=0, help="run seed (default 0)")

    g = p.add_argument_group("generator")
    names = tuple(GENERATORS)
    g.add_argument(
        "--generator",
        choices=names,
        default="diffusion",
        help="; ".join(f"{n}: {GENERATORS[n].help}" for n in names if GENERATORS[n].help)
        + " (default diffusion)",
    )
    presets = {n: tuple(settings_class(n).presets) for n in names}
    g.add_argument(
        "--preset",
        choices=sorted({preset for ps in presets.values() for preset in ps}),
        default=None,
        help="defaults for the generator's options: "
        + "; ".join(
            f"{n}: {', '.join(ps)} (default {settings_class(n).default_preset})" for n, ps in presets.items()
        ),
    )
    g.add_argument(
        "--model",
        default=None,
        help="diffusion: diffusers hub id or local path (default from --preset); classifier-based "
        "generators: the classifier spec (zoo name, timm name, tv:<name>, module:factory, "
        "path/to/net.py:factory)",
    )
    g.add_argument("--checkpoint", default=None, help="classifier-based generators: state dict to load")
    add_preprocess_flags(g, scope="classifier-based generators: ")
    p.set_defaults(setting_flags=_add_settings_options(p, names))

    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers", type=positive_int, default=None, help="actors (default: one per GPU, or 1 on CPU)"
    )
    g.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=8,
        help="images per generator call, or auto (sized from free GPU memory; 8 on CPU) (default 8); "
        "bn-distill optimises a batch jointly, so there it is part of the pool's recipe",
    )
    g.add_argument("--device", choices=DEVICES, default="auto")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    g.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    g.add_argument("--channels-last", action="store_true", help="channels_last UNet/VAE memory format")
    g.add_argument("--fuse-qkv", action="store_true", help="fuse attention QKV projections")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    g.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode; reduce-overhead adds CUDA graphs (default: default)",
    )
    g.add_argument("--address", default=None, help="join this Ray cluster (default: start Ray locally)")
    g.add_argument(
        "--max-actor-restarts", type=nonnegative_int, default=8, help="replacements of dead workers"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _add_settings_options(p: argparse.ArgumentParser, generators: tuple[str, ...]) -> dict[str, str]:
    """One option per flag any generator's settings declare (shared flags merged); returns flag -> dest."""
    from engine.generators import settings_class

    declared: dict[str, list[tuple[str, Any]]] = {}  # flag -> [(generator, Option)]
    for name in generators:
        for option in settings_class(name).options():
            for flag in option.flags:
                declared.setdefault(flag, []).append((name, option))
    dests: dict[str, str] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, users in declared.items():
        kinds = {option.kind for _, option in users}
        if len(kinds) > 1:
            raise ValueError(
                f"generators {', '.join(n for n, _ in users)} declare {flag} with different values"
            )
        owner, option = users[0]
        if owner not in groups:
            groups[owner] = p.add_argument_group(f"{owner} options (unset: from --preset)")
        helps = [o.help if flag == o.flags[0] else f"same as {o.flags[0]}" for _, o in users]
        text = helps[0] if len(users) == 1 else "; ".join(f"{n}: {h}" for (n, _), h in zip(users, helps))
        dests[flag] = "setting_" + flag.lstrip("-").replace("-", "_")
        metavar = flag.lstrip("-").upper().replace("-", "_")
        groups[owner].add_argument(
            flag, dest=dests[flag], default=None, help=text, **_argparse_kind(option.kind, metavar)
        )
    return dests


def _argparse_kind(kind: Any, metavar: str) -> dict[str, Any]:
    """argparse keywords for a settings value kind (engine.settings): its parser, choices or a flag pair."""
    from engine.settings import Choice, Flag

    if isinstance(kind, Flag):
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(kind, Choice):
        return {"choices": kind.values}

    def parse(text: str) -> Any:
        try:
            return kind.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = type(kind).__name__.lower()
    return {"type": parse, "metavar": metavar}


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen generator's settings given on the command line, by field name.

    Refuses a flag of another generator, and two flags for one setting (`--iterations` and `--steps`).
    """
    from engine.generators import settings_class

    given = {flag: getattr(args, dest) for flag, dest in args.setting_flags.items()}
    given = {flag: value for flag, value in given.items() if value is not None}
    values: dict[str, Any] = {}
    own: set[str] = set()
    for option in settings_class(args.generator).options():
        own.update(option.flags)
        hits = [flag for flag in option.flags if flag in given]
        if len(hits) > 1:
            raise UsageError(f"{hits[0]} and {hits[1]} both set {option.name}: give one")
        if hits:
            values[option.name] = given[hits[0]]
    stray = sorted(set(given) - own)
    if stray:
        raise UsageError(f"{stray[0]} is not an option of --generator {args.generator}")
    return values


def config_from_args(args: argparse.Namespace):  # -> engine.config.GenerateConfig
    from engine.config import GenerateConfig

    return GenerateConfig(
        out=args.out,
        num_images=args.num_images,
        shard_size=args.shard_size,
        generator=args.generator,
        preset=args.preset,
        model=args.model,
        checkpoint=args.checkpoint,
        preprocess=given_flags(args),
        settings=settings_from_args(args),
        vocab=args.vocab or "imagenet",
        k=args.k,
        pairing=args.pairing,
        seed=args.seed,
        image_format=args.image_format,
        quality=args.quality,
        prefix=args.prefix,
        name=args.name,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        address=args.address,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        compile=args.compile,
        compile_mode=args.compile_mode,
        max_actor_restarts=args.max_actor_restarts,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from engine.driver import format_summary, generate
    from engine.errors import GenerationError
    from engine.generators import settings_class

    settings_from_args(args)  # a stray or doubled flag is refused before any model is loaded
    context: dict = {}
    if settings_class(args.generator).needs_classifier:
        args, context = _classifier_setup(args)
    elif given_flags(args):
        flag = "--" + next(iter(given_flags(args))).replace("_", "-")
        raise UsageError(f"{flag} is for classifier-based generators, not --generator {args.generator}")
    try:
        summary = generate(config_from_args(args), context)
    except GenerationError as exc:
        print(f"dfq generate: failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0 if summary["complete"] else 1


def _classifier_setup(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """Resolve the classifier (via `launch.classifier`, the layer allowed to use `quant`) into the
    generator's `classifier` context; its class count picks the default vocabulary."""
    from engine.errors import EngineError
    from launch.classifier import VOCAB_BY_CLASSES, distill_context

    if not args.model:
        raise EngineError(
            f"--generator {args.generator} needs --model <classifier spec> (e.g. cifar_resnet20)"
        )
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise EngineError(f"checkpoint {args.checkpoint!r} does not exist")
    context, _ = distill_context(args.model, args.checkpoint, args.num_classes, preprocess_of(args))
    num_classes = context["classifier"].num_classes
    args = argparse.Namespace(**vars(args))
    if args.vocab is None:
        args.vocab = VOCAB_BY_CLASSES.get(num_classes)
        if args.vocab is None:
            raise EngineError(f"the classifier has {num_classes} classes: give --vocab with that many names")
    return args, context

"""`dfq generate`: build (or resume) a synthetic calibration pool; a thin layer over `engine.generate`.

Options left unset (`None`) take their value from `--preset` (`sd15`: the paper's SD v1.5 settings,
50 PNDM steps, guidance 3.5, 512 px; `tiny`: a small random offline pipeline for tests and demos).
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.argtypes import nonnegative_float, nonnegative_int, positive_int


def batch_size_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def image_size(text: str) -> tuple[int, int]:
    """`512` (square) or `WIDTHxHEIGHT`; multiples of 8 (the VAE's downsampling)."""
    parts = text.lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        width, height = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 512x768, got {text!r}") from None
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"sizes must be multiples of 8 and >= 8, got {text!r}")
    return width, height


def add_parser(sub: argparse._SubParsersAction) -> None:
    from engine.config import ATTENTIONS, COMPILE_MODES, DEVICES, DTYPES, IMAGE_FORMATS, PAIRINGS, PRESETS
    from engine.worker import generator_names

    p = sub.add_parser(
        "generate",
        help="generate a synthetic calibration pool (WebDataset shards) with Stable Diffusion on Ray",
        description="Generate (or resume) a calibration pool: mixup-class prompts -> Stable Diffusion "
        "on Ray actors -> WebDataset shards + manifest.json (see SHARDS.md). Re-running the same "
        "command on the same --out resumes.",
    )
    g = p.add_argument_group("pool")
    g.add_argument("--out", required=True, help="output directory (or fsspec URL)")
    g.add_argument("--num-images", type=positive_int, default=1024, help="samples in the pool (default 1024)")
    g.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard (default 256)")
    g.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    g.add_argument("--name", default=None, help="pool name in the manifest (default: the directory name)")
    g.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png", help="default png")
    g.add_argument("--quality", type=positive_int, default=95, help="jpg/webp quality (default 95)")

    g = p.add_argument_group("prompts")
    g.add_argument(
        "--vocab",
        default=None,
        help="imagenet (default), cifar10, cifar100, or a file with one class name a line "
        "(bn-distill: default picked from the classifier's number of classes)",
    )
    g.add_argument("--k", type=positive_int, default=2, help="classes per prompt; 1 = single-class baseline")
    g.add_argument(
        "--pairing", choices=PAIRINGS, default="random", help="how classes are combined (default random)"
    )
    g.add_argument("--template", default="a photo of {}", help="prompt template; {} gets the classes")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="run seed (default 0)")

    g = p.add_argument_group("model and sampling (unset: from --preset)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="defaults for the options below (sd15; bn-distill for --generator bn-distill)",
    )
    g.add_argument("--generator", choices=generator_names(), default="diffusion", help="default diffusion")
    g.add_argument(
        "--model",
        default=None,
        help="diffusion: diffusers hub id or local path; bn-distill: the classifier spec "
        "(zoo name, timm name, tv:<name>, module:factory)",
    )
    g.add_argument("--checkpoint", default=None, help="bn-distill: classifier state dict to load")
    g.add_argument(
        "--distill-method",
        choices=("generator", "pixels"),
        default=None,
        help="bn-distill: optimise a small generator's latents (default) or the pixels",
    )
    g.add_argument("--distill-lr", type=nonnegative_float, default=None, help="bn-distill: learning rate")
    g.add_argument(
        "--distill-loss",
        choices=("mse", "norm"),
        default=None,
        help="bn-distill: BN-statistics error as Genie-D's mean square (default) or ZeroQ's norm",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps (sd15: 50); bn-distill: iterations (400)",
    )
    g.add_argument("--guidance", type=nonnegative_float, default=None, help="CFG scale (sd15: 3.5)")
    g.add_argument("--size", type=image_size, default=None, help="512 or WIDTHxHEIGHT (sd15: 512)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument(
        "--scheduler", default=None, help="diffusers scheduler class or alias (pndm, ddim, dpm++, ...)"
    )
    g.add_argument(
        "--max-retries", type=nonnegative_int, default=3, help="regenerations of a blank/NaN image"
    )

    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers", type=positive_int, default=None, help="actors (default: one per GPU, or 1 on CPU)"
    )
    g.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=8,
        help="images per pipeline call, or auto (sized from free GPU memory; 8 on CPU) (default 8)",
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


def config_from_args(args: argparse.Namespace):  # -> engine.config.GenerateConfig
    from engine.config import GenerateConfig

    width, height = args.size if args.size else (None, None)
    preset = args.preset or ("bn-distill" if args.generator == "bn-distill" else "sd15")
    options = {}
    if args.generator == "bn-distill":
        # bn_loss always: pools distilled before it existed (ZeroQ's norm, a narrower decoder) hash
        # differently, so resuming one is refused instead of mixing two recipes in one pool
        options = {"bn_loss": args.distill_loss or "mse"}
        options.update(
            (k, v) for k, v in (("method", args.distill_method), ("lr", args.distill_lr)) if v is not None
        )
    return GenerateConfig(
        out=args.out,
        num_images=args.num_images,
        shard_size=args.shard_size,
        preset=preset,
        generator=args.generator,
        model=args.model,
        checkpoint=args.checkpoint,
        generator_options=options,
        vocab=args.vocab or "imagenet",
        k=args.k,
        pairing=args.pairing,
        template=args.template,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=width,
        height=height,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        image_format=args.image_format,
        quality=args.quality,
        prefix=args.prefix,
        max_retries=args.max_retries,
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

    context: dict = {}
    if args.generator == "bn-distill":
        args, context = _bn_distill_setup(args)
    try:
        summary = generate(config_from_args(args), context)
    except GenerationError as exc:
        print(f"dfq generate: failed: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0 if summary["complete"] else 1


def _bn_distill_setup(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """Resolve the classifier (via `launch.classifier`, the layer allowed to use `quant`): its size
    sets the image size, its class count the default vocabulary."""
    from engine.errors import EngineError
    from launch.classifier import VOCAB_BY_CLASSES, distill_context

    if not args.model:
        raise EngineError("--generator bn-distill needs --model <classifier spec> (e.g. cifar_resnet20)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise EngineError(f"checkpoint {args.checkpoint!r} does not exist")
    context, data_config = distill_context(args.model, args.checkpoint, None)
    _, height, width = data_config["input_size"]
    args = argparse.Namespace(**vars(args))
    if args.size is None:
        args.size = (width, height)
    if args.vocab is None:
        args.vocab = VOCAB_BY_CLASSES.get(context["num_classes"])
        if args.vocab is None:
            raise EngineError(
                f"the classifier has {context['num_classes']} classes: give --vocab with that many names"
            )
    return args, context

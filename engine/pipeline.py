"""Build the Stable Diffusion pipeline a worker keeps warm.

`StableDiffusionPipeline` from a hub id or local path (or the offline `preset:tiny`), fp16 on CUDA
and fp32 on CPU, safety checker off (calibration images are never shown to anyone, and its black
replacements would be blank images), SDPA attention (or xformers), and an optional scheduler swap
that keeps the model's own scheduler config (betas, offsets) as SD1.5 ships it.

`sample_images` is the pipeline's algorithm (encode prompts, prepare latents,
denoise with CFG, decode, postprocess) as one loop with no host sync per step: the scheduler keeps
its timesteps on the CPU (its coefficients are then host scalars), while the UNet gets timesteps moved
to the device once per call. `compile_pipeline` compiles the UNet and the VAE decoder
(`compile_mode`: `default`, `reduce-overhead` = CUDA graphs, `max-autotune`,
`max-autotune-no-cudagraphs`); `auto_batch_size` picks a batch from free GPU memory.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from engine.config import COMPILE_MODES, GenerateConfig
from engine.diffusion_settings import DiffusionSettings
from engine.errors import EngineError
from engine.tiny import TINY_MODEL_ID, build_tiny_pipeline


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible to this process, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' requested but no CUDA device is visible to this worker")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """`auto`: fp16 on CUDA (the paper's setting), fp32 on CPU (fp16 CPU kernels are slow or missing)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def build_pipeline(cfg: GenerateConfig, device: str | None = None, *, compile: bool | None = None) -> Any:
    """The ready-to-call pipeline for a resolved config, on `device` (default: resolve cfg.device).

    `compile=False` leaves compiling to the caller (after sizing the batch on the eager modules).
    """

    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                os.path.expanduser(cfg.model),
                torch_dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {cfg.model!r}: {str(exc).splitlines()[0]}") from None
    return prepare_pipeline(pipe, cfg, device, dtype, compile=cfg.compile if compile is None else compile)


def prepare_pipeline(pipe: Any, cfg: GenerateConfig, device: str, dtype: Any, *, compile: bool) -> Any:
    """Put a loaded pipeline in the config's running state: scheduler, dtype, device, attention kernel,
    channels_last, fused QKV, torch.compile (benchmarks call this on random-weight pipelines)."""
    import torch

    pipe = with_scheduler(pipe, cfg.generator_settings(DiffusionSettings).scheduler)
    if pipe.unet.dtype != dtype:  # casting to the same dtype only makes diffusers warn
        pipe.to(dtype)
    pipe.to(device)
    set_attention(pipe, cfg.attention)
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.fuse_qkv:  # installs fused SDPA processors (after set_attention, so it wins over xformers)
        pipe.fuse_qkv_projections()
    if compile:
        compile_pipeline(pipe, getattr(cfg, "compile_mode", "default"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Largest batch `auto` picks (beyond it a bigger batch costs memory, not time), and its choice where
#: there is no GPU memory to size from.
AUTO_BATCH_CAP = 64
AUTO_BATCH_CPU = 8


def compile_pipeline(pipe: Any, mode: str = "default") -> Any:
    """torch.compile the UNet and the VAE decoder in place (compiled lazily, at the first call)."""
    import torch

    if mode not in COMPILE_MODES:
        raise EngineError(f"unknown compile mode {mode!r} (choose from {', '.join(COMPILE_MODES)})")
    kwargs = {} if mode == "default" else {"mode": mode}
    pipe.unet = torch.compile(pipe.unet, **kwargs)
    pipe.vae.decode = torch.compile(pipe.vae.decode, **kwargs)
    pipe._dfq_cudagraphs = mode == "reduce-overhead"  # outputs must be copied before the next replay
    return pipe


def sample_images(
    pipe: Any,
    prompts: list[str],
    generators: list[Any],
    *,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    negative_prompt: list[str] | None = None,
) -> Any:
    """Float images (B, H, W, 3) in [0, 1] (NaN left in place): `StableDiffusionPipeline.__call__`'s
    algorithm, with the same operations in the same order (the same bytes on a CPU), minus its host
    syncs: one device-to-host copy per batch, at the end.
    """
    import torch

    unet, scheduler = pipe.unet, pipe.scheduler
    device = pipe._execution_device
    graphs = getattr(pipe, "_dfq_cudagraphs", False)
    cfg_scale = guidance > 1.0 and unet.config.time_cond_proj_dim is None
    with torch.inference_mode():
        # 1. text conditioning (negative first: the UNet batch is [uncond, cond])
        cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg_scale, negative_prompt)
        context = torch.cat([uncond, cond]) if cfg_scale else cond
        # 2. timesteps on the CPU for the scheduler, on the device for the UNet (one copy, now)
        scheduler.set_timesteps(steps, device="cpu")
        timesteps = scheduler.timesteps
        unet_timesteps = timesteps.to(device)
        # 3. initial noise from the per-sample CPU generators
        latents = pipe.prepare_latents(
            len(prompts), unet.config.in_channels, height, width, context.dtype, device, generators
        )
        extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
        # 4. denoise: CFG batch through the UNet, guidance, scheduler step; nothing leaves the device
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if cfg_scale else latents
            x = scheduler.scale_model_input(x, t)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            noise = unet(x, unet_timesteps[i], encoder_hidden_states=context, return_dict=False)[0]
            if cfg_scale:
                uncond_noise, cond_noise = noise.chunk(2)
                noise = uncond_noise + guidance * (cond_noise - uncond_noise)
            elif graphs:
                noise = noise.clone()  # the scheduler keeps it; the next graph replay overwrites it
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        # 5. decode and postprocess (denormalize to [0, 1], one copy to the host)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))


def auto_batch_size(pipe: Any, cfg: GenerateConfig, cap: int = AUTO_BATCH_CAP, headroom: float = 0.8) -> int:
    """A batch size from free GPU memory: measure the peak memory of one CFG UNet forward and one VAE
    decode at a probe batch of 2, scale per image, and fill `headroom` of what is free (multiples of
    8 from 8 up, at most `cap`). Without CUDA: `AUTO_BATCH_CPU`.
    """
    import torch

    device = pipe._execution_device
    if getattr(device, "type", str(device)) != "cuda":
        return AUTO_BATCH_CPU
    probe = 2
    dtype = pipe.unet.dtype
    size = cfg.generator_settings(DiffusionSettings)
    lat_h, lat_w = size.height // pipe.vae_scale_factor, size.width // pipe.vae_scale_factor
    hidden = pipe.text_encoder.config.hidden_size
    length = pipe.tokenizer.model_max_length
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    per_image = 0
    with torch.inference_mode():
        for run in ("unet", "vae"):
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            if run == "unet":
                x = torch.randn(
                    2 * probe, pipe.unet.config.in_channels, lat_h, lat_w, device=device, dtype=dtype
                )
                ctx = torch.randn(2 * probe, length, hidden, device=device, dtype=dtype)
                pipe.unet(x, torch.tensor(999, device=device), encoder_hidden_states=ctx, return_dict=False)
            else:
                z = torch.randn(
                    probe, pipe.vae.config.latent_channels, lat_h, lat_w, device=device, dtype=dtype
                )
                pipe.vae.decode(z, return_dict=False)
            torch.cuda.synchronize(device)
            per_image = max(per_image, (torch.cuda.max_memory_allocated(device) - base) / probe)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(headroom * free / max(per_image, 1))
    batch = min(cap, fits)
    return max(1, batch if batch < 8 else batch // 8 * 8)


def with_scheduler(pipe: Any, scheduler: str | None) -> Any:
    """A pipeline using the named diffusers scheduler, built from the model's scheduler config.

    Returns a new pipeline object sharing the weights, so a caller's pipeline (a shared test fixture,
    say) is never mutated.
    """
    if scheduler is None or type(pipe.scheduler).__name__ == scheduler:
        return pipe
    import diffusers

    cls = getattr(diffusers, scheduler)
    components = dict(pipe.components)
    components["scheduler"] = cls.from_config(pipe.scheduler.config)
    new = type(pipe)(**components, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def set_attention(pipe: Any, attention: str) -> None:
    """SDPA (PyTorch's fused attention) by default; xformers only when installed and asked for."""
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise EngineError("attention 'xformers' needs the xformers package (pip install 'dfq[gpu]')")
        pipe.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())


def load_text_encoder(cfg: GenerateConfig) -> tuple[Any, Any]:
    """The pipeline's tokenizer and text encoder alone, fp32 on CPU (for class-similarity pairing)."""
    if cfg.model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline()
        return pipe.tokenizer, pipe.text_encoder
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(
            cfg.model, subfolder="text_encoder", torch_dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"cannot load the text encoder of {cfg.model!r}: {str(exc).splitlines()[0]}"
        ) from None
    return tokenizer, encoder.eval()

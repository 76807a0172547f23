"""FLOPs of one generated image, the roofline they imply, and SD1.5-architecture random weights.

- `sd15_random_pipeline`: a StableDiffusionPipeline with the SD1.5 architecture (UNet, KL VAE, CLIP
  ViT-L/14 text encoder, PNDM as SD1.5 ships it) and random weights, built from configs written here
  (no hub access). The tokenizer is engine.tiny's byte-level one (max length 77): token ids differ from
  CLIP's, the compute does not.
- `image_flops`: torch.utils.flop_counter over one UNet forward at the CFG batch (2 for one image)
  and one VAE decode, with the UNet counted `steps` times. The text encoder is left out (once a batch,
  under 0.1 %).
- `cpu_matmul_peak`: a measured fp32 matmul rate, the roofline peak on a CPU.
"""

from __future__ import annotations

import time
from typing import Any

#: The roofline peak of an H100 for dense bf16/fp16 matmuls (what a large GEMM reaches; docs/results.md).
H100_PEAK_TFLOPS = 800.0

#: SD1.5's component configs (stable-diffusion-v1-5 `unet/`, `vae/`, `text_encoder/` config.json).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def sd15_random_pipeline(device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """SD1.5-architecture pipeline with random weights, initialised directly on `device`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_flops(pipe: Any, height: int, width: int, steps: int, guidance: float) -> dict[str, float]:
    """FLOPs of one image: `steps` UNet forwards at the CFG batch + one VAE decode (flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    device, dtype = pipe._execution_device, unet.dtype
    cfg_batch = 2 if guidance > 1.0 else 1
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    length = pipe.tokenizer.model_max_length
    with torch.inference_mode():
        x = torch.randn(cfg_batch, unet.config.in_channels, h, w, device=device, dtype=dtype)
        ctx = torch.randn(cfg_batch, length, unet.config.cross_attention_dim, device=device, dtype=dtype)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor(999, device=device), encoder_hidden_states=ctx, return_dict=False)
        unet_flops = counter.get_total_flops()
        z = torch.randn(1, vae.config.latent_channels, h, w, device=device, dtype=dtype)
        with FlopCounterMode(display=False) as counter:
            vae.decode(z, return_dict=False)
        vae_flops = counter.get_total_flops()
    return {
        "unet_forward_per_sample": unet_flops / cfg_batch,
        "vae_decode": float(vae_flops),
        "per_image": float(unet_flops * steps + vae_flops),
    }


def cpu_matmul_peak(n: int = 1024, seconds: float = 0.5) -> float:
    """Measured fp32 matmul rate of this CPU with torch's current threads, in TFLOP/s (best of runs)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best / 1e12

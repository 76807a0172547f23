"""A tiny, random, offline Stable Diffusion pipeline (the `tiny` preset).

It has the SD1.5 architecture in miniature (UNet with cross-attention, KL VAE, CLIP text encoder,
PNDM scheduler, CLIP BPE tokenizer) so that the whole engine (prompting, denoising loop, decoding,
shards, Ray actors) runs in CI on a CPU in seconds, never touching the network.

Weights are created under a fixed torch seed inside `torch.random.fork_rng`, so every actor and
every process builds byte-identical weights (a requirement for identical shard bytes across
workers) without disturbing the caller's global RNG.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

#: Image size and sampling defaults of the tiny preset (the VAE downsamples by 2: 32 px -> 16 latent).
TINY_SIZE = 32
TINY_STEPS = 4
TINY_GUIDANCE = 3.5
TINY_WEIGHT_SEED = 0
TINY_MODEL_ID = "preset:tiny"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the byte-level BPE base alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tiny_tokenizer() -> Any:
    """A CLIPTokenizer over single bytes (no merges): every prompt tokenizes, nothing is downloaded.

    The files are written to a temporary directory and loaded with `from_pretrained`, which works
    for both the slow (transformers 4) and the tokenizers-backed (transformers 5) CLIPTokenizer.
    `model_max_length=77` is explicit: transformers 5 otherwise leaves it at 1e30 and the pipeline's
    padding to `model_max_length` overflows.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with tempfile.TemporaryDirectory(prefix="dfq-tiny-tok-") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def build_tiny_pipeline() -> Any:
    """Build the tiny random StableDiffusionPipeline (fp32, CPU, safety checker off).

    Deterministic: two calls (in any process) give identical weights.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_WEIGHT_SEED)
        unet = UNet2DConditionModel(
            sample_size=TINY_SIZE // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(TINY_WEIGHT_SEED + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_SIZE,
        )
        torch.manual_seed(TINY_WEIGHT_SEED + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    # SD1.5's scheduler config: scaled-linear betas, PNDM with the PLMS-only (skip_prk) variant.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

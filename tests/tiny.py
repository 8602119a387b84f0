"""Sizes and architectures of the tiny models the tests build (importable from any test module)."""

from __future__ import annotations

TINY_IMAGE = 32


def tiny_unet_arch(attention_levels: int = 1):
    from dtengine.teachers.unet import UNetArchConfig

    # 4 levels at 32 px: up blocks read before upsampling sit at strides 8, 4, 2, 1.
    return UNetArchConfig(
        block_out_channels=[16, 16, 32, 32], attention_levels=attention_levels, attention_head_dim=8, norm_num_groups=8
    )


def save_tiny_latent_pipelines(root) -> dict:
    """Random-weight latent teachers at 32 px in `root`: {"latent_unet": folder, "dit": folder}.

    Both share a 4-level VAE (latent stride 8, 4 channels). The SD-style folder has a 2-level cross-attention
    U-Net (up blocks 0 and 1 at image strides 16 and 8 before upsampling) and a one-layer CLIP text encoder with a
    26-letter tokenizer, so the empty-prompt embedding can be computed; the DiT folder has 3 blocks of patch 2
    (image stride 16) with 10 classes and the null class.
    """
    import json
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    folders = {"latent_unet": root / "sd", "dit": root / "dit"}
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32,
    )  # fmt: skip
    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for folder in folders.values():
        vae.save_pretrained(folder / "vae")
        schedule.save_pretrained(folder / "scheduler")
    UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
    ).save_pretrained(folders["latent_unet"] / "unet")  # fmt: skip
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=4,
        patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(folders["dit"] / "transformer")  # fmt: skip

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({f"{c}</w>": 2 + i for i, c in enumerate(letters)} | {c: 28 + i for i, c in enumerate(letters)})
    words = root / "words"
    words.mkdir(parents=True, exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=8).save_pretrained(
        folders["latent_unet"] / "tokenizer"
    )
    text = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    CLIPTextModel(text).save_pretrained(folders["latent_unet"] / "text_encoder")
    return folders

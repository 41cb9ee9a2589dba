"""Tiny random diffusers components, built offline (no download), shared by the pipeline tests."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_unet():
    """An unconditional ``UNet2DModel`` on 3×8×8 images."""
    import diffusers
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).eval()


def letter_tokenizer(folder: Path):
    """A CLIP tokenizer over single letters (no merges), written to ``folder``: no download."""
    import transformers
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_vae(**kwargs):
    """An ``AutoencoderKL`` from 3×16×16 images to 4×8×8 latents."""
    import diffusers
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=16, **kwargs).eval()


def tiny_sd_components(folder: Path) -> dict:
    """The components of a tiny Stable Diffusion (text-to-image, img2img, legacy 4-channel inpainting), with a
    PNDM scheduler configured as Stable Diffusion's."""
    import diffusers
    import transformers
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)).eval()
    scheduler = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return dict(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=letter_tokenizer(folder), unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd3(scheduler):
    """A tiny StableDiffusion3Pipeline (rectified flow) without text encoders: call it with prompt_embeds and
    pooled_prompt_embeds (16 features) and guidance_scale=1."""
    import diffusers
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe

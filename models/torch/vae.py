"""VAEs: ``AutoencoderKL`` for images, each video model's own 3D VAE; tiny from code or a local checkpoint.

Tiny VAEs keep the real temporal factor (4: ``frames = 4 (latent frames - 1) + 1``) and a spatial factor of
2 (images) or 4 (video) instead of 8, so CPU decodes stay short. ``to_frames`` turns decoded pixels in
[-1, 1] into uint8 frames, as diffusers' ``VaeImageProcessor`` / ``VideoProcessor`` do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_IMAGE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
              norm_num_groups=4, sample_size=32)
# the checkpoints' scaling (and shift) factors; Wan's per-channel mean/std are its first four channels'
TINY_VAE: dict[str, tuple[str, dict]] = {
    "flux": ("AutoencoderKL", dict(_IMAGE, scaling_factor=0.3611, shift_factor=0.1159)),
    "sd3": ("AutoencoderKL", dict(_IMAGE, scaling_factor=1.5305, shift_factor=0.0609)),
    "sdxl": ("AutoencoderKL", dict(_IMAGE, scaling_factor=0.13025)),
    "cogvideox": ("AutoencoderKLCogVideoX", dict(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=["CogVideoXDownBlock3D"] * 3,
        up_block_types=["CogVideoXUpBlock3D"] * 3, block_out_channels=[8, 8, 16], layers_per_block=1,
        norm_num_groups=4, temporal_compression_ratio=4, scaling_factor=0.7)),
    "hunyuanvideo": ("AutoencoderKLHunyuanVideo", dict(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=["HunyuanVideoDownBlock3D"] * 3,
        up_block_types=["HunyuanVideoUpBlock3D"] * 3, block_out_channels=[8, 8, 16], layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4, scaling_factor=0.476986)),
    "wan": ("AutoencoderKLWan", dict(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075], latents_std=[2.8184, 1.4541, 2.3275, 2.6558])),
}


def tiny_vae(family: str, seed: int = 0):
    import diffusers
    cls, config = TINY_VAE[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = getattr(diffusers, cls)(**config)
    return vae.eval().requires_grad_(False)


def load_vae(family: str, path: str | Path, dtype=torch.float32):
    """``path/vae`` of a local diffusers checkpoint, with the family's VAE class; never touches the hub."""
    import diffusers
    cls = getattr(diffusers, TINY_VAE[family][0])
    return cls.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True).eval() \
        .requires_grad_(False)


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels of one request, ``(1, 3, H, W)`` or ``(1, 3, F, H, W)`` in [-1, 1], as uint8 ``(F, H, W, 3)``."""
    x = pixels[0].float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    x = (x / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
    return (x * 255).round().to(torch.uint8).numpy()


def spatial_factor(config: dict) -> int:
    """Pixels per latent cell, from a VAE config (as each pipeline's ``vae_scale_factor``)."""
    if "spatial_compression_ratio" in config:
        return int(config["spatial_compression_ratio"])
    if "temperal_downsample" in config:  # Wan (diffusers' spelling)
        return 2 ** len(config["temperal_downsample"])
    return 2 ** (len(config["block_out_channels"]) - 1)

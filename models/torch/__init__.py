"""Torch models for the executor (needs the ``executor`` extra; the planner never imports this).

Every family of the catalog runs its real diffusers classes (``families.py``): the backbone (FLUX, SD3,
CogVideoX, HunyuanVideo and Wan DiTs, the SDXL U-Net), the text encoders its pipeline uses (``encoders.py``:
CLIP, T5, UMT5, Llama from ``transformers``) and its VAE (``vae.py``: ``AutoencoderKL``, or the video model's
own 3D VAE). A ``ModelSource`` builds each catalog component (``backbone``, ``text``, ``vae``) tiny from code
with seeded random weights, or loads it from a local diffusers checkpoint (``from_pretrained`` of
``<path>/transformer`` or ``unet``, ``text_encoder*``, ``vae``, ``scheduler``; never the hub): one code path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ditplan.models.torch.encoders import TextEncoders, load_text_encoders, tiny_text_encoders
from ditplan.models.torch.families import FAMILIES, Family, family, flux_img_ids
from ditplan.models.torch.spec import TEXT_LEN, LatentSpec, prompt_ids
from ditplan.models.torch.vae import TINY_VAE, load_vae, spatial_factor, tiny_vae, to_frames

__all__ = ["FAMILIES", "TEXT_LEN", "Family", "LatentSpec", "ModelSource", "TextEncoders", "family", "flux_img_ids",
           "load_transformer", "make_scheduler", "prompt_ids", "set_timesteps", "tiny_config", "tiny_transformer",
           "to_frames"]


def tiny_config(name: str, num_attention_heads: int = 4) -> dict:
    return family(name).tiny_config(num_attention_heads)


def tiny_transformer(name: str, num_attention_heads: int = 4, seed: int = 0, dtype=torch.float32):
    """A tiny backbone from code; the same ``seed`` gives the same weights in every process."""
    import diffusers
    fam = family(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, fam.backbone)(**fam.tiny_config(num_attention_heads))
    return _cast(model, dtype).eval().requires_grad_(False)


def _cast(module, dtype):
    return module if dtype == torch.float32 else module.to(dtype)  # built in float32


def load_transformer(name: str, path: str | Path, dtype=torch.bfloat16, device="cpu"):
    """A real backbone from a local diffusers layout (``path/transformer`` or ``path/unet``); never the hub."""
    import diffusers
    fam, path = family(name), Path(path)
    sub = fam.backbone_dir if (path / fam.backbone_dir).is_dir() else None
    model = getattr(diffusers, fam.backbone).from_pretrained(path, subfolder=sub, torch_dtype=dtype,
                                                             local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def make_scheduler(name: str, path: str | Path | None = None):
    """The family's own scheduler (a local checkpoint's ``scheduler/`` config if given)."""
    return family(name).make_scheduler(path)


def set_timesteps(scheduler, spec: LatentSpec, begin: int = 0) -> None:
    """Timesteps as the family's pipeline sets them; ``begin`` resumes at a step boundary."""
    family(spec.family).set_timesteps(scheduler, spec)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = begin  # noqa: SLF001 - resume exactly here (set_begin_index applies on first step)


@dataclass(frozen=True)
class ModelSource:
    """Where a rank's modules come from: tiny seeded ones (``heads`` attention heads, enough for every SP
    degree), or, for a family in ``checkpoints``, that local diffusers checkpoint."""

    checkpoints: Mapping[str, str] = field(default_factory=dict)
    heads: int = 4
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in self.checkpoints:
            family(name)  # a clear error for a family the executor cannot run

    def build(self, name: str, component: str) -> torch.nn.Module:
        """One catalog component of a family's model: ``backbone``, ``text`` (all its encoders) or ``vae``."""
        fam, path = family(name), self.checkpoints.get(name)
        if component == "backbone":
            return tiny_transformer(name, self.heads, dtype=self.dtype) if path is None else \
                load_transformer(name, path, dtype=self.dtype)
        if component == "text":
            return _cast(tiny_text_encoders(fam.text, fam.tiny_text()), self.dtype) if path is None else \
                load_text_encoders(fam.text, path, dtype=self.dtype)
        if component == "vae":
            return _cast(tiny_vae(name), self.dtype) if path is None else load_vae(name, path, dtype=self.dtype)
        raise ValueError(f"component must be backbone, text or vae, not {component!r}")

    def scheduler(self, name: str):
        return make_scheduler(name, self.checkpoints.get(name))

    def vae_scale(self, name: str) -> int:
        """Pixels per latent cell of the family's VAE (without building it)."""
        path = self.checkpoints.get(name)
        config = TINY_VAE[name][1] if path is None else json.loads((Path(path) / "vae" / "config.json").read_text())
        return spatial_factor(config)

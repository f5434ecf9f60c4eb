"""Torch model definitions for the executor (needs the ``executor`` extra; the planner never imports this).

Three families, each a diffusers transformer plus its own flow-match scheduler:

* ``flux``: ``FluxTransformer2DModel``; the latent is packed ``(B, h*w, C)`` with ``img_ids`` (row, col).
* ``sd3``: ``SD3Transformer2DModel``; the latent is ``(B, C, h, w)``.
* ``cogvideox``: ``CogVideoXTransformer3DModel`` (tiny build only; no SP processor yet).

``tiny_transformer(family)`` builds a few-layer model from code with seeded random weights;
``load_transformer(family, path)`` loads a local diffusers checkpoint (``<path>/transformer``, no hub access).
The encode stage is not modelled here: ``make_request_tensors`` draws the noise latent and stand-in text
conditioning from the request's seed, so every rank that builds a request gets identical tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("flux", "sd3", "cogvideox")
TEXT_LEN = 8  # stand-in text tokens per request (divisible by every SP degree used in tests)


@dataclass(frozen=True)
class LatentSpec:
    """What the executor needs to materialise a request's latent (latent-space sizes, not pixels)."""
    rid: str
    family: str
    height: int  # latent rows
    width: int  # latent cols
    steps: int
    seed: int = 0
    frames: int = 1


def tiny_config(family: str, num_attention_heads: int = 4) -> dict:
    if family == "flux":
        return dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=num_attention_heads, joint_attention_dim=32, pooled_projection_dim=32,
                    axes_dims_rope=[4, 4, 8])
    if family == "sd3":
        return dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                    num_attention_heads=num_attention_heads, caption_projection_dim=32, joint_attention_dim=32,
                    pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96)
    if family == "cogvideox":
        return dict(num_attention_heads=num_attention_heads, attention_head_dim=8, in_channels=4, out_channels=4,
                    num_layers=1, text_embed_dim=32, time_embed_dim=16, sample_width=8, sample_height=8,
                    sample_frames=9, patch_size=2, max_text_seq_length=TEXT_LEN)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _model_class(family: str):
    import diffusers
    return {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
            "cogvideox": diffusers.CogVideoXTransformer3DModel}[family]


def tiny_transformer(family: str, num_attention_heads: int = 4, seed: int = 0, dtype=torch.float32):
    """A tiny model from code; the same ``seed`` gives the same weights in every process."""
    cls = _model_class(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**tiny_config(family, num_attention_heads))
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_transformer(family: str, path: str | Path, dtype=torch.bfloat16, device="cpu"):
    """A real checkpoint from a local diffusers layout (``path/transformer``); never touches the hub."""
    path = Path(path)
    sub = "transformer" if (path / "transformer").is_dir() else None
    model = _model_class(family).from_pretrained(path, subfolder=sub, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def make_scheduler(family: str, path: str | Path | None = None):
    """The model's own scheduler: FlowMatchEulerDiscreteScheduler (local checkpoint config if given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if path is not None and (Path(path) / "scheduler").is_dir():
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def set_timesteps(scheduler, spec: LatentSpec, begin: int = 0) -> None:
    """Timesteps as the family's pipeline sets them; ``begin`` resumes at a step boundary."""
    import numpy as np
    if scheduler.config.use_dynamic_shifting:
        seq = spec.height * spec.width
        c = scheduler.config
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = seq * m + c.base_shift - m * c.base_image_seq_len
        sigmas = np.linspace(1.0, 1 / spec.steps, spec.steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(spec.steps)
    scheduler.set_begin_index(begin)
    scheduler._step_index = begin  # noqa: SLF001 - resume exactly here (set_begin_index applies on first step)


@dataclass
class RequestTensors:
    latent: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # per-request (batch dim 1) conditioning

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent] + [self.cond[k] for k in sorted(self.cond)]


def make_request_tensors(model, spec: LatentSpec, dtype=torch.float32) -> RequestTensors:
    cfg = model.config
    g = torch.Generator().manual_seed(spec.seed)
    if spec.family == "flux":
        latent = torch.randn(1, spec.height * spec.width, cfg.in_channels, generator=g)
        cond = {"encoder_hidden_states": torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g)}
    elif spec.family == "sd3":
        latent = torch.randn(1, cfg.in_channels, spec.height, spec.width, generator=g)
        cond = {"encoder_hidden_states": torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g)}
    elif spec.family == "cogvideox":
        frames = (spec.frames - 1) // 4 + 1
        latent = torch.randn(1, frames, cfg.in_channels, spec.height, spec.width, generator=g)
        cond = {"encoder_hidden_states": torch.randn(1, TEXT_LEN, cfg.text_embed_dim, generator=g)}
    else:
        raise ValueError(f"unknown family {spec.family!r}")
    return RequestTensors(latent.to(dtype), {k: v.to(dtype) for k, v in cond.items()})


def flux_img_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def predict(model, spec: LatentSpec, latent: torch.Tensor, cond: dict[str, torch.Tensor], t: torch.Tensor):
    """One transformer call (velocity prediction) on a batch of same-shape requests of ``spec``'s shape."""
    b = latent.shape[0]
    t = t.expand(b).to(latent)
    if spec.family == "flux":
        return model(hidden_states=latent, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=t / 1000,
                     img_ids=flux_img_ids(spec.height, spec.width).to(latent),
                     txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3).to(latent),
                     return_dict=False)[0]
    if spec.family == "sd3":
        return model(hidden_states=latent, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=t, return_dict=False)[0]
    if spec.family == "cogvideox":
        return model(hidden_states=latent, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                     return_dict=False)[0]
    raise ValueError(f"unknown family {spec.family!r}")

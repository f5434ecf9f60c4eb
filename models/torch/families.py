"""The catalog's model families on diffusers: the pipeline code around each backbone.

A ``Family`` names the classes its real pipeline uses (backbone, text encoders, VAE, scheduler) and does what
that pipeline does between them: ``encode`` (prompt to the embeddings the backbone's forward takes), ``noise``
(the seeded initial latent, in the pipeline's layout), ``predict`` (one backbone call, with the pipeline's
extra inputs: FLUX's ``img_ids``/``txt_ids`` and guidance, SD3's pooled projections, SDXL's ``text_embeds``
and ``time_ids``, CogVideoX's 3D RoPE, HunyuanVideo's text mask and guidance) and ``decode`` (latent to pixels).
Classifier-free guidance is not run: one conditional call per step (docs/architecture.md, the torch executor).

Schedulers are each checkpoint's own, all resumable at a step boundary: FlowMatchEuler (FLUX, SD3,
HunyuanVideo), EulerDiscrete (SDXL), CogVideoXDDIM, UniPC multistep with flow sigmas (Wan; its solver history
lives in the scheduler object, which a migration ships whole).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditplan.models.torch.encoders import (TextEncoders, clip_embeds, clip_pooled, llama_embeds, t5_embeds,
                                           tiny_clip, tiny_llama, tiny_t5)
from ditplan.models.torch.spec import TEXT_LEN, LatentSpec, prompt_ids


class Family:
    name: str
    backbone: str  # diffusers class of the denoiser
    backbone_dir = "transformer"  # its sub-folder in a diffusers checkpoint
    text: dict[str, str]  # pipeline slot -> transformers class
    scheduler_cls = "FlowMatchEulerDiscreteScheduler"
    scheduler_config: dict = {}
    sequence_parallel = True  # attention shards over yunchang (executor/parallel.py)

    def tiny_config(self, heads: int) -> dict:
        raise NotImplementedError

    def tiny_text(self) -> dict[str, dict]:
        raise NotImplementedError

    def make_scheduler(self, path: str | Path | None = None):
        import diffusers
        cls = getattr(diffusers, self.scheduler_cls)
        if path is not None and (Path(path) / "scheduler").is_dir():
            return cls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(**self.scheduler_config)

    def set_timesteps(self, scheduler, spec: LatentSpec) -> None:
        scheduler.set_timesteps(spec.steps)

    def ids(self, text: TextEncoders, spec: LatentSpec, slot: str) -> torch.Tensor:
        return prompt_ids(spec, slot, text[slot].config)

    def encode(self, text: TextEncoders, spec: LatentSpec, vae_scale: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def noise(self, config, spec: LatentSpec, g: torch.Generator) -> torch.Tensor:
        """Video: ``(1, C, F, h, w)``; the image families override."""
        return torch.randn(1, config.in_channels, spec.latent_frames, spec.height, spec.width, generator=g)

    def predict(self, model, spec: LatentSpec, x: torch.Tensor, cond: dict, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, vae, latent: torch.Tensor, spec: LatentSpec) -> torch.Tensor:
        return vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor).sample


def _steps(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0]).to(x)


class Flux(Family):
    name, backbone = "flux", "FluxTransformer2DModel"
    text = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    scheduler_config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                            base_image_seq_len=256, max_image_seq_len=4096)
    guidance = 3.5  # FluxPipeline's default (FLUX.1 [dev] is guidance-distilled)

    def tiny_config(self, heads):
        # 2x2 latent patches are packed into channels (the pipeline's _pack_latents): in_channels = 4 x 4
        return dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=[4, 4, 8])

    def tiny_text(self):
        return {"text_encoder": tiny_clip(16), "text_encoder_2": tiny_t5(32)}

    def set_timesteps(self, scheduler, spec):
        c = scheduler.config
        seq = (spec.height // 2) * (spec.width // 2)
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = seq * m + c.base_shift - m * c.base_image_seq_len
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / spec.steps, spec.steps), mu=mu)

    def encode(self, text, spec, vae_scale):
        pooled = clip_pooled(text["text_encoder"], self.ids(text, spec, "text_encoder"))
        embeds = t5_embeds(text["text_encoder_2"], self.ids(text, spec, "text_encoder_2"))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def noise(self, config, spec, g):
        x = torch.randn(1, config.in_channels // 4, spec.height, spec.width, generator=g)
        return pack(x)

    def predict(self, model, spec, x, cond, t):
        kw = {}
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((x.shape[0],), self.guidance).to(x)
        text = cond["encoder_hidden_states"]
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=cond["pooled_projections"],
                     timestep=_steps(t, x) / 1000, img_ids=flux_img_ids(spec.height // 2, spec.width // 2).to(x),
                     txt_ids=torch.zeros(text.shape[1], 3).to(x), return_dict=False, **kw)[0]

    def decode(self, vae, latent, spec):
        x = unpack(latent, spec.height, spec.width)
        return vae.decode((x / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)).sample


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patch packing: ``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_img_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class SD3(Family):
    name, backbone = "sd3", "SD3Transformer2DModel"
    text = {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel"}
    scheduler_config = dict(shift=3.0)

    def tiny_config(self, heads):
        return dict(sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                    num_attention_heads=heads, caption_projection_dim=8 * heads, joint_attention_dim=64,
                    pooled_projection_dim=48, out_channels=4, pos_embed_max_size=96)

    def tiny_text(self):
        return {"text_encoder": tiny_clip(16), "text_encoder_2": tiny_clip(32), "text_encoder_3": tiny_t5(64)}

    def encode(self, text, spec, vae_scale):
        h1, p1 = clip_embeds(text["text_encoder"], self.ids(text, spec, "text_encoder"))
        h2, p2 = clip_embeds(text["text_encoder_2"], self.ids(text, spec, "text_encoder_2"))
        t5 = t5_embeds(text["text_encoder_3"], self.ids(text, spec, "text_encoder_3"))
        clip = torch.cat([h1, h2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # CLIP features padded to T5's width
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([p1, p2], dim=-1)}

    def noise(self, config, spec, g):
        return torch.randn(1, config.in_channels, spec.height, spec.width, generator=g)

    def predict(self, model, spec, x, cond, t):
        return model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=_steps(t, x), return_dict=False)[0]

    def decode(self, vae, latent, spec):
        return vae.decode((latent / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)).sample


class SDXL(Family):
    name, backbone, backbone_dir = "sdxl", "UNet2DConditionModel", "unet"
    text = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    scheduler_cls = "EulerDiscreteScheduler"
    scheduler_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            timestep_spacing="leading", steps_offset=1, prediction_type="epsilon")
    sequence_parallel = False  # a U-Net: the catalog gives sdxl max_sp = 1

    def tiny_config(self, heads):
        return dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                    cross_attention_dim=48, norm_num_groups=4)

    def tiny_text(self):
        return {"text_encoder": tiny_clip(16), "text_encoder_2": tiny_clip(32)}

    def encode(self, text, spec, vae_scale):
        h1, _ = clip_embeds(text["text_encoder"], self.ids(text, spec, "text_encoder"))
        h2, pooled = clip_embeds(text["text_encoder_2"], self.ids(text, spec, "text_encoder_2"))
        h, w = spec.height * vae_scale, spec.width * vae_scale  # original size, crop (0, 0), target size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=h2.dtype, device=h2.device)
        return {"encoder_hidden_states": torch.cat([h1, h2], dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    def noise(self, config, spec, g):
        return torch.randn(1, config.in_channels, spec.height, spec.width, generator=g)

    def predict(self, model, spec, x, cond, t):
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                     return_dict=False)[0]


class CogVideoX(Family):
    name, backbone = "cogvideox", "CogVideoXTransformer3DModel"
    text = {"text_encoder": "T5EncoderModel"}
    scheduler_cls = "CogVideoXDDIMScheduler"
    scheduler_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                            snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing")

    def tiny_config(self, heads):
        return dict(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=1,
                    text_embed_dim=32, time_embed_dim=16, sample_width=8, sample_height=8, sample_frames=9,
                    patch_size=2, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True)

    def tiny_text(self):
        return {"text_encoder": tiny_t5(32)}

    def encode(self, text, spec, vae_scale):
        return {"encoder_hidden_states": t5_embeds(text["text_encoder"], self.ids(text, spec, "text_encoder"))}

    def noise(self, config, spec, g):  # the pipeline's layout: (B, F, C, h, w)
        return torch.randn(1, spec.latent_frames, config.in_channels, spec.height, spec.width, generator=g)

    def predict(self, model, spec, x, cond, t):
        rope = self.rope(model.config, spec, x.device) if model.config.use_rotary_positional_embeddings else None
        return model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=_steps(t, x),
                     image_rotary_emb=rope, return_dict=False)[0]

    @staticmethod
    def rope(config, spec: LatentSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
        """CogVideoXPipeline._prepare_rotary_positional_embeddings, on the latent grid."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
        p, p_t = config.patch_size, config.patch_size_t
        grid = (spec.height // p, spec.width // p)
        base_h, base_w = config.sample_height // p, config.sample_width // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                           temporal_size=spec.latent_frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(spec.latent_frames + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(base_h, base_w), device=device)

    def decode(self, vae, latent, spec):
        return vae.decode(latent.permute(0, 2, 1, 3, 4).to(vae.dtype) / vae.config.scaling_factor).sample


class HunyuanVideo(Family):
    name, backbone = "hunyuanvideo", "HunyuanVideoTransformer3DModel"
    text = {"text_encoder": "LlamaModel", "text_encoder_2": "CLIPTextModel"}
    scheduler_config = dict(shift=7.0)
    guidance = 6.0  # HunyuanVideoPipeline's default embedded guidance

    def tiny_config(self, heads):
        return dict(in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                    rope_axes_dim=(4, 6, 6))

    def tiny_text(self):
        return {"text_encoder": tiny_llama(32), "text_encoder_2": tiny_clip(16)}

    def set_timesteps(self, scheduler, spec):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, spec.steps + 1)[:-1])

    def encode(self, text, spec, vae_scale):
        embeds, mask = llama_embeds(text["text_encoder"], self.ids(text, spec, "text_encoder"))
        pooled = clip_pooled(text["text_encoder_2"], self.ids(text, spec, "text_encoder_2"))
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}

    def predict(self, model, spec, x, cond, t):
        kw = {}
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((x.shape[0],), self.guidance * 1000.0).to(x)
        return model(hidden_states=x, timestep=_steps(t, x), encoder_hidden_states=cond["encoder_hidden_states"],
                     encoder_attention_mask=cond["encoder_attention_mask"],
                     pooled_projections=cond["pooled_projections"], return_dict=False, **kw)[0]


class Wan(Family):
    name, backbone = "wan", "WanTransformer3DModel"
    text = {"text_encoder": "UMT5EncoderModel"}
    scheduler_cls = "UniPCMultistepScheduler"
    scheduler_config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000, solver_order=2)

    def tiny_config(self, heads):
        return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads")

    def tiny_text(self):
        return {"text_encoder": tiny_t5(32)}

    def encode(self, text, spec, vae_scale):
        return {"encoder_hidden_states": t5_embeds(text["text_encoder"], self.ids(text, spec, "text_encoder"))}

    def predict(self, model, spec, x, cond, t):
        return model(hidden_states=x, timestep=_steps(t, x), encoder_hidden_states=cond["encoder_hidden_states"],
                     return_dict=False)[0]

    def decode(self, vae, latent, spec):
        c = vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(latent)
        std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(latent)
        return vae.decode((latent * std + mean).to(vae.dtype)).sample


FAMILIES: dict[str, Family] = {f.name: f for f in (Flux(), SD3(), SDXL(), CogVideoX(), HunyuanVideo(), Wan())}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; the torch executor runs: {', '.join(FAMILIES)}") from None

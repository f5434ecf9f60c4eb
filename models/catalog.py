"""Model catalog: token math, stages and memory of each servable model.

Figures are the public architecture numbers of each checkpoint (parameter
counts, hidden size, layer count, VAE factors, patch size, text length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

BF16_BYTES = 2
FP32_BYTES = 4
SP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)
# Weight components, placed separately: the backbone runs every diffuse step,
# the text encoders the encode stage, the VAE decoder the decode stage.
COMPONENTS: tuple[str, ...] = ("backbone", "text", "vae")
STAGE_COMPONENT: dict[str, str] = {"encode": "text", "diffuse": "backbone", "decode": "vae"}


@dataclass(frozen=True, order=True)
class Shape:
    """Output size of one generation: pixels and frames (1 for an image)."""

    height: int
    width: int
    frames: int = 1

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    def __str__(self) -> str:
        base = f"{self.height}x{self.width}"
        return base if self.frames == 1 else f"{base}x{self.frames}f"


@dataclass(frozen=True)
class ModelSpec:
    """One servable diffusion model.

    ``params_b`` is the denoising backbone (what runs every step); text
    encoders run once in the encode stage, the VAE decoder once in decode.
    """

    name: str
    family: str
    kind: Literal["image", "video"]
    arch: Literal["dit", "unet"]
    params_b: float
    text_encoder_params_b: float
    vae_params_b: float
    hidden: int
    layers: int
    latent_channels: int
    vae_spatial: int
    vae_temporal: int
    patch: int
    patch_t: int
    text_tokens: int
    joint_text: bool  # text tokens share the self-attention sequence (MM-DiT)
    max_sp: int
    default_steps: int
    default_shape: Shape
    # VAE decoder cost per output pixel-frame, FLOPs. Estimates, not measured
    # (no published table): 2D image VAEs ~1.2e7, 3D causal video VAEs ~3e7.
    decode_flops_per_px: float
    # Activation bytes per sequence token per GPU at peak (layer-by-layer
    # inference, no grads): hidden x bf16 x this factor.
    activation_factor: float = 24.0
    # The executor runs mixed-resolution CSP patch batches of it (``models/csp.py``): images of
    # different sizes, and at different steps, share one forward pass (PatchedServe).
    csp: bool = False
    # --- input bounds (what a request may ask of this model) -------------
    # Largest output height and width in pixels, and pixels per frame: the
    # model's documented serving sizes (see each entry below). Sides must be
    # multiples of ``size_multiple``; a video's frames 1 + k x vae_temporal.
    max_height: int = 2048
    max_width: int = 2048
    max_pixels: int = 2048 * 2048
    max_frames: int = 1
    # Diffusion schedulers discretise the 1000 training timesteps; diffusers'
    # DDPM/DDIM-style schedulers refuse more inference steps than that.
    max_steps: int = 1000

    # --- bounds -----------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Pixels per latent patch side (VAE factor x patch): height and width must be multiples."""
        return self.vae_spatial * self.patch

    def size_problem(self, height: int, width: int, frames: int, steps: int) -> tuple[str, int, str] | None:
        """``(field, value, reason)`` for the first out-of-bounds field of a request, else None.

        Assumes positive integers (the trace reader checks those first).
        """
        m = self.size_multiple
        for key, value, top in (("height", height, self.max_height), ("width", width, self.max_width)):
            if value > top:
                return key, value, f"exceeds {self.name}'s largest {key}, {top} px"
            if value % m:
                return key, value, (f"must be a multiple of {m} px for {self.name} "
                                    f"(VAE factor {self.vae_spatial} x patch {self.patch})")
        if height * width > self.max_pixels:
            return "width", width, (f"{height}x{width} = {height * width} px exceeds {self.name}'s largest "
                                    f"frame, {self.max_pixels} px")
        if frames > self.max_frames:
            return "frames", frames, f"exceeds {self.name}'s largest frame count, {self.max_frames}"
        if self.kind == "video" and (frames - 1) % self.vae_temporal:
            return "frames", frames, (f"must be 1 + a multiple of {self.vae_temporal} for {self.name} "
                                      f"(temporal VAE factor {self.vae_temporal}), e.g. 17, 33, 49")
        if steps > self.max_steps:
            return "steps", steps, f"exceeds {self.name}'s most steps, {self.max_steps}"
        return None

    # --- token math -----------------------------------------------------
    def latent_frames(self, shape: Shape) -> int:
        if self.kind == "image" or shape.frames == 1:
            return 1
        return (shape.frames - 1) // self.vae_temporal + 1

    def latent_hw(self, shape: Shape) -> tuple[int, int]:
        return (math.ceil(shape.height / self.vae_spatial),
                math.ceil(shape.width / self.vae_spatial))

    def image_tokens(self, shape: Shape) -> int:
        """Tokens the backbone attends over for the visual latent."""
        lh, lw = self.latent_hw(shape)
        lf = math.ceil(self.latent_frames(shape) / self.patch_t)
        return lf * math.ceil(lh / self.patch) * math.ceil(lw / self.patch)

    def seq_tokens(self, shape: Shape) -> int:
        """Self-attention sequence length per sample (text included if joint)."""
        return self.image_tokens(shape) + (self.text_tokens if self.joint_text else 0)

    # --- memory ---------------------------------------------------------
    def component_bytes(self, component: str) -> int:
        """bf16 weights of one component: ``backbone`` (every step), ``text`` (encode), ``vae`` (decode)."""
        params = {"backbone": self.params_b, "text": self.text_encoder_params_b, "vae": self.vae_params_b}
        if component not in params:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, not {component!r}")
        return int(params[component] * 1e9 * BF16_BYTES)

    @property
    def weight_bytes(self) -> int:
        """bf16 weights of backbone, text encoders and VAE on one GPU."""
        return sum(self.component_bytes(c) for c in COMPONENTS)

    def embedding_bytes(self) -> int:
        """bf16 prompt embeddings of one request: what encode hands to the backbone's GPUs."""
        return self.text_tokens * self.hidden * BF16_BYTES

    def latent_bytes(self, shape: Shape) -> int:
        """fp32 latent of one request: what a pause keeps and a move ships."""
        lh, lw = self.latent_hw(shape)
        return self.latent_channels * self.latent_frames(shape) * lh * lw * FP32_BYTES

    def activation_bytes(self, shape: Shape, sp: int, batch: int = 1) -> int:
        """Peak activation memory per GPU of an SP group of degree ``sp``."""
        per_gpu_tokens = math.ceil(self.seq_tokens(shape) / sp)
        return int(per_gpu_tokens * batch * self.hidden * BF16_BYTES * self.activation_factor)

    def legal_sp(self, sp: int) -> bool:
        return sp in SP_DEGREES and sp <= self.max_sp

    def sp_degrees(self, limit: int = 8) -> tuple[int, ...]:
        return tuple(k for k in SP_DEGREES if k <= min(self.max_sp, limit))


def _m(**kw) -> ModelSpec:
    return ModelSpec(**kw)


CATALOG: dict[str, ModelSpec] = {m.name: m for m in (
    _m(name="flux-dev", family="flux", kind="image", arch="dit", params_b=11.9,
       text_encoder_params_b=4.88, vae_params_b=0.084, hidden=3072, layers=57,
       latent_channels=16, vae_spatial=8, vae_temporal=1, patch=2, patch_t=1,
       text_tokens=512, joint_text=True, max_sp=8, default_steps=28,
       default_shape=Shape(1024, 1024), decode_flops_per_px=1.2e7, csp=True,
       # FLUX.1 [dev]: BFL gives 0.1-2 MP; served up to 2048x2048 (4 MP, TetriServe's and
       # Hetu-DiT's largest request), any aspect within that.
       max_height=2048, max_width=2048, max_pixels=2048 * 2048),
    _m(name="sd3-medium", family="sd3", kind="image", arch="dit", params_b=2.03,
       text_encoder_params_b=5.57, vae_params_b=0.084, hidden=1536, layers=24,
       latent_channels=16, vae_spatial=8, vae_temporal=1, patch=2, patch_t=1,
       text_tokens=333, joint_text=True, max_sp=8, default_steps=28,
       default_shape=Shape(1024, 1024), decode_flops_per_px=1.2e7, csp=True,
       # SD3 Medium: trained at 1024^2; its positional embedding grid (192 patches = 3072 px)
       # is the hard limit, 2048x2048 (Hetu-DiT's largest request) the served one.
       max_height=2048, max_width=2048, max_pixels=2048 * 2048),
    # U-Net: no sequence parallelism in xDiT's SP path, so max_sp = 1. Its
    # first attention level is the 2x-downsampled latent, hence patch = 2.
    _m(name="sdxl", family="sdxl", kind="image", arch="unet", params_b=2.57,
       text_encoder_params_b=0.82, vae_params_b=0.084, hidden=1280, layers=70,
       latent_channels=4, vae_spatial=8, vae_temporal=1, patch=2, patch_t=1,
       text_tokens=77, joint_text=False, max_sp=1, default_steps=30,
       default_shape=Shape(1024, 1024), decode_flops_per_px=1.2e7, csp=True,
       # SDXL: trained at 1024^2 buckets; 2048^2 (4x its native pixels) is the largest served size.
       max_height=2048, max_width=2048, max_pixels=2048 * 2048),
    _m(name="cogvideox-5b", family="cogvideox", kind="video", arch="dit", params_b=5.57,
       text_encoder_params_b=4.76, vae_params_b=0.22, hidden=3072, layers=42,
       latent_channels=16, vae_spatial=8, vae_temporal=4, patch=2, patch_t=1,
       text_tokens=226, joint_text=True, max_sp=8, default_steps=50,
       default_shape=Shape(480, 720, 49), decode_flops_per_px=3.0e7,
       # CogVideoX: 480x720 x 49 frames (5B), CogVideoX1.5 768x1360 x 81 (Hetu-DiT serves
       # both); either orientation, at most a 768x1360 frame.
       max_height=1360, max_width=1360, max_pixels=768 * 1360, max_frames=81),
    _m(name="hunyuanvideo", family="hunyuanvideo", kind="video", arch="dit", params_b=12.8,
       text_encoder_params_b=7.6, vae_params_b=0.25, hidden=3072, layers=60,
       latent_channels=16, vae_spatial=8, vae_temporal=4, patch=2, patch_t=1,
       text_tokens=256, joint_text=True, max_sp=8, default_steps=50,
       default_shape=Shape(720, 1280, 129), decode_flops_per_px=3.0e7,
       # HunyuanVideo: 720p (720x1280, either orientation) x 129 frames (5 s at 24 fps);
       # frames up to 768x1360 (Hetu-DiT's largest video size).
       max_height=1360, max_width=1360, max_pixels=768 * 1360, max_frames=129),
    _m(name="wan2.1-t2v-14b", family="wan", kind="video", arch="dit", params_b=14.3,
       text_encoder_params_b=5.7, vae_params_b=0.13, hidden=5120, layers=40,
       latent_channels=16, vae_spatial=8, vae_temporal=4, patch=2, patch_t=1,
       text_tokens=512, joint_text=False, max_sp=8, default_steps=50,
       default_shape=Shape(720, 1280, 81), decode_flops_per_px=3.0e7,
       # Wan2.1 T2V 14B: 480p and 720p, either orientation, x 81 frames (5 s at 16 fps).
       max_height=1360, max_width=1360, max_pixels=768 * 1360, max_frames=81),
)}

FAMILIES: dict[str, str] = {m.family: m.name for m in CATALOG.values()}


class UnknownModelError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(sorted(CATALOG))}"


def get_model(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownModelError(name) from None


def model_for_family_prefix(filename: str) -> str | None:
    """Catalog name whose family starts a file name (``flux_trace.txt`` -> flux-dev)."""
    base = filename.lower().rsplit("/", 1)[-1]
    for family in sorted(FAMILIES, key=len, reverse=True):
        if base.startswith(family):
            return FAMILIES[family]
    return None

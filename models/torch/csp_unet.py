"""Patched (CSP) forward of diffusers' ``UNet2DConditionModel`` for mixed-resolution batches, after
PatchedServe (arXiv 2501.09253, github.com/MiRaCLeXeoN/sduss).

Every request's latent is cut into square patches of ``patch`` latent pixels (32 = 256 px, as PatchedServe)
and the patches of all requests run as one tensor ``(N, C, p, p)``. What the U-Net does across pixels is
rebuilt on the patches so that the result is the unpatched per-request forward's:

- every 3x3 convolution sees a 1-pixel halo stitched from its neighbour patches' current edges just before
  it runs (zeros at the image's border, as the unpatched conv's zero padding), so it is exact; 1x1
  convolutions, activations, linear layers and LayerNorms are per pixel and need nothing;
- group norm statistics are taken per image, over all of that image's patches;
- attention gathers each image's tokens (self-attention over the whole image, cross-attention to that
  request's text), runs the module's transformer blocks, and scatters the tokens back; requests with the
  same number of patches share one batched call. Tokens come in patch order, not raster order: SDXL's
  transformer blocks have no positional embedding, so attention is permutation-equivariant and only the
  order of floating-point sums changes;
- the stride-2 downsampler reads the top/left halo at its input scale and halves the patch
  (32 -> 16 -> 8 ...), the upsampler repeats each patch 2x (nearest) and its conv refreshes the halo at the
  new scale; the patch grid is the same at every level;
- timestep and added (text_time) embeddings are per request and broadcast to that request's patches.

Image sides must be multiples of ``patch`` (padding would change group norm statistics and attention, so
the result would not be the unpatched one): other sizes are refused naming the size. ``patch`` must be
divisible by 2 ** (number of downsamplers) so that every level's patches tile the image.
``PatchedUNet.patch_for`` picks a batch's patch: the largest side up to ``LARGEST_PATCH`` (32 latent pixels,
PatchedServe's 256 px through SDXL's 8x VAE) that divides every image side and is such a multiple. Real SDXL
sizes at multiples of 256 px get 32; others get less (832x1216 px, latent 104x152: 8); the tiny models'
latents (multiples of 8, ``executor/service.py`` ``latent_side``) get 8 or 16. A smaller patch is as exact,
with more halo work per pixel.

In float32 the patched forward matches the unpatched one to rounding (tests/test_csp_unet.py bounds it);
``halo=False`` zero-pads each patch on its own instead (the naive per-patch forward) to show what the halo
is for.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
LARGEST_PATCH = 32  # latent pixels: PatchedServe's 256-px patch at SDXL's 8x VAE
_OUTSIDE = -1  # neighbour index of a patch beyond the image's border, before it is mapped to the zero edge


@dataclass(frozen=True, eq=False)
class PatchLayout:
    """Where every patch of a mixed-resolution batch comes from.

    Patches are request-major, row-major within a request: request ``r`` owns patches
    ``offsets[r]:offsets[r + 1]``. ``neighbours[i, 1 + dr, 1 + dc]`` is the patch at grid offset (dr, dc)
    of patch ``i`` in the same image, or ``N`` (the zero edge) beyond the image's border.
    ``buckets`` groups requests with the same number of patches: ``(request ids, their patch ids)``.
    """

    sizes: tuple[tuple[int, int], ...]  # per request (h, w) in latent pixels
    patch: int
    grids: tuple[tuple[int, int], ...]  # per request (rows, cols) of patches
    offsets: tuple[int, ...]
    patch_request: torch.Tensor  # (N,) long
    patch_row: torch.Tensor  # (N,) long
    patch_col: torch.Tensor  # (N,) long
    neighbours: torch.Tensor  # (N, 3, 3) long
    request_patches: torch.Tensor  # (R,) long: patches per request
    buckets: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @classmethod
    def build(cls, sizes: Sequence[tuple[int, int]], patch: int = 32, device: torch.device | str = "cpu"
              ) -> PatchLayout:
        if patch < 1:
            raise ValueError(f"patch must be a positive number of latent pixels, not {patch}")
        if not sizes:
            raise ValueError("sizes must name at least one request")
        sizes = tuple((int(h), int(w)) for h, w in sizes)
        for r, (h, w) in enumerate(sizes):
            if h <= 0 or w <= 0 or h % patch or w % patch:
                raise ValueError(f"request {r}: latent size {h}x{w} is not a positive multiple of the patch "
                                 f"size {patch} (pad or resize it to a multiple of {patch} latent pixels)")
        grids = tuple((h // patch, w // patch) for h, w in sizes)
        offsets = [0]
        for rows, cols in grids:
            offsets.append(offsets[-1] + rows * cols)
        req, row, col, nbr = [], [], [], []
        for r, (rows, cols) in enumerate(grids):
            grid = torch.arange(rows * cols).reshape(rows, cols) + offsets[r]
            framed = F.pad(grid, (1, 1, 1, 1), value=_OUTSIDE)  # (rows + 2, cols + 2)
            nbr.append(framed.unfold(0, 3, 1).unfold(1, 3, 1).reshape(rows * cols, 3, 3))
            req.append(torch.full((rows * cols,), r))
            row.append(torch.arange(rows).repeat_interleave(cols))
            col.append(torch.arange(cols).repeat(rows))
        n = offsets[-1]
        neighbours = torch.cat(nbr)
        neighbours[neighbours == _OUTSIDE] = n
        counts: dict[int, list[int]] = {}
        for r in range(len(sizes)):
            counts.setdefault(offsets[r + 1] - offsets[r], []).append(r)
        buckets = tuple((torch.tensor(rs, device=device),
                         torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in rs]).to(device))
                        for rs in counts.values())
        return cls(sizes, patch, grids, tuple(offsets), torch.cat(req).to(device), torch.cat(row).to(device),
                   torch.cat(col).to(device), neighbours.to(device),
                   torch.tensor([rows * cols for rows, cols in grids], device=device), buckets)

    @property
    def requests(self) -> int:
        return len(self.sizes)

    @property
    def patches(self) -> int:
        return self.offsets[-1]

    def patchify(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-request latents ``(1, C, h, w)`` (or ``(C, h, w)``) -> patches ``(N, C, p, p)``."""
        if len(latents) != self.requests:
            raise ValueError(f"latents: {len(latents)} tensors for a layout of {self.requests} requests")
        p, out = self.patch, []
        for r, x in enumerate(latents):
            x = x[0] if x.dim() == 4 and x.shape[0] == 1 else x
            if x.dim() != 3 or tuple(x.shape[-2:]) != self.sizes[r]:
                raise ValueError(f"latents[{r}]: shape {tuple(x.shape)}, expected (1, C, {self.sizes[r][0]}, "
                                 f"{self.sizes[r][1]})")
            c, (rows, cols) = x.shape[0], self.grids[r]
            out.append(x.reshape(c, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, p, p))
        return torch.cat(out)

    def unpatchify(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patches ``(N, C, q, q)`` (any level's patch size q) -> per-request ``(1, C, rows q, cols q)``."""
        _, c, q, _ = x.shape
        out = []
        for r, (rows, cols) in enumerate(self.grids):
            part = x[self.offsets[r]:self.offsets[r + 1]]
            out.append(part.reshape(rows, cols, c, q, q).permute(2, 0, 3, 1, 4).reshape(1, c, rows * q, cols * q))
        return out


def stitch_halo(x: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
    """``(N, C, q, q)`` -> ``(N, C, q + 2, q + 2)``: each patch framed by its neighbours' adjoining rows,
    columns and corner pixels as they are now (zeros beyond the image's border)."""
    nb = layout.neighbours

    def edge(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # src (N, C, ...): row N is the zero edge
        return torch.cat([src, src.new_zeros(1, *src.shape[1:])]).index_select(0, idx)

    out = F.pad(x, (1, 1, 1, 1))
    out[:, :, 0, 1:-1] = edge(x[:, :, -1, :], nb[:, 0, 1])  # the patch above: its bottom row
    out[:, :, -1, 1:-1] = edge(x[:, :, 0, :], nb[:, 2, 1])
    out[:, :, 1:-1, 0] = edge(x[:, :, :, -1], nb[:, 1, 0])
    out[:, :, 1:-1, -1] = edge(x[:, :, :, 0], nb[:, 1, 2])
    out[:, :, 0, 0] = edge(x[:, :, -1, -1], nb[:, 0, 0])
    out[:, :, 0, -1] = edge(x[:, :, -1, 0], nb[:, 0, 2])
    out[:, :, -1, 0] = edge(x[:, :, 0, -1], nb[:, 2, 0])
    out[:, :, -1, -1] = edge(x[:, :, 0, 0], nb[:, 2, 2])
    return out


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, layout: PatchLayout) -> torch.Tensor:
    """``norm`` with each image's statistics over all of its patches (two passes, in float32 or wider)."""
    n, c, q, _ = x.shape
    g, req = norm.num_groups, layout.patch_request
    xg = x.reshape(n, g, -1).to(torch.promote_types(x.dtype, torch.float32))
    count = layout.request_patches.to(xg.dtype)[:, None] * xg.shape[-1]
    mean = xg.new_zeros(layout.requests, g).index_add_(0, req, xg.sum(-1)) / count
    d = xg - mean[req][..., None]
    var = xg.new_zeros(layout.requests, g).index_add_(0, req, (d * d).sum(-1)) / count
    y = (d * torch.rsqrt(var + norm.eps)[req][..., None]).reshape(n, c, q, q).to(x.dtype)
    if norm.affine:
        y = y * norm.weight[:, None, None] + norm.bias[:, None, None]
    return y


class PatchedUNet:
    """A ``UNet2DConditionModel`` (SDXL layout: DownBlock2D / CrossAttnDownBlock2D, a cross-attention mid
    block, linear projections, text_time added embedding) run on a ``PatchLayout``'s patches, calling the
    module's own submodules for every weight."""

    def __init__(self, unet: nn.Module, halo: bool = True):
        _check_supported(unet)
        self.unet, self.halo = unet, halo
        self.levels = sum(b.downsamplers is not None for b in unet.down_blocks)

    def layout(self, sizes: Sequence[tuple[int, int]], patch: int = 32) -> PatchLayout:
        if patch % (2 ** self.levels):
            raise ValueError(f"patch {patch} is not divisible by 2**{self.levels} (the U-Net downsamples "
                             f"{self.levels} times)")
        return PatchLayout.build(sizes, patch, self.unet.device)

    def patch_for(self, sizes: Sequence[tuple[int, int]], largest: int = LARGEST_PATCH) -> int:
        """The largest patch side <= ``largest`` that divides every side of ``sizes`` (latent pixels) and is a
        multiple of 2 ** (downsamplers); a size off that grid is refused, naming it."""
        unit = 2 ** self.levels
        if largest < unit:
            raise ValueError(f"largest patch {largest} is below 2**{self.levels} (the U-Net downsamples "
                             f"{self.levels} times)")
        for r, (h, w) in enumerate(sizes):
            if h <= 0 or w <= 0 or h % unit or w % unit:
                raise ValueError(f"request {r}: latent size {h}x{w} is not a positive multiple of {unit} (the "
                                 f"U-Net downsamples {self.levels} times), so no patch tiles it")
        common = gcd(*(side for size in sizes for side in size))
        return next(p for p in range(min(largest, common) // unit * unit, 0, -unit) if common % p == 0)

    def __call__(self, latents: Sequence[torch.Tensor], timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: Mapping[str, torch.Tensor], patch: int = 32) -> list[torch.Tensor]:
        """Per-request latents ``(1, C, h, w)`` -> per-request noise predictions, as
        ``unet(latents[r], timesteps[r], encoder_hidden_states[r:r+1], {k: v[r:r+1]})`` would give."""
        layout = self.layout([tuple(x.shape[-2:]) for x in latents], patch)
        out = self.forward(layout, layout.patchify(latents), timesteps, encoder_hidden_states, added_cond_kwargs)
        return layout.unpatchify(out)

    def forward(self, layout: PatchLayout, x: torch.Tensor, timesteps: torch.Tensor,
                encoder_hidden_states: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Patches ``(N, C_in, p, p)`` -> patches ``(N, C_out, p, p)``; one timestep, text and added
        conditioning row per request."""
        unet, r = self.unet, layout.requests
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        missing = {"text_embeds", "time_ids"} - set(added_cond_kwargs)
        if missing:
            raise ValueError(f"added_cond_kwargs: missing {sorted(missing)} (the text_time embedding needs both)")
        rows = {"timesteps": timesteps, "encoder_hidden_states": encoder_hidden_states,
                **{f"added_cond_kwargs[{k!r}]": v for k, v in added_cond_kwargs.items()}}
        for name, value in rows.items():
            if value.shape[0] != r:
                raise ValueError(f"{name}: {value.shape[0]} rows for {r} requests")
        if x.shape[0] != layout.patches or x.shape[-1] != layout.patch:
            raise ValueError(f"x: shape {tuple(x.shape)} for a layout of {layout.patches} patches of {layout.patch}")
        emb = unet.time_embedding(unet.time_proj(timesteps).to(x.dtype))
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                       added_cond_kwargs=dict(added_cond_kwargs))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        step = _Step(layout, self.halo, emb, encoder_hidden_states)

        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        x = step.conv(x, unet.conv_in)
        skips = [x]
        for block in unet.down_blocks:
            for i, resnet in enumerate(block.resnets):
                x = step.resnet(x, resnet)
                if hasattr(block, "attentions"):
                    x = step.transformer(x, block.attentions[i])
                skips.append(x)
            if block.downsamplers is not None:
                x = step.conv(x, block.downsamplers[0].conv)
                skips.append(x)
        mid = unet.mid_block
        x = step.resnet(x, mid.resnets[0])
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            x = step.resnet(step.transformer(x, attn), resnet)
        for block in unet.up_blocks:
            for i, resnet in enumerate(block.resnets):
                x = step.resnet(torch.cat([x, skips.pop()], dim=1), resnet)
                if hasattr(block, "attentions"):
                    x = step.transformer(x, block.attentions[i])
            if block.upsamplers is not None:
                x = step.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), block.upsamplers[0].conv)
        if unet.conv_norm_out is not None:
            x = unet.conv_act(group_norm(x, unet.conv_norm_out, layout))
        return step.conv(x, unet.conv_out)


@dataclass(frozen=True, eq=False)
class _Step:
    """One forward's shared state: the layout, the halo switch, the per-request embedding and text."""

    layout: PatchLayout
    halo: bool
    emb: torch.Tensor  # (R, D)
    text: torch.Tensor  # (R, T, D_text)

    def conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        if conv.kernel_size == (1, 1):
            return conv(x)
        x = stitch_halo(x, self.layout) if self.halo else F.pad(x, (1, 1, 1, 1))
        return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, groups=conv.groups)

    def resnet(self, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        req = self.layout.patch_request
        h = self.conv(block.nonlinearity(group_norm(x, block.norm1, self.layout)), block.conv1)
        h = h + block.time_emb_proj(block.nonlinearity(self.emb))[req][:, :, None, None]
        h = block.nonlinearity(group_norm(h, block.norm2, self.layout))
        h = self.conv(block.dropout(h), block.conv2)
        skip = x if block.conv_shortcut is None else self.conv(x, block.conv_shortcut)
        return (skip + h) / block.output_scale_factor

    def transformer(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        n, c, q, _ = x.shape
        tokens = group_norm(x, model.norm, self.layout).permute(0, 2, 3, 1).reshape(n, q * q, c)
        tokens = model.proj_in(tokens)
        out = torch.empty_like(tokens)
        for requests, patches in self.layout.buckets:
            seq = tokens.index_select(0, patches).reshape(len(requests), -1, tokens.shape[-1])
            text = self.text.index_select(0, requests)
            for block in model.transformer_blocks:
                seq = block(seq, encoder_hidden_states=text)
            out.index_copy_(0, patches, seq.reshape(len(patches), q * q, -1))
        out = model.proj_out(out)
        return out.reshape(n, q, q, -1).permute(0, 3, 1, 2) + x


def _check_supported(unet: nn.Module) -> None:
    """Refuse, naming the setting, any U-Net this patched forward does not reproduce exactly."""
    cfg = unet.config
    wanted = {"addition_embed_type": "text_time", "class_embed_type": None, "encoder_hid_dim_type": None,
              "time_cond_proj_dim": None, "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
              "conv_out_kernel": 3, "use_linear_projection": True, "mid_block_type": "UNetMidBlock2DCrossAttn",
              "dual_cross_attention": False, "downsample_padding": 1}
    for key, value in wanted.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"patched U-Net: config {key}={cfg.get(key)!r} is not supported (needs {value!r})")
    for kind, blocks, names in (("down", cfg.down_block_types, DOWN_BLOCKS), ("up", cfg.up_block_types, UP_BLOCKS)):
        for name in blocks:
            if name not in names:
                raise ValueError(f"patched U-Net: {kind} block {name!r} is not supported (one of {names})")
    for name, conv in unet.named_modules():
        if isinstance(conv, nn.Conv2d) and (conv.dilation != (1, 1) or conv.padding_mode != "zeros" or (
                conv.kernel_size, conv.padding) not in (((1, 1), (0, 0)), ((3, 3), (1, 1)))):
            raise ValueError(f"patched U-Net: {name} is a {conv.kernel_size} conv with padding {conv.padding}, "
                             f"dilation {conv.dilation}; only 1x1 and zero-padded 3x3 convs are stitched")
    for block in unet.up_blocks:
        if getattr(block, "s1", None):
            raise ValueError("patched U-Net: FreeU is enabled; disable it (unet.disable_freeu())")

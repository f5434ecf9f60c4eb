"""Compressed Sparse Patch (CSP) batches: requests of different resolutions and step positions in one DiT pass.

PatchedServe (arXiv 2501.09253) packs the tokens of every image of a batch into one sequence: the linear
layers and MLPs run once on the packed tensor ``(1, sum of tokens, D)``, attention stays inside each image.
Here for SD3 (``SD3Transformer2DModel``, ``sd3_forward``) and FLUX (``FluxTransformer2DModel``,
``flux_forward``), calling the real modules' submodules with their weights:

* ``CspLayout``: the packed order (image tokens of request 0, 1, ..., then their text tokens), cu_seqlens-style
  offsets, the request of every token, per-request token grid (h, w), and, under sequence parallelism, the
  padding to a multiple of the degree and where each token sits after the all-to-all.
* per request: the patch embedding with its own position embedding (SD3: ``pos_embed``'s cropped sin-cos for
  its size; FLUX: ``pos_embed``'s RoPE of its own (row, col) ids), its own timestep and pooled text
  (``time_text_embed`` on one row per request); adaLN modulations are computed once per request (the norm's own
  ``linear``) and expanded to that request's tokens. The diffusers norms take one embedding per batch row and
  a packed batch has one row for many requests, so the line of modulation (``norm(x) * (1 + scale) + shift``)
  is written here; every weight is the module's.
* joint attention per image: each image's image and text tokens attend only to each other (``ATTENTION``).
* sequence parallelism (``SeqShard``): the packed image tokens and the packed text tokens are each padded to a
  multiple of the degree P and split in P runs; each rank's q/k/v (its image run, then its text run) go through
  yunchang's Ulysses all-to-all (``SeqAllToAll4D``: heads scattered, sequence gathered), so every rank sees the
  whole packed sequence for H/P heads and applies the same per-image attention; padding attends only to itself.
  The final projection's output is all-gathered, so every rank returns every prediction.
* the patch cache (``patch_cache.py``), SD3 at degree 1: a skipped patch reuses its cached block output.

SDXL's U-Net is no DiT: its CSP batch is ``csp_unet.PatchedUNet`` (square patches of every latent, halos
stitched for the 3x3 convs, group norm and attention per image), degree 1 only, patch side from
``PatchedUNet.patch_for``. Its attention runs per image by construction (the U-Net's own transformer blocks on
each image's tokens), so ``attention=`` does not apply to it.

Attention variants (``attention=``), all exact against each image alone (max |diff| 7e-7, float32), timed by
``python -m bench.csp --flex`` (the bench's tiny SD3, 4 blocks of width 64, latents 16/24/32, 2 of each, one
step, 1 thread on this 2-core CPU): ``loop``, one SDPA per image over its own tokens, 17-24 ms, the default;
``mask``, one SDPA over the whole packed sequence with a boolean block-diagonal mask, 42-58 ms (it pays for
every cross-image pair); ``flex``, ``flex_attention`` compiled by ``torch.compile`` with a block mask from the
same segment ids, 88 ms (the block mask is rebuilt each call, and it compiles again, ~30 s, for each new
layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ditplan.models.torch.csp_unet import PatchedUNet
from ditplan.models.torch.patch_cache import PatchCache

ATTENTION = ("loop", "mask", "flex")


@dataclass(frozen=True)
class SeqShard:
    """This rank's place in a sequence-parallel group: ``index`` of ``size``, over process group ``group``."""

    group: object = None
    index: int = 0
    size: int = 1


@dataclass(frozen=True)
class CspLayout:
    """Where each request's tokens sit in the packed sequence.

    ``grids``: per request its token grid (rows, cols) (the latent divided by the patch size); ``text_lens``: its
    text tokens; ``degree``: the SP degree the packed runs are padded for. Packed image tokens are request 0's
    (row-major), request 1's, ...; text tokens likewise, in a run of their own.
    """

    grids: tuple[tuple[int, int], ...]
    text_lens: tuple[int, ...]
    degree: int = 1
    text_first: bool = False  # each image's own forward orders its joint sequence text, image (FLUX)

    def __post_init__(self) -> None:
        if not self.grids or len(self.grids) != len(self.text_lens):
            raise ValueError(f"CspLayout: grids {self.grids} and text_lens {self.text_lens} must be non-empty and "
                             "of the same length")
        if self.degree < 1:
            raise ValueError(f"CspLayout: degree must be >= 1, not {self.degree}")

    @property
    def requests(self) -> int:
        return len(self.grids)

    @cached_property
    def img_offsets(self) -> tuple[int, ...]:
        """cu_seqlens of the image tokens: request i owns ``img_offsets[i]:img_offsets[i + 1]``."""
        return _cumsum([h * w for h, w in self.grids])

    @cached_property
    def txt_offsets(self) -> tuple[int, ...]:
        return _cumsum(self.text_lens)

    @property
    def n_img(self) -> int:
        return self.img_offsets[-1]

    @property
    def n_txt(self) -> int:
        return self.txt_offsets[-1]

    @property
    def img_local(self) -> int:
        """Image tokens per rank (the packed run padded to a multiple of the degree)."""
        return -(-self.n_img // self.degree)

    @property
    def txt_local(self) -> int:
        return -(-self.n_txt // self.degree)

    @cached_property
    def img_owner(self) -> torch.Tensor:
        """The request of each packed image token, padding included (-1)."""
        return _owners(self.img_offsets, self.img_local * self.degree)

    @cached_property
    def txt_owner(self) -> torch.Tensor:
        return _owners(self.txt_offsets, self.txt_local * self.degree)

    def local_img_owner(self, index: int) -> torch.Tensor:
        return self.img_owner[index * self.img_local:(index + 1) * self.img_local]

    def local_txt_owner(self, index: int) -> torch.Tensor:
        return self.txt_owner[index * self.txt_local:(index + 1) * self.txt_local]

    @cached_property
    def slots(self) -> torch.Tensor:
        """Position of each packed token after the all-to-all, image tokens first then text tokens: rank r's
        image run, then its text run, for r = 0 .. P-1 (at degree 1: image tokens, then text tokens)."""
        li, lt = self.img_local, self.txt_local
        img = torch.arange(li * self.degree)
        txt = torch.arange(lt * self.degree)
        img_slot = (img // li) * (li + lt) + img % li
        txt_slot = (txt // lt) * (li + lt) + li + txt % lt
        return torch.cat([img_slot, txt_slot])

    @cached_property
    def segments(self) -> tuple[torch.Tensor, ...]:
        """Per request, the slots of its tokens in the order of its own forward: its image tokens then its text
        (SD3), or text then image (``text_first``: FLUX)."""
        n_img_pad = self.img_local * self.degree
        out = []
        for i in range(self.requests):
            img = torch.arange(self.img_offsets[i], self.img_offsets[i + 1])
            txt = n_img_pad + torch.arange(self.txt_offsets[i], self.txt_offsets[i + 1])
            out.append(self.slots[torch.cat([txt, img] if self.text_first else [img, txt])])
        return tuple(out)

    @cached_property
    def slot_segment(self) -> torch.Tensor:
        """The request of each slot; padding slots get distinct negative ids (they attend only to themselves)."""
        n = (self.img_local + self.txt_local) * self.degree
        seg = -1 - torch.arange(n)
        for i, idx in enumerate(self.segments):
            seg[idx] = i
        return seg


def _cumsum(xs) -> tuple[int, ...]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return tuple(out)


def _owners(offsets: tuple[int, ...], padded: int) -> torch.Tensor:
    owner = torch.full((padded,), -1, dtype=torch.long)
    for i in range(len(offsets) - 1):
        owner[offsets[i]:offsets[i + 1]] = i
    return owner


# --- attention ---------------------------------------------------------------------------------------------
def _attend(q, k, v, layout: CspLayout, mode: str, q_slots=None) -> torch.Tensor:
    """Per-image attention over slot-ordered ``(1, S, H, D)`` q/k/v; ``q_slots``: the slots the queries are
    (default: every slot) when only some tokens are computed (the patch cache)."""
    if mode == "loop":
        out = q.new_zeros(q.shape)
        where = None if q_slots is None else _inverse(q_slots, k.shape[1])
        for seg in layout.segments:
            qs = seg if where is None else where[seg][where[seg] >= 0]
            o = F.scaled_dot_product_attention(q[:, qs].transpose(1, 2), k[:, seg].transpose(1, 2),
                                               v[:, seg].transpose(1, 2))
            out[:, qs] = o.transpose(1, 2)
        return out
    seg = layout.slot_segment
    q_seg = (seg if q_slots is None else seg[q_slots]).to(q.device)
    seg = seg.to(q.device)
    if mode == "mask":
        mask = q_seg[:, None] == seg[None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if mode == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_image(_b, _h, qi, ki):
            return q_seg[qi] == seg[ki]

        block = create_block_mask(same_image, 1, 1, q.shape[1], k.shape[1], device=str(q.device))
        out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block)
        return out.transpose(1, 2)
    raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {mode!r}")


def _inverse(slots: torch.Tensor, n: int) -> torch.Tensor:
    """For each of ``n`` slots, its position in ``slots`` (-1 if absent)."""
    where = torch.full((n,), -1, dtype=torch.long)
    where[slots] = torch.arange(slots.numel())
    return where


_FLEX = []


def _compiled_flex():
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


def _all_to_all(x: torch.Tensor, shard: SeqShard, scatter: int, gather: int) -> torch.Tensor:
    from yunchang.comm.all_to_all import SeqAllToAll4D
    return SeqAllToAll4D.apply(shard.group, x.contiguous(), scatter, gather)


def _heads(proj, x, heads: int, norm=None) -> torch.Tensor:
    y = proj(x).unflatten(-1, (heads, -1))  # unflatten, not view: no token may be computed (the patch cache)
    return y if norm is None else norm(y)  # diffusers' q/k norms act on the last dim


def packed_attention(q, k, v, layout: CspLayout, shard: SeqShard, mode: str, q_slots=None) -> torch.Tensor:
    """Per-image attention over this rank's ``(1, L, H, D)`` q/k/v (its image run, then its text run): under SP
    through the Ulysses all-to-all (heads scattered, the whole packed sequence gathered) and back."""
    if shard.size > 1:
        q, k, v = (_all_to_all(x, shard, 2, 1) for x in (q, k, v))
    out = _attend(q, k, v, layout, mode, q_slots)
    if shard.size > 1:
        out = _all_to_all(out, shard, 1, 2)
    return out.flatten(2, 3).to(q.dtype)


def joint_attention(attn, img, txt, layout: CspLayout, shard: SeqShard, mode: str, keep=None, merge_kv=None):
    """An SD3 ``Attention`` (JointAttnProcessor2_0's math) on this rank's packed image and text tokens, each
    image attending only to its own tokens. With a patch cache (degree 1): ``img`` holds only the image tokens at
    packed positions ``keep`` (None: all of them), and ``merge_kv(k, v)`` gives the keys and values of every
    image token (the cached ones where not computed). Returns (image output, text output)."""
    h = attn.heads
    q = _heads(attn.to_q, img, h, attn.norm_q)
    k = _heads(attn.to_k, img, h, attn.norm_k)
    v = _heads(attn.to_v, img, h)
    eq = _heads(attn.add_q_proj, txt, h, attn.norm_added_q)
    ek = _heads(attn.add_k_proj, txt, h, attn.norm_added_k)
    ev = _heads(attn.add_v_proj, txt, h)
    if merge_kv is not None:
        k, v = merge_kv(k, v)
    q_slots = None if keep is None else torch.cat([keep, layout.n_img + torch.arange(txt.shape[1])])
    out = packed_attention(torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1), layout, shard, mode,
                           q_slots)
    n = img.shape[1]
    out_img, out_txt = out[:, :n], out[:, n:]
    if not attn.context_pre_only:
        out_txt = attn.to_add_out(out_txt)
    return attn.to_out[1](attn.to_out[0](out_img)), out_txt


def _modulation(norm, temb: torch.Tensor, owner: torch.Tensor, chunks: int, scales=()) -> list[torch.Tensor]:
    """An adaLN's modulation vectors, computed per request (its ``linear`` on one row each) and expanded to
    every token (``owner``: request of each token; padding takes request 0's: its outputs are dropped); the
    chunks numbered in ``scales`` come as ``1 + scale``, added before the expansion."""
    emb = norm.linear(norm.silu(temb)).chunk(chunks, dim=1)
    owner = owner.clamp(min=0)
    return [((1 + c) if i in scales else c)[owner].unsqueeze(0) for i, c in enumerate(emb)]


# --- SD3 -----------------------------------------------------------------------------------------------------
def _sd3_block(block, img, txt, temb, layout: CspLayout, shard: SeqShard, mode: str, cache: PatchCache | None,
               index: int):
    """One ``JointTransformerBlock`` (its forward's math) on packed tokens; image tokens a patch cache skips
    keep their cached output."""
    if block.use_dual_attention:
        raise NotImplementedError("CSP for SD3 blocks with dual attention (SD3.5) is not implemented")
    owner = layout.local_img_owner(shard.index)
    full, keep, merge_kv = img, None, None
    if cache is not None:
        keep = cache.keep(index, img)
        merge_kv = partial(cache.kv, index, keep)
        if keep is not None:
            img, owner = img[:, keep], owner[keep]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, temb, owner, 6, (1, 4))
    x = torch.addcmul(shift_msa, block.norm1.norm(img), scale_msa)
    t_owner = layout.local_txt_owner(shard.index)
    if block.context_pre_only:  # AdaLayerNormContinuous: scale first
        c_scale, c_shift = _modulation(block.norm1_context, temb, t_owner, 2, (0,))
        c = torch.addcmul(c_shift, block.norm1_context.norm(txt), c_scale)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
            block.norm1_context, temb, t_owner, 6, (1, 4))
        c = torch.addcmul(c_shift_msa, block.norm1_context.norm(txt), c_scale_msa)
    attn_img, attn_txt = joint_attention(block.attn, x, c, layout, shard, mode, keep, merge_kv)
    img = torch.addcmul(img, gate_msa, attn_img)
    img = torch.addcmul(img, gate_mlp, block.ff(torch.addcmul(shift_mlp, block.norm2(img), scale_mlp)))
    if cache is not None:
        img = cache.store(index, full, keep, img)
    if block.context_pre_only:
        return img, None
    txt = torch.addcmul(txt, c_gate_msa, attn_txt)
    txt = torch.addcmul(txt, c_gate_mlp, block.ff_context(torch.addcmul(c_shift_mlp, block.norm2_context(txt),
                                                                        c_scale_mlp)))
    return img, txt


def _final(model, img: torch.Tensor, temb: torch.Tensor, layout: CspLayout, shard: SeqShard) -> torch.Tensor:
    """The final adaLN norm and projection of this rank's image tokens, gathered over the SP group."""
    scale, shift = _modulation(model.norm_out, temb, layout.local_img_owner(shard.index), 2, (0,))
    out = model.proj_out(torch.addcmul(shift, model.norm_out.norm(img), scale))
    if shard.size > 1:
        parts = [torch.empty_like(out) for _ in range(shard.size)]
        dist.all_gather(parts, out.contiguous(), group=shard.group)
        out = torch.cat(parts, dim=1)
    return out


def sd3_forward(model, latents: list[torch.Tensor], conds: list[dict[str, torch.Tensor]], timesteps: torch.Tensor,
                shard: SeqShard = SeqShard(), attention: str = "loop",
                cache: PatchCache | None = None) -> list[torch.Tensor]:
    """``SD3Transformer2DModel.forward`` for a CSP batch: ``latents[i]`` ``(1, C, H_i, W_i)``, ``conds[i]`` its
    ``encoder_hidden_states`` / ``pooled_projections``, ``timesteps[i]`` its step; returns each request's
    prediction ``(1, C, H_i, W_i)`` (on every rank of the shard's group). ``cache``: the ``PatchCache`` of the
    batch's requests (degree 1 only)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    if not (len(latents) == len(conds) == timesteps.shape[0]):
        raise ValueError(f"CSP batch: {len(latents)} latents, {len(conds)} conds, {timesteps.shape[0]} timesteps")
    if cache is not None and shard.size > 1:
        raise NotImplementedError("the patch cache under sequence parallelism (degree > 1) is not implemented")
    p = model.config.patch_size
    layout = CspLayout(tuple((x.shape[-2] // p, x.shape[-1] // p) for x in latents),
                       tuple(c["encoder_hidden_states"].shape[1] for c in conds), shard.size)
    # pos_embed.forward, not pos_embed(...): the Worker's SP hook on the module would shard one image's tokens
    img = torch.cat([model.pos_embed.forward(x) for x in latents], dim=1)
    txt = model.context_embedder(torch.cat([c["encoder_hidden_states"] for c in conds], dim=1))
    temb = model.time_text_embed(timesteps.to(img.dtype), torch.cat([c["pooled_projections"] for c in conds]))
    img, txt = _local(img, layout.img_local, shard), _local(txt, layout.txt_local, shard)
    if cache is not None:
        cache.begin(layout)
    for index, block in enumerate(model.transformer_blocks):
        img, txt = _sd3_block(block, img, txt, temb, layout, shard, attention, cache, index)
    out = _final(model, img, temb, layout, shard)
    preds = []
    for i, (gh, gw) in enumerate(layout.grids):
        x = out[0, layout.img_offsets[i]:layout.img_offsets[i + 1]]
        x = x.reshape(1, gh, gw, p, p, model.out_channels)  # the model's unpatchify
        preds.append(torch.einsum("nhwpqc->nchpwq", x).reshape(1, model.out_channels, gh * p, gw * p))
    return preds


def _local(x: torch.Tensor, per_rank: int, shard: SeqShard) -> torch.Tensor:
    """This rank's run of a packed ``(1, n, D)`` tensor, padded with zeros to ``per_rank * size``."""
    pad = per_rank * shard.size - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_zeros(1, pad, x.shape[2])], dim=1)
    return x[:, shard.index * per_rank:(shard.index + 1) * per_rank]


# --- FLUX ----------------------------------------------------------------------------------------------------
def _flux_attention(attn, x, rope, layout: CspLayout, shard: SeqShard, mode: str, txt=None) -> torch.Tensor:
    """A ``FluxAttention`` (FluxAttnProcessor's math, RoPE per token) on this rank's packed tokens: ``x`` the
    image run and ``txt`` the text run (a double-stream block), or ``x`` both runs already (a single-stream
    block, ``txt`` None); ``rope``: (cos, sin) of the same tokens. Returns the attention output of ``x``'s and
    ``txt``'s tokens, concatenated, before any output projection."""
    from diffusers.models.embeddings import apply_rotary_emb

    def qkv(proj_q, proj_k, proj_v, norm_q, norm_k, y):
        return (norm_q(proj_q(y).unflatten(-1, (-1, attn.head_dim))),
                norm_k(proj_k(y).unflatten(-1, (-1, attn.head_dim))), proj_v(y).unflatten(-1, (-1, attn.head_dim)))

    q, k, v = qkv(attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, x)
    if txt is not None:
        eq, ek, ev = qkv(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k,
                         txt)
        q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return packed_attention(q, k, v, layout, shard, mode)


def _flux_block(block, img, txt, temb, rope, layout: CspLayout, shard: SeqShard, mode: str):
    """One ``FluxTransformerBlock`` (double stream) on packed tokens."""
    owner, t_owner = layout.local_img_owner(shard.index), layout.local_txt_owner(shard.index)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, temb, owner, 6, (1, 4))
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
        block.norm1_context, temb, t_owner, 6, (1, 4))
    x = torch.addcmul(shift_msa, block.norm1.norm(img), scale_msa)
    c = torch.addcmul(c_shift_msa, block.norm1_context.norm(txt), c_scale_msa)
    out = _flux_attention(block.attn, x, rope, layout, shard, mode, txt=c)
    n = img.shape[1]
    attn_img = block.attn.to_out[1](block.attn.to_out[0](out[:, :n].contiguous()))
    attn_txt = block.attn.to_add_out(out[:, n:].contiguous())
    img = torch.addcmul(img, gate_msa, attn_img)
    img = torch.addcmul(img, gate_mlp, block.ff(torch.addcmul(shift_mlp, block.norm2(img), scale_mlp)))
    txt = torch.addcmul(txt, c_gate_msa, attn_txt)
    txt = torch.addcmul(txt, c_gate_mlp, block.ff_context(torch.addcmul(c_shift_mlp, block.norm2_context(txt),
                                                                        c_scale_mlp)))
    return img, txt


def _flux_single_block(block, x, owner, temb, rope, layout: CspLayout, shard: SeqShard, mode: str):
    """One ``FluxSingleTransformerBlock`` on this rank's image run and text run together (``x``)."""
    shift, scale, gate = _modulation(block.norm, temb, owner, 3, (1,))
    h = torch.addcmul(shift, block.norm.norm(x), scale)
    mlp = block.act_mlp(block.proj_mlp(h))
    attn = _flux_attention(block.attn, h, rope, layout, shard, mode)
    return torch.addcmul(x, gate, block.proj_out(torch.cat([attn, mlp], dim=2)))


def flux_forward(model, latents: list[torch.Tensor], conds: list[dict[str, torch.Tensor]], timesteps: torch.Tensor,
                 grids: list[tuple[int, int]], shard: SeqShard = SeqShard(), attention: str = "loop",
                 guidance: float | None = None) -> list[torch.Tensor]:
    """``FluxTransformer2DModel.forward`` for a CSP batch: ``latents[i]`` ``(1, n_i, C)`` (the pipeline's
    2x2-packed latent of token grid ``grids[i]``), ``timesteps[i]`` its step (already divided by 1000, as the
    pipeline passes it), ``guidance`` the embedded guidance (guidance-distilled checkpoints); returns each
    request's prediction ``(1, n_i, C)`` on every rank of the shard's group. RoPE per image: text ids zero,
    image ids its own (row, col) grid (``flux_img_ids``)."""
    from ditplan.models.torch.families import flux_img_ids
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    if model.config.guidance_embeds and guidance is None:
        raise ValueError("flux_forward: this checkpoint embeds guidance (guidance_embeds), so guidance is needed")
    layout = CspLayout(tuple(grids), tuple(c["encoder_hidden_states"].shape[1] for c in conds), shard.size,
                       text_first=True)
    # x_embedder.forward / pos_embed.forward: the Worker's SP hooks on those modules would shard one image
    img = model.x_embedder.forward(torch.cat(latents, dim=1))
    txt = model.context_embedder(torch.cat([c["encoder_hidden_states"] for c in conds], dim=1))
    t = timesteps.to(img.dtype) * 1000
    pooled = torch.cat([c["pooled_projections"] for c in conds])
    if model.config.guidance_embeds:
        temb = model.time_text_embed(t, torch.full_like(t, guidance * 1000), pooled)
    else:
        temb = model.time_text_embed(t, pooled)
    img_rope = [model.pos_embed.forward(flux_img_ids(*g).to(img)) for g in layout.grids]
    txt_rope = [model.pos_embed.forward(torch.zeros(n, 3).to(img)) for n in layout.text_lens]
    img, txt = _local(img, layout.img_local, shard), _local(txt, layout.txt_local, shard)
    rope = [torch.cat([_local(torch.cat([r[j] for r in img_rope])[None], layout.img_local, shard)[0],
                       _local(torch.cat([r[j] for r in txt_rope])[None], layout.txt_local, shard)[0]])
            for j in (0, 1)]  # this rank's (cos, sin): its image run, then its text run
    for block in model.transformer_blocks:
        img, txt = _flux_block(block, img, txt, temb, rope, layout, shard, attention)
    x = torch.cat([img, txt], dim=1)
    owner = torch.cat([layout.local_img_owner(shard.index), layout.local_txt_owner(shard.index)])
    for block in model.single_transformer_blocks:
        x = _flux_single_block(block, x, owner, temb, rope, layout, shard, attention)
    img = x[:, :layout.img_local]
    out = _final(model, img, temb, layout, shard)
    return [out[:, layout.img_offsets[i]:layout.img_offsets[i + 1]] for i in range(layout.requests)]


def _sd3(model, specs, latents, conds, timesteps, shard, attention, cache):
    return sd3_forward(model, latents, conds, timesteps, shard, attention, cache)


def _flux(model, specs, latents, conds, timesteps, shard, attention, cache):
    from ditplan.models.torch.families import Flux
    if cache is not None:
        raise NotImplementedError("the patch cache for FLUX is not implemented (SD3 only)")
    return flux_forward(model, latents, conds, timesteps / 1000, [(s.height // 2, s.width // 2) for s in specs],
                        shard, attention, Flux.guidance)


def _sdxl(model, specs, latents, conds, timesteps, shard, attention, cache):
    if shard.size > 1:
        raise ValueError(f"sdxl has no sequence parallelism: a CSP batch of it runs at degree 1, not {shard.size}")
    if cache is not None:
        raise NotImplementedError("the patch cache for SDXL is not implemented (SD3 only)")
    unet = PatchedUNet(model)
    added = {k: torch.cat([c[k] for c in conds]) for k in ("text_embeds", "time_ids")}
    return unet(latents, timesteps, torch.cat([c["encoder_hidden_states"] for c in conds]), added,
                patch=unet.patch_for([tuple(x.shape[-2:]) for x in latents]))


FORWARDS = {"sd3": _sd3, "flux": _flux, "sdxl": _sdxl}
CSP_FAMILIES = frozenset(FORWARDS)  # families with a packed forward here


def csp_predict(family: str, model, specs, latents, conds, timesteps, shard: SeqShard = SeqShard(),
                attention: str = "loop", cache: PatchCache | None = None) -> list[torch.Tensor]:
    """One backbone call for a CSP batch of ``family``'s requests ``specs`` (``LatentSpec``), each with its latent
    in the family's layout, its embeddings and its scheduler timestep: each request's prediction, as the family's
    ``predict`` gives it alone (see ``sd3_forward``, ``flux_forward``, ``csp_unet.PatchedUNet``)."""
    if family not in FORWARDS:
        raise ValueError(f"family {family!r} has no CSP forward (CSP families: {', '.join(sorted(CSP_FAMILIES))})")
    return FORWARDS[family](model, specs, latents, conds, timesteps, shard, attention, cache)

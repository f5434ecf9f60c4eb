"""Sequence parallelism (Ulysses) for each DiT family: hooks that shard and gather tokens, SP attention processors.

``enable_sequence_parallel(model, family, ctx)`` installs, once, hooks and processors that follow
``ctx`` (``executor/parallel.py``): with a group of size 1 the model runs unchanged; with size P every rank
keeps 1/P of the image tokens from the patch embedding to the final norm (gathered there), with the matching
1/P of the rotary embedding, and each joint or self attention runs through ``SPContext.attention``.

* FLUX (text first) and SD3 (image first): joint attention of text and image tokens.
* CogVideoX: text first, 3D RoPE on the image part (passed in as ``image_rotary_emb``, sharded on entry).
* HunyuanVideo: image first; the dual- and single-stream blocks alike. The text mask must be all ones
  (the encode stage pads nothing); anything else is refused, never approximated.
* Wan: self attention over image tokens only (all-to-all, no text); cross attention to the (replicated)
  text needs no communication: each rank's queries attend to all of it with the stock processor.

The SDXL U-Net has no sequence parallelism (the catalog gives it ``max_sp = 1``).
"""
from __future__ import annotations

import torch

from ditplan.executor.parallel import SPContext

SP_FAMILIES = ("flux", "sd3", "cogvideox", "hunyuanvideo", "wan")


class FluxSPProcessor:
    """diffusers' FluxAttnProcessor with the attention call routed through ``SPContext``."""

    def __init__(self, ctx: SPContext) -> None:
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.ctx.text_len
        hidden_states = self.ctx.attention(query, key, value, text_len, text_first=True)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3SPProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3: image tokens first, text appended) routed through ``SPContext``."""

    def __init__(self, ctx: SPContext) -> None:
        self.ctx = ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x):
            return x.view(b, -1, attn.heads, head_dim)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        # diffusers' norms act on the last dim, so (B, S, H, D) is as good as (B, H, S, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        out = self.ctx.attention(query, key, value, text_len, text_first=False)
        out = out.reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_hidden_states) if encoder_hidden_states is not None else out


class CogVideoXSPProcessor:
    """diffusers' CogVideoXAttnProcessor2_0 (text first, RoPE on the image part) routed through ``SPContext``."""

    def __init__(self, ctx: SPContext, base) -> None:
        self.ctx, self.base = ctx, base

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if self.ctx.size == 1:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        if attention_mask is not None:
            raise NotImplementedError("CogVideoX attention with a mask under sequence parallelism")
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = x.shape[0]
        q, k, v = (proj(x).view(b, x.shape[1], attn.heads, -1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :text_len], apply_rotary_emb(q[:, text_len:], image_rotary_emb, sequence_dim=1)], 1)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :text_len], apply_rotary_emb(k[:, text_len:], image_rotary_emb, sequence_dim=1)],
                              1)
        out = self.ctx.attention(q, k, v, text_len, text_first=True).flatten(2, 3).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, out.shape[1] - text_len], dim=1)
        return hidden_states, encoder_hidden_states


class HunyuanVideoSPProcessor:
    """diffusers' HunyuanVideoAttnProcessor2_0 (image first, text appended; RoPE on the image part) routed
    through ``SPContext``, for the dual-stream (added projections) and single-stream blocks."""

    def __init__(self, ctx: SPContext, base) -> None:
        self.ctx, self.base = ctx, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.ctx.size == 1:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("HunyuanVideo with padded text under sequence parallelism")
        text_len = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        n_img = hidden_states.shape[1]
        if image_rotary_emb is not None:
            q = torch.cat([apply_rotary_emb(q[:, :n_img], image_rotary_emb, sequence_dim=1), q[:, n_img:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :n_img], image_rotary_emb, sequence_dim=1), k[:, n_img:]], dim=1)
        if not single:
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        out = self.ctx.attention(q, k, v, text_len, text_first=False).flatten(2, 3).to(q.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class WanSelfAttentionSPProcessor:
    """diffusers' WanAttnProcessor for the self attention (``attn1``: image tokens only) over ``SPContext``."""

    def __init__(self, ctx: SPContext, base) -> None:
        self.ctx, self.base = ctx, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.ctx.size == 1:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("Wan cross attention or a mask in the self-attention SP processor")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _wan_rope(q, *rotary_emb), _wan_rope(k, *rotary_emb)
        out = self.ctx.attention(q, k, v, 0, text_first=False).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def enable_sequence_parallel(model, family: str, ctx: SPContext) -> None:
    """Install shard/gather hooks and SP attention processors (pass-through while ``ctx.size == 1``)."""
    if getattr(model, "_ditplan_sp", None) is not None:
        return

    def shard_tokens(_mod, _inp, out):
        return ctx.shard(out) if ctx.size > 1 else out

    def shard_rope(dim):
        def hook(_mod, _inp, out):
            return out if ctx.size == 1 else tuple(ctx.shard(x, dim=dim) for x in out)
        return hook

    def gather_first_arg(_mod, args):
        return None if ctx.size == 1 else (ctx.gather(args[0]),) + tuple(args[1:])

    final_norm = model.norm_out if family != "cogvideox" else model.norm_final
    if family == "flux":
        def text_len_hook(_mod, _args, kwargs):
            ctx.text_len = kwargs["encoder_hidden_states"].shape[1]

        def shard_flux_rope(_mod, _inp, out):
            if ctx.size == 1:
                return out
            t = ctx.text_len
            return tuple(torch.cat([x[:t], ctx.shard(x[t:], dim=0)], dim=0) for x in out)

        model.register_forward_pre_hook(text_len_hook, with_kwargs=True)
        model.x_embedder.register_forward_hook(shard_tokens)
        model.pos_embed.register_forward_hook(shard_flux_rope)
        model.set_attn_processor(FluxSPProcessor(ctx))
    elif family == "sd3":
        model.pos_embed.register_forward_hook(shard_tokens)
        model.set_attn_processor(SD3SPProcessor(ctx))
    elif family == "cogvideox":
        def enter(_mod, args, kwargs):  # text length for the patch embedding; this rank's rows of the RoPE
            ctx.text_len = kwargs["encoder_hidden_states"].shape[1]
            rope = kwargs.get("image_rotary_emb")
            if ctx.size > 1 and rope is not None:
                kwargs["image_rotary_emb"] = tuple(ctx.shard(x, dim=0) for x in rope)
            return args, kwargs

        def shard_image_tokens(_mod, _inp, out):  # the patch embedding emits text + image tokens
            if ctx.size == 1:
                return out
            t = ctx.text_len
            return torch.cat([out[:, :t], ctx.shard(out[:, t:])], dim=1)

        model.register_forward_pre_hook(enter, with_kwargs=True)
        model.patch_embed.register_forward_hook(shard_image_tokens)
        for block in model.transformer_blocks:
            block.attn1.set_processor(CogVideoXSPProcessor(ctx, block.attn1.processor))
    elif family == "hunyuanvideo":
        model.x_embedder.register_forward_hook(shard_tokens)
        model.rope.register_forward_hook(shard_rope(0))
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):  # not the token refiner's
            block.attn.set_processor(HunyuanVideoSPProcessor(ctx, block.attn.processor))
    elif family == "wan":
        model.rope.register_forward_hook(shard_rope(1))
        model.blocks[0].register_forward_pre_hook(
            lambda _mod, args: None if ctx.size == 1 else (ctx.shard(args[0]),) + tuple(args[1:]))
        for block in model.blocks:
            block.attn1.set_processor(WanSelfAttentionSPProcessor(ctx, block.attn1.processor))
    else:
        raise NotImplementedError(f"sequence parallelism for {family!r} is not implemented "
                                  f"(families with it: {', '.join(SP_FAMILIES)})")
    final_norm.register_forward_pre_hook(gather_first_arg)
    model._ditplan_sp = ctx

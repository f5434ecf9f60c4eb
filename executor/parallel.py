"""Process groups for every aligned block, and sequence-parallel (Ulysses) attention for diffusers DiTs.

``BlockGroups`` creates, once at start-up and collectively on every rank, a process group for each aligned
block of k ranks (k in 1, 2, 4, 8 within the world), so moving a request to another degree only switches
the group it runs on: nothing is re-initialised (xfuser's runtime would have to be torn down instead).

``enable_sequence_parallel(model, ctx)`` installs, once, hooks and attention processors that follow
``ctx.group``: with a group of size 1 the model runs unchanged; with size P every rank of the group
keeps 1/P of the image tokens from the patch embedding to the final norm (gathered there), and each
attention runs through yunchang's ``LongContextAttention`` (TORCH_MATH on CPU; xfuser's
``xFuserLongContextAttention`` when CUDA is present). Text tokens stay replicated; each rank feeds its
1/P slice of them into the all-to-all (the key sequence comes out permuted, which full attention does not
see) and the text outputs are all-gathered back. The text length must therefore be divisible by P.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ditplan.models.catalog import SP_DEGREES

DEGREES = SP_DEGREES


def aligned_blocks(world: int) -> list[tuple[int, ...]]:
    return [tuple(range(s, s + k)) for k in DEGREES if k <= world for s in range(0, world - k + 1, k)]


class BlockGroups:
    """One process group per aligned block; must be constructed by all ranks (collective)."""

    def __init__(self, rank: int, world: int) -> None:
        from yunchang import set_seq_parallel_pg
        self.rank, self.world = rank, world
        set_seq_parallel_pg(world, 1, rank, world)  # yunchang's globals (LongContextAttention asserts them)
        self.groups: dict[tuple[int, ...], object] = {}
        for ranks in aligned_blocks(world):
            g = dist.new_group(list(ranks))
            if rank in ranks:
                self.groups[ranks] = g
        self._attn: dict[tuple[int, ...], torch.nn.Module] = {}

    def group(self, ranks) -> object:
        ranks = tuple(ranks)
        if ranks not in self.groups:
            raise ValueError(f"rank {self.rank}: {ranks} is not an aligned block containing this rank")
        return self.groups[ranks]

    def long_context_attention(self, ranks):
        """yunchang (CPU) or xfuser (CUDA) long-context attention bound to this block's group."""
        ranks = tuple(ranks)
        if ranks not in self._attn:
            from yunchang import LongContextAttention
            from yunchang.kernels import AttnType
            attn, call = None, None
            if torch.cuda.is_available():  # xfuser cannot even be imported without an accelerator
                try:
                    from xfuser.core.long_ctx_attention import xFuserLongContextAttention
                    attn = xFuserLongContextAttention()
                    call = attn  # forward(attn_layer, q, k, v): no KV cache here, so None
                except ImportError:  # untested path (no GPU in CI): yunchang's SDPA kernel instead
                    attn = LongContextAttention(attn_type=AttnType.TORCH_EFFICIENT)
            else:
                attn = LongContextAttention(attn_type=AttnType.TORCH_MATH)
            attn.ulysses_pg = self.group(ranks)
            attn.ring_pg = self.group((self.rank,))  # ring degree 1
            self._attn[ranks] = (lambda q, k, v: call(None, q, k, v)) if call is not None else attn
        return self._attn[ranks]


class SPContext:
    """Which group the model currently runs on (set by the runner before each call)."""

    def __init__(self, groups: BlockGroups | None = None) -> None:
        self.groups = groups
        self.ranks: tuple[int, ...] = (0,)
        self.text_len = 0
        self.sp_calls = 0  # attention calls that went through LongContextAttention

    def use(self, ranks) -> None:
        self.ranks = tuple(ranks)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        return self.ranks.index(self.groups.rank)

    @property
    def pg(self):
        return self.groups.group(self.ranks)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        n = x.shape[dim]
        if n % self.size:
            raise ValueError(f"{n} tokens do not split over SP degree {self.size}")
        return x.narrow(dim, self.index * (n // self.size), n // self.size)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.pg)
        return torch.cat(parts, dim=dim)

    def attention(self, q, k, v, text_len: int, text_first: bool) -> torch.Tensor:
        """Full attention over (B, S_local, H, D) q/k/v whose sequence is text + local image tokens."""
        if self.size == 1:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        def split(x):
            if text_first:
                return x[:, :text_len], x[:, text_len:]
            return x[:, x.shape[1] - text_len:], x[:, :x.shape[1] - text_len]

        self.sp_calls += 1
        local = []
        for x in (q, k, v):
            txt, img = split(x)
            local.append(torch.cat([self.shard(txt), img], dim=1).contiguous())
        out = self.groups.long_context_attention(self.ranks)(*local)
        t = text_len // self.size
        txt_out = self.gather(out[:, :t])
        img_out = out[:, t:]
        return torch.cat([txt_out, img_out] if text_first else [img_out, txt_out], dim=1)


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


def enable_sequence_parallel(model, family: str, ctx: SPContext) -> None:
    """Install shard/gather hooks and SP attention processors (pass-through while ``ctx.size == 1``)."""
    if getattr(model, "_ditplan_sp", None) is not None:
        return

    def shard_tokens(_mod, _inp, out):
        return ctx.shard(out) if ctx.size > 1 else out

    def gather_before_norm(_mod, args):
        if ctx.size == 1:
            return None
        return (ctx.gather(args[0]),) + tuple(args[1:])

    if family == "flux":
        def text_len_hook(_mod, _args, kwargs):
            ctx.text_len = kwargs["encoder_hidden_states"].shape[1]

        def shard_rope(_mod, _inp, out):
            if ctx.size == 1:
                return out
            t = ctx.text_len
            return tuple(torch.cat([x[:t], ctx.shard(x[t:], dim=0)], dim=0) for x in out)

        model.register_forward_pre_hook(text_len_hook, with_kwargs=True)
        model.x_embedder.register_forward_hook(shard_tokens)
        model.pos_embed.register_forward_hook(shard_rope)
        model.set_attn_processor(FluxSPProcessor(ctx))
    elif family == "sd3":
        model.pos_embed.register_forward_hook(shard_tokens)
        model.set_attn_processor(SD3SPProcessor(ctx))
    else:
        raise NotImplementedError(f"sequence parallelism for {family!r} is not implemented yet")
    model.norm_out.register_forward_pre_hook(gather_before_norm)
    model._ditplan_sp = ctx

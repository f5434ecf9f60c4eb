"""Process groups for every aligned block, and the sequence-parallel (Ulysses) context the DiTs run in.

``BlockGroups`` creates, once at start-up and collectively on every rank, a process group for each aligned
block of k ranks (k in 1, 2, 4, 8 within the world), so moving a request to another degree only switches
the group it runs on: nothing is re-initialised (xfuser's runtime would have to be torn down instead).

``SPContext`` is the group a model runs on now; its ``attention`` is full attention over text + image
tokens of which this rank holds 1/P of the image ones, through yunchang's ``LongContextAttention``
(TORCH_MATH on CPU; xfuser's ``xFuserLongContextAttention`` when CUDA is present). Text tokens stay
replicated; each rank feeds its 1/P slice of them into the all-to-all (the key sequence comes out permuted,
which full attention does not see) and the text outputs are all-gathered back, so the text length must
divide by P. The hooks and processors that use it per family are in ``sequence_parallel.py``.
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
        if text_len == 0:  # self-attention over image tokens only (Wan)
            return self.groups.long_context_attention(self.ranks)(q.contiguous(), k.contiguous(), v.contiguous())
        local = []
        for x in (q, k, v):
            txt, img = split(x)
            local.append(torch.cat([self.shard(txt), img], dim=1).contiguous())
        out = self.groups.long_context_attention(self.ranks)(*local)
        t = text_len // self.size
        txt_out = self.gather(out[:, :t])
        img_out = out[:, t:]
        return torch.cat([txt_out, img_out] if text_first else [img_out, txt_out], dim=1)

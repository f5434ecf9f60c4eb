"""Patch-level cache reuse across denoising steps (PatchedServe, arXiv 2501.09253).

An image's token grid is cut into square patches of ``CachePolicy.patch`` x ``patch`` tokens (edge patches are
smaller; SD3's 2x2 latent patchify makes 16 tokens = 32 latent pixels = PatchedServe's 256-pixel patch). For
every transformer block and patch, a request's ``RequestCache`` keeps the block's input, output, keys and
values from the last step that computed the patch. At the next step the patch is skipped (its cached output
reused, its tokens left out of the block's linear layers, MLP and attention queries) when its block input
changed by a *relative L2* below ``threshold`` since then, ``||x - x_cached|| / ||x_cached||`` over the patch's
tokens and channels, unless it has been skipped ``max_skips`` times in a row: then it is recomputed.

The kept tokens of an image still attend over the whole image: a skipped patch contributes the keys and values
cached when it was last computed (not the current hidden states, which would cost their projections). Text
tokens are always computed. At ``threshold=0`` nothing is skipped (the test is strict) and the packed forward
is the uncached one bit for bit; ``max_skips=0`` never skips either. Degree 1 only (no sequence parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CachePolicy:
    """Reuse a patch's cached block output when its block input's relative L2 change is below ``threshold``,
    at most ``max_skips`` steps in a row; ``patch``: the patch side in tokens."""

    threshold: float
    max_skips: int
    patch: int = 16

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"CachePolicy.threshold must be >= 0, not {self.threshold!r}")
        if self.max_skips < 0:
            raise ValueError(f"CachePolicy.max_skips must be >= 0, not {self.max_skips!r}")
        if self.patch < 1:
            raise ValueError(f"CachePolicy.patch must be >= 1, not {self.patch!r}")


def patch_ids(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The patch of every token of a row-major ``(rows, cols)`` token grid."""
    rows, cols = grid
    r, c = torch.arange(rows)[:, None] // patch, torch.arange(cols)[None, :] // patch
    return (r * -(-cols // patch) + c).reshape(-1)


@dataclass
class _Block:
    """One block's cached state, of one request (views into a batch's packed state) or packed for a batch."""

    inp: torch.Tensor  # (n, D) block input when each patch was last computed
    out: torch.Tensor  # (n, D) its block output
    k: torch.Tensor  # (n, H, Dh) its attention keys and values
    v: torch.Tensor
    skips: torch.Tensor  # (patches,) consecutive skips
    valid: torch.Tensor | None = None  # packed: (patches,) the patch has a cached state
    norm2: torch.Tensor | None = None  # packed: (patches,) squared L2 norm of the cached input


@dataclass
class RequestCache:
    """One request's cached blocks and its counts of patch-blocks computed and skipped."""

    policy: CachePolicy
    grid: tuple[int, int] | None = None
    blocks: dict[int, _Block] = field(default_factory=dict)
    computed: int = 0
    skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        total = self.computed + self.skipped
        return self.skipped / total if total else 0.0


class PatchCache:
    """The patch caches of one CSP batch over the steps of a run: ``members[i]`` is request i's ``RequestCache``
    (None: no cache, every token computed). The state is kept packed (one tensor per block for the whole batch,
    so a step costs a few tensor ops per block whatever the batch size); each member's ``blocks`` are views
    into it, so a request's state outlives the batch (a later run, in another batch, packs it again)."""

    def __init__(self, members: list[RequestCache | None]) -> None:
        self.members = members
        self.layout = None
        self.blocks: dict[int, _Block] = {}
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, layout) -> None:
        """Bind to a forward's ``CspLayout`` (degree 1); the next step of the same batch keeps the packed state."""
        if layout.requests != len(self.members):
            raise ValueError(f"PatchCache of {len(self.members)} requests for a batch of {layout.requests}")
        if layout == self.layout:
            return
        self.layout = layout
        pids, spans, thr, cap, owner = [], [], [], [], []
        base = 0
        for i, (m, grid) in enumerate(zip(self.members, layout.grids)):
            if m is not None and m.grid != grid:  # a new shape: nothing cached applies
                m.grid, m.blocks = grid, {}
            pid = patch_ids(grid, m.policy.patch) if m is not None else torch.zeros(grid[0] * grid[1], dtype=torch.long)
            n = int(pid.max()) + 1
            pids.append(pid + base)
            spans.append(slice(base, base + n))
            thr.append(torch.full((n,), m.policy.threshold if m is not None else 0.0))
            cap.append(torch.full((n,), m.policy.max_skips if m is not None else 0))
            owner.append(torch.full((n,), i))
            base += n
        self._pid, self._pspans = torch.cat(pids), spans
        self._thr, self._cap, self._owner = torch.cat(thr), torch.cat(cap), torch.cat(owner)
        self._cached = torch.cat([torch.full((s.stop - s.start,), m is not None) for m, s in zip(self.members, spans)])
        self._kv = {}
        held = sorted(set().union(*(m.blocks for m in self.members if m is not None)))
        self.blocks = {index: self._pack(index) for index in held}

    def _span(self, i: int) -> slice:
        return slice(self.layout.img_offsets[i], self.layout.img_offsets[i + 1])

    def _pack(self, index: int) -> _Block:
        """Block ``index``'s state for the batch from its members' (placeholders where a member has none)."""
        have = next(m.blocks[index] for m in self.members if m is not None and index in m.blocks)
        parts, valid = [], []
        for i, m in enumerate(self.members):
            st = None if m is None else m.blocks.get(index)
            if st is None:
                n, p = self._span(i).stop - self._span(i).start, self._pspans[i].stop - self._pspans[i].start
                st = _Block(have.inp.new_zeros(n, have.inp.shape[1]), have.out.new_zeros(n, have.out.shape[1]),
                            have.k.new_zeros(n, *have.k.shape[1:]), have.v.new_zeros(n, *have.v.shape[1:]),
                            torch.zeros(p, dtype=torch.long))
            parts.append(st)
            valid.append(torch.full(st.skips.shape, m is not None and index in m.blocks))
        packed = _Block(*(torch.cat([getattr(p, f) for p in parts]) for f in ("inp", "out", "k", "v", "skips")),
                        valid=torch.cat(valid))
        packed.norm2 = self._norm2(packed.inp)
        return packed

    def _norm2(self, x: torch.Tensor) -> torch.Tensor:
        """Per patch, the squared L2 norm of ``x`` (packed image tokens), on the host with the other per-patch
        state (the tokens' positions index device tensors from there)."""
        pid = self._pid.to(x.device)
        return torch.zeros(self._thr.shape[0], device=x.device).index_add_(0, pid, x.float().square().sum(-1)).cpu()

    def keep(self, index: int, img: torch.Tensor) -> torch.Tensor | None:
        """Packed positions of the image tokens block ``index`` computes now (``img``: its full input); None when
        it computes all of them."""
        st = self.blocks.get(index)
        skip = torch.zeros(self._thr.shape[0], dtype=torch.bool)
        if st is not None:
            diff2 = self._norm2(img[0] - st.inp)
            skip = (diff2.sqrt() < self._thr * st.norm2.sqrt()) & (st.skips < self._cap) & st.valid
            st.skips = torch.where(skip, st.skips + 1, torch.zeros_like(st.skips))
        skipped = torch.zeros(len(self.members), dtype=torch.long).index_add_(0, self._owner, skip.long()).tolist()
        for m, n_skip, span in zip(self.members, skipped, self._pspans):
            if m is not None:
                m.skipped += n_skip
                m.computed += span.stop - span.start - n_skip
        return (~skip)[self._pid].nonzero().squeeze(1) if any(skipped) else None

    def kv(self, index: int, keep: torch.Tensor | None, k: torch.Tensor,
           v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``(1, n, H, Dh)`` of every image token: the fresh ``k``/``v`` of the tokens at
        ``keep`` (None: all), the cached ones elsewhere."""
        if keep is not None:
            st = self.blocks[index]
            k, v = st.k.index_put((keep,), k[0])[None], st.v.index_put((keep,), v[0])[None]
        self._kv[index] = (k, v)
        return k, v

    def store(self, index: int, full: torch.Tensor, keep: torch.Tensor | None,
              computed: torch.Tensor) -> torch.Tensor:
        """The block's packed output: ``computed`` at ``keep`` (None: everywhere), the cached output elsewhere;
        caches it with the block's input, keys and values (``out``, ``k`` and ``v`` are new tensors every step,
        so they are kept as they are; the input is the previous block's output: copied)."""
        k, v = self._kv.pop(index)
        st = self.blocks.get(index)
        if st is None:
            st = self.blocks[index] = _Block(full[0].clone(), computed[0], k[0], v[0],
                                             torch.zeros(self._thr.shape[0], dtype=torch.long))
            out = computed
        elif keep is None:
            st.inp, st.out, st.k, st.v, out = full[0].clone(), computed[0], k[0], v[0], computed
        else:
            out = st.out.index_put((keep,), computed[0])[None]
            st.inp[keep] = full[0, keep]
            st.out, st.k, st.v = out[0], k[0], v[0]
        st.valid, st.norm2 = self._cached, self._norm2(st.inp)
        for i, m in enumerate(self.members):  # each member's views
            if m is not None:
                span, ps = self._span(i), self._pspans[i]
                m.blocks[index] = _Block(st.inp[span], st.out[span], st.k[span], st.v[span], st.skips[ps])
        return out

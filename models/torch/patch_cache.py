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
    inp: torch.Tensor  # (n, D) block input when each patch was last computed
    out: torch.Tensor  # (n, D) its block output
    k: torch.Tensor  # (n, H, Dh) its attention keys and values
    v: torch.Tensor
    skips: torch.Tensor  # (patches,) consecutive skips


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
    """The patch caches of one CSP batch, one forward at a time: ``members[i]`` is request i's ``RequestCache``
    (None: no cache, every token computed)."""

    def __init__(self, members: list[RequestCache | None]) -> None:
        self.members = members

    def begin(self, layout) -> None:
        """Bind to a forward's ``CspLayout`` (degree 1)."""
        if layout.requests != len(self.members):
            raise ValueError(f"PatchCache of {len(self.members)} requests for a batch of {layout.requests}")
        self.layout = layout
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._patches = []
        for m, grid in zip(self.members, layout.grids):
            if m is not None:
                if m.grid != grid:  # a new shape: nothing cached applies
                    m.grid, m.blocks = grid, {}
                self._patches.append(patch_ids(grid, m.policy.patch))
            else:
                self._patches.append(None)

    def _span(self, i: int) -> slice:
        return slice(self.layout.img_offsets[i], self.layout.img_offsets[i + 1])

    def keep(self, index: int, img: torch.Tensor) -> torch.Tensor:
        """Packed positions of the image tokens block ``index`` computes now (``img``: its full input)."""
        kept = []
        for i, m in enumerate(self.members):
            span = self._span(i)
            n = span.stop - span.start
            st = None if m is None else m.blocks.get(index)
            if m is None:
                kept.append(torch.ones(n, dtype=torch.bool))
                continue
            pid = self._patches[i]
            n_patches = int(pid.max()) + 1
            if st is None:
                skip = torch.zeros(n_patches, dtype=torch.bool)
            else:
                x = img[0, span].float()
                diff = torch.zeros(n_patches).index_add_(0, pid, (x - st.inp.float()).square().sum(-1))
                ref = torch.zeros(n_patches).index_add_(0, pid, st.inp.float().square().sum(-1))
                skip = (diff.sqrt() < m.policy.threshold * ref.sqrt()) & (st.skips < m.policy.max_skips)
                st.skips = torch.where(skip, st.skips + 1, torch.zeros_like(st.skips))
            m.skipped += int(skip.sum())
            m.computed += n_patches - int(skip.sum())
            kept.append(~skip[pid])
        return torch.cat(kept).nonzero().squeeze(1)

    def kv(self, index: int, heads: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(1, n, heads, head_dim)`` key and value buffers holding the cached ones (zeros where none:
        those tokens are computed now); the attention writes the kept tokens' fresh keys and values into them."""
        ks, vs = [], []
        for i, m in enumerate(self.members):
            st = None if m is None else m.blocks.get(index)
            if st is None:
                span = self._span(i)
                st = _Block(None, None, like.new_zeros(span.stop - span.start, heads, head_dim),
                            like.new_zeros(span.stop - span.start, heads, head_dim), None)
            ks.append(st.k)
            vs.append(st.v)
        self._kv[index] = (torch.cat(ks)[None], torch.cat(vs)[None])
        return self._kv[index]

    def store(self, index: int, full: torch.Tensor, keep: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        """The block's full packed output: ``computed`` at ``keep``, the cached output elsewhere; caches it."""
        outs = []
        for i, m in enumerate(self.members):
            st = None if m is None else m.blocks.get(index)
            span = self._span(i)
            outs.append(full.new_zeros(span.stop - span.start, full.shape[2]) if st is None else st.out)
        out = torch.cat(outs)[None]
        out[:, keep] = computed
        k, v = self._kv.pop(index)
        kept = torch.zeros(full.shape[1], dtype=torch.bool)
        kept[keep] = True
        for i, m in enumerate(self.members):
            if m is None:
                continue
            span = self._span(i)
            st = m.blocks.get(index)
            if st is None:
                n_patches = int(self._patches[i].max()) + 1
                m.blocks[index] = _Block(full[0, span].clone(), out[0, span].clone(), k[0, span].clone(),
                                         v[0, span].clone(), torch.zeros(n_patches, dtype=torch.long))
                continue
            mask = kept[span]
            st.inp[mask] = full[0, span][mask]
            st.out, st.k, st.v = out[0, span].clone(), k[0, span].clone(), v[0, span].clone()
        return out

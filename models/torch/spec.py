"""What the executor knows about one request before any module runs: latent sizes, steps, seed."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

TEXT_LEN = 8  # prompt tokens per text encoder (divisible by every SP degree, 1 to 8)
VAE_TEMPORAL = 4  # frames per latent frame after the first, in every video VAE of the catalog (tiny ones too)


@dataclass(frozen=True)
class LatentSpec:
    """A request in latent-space sizes (the VAE's latent grid, not pixels); ``frames`` in pixel frames."""

    rid: str
    family: str
    height: int  # latent rows
    width: int  # latent cols
    steps: int
    seed: int = 0
    frames: int = 1

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL + 1


def prompt_ids(spec: LatentSpec, slot: str, config) -> torch.Tensor:
    """The prompt as token ids for one text encoder: drawn from the request's seed (requests carry no prompt
    text), ``TEXT_LEN`` long, ending with the encoder's end-of-text id where it has one (CLIP pools there)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{spec.seed}/{slot}".encode()))
    vocab = config.vocab_size
    ids = torch.randint(2, vocab - 1, (1, TEXT_LEN), generator=g)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[0, -1] = eos
    return ids

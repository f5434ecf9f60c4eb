"""Decoded pixels on disk: ``DIR/<request id>.png`` for an image, ``DIR/<request id>/frame_0000.png``, ... for a video.

A request id that is not a plain file name (letters, digits, ``.``, ``_``, ``-``; not starting with ``.``)
is written under its sanitised form plus the CRC32 of the id, so two ids never share a file.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def file_stem(rid: str) -> str:
    if _PLAIN.fullmatch(rid):
        return rid
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', rid).lstrip('.')[:64]}-{zlib.crc32(rid.encode()):08x}"


def write_frames(out_dir: str | Path, rid: str, frames: np.ndarray) -> list[Path]:
    """``frames``: uint8 ``(F, H, W, 3)``; one PNG for F = 1, else a folder of numbered frames."""
    from PIL import Image
    out_dir = Path(out_dir)
    if len(frames) == 1:
        paths = [out_dir / f"{file_stem(rid)}.png"]
    else:
        paths = [out_dir / file_stem(rid) / f"frame_{i:04d}.png" for i in range(len(frames))]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for frame, path in zip(frames, paths):
        Image.fromarray(frame).save(path)
    return paths

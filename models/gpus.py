"""GPU kinds: peak dense bf16 FLOP/s, memory bandwidth, memory, links.

Peaks are vendor datasheet figures (dense, no sparsity). ``link_bw`` is the
per-direction bandwidth of the fast intra-node link between GPUs that have
one; ``pcie_bw`` applies otherwise, and to weight loads from host memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GiB = 1024**3


@dataclass(frozen=True)
class GpuKind:
    name: str
    bf16_flops: float
    mem_bw: float  # bytes/s
    memory: int  # bytes
    link: Literal["nvswitch", "nvlink-pairs", "pcie"]
    link_bw: float  # bytes/s per direction on the fast link
    pcie_bw: float  # bytes/s per direction
    internode_bw: float = 50e9  # 400 Gb/s NIC per GPU

    @property
    def load_bw(self) -> float:
        """Bytes/s of a weight load: host (pinned) memory to the GPU over its PCIe link."""
        return self.pcie_bw


GPU_KINDS: dict[str, GpuKind] = {g.name: g for g in (
    GpuKind("H100", bf16_flops=989e12, mem_bw=3.35e12, memory=80 * GiB,
            link="nvswitch", link_bw=450e9, pcie_bw=64e9),
    GpuKind("H200", bf16_flops=989e12, mem_bw=4.8e12, memory=141 * GiB,
            link="nvswitch", link_bw=450e9, pcie_bw=64e9),
    GpuKind("A40", bf16_flops=149.7e12, mem_bw=696e9, memory=48 * GiB,
            link="nvlink-pairs", link_bw=56.25e9, pcie_bw=32e9, internode_bw=25e9),
    GpuKind("L20", bf16_flops=119.5e12, mem_bw=864e9, memory=48 * GiB,
            link="pcie", link_bw=32e9, pcie_bw=32e9, internode_bw=25e9),
)}


def get_gpu(name: str) -> GpuKind:
    key = name.upper()
    if key not in GPU_KINDS:
        raise KeyError(f"unknown GPU kind {name!r}; known: {', '.join(GPU_KINDS)}")
    return GPU_KINDS[key]

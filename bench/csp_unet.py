"""CSP patches on a U-Net: the patched mixed-resolution forward (models/torch/csp_unet.py) against each image
run alone through diffusers' own forward, on one seeded U-Net in this process.

The U-Net is the SDXL layout a size up from the family's tiny one (``CONFIG``: three levels as SDXL has,
DownBlock2D + 2 CrossAttnDownBlock2D, two downsamplers, 1-2 transformer layers per level, linear
projections, text_time added embedding), so a patch of ``--patch`` latent pixels becomes patch/2 and patch/4
deeper down and every image has several patches at every level.

Reported per image size: the patched output's error against the image alone (max abs, relative L2), with
the halo and without it (each patch zero-padded on its own); and the time of one patched forward of the
whole mixed batch against the sum of the images' forwards alone (one request per call, as a U-Net server
without patches must run mixed sizes), medians over ``--repeats`` interleaved repetitions after one warm-up,
and their ratio (> 1: the patched batch is faster); the patched forward without the halo is timed too,
for what the stitching costs.
Usage: python -m bench.csp_unet [--sizes 32x32,48x48,32x64,64x64] [--patch 16] [--repeats 7] [--threads 1]
       [--json out/csp_unet.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ditplan.models.torch.csp_unet import PatchedUNet

CONFIG = dict(block_out_channels=(32, 64, 128), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 8),
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=16,
              transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=6 * 16 + 64,
              cross_attention_dim=64, norm_num_groups=8)
TEXT_TOKENS, POOLED = 16, 64


def build_unet(seed: int = 0):
    import diffusers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**CONFIG)
    return unet.eval().requires_grad_(False)


def make_batch(sizes: list[tuple[int, int]], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = len(sizes)
    latents = [torch.randn(1, 4, h, w, generator=g) for h, w in sizes]
    timesteps = torch.linspace(999, 1, n).round()
    text = torch.randn(n, TEXT_TOKENS, CONFIG["cross_attention_dim"], generator=g)
    time_ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w] for h, w in sizes], dtype=torch.float32)
    return latents, timesteps, text, {"text_embeds": torch.randn(n, POOLED, generator=g), "time_ids": time_ids}


def alone(unet, latents, timesteps, text, added) -> list[torch.Tensor]:
    return [unet(x, timesteps[r:r + 1], encoder_hidden_states=text[r:r + 1],
                 added_cond_kwargs={k: v[r:r + 1] for k, v in added.items()}).sample for r, x in enumerate(latents)]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a list like 32x32,48x64") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes("32x32,48x48,32x64,64x64"),
                    help="latent sizes (h x w latent pixels) of the mixed batch")
    ap.add_argument("--patch", type=int, default=16, help="patch side in latent pixels (PatchedServe: 32)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_unet()
    patched, naive = PatchedUNet(unet), PatchedUNet(unet, halo=False)
    batch = make_batch(args.sizes)
    layout = patched.layout(args.sizes, args.patch)

    with torch.no_grad():
        ref = alone(unet, *batch)
        out, out_naive = patched(*batch, patch=args.patch), naive(*batch, patch=args.patch)
        t_alone, t_patched, t_naive = [], [], []
        for i in range(args.repeats + 1):  # the first repetition warms up and is dropped
            ta, _ = timed(lambda: alone(unet, *batch))
            tp, _ = timed(lambda: patched(*batch, patch=args.patch))
            tn, _ = timed(lambda: naive(*batch, patch=args.patch))
            if i:
                t_alone.append(ta)
                t_patched.append(tp)
                t_naive.append(tn)

    rows = []
    for r, (h, w) in enumerate(args.sizes):
        d, d0 = out[r] - ref[r], out_naive[r] - ref[r]
        rows.append({"height": h, "width": w, "patches": layout.offsets[r + 1] - layout.offsets[r],
                     "halo_max_abs": d.abs().max().item(), "halo_rel_l2": (d.norm() / ref[r].norm()).item(),
                     "no_halo_max_abs": d0.abs().max().item(), "no_halo_rel_l2": (d0.norm() / ref[r].norm()).item()})
    ma, mp, mn = (statistics.median(t) for t in (t_alone, t_patched, t_naive))
    print(f"U-Net {CONFIG['block_out_channels']} x{CONFIG['layers_per_block']} layers, patch {args.patch} latent px "
          f"({layout.patches} patches), {args.repeats} repeats, {args.threads} thread(s), float32")
    print(f"{'latent':>8}{'patches':>9}{'halo max abs':>14}{'halo rel L2':>13}{'no-halo max abs':>17}"
          f"{'no-halo rel L2':>16}")
    for x in rows:
        print(f"{x['height']:>4}x{x['width']:<3}{x['patches']:>9}{x['halo_max_abs']:>14.2e}{x['halo_rel_l2']:>13.2e}"
              f"{x['no_halo_max_abs']:>17.3f}{x['no_halo_rel_l2']:>16.3f}")
    print(f"{'forward of the mixed batch':<34}{'median ms':>10}")
    print(f"{'each image alone (sum)':<34}{ma * 1e3:>10.1f}")
    print(f"{'patched, one batch':<34}{mp * 1e3:>10.1f}")
    print(f"{'patched, no halo (inexact)':<34}{mn * 1e3:>10.1f}")
    print(f"throughput ratio patched / alone {ma / mp:.3f}; the halo costs {(mp - mn) / mp:.1%} of the patched forward")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()}, "patch": args.patch,
            "threads": args.threads, "repeats": args.repeats, "sizes": rows,
            "alone_ms": [t * 1e3 for t in t_alone], "patched_ms": [t * 1e3 for t in t_patched],
            "no_halo_ms": [t * 1e3 for t in t_naive], "median_alone_ms": ma * 1e3, "median_patched_ms": mp * 1e3,
            "median_no_halo_ms": mn * 1e3, "throughput_ratio": ma / mp}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

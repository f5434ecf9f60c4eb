"""PNG plots: SLO attainment per policy, and a Gantt chart of GPUs over time."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from planner.simulator import SimResult  # noqa: E402

STAGE_COLORS = {"encode": "#bdbdbd", "decode": "#636363"}


def plot_attainment(summaries: dict[str, dict], path: str | Path, title: str = "") -> Path:
    names = list(summaries)
    series = [("all", [summaries[n]["slo_attainment"] or 0 for n in names])]
    for kind in ("image", "video"):
        vals = [summaries[n]["slo_attainment_by_kind"].get(kind) for n in names]
        if any(v is not None for v in vals):
            series.append((kind, [v or 0 for v in vals]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, vals, width, label=label)
        if label == "all":
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("SLO attainment")
    ax.set_title(title or "SLO attainment by policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_gantt(result: SimResult, n_gpus: int, path: str | Path, title: str = "") -> Path:
    """GPUs over time; diffuse work coloured per request (hatched for video)."""
    index = {s.id: i for i, s in enumerate(result.requests)}
    kinds = {s.id: s.request.kind for s in result.requests}
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (14, 15)]  # no greys
    fig, ax = plt.subplots(figsize=(11, 0.35 * n_gpus + 1.5))
    for seg in result.segments:
        lead = seg.request_ids[0]
        color = STAGE_COLORS.get(seg.stage.value) or palette[index[lead] % len(palette)]
        hatch = "///" if seg.stage.value == "diffuse" and kinds[lead] == "video" else None
        for g in seg.gpus:
            ax.broken_barh([(seg.start, seg.end - seg.start)], (g - 0.4, 0.8),
                           facecolors=color, edgecolors="none", hatch=hatch)
    ax.set_yticks(range(n_gpus), [f"GPU {g}" for g in range(n_gpus)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{result.policy}: GPUs over time (colour = request)")
    handles = [Patch(facecolor="white", edgecolor="black", label="diffuse: image"),
               Patch(facecolor="white", edgecolor="black", hatch="///", label="diffuse: video")]
    handles += [Patch(color=c, label=s) for s, c in STAGE_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper right", ncols=4)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

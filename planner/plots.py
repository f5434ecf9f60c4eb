"""PNG plots: SLO attainment per policy, and a Gantt chart of GPUs over time."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from planner.simulator import SimResult  # noqa: E402

STAGE_COLORS = {"encode": "#9ecae1", "decode": "#fdae6b"}
KIND_COLORS = {"image": "#3182bd", "video": "#e6550d"}


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
    kinds = {s.id: s.request.kind for s in result.requests}
    fig, ax = plt.subplots(figsize=(11, 0.35 * n_gpus + 1.5))
    for seg in result.segments:
        stage = seg.stage.value
        color = STAGE_COLORS.get(stage) or KIND_COLORS[kinds[seg.request_ids[0]]]
        for g in seg.gpus:
            ax.broken_barh([(seg.start, seg.end - seg.start)], (g - 0.4, 0.8),
                           facecolors=color, edgecolors="white", linewidth=0.2)
    ax.set_yticks(range(n_gpus), [f"GPU {g}" for g in range(n_gpus)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{result.policy}: GPUs over time")
    handles = [Patch(color=c, label=f"diffuse ({k})") for k, c in KIND_COLORS.items()]
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

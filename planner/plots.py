"""PNG plots: SLO attainment per policy, and a Gantt chart of GPUs over time.

The Gantt chart draws in one pass: every bar of one layer (weight loads,
image diffuse, video diffuse, encode, decode) across all GPUs goes into one
``PolyCollection``, the missed-deadline marks into one line, the node
boundaries into one ``LineCollection``. The artist count is therefore a small
constant (plus one label per node), whatever the number of segments, and
20,000 requests draw in seconds.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ditplan.planner.request import RequestState  # noqa: E402
from ditplan.planner.sim_result import SimResult  # noqa: E402

STAGE_COLORS = {"encode": "#bdbdbd", "decode": "#636363"}
LOAD_COLOR = "#fdd0a2"
OUTCOME_COLORS = {"on time": "#4daf4a", "late": "#e41a1c", "unfinished": "#984ea3"}
MISS_MARK = "#b10026"
# A filled cross with a white rim: visible on any bar colour, the red of late bars included.
MISS_STYLE = dict(marker="X", markersize=6, markerfacecolor=MISS_MARK, markeredgecolor="white", markeredgewidth=0.6)
COLOR_BY = ("class", "outcome")
MAX_CLASSES = 12  # the classes with the most diffuse GPU-seconds get a colour; the rest share "other"
OTHER_COLOR = "#9ecae1"
DPI = 110
MIN_STAGE_PX = 1.5  # encode and decode bars are at least this wide, so they show at any time scale;
THIN_ROW = 0.27  # the widened ones fill only this much of the row (its lower third), not hiding diffuse work
# Class colours: tab20 without its greys (greys are encode and decode).
PALETTE = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (14, 15)]


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


def gantt_bars(result: SimResult) -> int:
    """How many bars the Gantt chart of ``result`` draws (one per segment per GPU), for progress messages."""
    return sum(len(s.gpus) for s in result.segments)


def _outcome(status) -> str:
    if status.met:
        return "on time"
    return "late" if status.state is RequestState.DONE else "unfinished"


def _class_label(req) -> str:
    return f"{req.model} {req.shape}"


def _nodes_of(cluster) -> tuple[int, tuple[tuple[int, ...], ...]]:
    if isinstance(cluster, int):
        return cluster, (tuple(range(cluster)),)
    return cluster.size, tuple(cluster.nodes)


def gantt_figure(result: SimResult, cluster, title: str = "", color_by: str = "class"):
    """The Gantt figure of ``result`` (not saved): GPUs over time.

    ``cluster`` is a ``Cluster`` (node boundaries drawn) or a GPU count.
    ``color_by``: ``class`` colours diffuse work by request class (model and
    shape), ``outcome`` by on time / late / unfinished. Either way, hatching
    marks video, grey bars are encode (light) and decode (dark); those
    shorter than ``MIN_STAGE_PX`` pixels are widened to it in the lower third
    of their row, so they show at long time scales without hiding the
    diffuse work. A cross marks where every request that missed its deadline
    finished (or last ran); the title counts them.
    """
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by {color_by!r} is unknown; use {' or '.join(COLOR_BY)}")
    n_gpus, nodes = _nodes_of(cluster)
    status = {s.id: s for s in result.requests}
    span = max([result.end_time, *(s.end for s in result.segments)], default=0.0) or 1.0

    # Colour of each request's diffuse work.
    if color_by == "class":
        gpu_s: dict[str, float] = defaultdict(float)
        for seg in result.segments:
            if seg.stage.value == "diffuse":
                gpu_s[_class_label(status[seg.request_ids[0]].request)] += len(seg.gpus) * (seg.end - seg.start)
        for s in result.requests:
            gpu_s.setdefault(_class_label(s.request), 0.0)
        ranked = sorted(gpu_s, key=lambda c: (-gpu_s[c], c))
        colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(ranked[:MAX_CLASSES])}
        shown = {c: colors.get(c, OTHER_COLOR) for c in ranked}
        req_color = {s.id: shown[_class_label(s.request)] for s in result.requests}
        entries = [(c, colors[c]) for c in ranked[:MAX_CLASSES]]
        if len(ranked) > MAX_CLASSES:
            entries.append((f"{len(ranked) - MAX_CLASSES} other classes", OTHER_COLOR))
        legend_title = "request class (model, shape)"
    else:
        req_color = {s.id: OUTCOME_COLORS[_outcome(s)] for s in result.requests}
        present = {_outcome(s) for s in result.requests}
        entries = [(k, c) for k, c in OUTCOME_COLORS.items() if k in present]
        legend_title = "request outcome"

    fig_w = 11.0
    fig, ax = plt.subplots(figsize=(fig_w, 0.3 * n_gpus + 2.4), layout="constrained")
    # Data seconds per pixel, from the axes' share of the figure (about 85 % of its width).
    min_w = MIN_STAGE_PX * span / (0.85 * fig_w * DPI)

    # Gather every bar of a layer; y is the GPU row.
    layers: dict[str, dict[str, list]] = {k: {"x": [], "w": [], "y": [], "c": [], "thin": []}
                                         for k in ("load", "image", "video", "encode", "decode")}
    for seg in result.segments:
        stage = seg.stage.value
        lead = status[seg.request_ids[0]]
        width, thin = seg.end - seg.start, False
        if stage == "diffuse":
            key, color = lead.request.kind, req_color[lead.id]
        else:
            key, color = stage, STAGE_COLORS[stage]
            if width < min_w:  # too short to see: a min_w strip in the row's lower third
                width, thin = min_w, True
        layer = layers[key]
        for g in seg.gpus:
            layer["x"].append(seg.start)
            layer["w"].append(width)
            layer["y"].append(g)
            layer["c"].append(color)
            layer["thin"].append(thin)
    for e in result.weight_events:
        if e.kind == "load" and e.end > e.start:
            layer = layers["load"]
            layer["x"].append(e.start)
            layer["w"].append(e.end - e.start)
            layer["y"].append(e.gpu)
            layer["c"].append(LOAD_COLOR)
            layer["thin"].append(False)

    style = {"load": dict(zorder=1, hatch=None), "image": dict(zorder=2, hatch=None),
             "video": dict(zorder=2, hatch="///"), "encode": dict(zorder=3, hatch=None),
             "decode": dict(zorder=3, hatch=None)}
    for key, layer in layers.items():
        if not layer["x"]:
            continue
        x = np.asarray(layer["x"], dtype=float)
        w = np.asarray(layer["w"], dtype=float)
        y = np.asarray(layer["y"], dtype=float)
        hi = y + 0.4
        lo = np.where(np.asarray(layer["thin"], dtype=bool), y + 0.4 - THIN_ROW, y - 0.4)
        verts = np.stack([np.stack([x, lo], 1), np.stack([x + w, lo], 1),
                          np.stack([x + w, hi], 1), np.stack([x, hi], 1)], 1)
        coll = PolyCollection(verts, facecolors=layer["c"], edgecolors="none", linewidths=0,
                              zorder=style[key]["zorder"], hatch=style[key]["hatch"])
        coll.set_gid(f"gantt-{key}")
        coll.set_in_layout(False)
        ax.add_collection(coll, autolim=False)

    # Missed deadlines: one mark per request, where it finished or last ran.
    last: dict[str, tuple[float, int]] = {}
    for seg in result.segments:
        for rid in seg.request_ids:
            if rid not in last or seg.end >= last[rid][0]:
                last[rid] = (seg.end, seg.gpus[0])
    missed = [s for s in result.requests if not s.met]
    marks = [(s.finish if s.finish is not None else last[s.id][0], last[s.id][1]) for s in missed if s.id in last]
    if marks:
        mx, my = zip(*marks)
        (line,) = ax.plot(mx, my, linestyle="none", zorder=5, **MISS_STYLE)
        line.set_gid("gantt-missed")
        line.set_in_layout(False)

    # Node boundaries (multi-node clusters).
    if len(nodes) > 1:
        ax.hlines([min(node) - 0.5 for node in nodes[1:]], 0, span * 1.01, colors="black", linewidths=1.4,
                  zorder=6, gid="gantt-nodes")
        for i, node in enumerate(nodes):
            ax.text(1.005, (min(node) + max(node)) / 2, f"node {i}", rotation=90, va="center", ha="left",
                    fontsize=8, transform=ax.get_yaxis_transform())

    ax.set_xlim(0, span * 1.01)
    ax.set_ylim(n_gpus - 0.5, -0.5)
    ax.set_yticks(range(n_gpus), [f"GPU {g}" for g in range(n_gpus)], fontsize=8 if n_gpus <= 16 else 6)
    ax.set_xlabel("time (s)")
    n_unrun = sum(1 for s in missed if s.id not in last)
    unrun = f", {n_unrun} never ran" if n_unrun else ""
    ax.set_title(title or f"{result.policy}: GPUs over time; colour = {legend_title}; "
                          f"x = missed deadline ({len(missed)} of {len(result.requests)}{unrun})", fontsize=10)

    handles = [Patch(facecolor=c, label=label) for label, c in entries]
    if layers["video"]["x"]:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="video diffuse"))
    handles += [Patch(color=c, label=s) for s, c in STAGE_COLORS.items()]
    if layers["load"]["x"]:
        handles.append(Patch(color=LOAD_COLOR, label="weight load"))
    handles.append(Line2D([], [], linestyle="none", label="missed deadline", **MISS_STYLE))
    if len(nodes) > 1:
        handles.append(Line2D([], [], color="black", linewidth=1.4, label="node boundary"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(5, len(handles)), fontsize=7,
               frameon=False)
    return fig, ax


def plot_gantt(result: SimResult, cluster, path: str | Path, title: str = "", color_by: str = "class") -> Path:
    """Write the Gantt chart of ``result`` (see ``gantt_figure``) to ``path``."""
    fig, _ = gantt_figure(result, cluster, title, color_by)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

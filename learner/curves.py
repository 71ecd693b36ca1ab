"""curves.png: a run's per-step figures from metrics.jsonl, one panel each (`gfnlm plot RUN`).

Written at the end of every run, and on demand while a run trains (metrics.jsonl is appended line
by line; a line cut short by a kill is skipped).
"""

from __future__ import annotations

import json
import math
import os
import sys

from gfnlm.configs import ConfigError

# (title, [(key, label)], y-axis scale): a panel is drawn when one of its keys has a finite value
PANELS = [
    ("loss", [("loss", "loss")], "symlog"),
    ("log R of fresh samples", [("mean_log_r", "mean"), ("max_log_r", "max")], "linear"),
    ("quality", [("valid_fraction", "valid fraction"), ("accuracy", "accuracy")], "linear"),
    ("exact distance to the target", [("exact_kl", "KL(target‖policy)"), ("exact_tv", "TV"),
                                      ("invalid_mass", "invalid mass")], "log"),
    ("log Z (SubTB's: log F(s0))", [("log_z", "mean over the batch's records"), ("log_z_spread", "spread across records")],
     "linear"),
    ("learning rate", [("lr", "learning rate")], "linear"),
    ("reward temperature", [("reward_temperature", "T")], "linear"),
    ("trajectories/s", [("samples_per_second", "samples/s (last 10 steps)")], "linear"),
    ("staleness (policy versions)", [("staleness", "staleness")], "linear"),
    ("replay", [("replay_size", "trajectories in the buffer")], "linear"),
    ("gradient norm", [("grad_norm", "before clipping")], "log"),
]


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written, or cut short by a kill
                continue
    return rows


def axis_scale(scale: str, ys: list[float]) -> str:
    """A panel's y scale: log (or symlog) only where its values span a decade or more; within less,
    a log axis has no labelled tick at all (an SFT loss from 2.8 to 1.3 showed a bare axis)."""
    if scale == "log" and not all(y > 0 for y in ys):
        return "linear"
    if scale in ("log", "symlog") and ys and min(ys) > 0 and max(ys) < 10 * min(ys):
        return "linear"
    return scale


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot(run_dir: str, out: str | None = None) -> str:
    """Draw curves.png of a run folder (or `out`); returns the path written."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"plot: {path} not found; expected the folder of a run")
    rows = read_metrics(path)
    if not rows:
        raise ConfigError(f"plot: {path} holds no step yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, series, scale in PANELS:
        lines = []
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            if pts:
                lines.append((label, pts))
        if lines:
            panels.append((title, lines, scale))
    failures = [r["step"] for prev, r in zip(rows, rows[1:])
                if _finite(r.get("actor_failures_total")) and r["actor_failures_total"] > prev.get("actor_failures_total", 0)]
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 2.8 * nrows), squeeze=False)
    for ax, (title, lines, scale) in zip(axes.flat, panels):
        for label, pts in lines:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(xs) < 30 else None)
        scale = axis_scale(scale, [y for _, pts in lines for _, y in pts])
        if scale == "log":
            ax.set_yscale("log")
        elif scale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        for k, step in enumerate(failures):  # an actor died in this step (Ray mode)
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8, label="actor died" if k == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or failures or title in ("quality", "trajectories/s"):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    name = os.path.basename(os.path.abspath(run_dir))
    fig.suptitle(f"{name}: {len(rows)} steps (to step {rows[-1]['step']})", fontsize=11)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    print(plot(args.run, args.out), file=sys.stderr)
    return 0

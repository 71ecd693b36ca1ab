"""table.png of an experiment: its headline figures, one panel each, a bar per table row (the rows'
labels, as in table.md) at the mean over seeds with the standard deviation as an error bar."""

from __future__ import annotations

import math
import statistics

HEADLINES = ("satisfied", "bleu4", "gleu4", "loglik_max", "diversity", "loglik_mean", "exact_kl", "exact_tv",
             "valid_fraction", "valid")
"""The figures a table's plot shows, in order of preference; the first four a table has (an answer
task's accuracy per test set, acc_*, instead when it has them), counting only finite values."""


def headline_keys(rows: dict[str, list[dict]]) -> list[str]:
    present = {k for runs in rows.values() for r in runs for k, v in r.items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
    accuracy = sorted(k for k in present if k.startswith("acc_"))
    return accuracy or [k for k in HEADLINES if k in present][:4]


def value_anchor(mean: float, err: float, xlim: tuple[float, float], row: int = 0) -> tuple[float, int]:
    """Where a bar's value is written: inside a long bar, by the zero line; past the error bar's end
    of a short one (more than half the panel's width left), so that it never sits on the error cap."""
    if math.isnan(mean):
        return 0.0, row
    width = xlim[1] - xlim[0]
    return (0.0 if abs(mean) + err > width / 2 else math.copysign(abs(mean) + err, mean)), row


def accuracy_xlim(means: list[float], errs: list[float]) -> tuple[float, float]:
    """An accuracy panel's scale: 0 to 1, widened to the longest error bar that passes 1 (a mean of
    0.97 ± 0.04 is drawn whole, not cut at 1)."""
    ends = [m + e for m, e in zip(means, errs) if not math.isnan(m)]
    longest = max([1.0, *ends])
    return 0.0, (1.0 if longest <= 1.0 else longest + 0.02)  # a little room past that bar's cap


def plot_table(rows: dict[str, list[dict]], path: str, title: str) -> list[str]:
    """Draw `rows` ({label: [flat figures of each run]}) into path; the figures drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = headline_keys(rows)
    if not keys:
        return []
    labels = list(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 1.6, 0.45 * len(labels) + 1.6),
                             squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        means, errs = [], []
        for label in labels:
            xs = [r[key] for r in rows[label] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            means.append(statistics.mean(xs) if xs else math.nan)
            errs.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ax.barh(range(len(labels)), [0.0 if math.isnan(m) else m for m in means], xerr=errs, capsize=3,
                color=["C0" if not math.isnan(m) else "none" for m in means])
        if key.startswith("acc_"):  # accuracies on one scale, so that no test set's panel looks larger than it is
            ax.set_xlim(*accuracy_xlim(means, errs))
        else:
            ax.margins(x=0.2)  # room for the values written past short bars
        for i, (m, e) in enumerate(zip(means, errs)):
            ax.annotate("—" if math.isnan(m) else f"{m:.3g}", value_anchor(m, e, ax.get_xlim(), i), xytext=(3 if m >= 0 or math.isnan(m) else -3, 0),
                        textcoords="offset points", va="center", ha="left" if m >= 0 or math.isnan(m) else "right", fontsize=8,
                        annotation_clip=False)
        ax.set_title(key)
        ax.axvline(0.0, color="black", linewidth=0.6)
    axes[0][0].set_yticks(range(len(labels)), [f"{label} (n={len(rows[label])})" for label in labels])
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys

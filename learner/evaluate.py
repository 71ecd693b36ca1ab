"""Evaluation of a sampler against the task's target: figures, a JSON and a PNG histogram."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

from rewards import number_metrics


def sample_values(sampler, task, n: int, batch_size: int) -> list[int | None]:
    """n samples per prompt at temperature 1; a sample is valid only if the policy ended it."""
    values: list[int | None] = []
    for pid, prompt in enumerate(task.prompt_ids):
        left = n
        while left > 0:
            k = min(batch_size, left)
            # one token past max_len: a number must be ended by ⊤ chosen by the policy itself
            trajs = sampler.generate(pid, prompt, k, 1.0, task.min_len, task.max_len + 1, task.end_ids, source="eval")
            values += [task.sample_value(t) for t in trajs]
            left -= k
    return values


def evaluate(policy, task, sampler, eval_cfg, out_dir: str, log=print) -> dict:
    variants = {"trained": contextlib.nullcontext}
    if eval_cfg.include_base:
        variants = {"base": policy.model.disable_adapter, **variants}
    results, histograms = {}, {}
    for name, ctx in variants.items():
        t0 = time.perf_counter()
        with ctx():
            values = sample_values(sampler, task, eval_cfg.num_samples, eval_cfg.batch_size)
        figures = number_metrics(values, task.log_p)
        figures["seconds"] = time.perf_counter() - t0
        results[name] = figures
        histograms[name] = values
        log(
            f"gfnlm eval {name:>7}: valid {100 * figures['valid_fraction']:.1f}%  KL(target‖empirical) {figures['kl']:.4f}  "
            f"TV {figures['tv']:.3f}  distinct {figures['distinct']}/{figures['support_size']}  "
            f"({figures['samples']} samples, {figures['seconds']:.0f} s)"
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_histogram(histograms, task.log_p, os.path.join(out_dir, "eval.png"))
    return results


def plot_histogram(samples: dict[str, list], log_p: dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = sorted(log_p)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(samples), 1)
    for i, (name, values) in enumerate(samples.items()):
        n = len(values)
        counts = {v: 0 for v in support}
        for v in values:
            if v is not None:
                counts[v] += 1
        invalid = sum(v is None for v in values)
        xs = [x + (i - (len(samples) - 1) / 2) * width for x in support]
        ax.bar(xs, [counts[v] / n for v in support], width=width, alpha=0.7,
               label=f"{name} (invalid {100 * invalid / n:.1f}% of {n})")
    ax.step(support, [math.exp(log_p[v]) for v in support], where="mid", color="black", label="target")
    ax.set_xlabel("value")
    ax.set_ylabel("fraction of all samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

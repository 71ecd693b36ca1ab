"""What a run reports while it trains: the running figures of the progress bar, metrics.jsonl,
the Prometheus figures of the learner and its targets file, curves.png."""

from __future__ import annotations

import json
import os
import time
from collections import deque

import numpy as np

from gfnlm.actors.trajectory import Trajectory


class RunningStats:
    """Figures over the last few steps for the progress bar."""

    def __init__(self, window: int = 10):
        self.batches = deque(maxlen=window)

    def push(self, valid: int, total: int, trajectories: int, seconds: float) -> None:
        self.batches.append((valid, total, trajectories, seconds))

    @property
    def valid_fraction(self) -> float:
        total = sum(b[1] for b in self.batches)
        return sum(b[0] for b in self.batches) / total if total else 0.0

    @property
    def samples_per_second(self) -> float:
        secs = sum(b[3] for b in self.batches)
        return sum(b[2] for b in self.batches) / secs if secs else 0.0


def write_targets(driver, run_dir: str, log, m=None) -> str | None:
    """The run's metrics endpoints, for Prometheus (file_sd format) and for people: in the run folder,
    and as `<job>.json` in metrics.targets_dir, the folder a local Prometheus watches (returned, for
    removal at the end of the run)."""
    endpoints = driver.metrics_endpoints()
    if not endpoints:
        return None
    targets = [{"targets": [ep], "labels": {"gfnlm_process": name}} for name, ep in endpoints.items() if ep]
    _write_json(os.path.join(run_dir, "prometheus_targets.json"), targets)
    log("gfnlm: metrics at " + ", ".join(f"{name} http://{ep}/metrics" for name, ep in endpoints.items() if ep))
    if m is None or not m.targets_dir:
        return None
    shared = os.path.join(m.targets_dir, f"{m.job or os.path.basename(os.path.abspath(run_dir))}.json")
    try:
        os.makedirs(m.targets_dir, exist_ok=True)
        _write_json(shared, targets)
    except OSError as e:  # a convenience for a local Prometheus: never a reason to stop training
        log(f"gfnlm: warning: cannot write {shared} ({e.strerror}); Prometheus finds this run in {run_dir} only")
        return None
    return shared


def _write_json(path: str, obj) -> None:
    """Whole or not at all (Prometheus re-reads file_sd files while they change)."""
    _replace_file(path, json.dumps(obj, indent=1))


def _replace_file(path: str, text: str) -> None:
    """Write a temporary file beside path, then rename it over path: readers see the old or the new whole."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def record_step(m, out: dict, fresh: list[Trajectory], trained: int, temperature: float, valid: float | None,
                seconds: float) -> None:
    if m is None:
        return
    m.get("gfnlm_learner_steps_total").inc()
    m.get("gfnlm_trained_trajectories_total").inc(trained)
    m.get("gfnlm_learner_step_seconds").observe(seconds)
    m.get("gfnlm_learner_update_seconds").observe(out["update_seconds"])
    m.get("gfnlm_loss").set(out["loss"])
    m.get("gfnlm_learning_rate").set(out["lr"])
    for key in ("log_z", "log_z_spread"):
        if key in out:
            m.get(f"gfnlm_{key}").set(out[key])
    m.get("gfnlm_reward_temperature").set(temperature)
    if valid is not None:
        m.get("gfnlm_valid_fraction").set(valid)
    if fresh:
        log_r = [t.final_log_r for t in fresh]
        m.get("gfnlm_log_reward_mean").set(float(np.mean(log_r)))
        m.get("gfnlm_log_reward_max").set(float(np.max(log_r)))


def valid_counts(task, fresh: list[Trajectory]) -> tuple[int, int] | None:
    """(valid, total) of this step's on-policy samples, by the task's one definition of valid."""
    on_policy = [t for t in fresh if t.source == "on_policy"]
    verdicts = [task.is_valid(t) for t in on_policy]
    if not on_policy or verdicts[0] is None:
        return None
    return sum(verdicts), len(verdicts)


def draw_curves(run_dir: str, log) -> None:
    """curves.png of the run; a plotting problem is a warning, never the end of a run."""
    from .curves import plot

    try:
        plot(run_dir)
    except Exception as e:
        log(f"gfnlm: warning: curves.png not drawn ({type(e).__name__}: {e})")


def trim_metrics(path: str, step: int) -> None:
    """Drop metrics.jsonl lines of steps past the checkpoint a run resumes from (a run killed between
    a step's line and its checkpoint would otherwise show those steps twice)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:  # a line cut short by the kill
            continue
        kept.append(line)
    if len(kept) != len(lines):
        _replace_file(path, "".join(kept))


def step_record(c, driver, out: dict, fresh: list[Trajectory], temperature: float, counts, stats: RunningStats,
                t0: float) -> dict:
    """A step's line of metrics.jsonl: the update's figures, the fresh samples' log R, the valid
    fraction, throughput, the driver's counters, and the task's tracked figures every eval.track_every."""
    cfg = c.cfg
    record = {
        "step": c.learner.step, **out, "reward_temperature": temperature,
        "mean_log_r": float(np.mean([t.final_log_r for t in fresh])) if fresh else float("nan"),
        "max_log_r": float(np.max([t.final_log_r for t in fresh])) if fresh else float("nan"),
        "valid_fraction": counts[0] / counts[1] if counts else None, "samples_per_second": stats.samples_per_second,
        "step_seconds": time.perf_counter() - t0, "replay_size": driver.replay_size(), **driver.counters,
    }
    if cfg.learner.objective.type == "sft":  # trains on the records' references: no samples, replay or reward
        for key in SAMPLER_KEYS:
            record.pop(key, None)
    if cfg.eval.track_every and c.learner.step % cfg.eval.track_every == 0:
        record.update(c.task.track(c.policy))
    return record


SAMPLER_KEYS = ("reward_temperature", "mean_log_r", "max_log_r", "valid_fraction", "samples_per_second", "replay_size")
"""A step's figures of the samplers, the replay and the reward, which an SFT step has none of."""


def write_line(metrics_file, trackers, record: dict) -> None:
    """One line of metrics.jsonl, flushed (curves.png and `gfnlm plot` read it mid-run), and the trackers'."""
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    if trackers is not None:
        trackers.log_step(record)


class Progress:
    """The progress bar of run.progress (tqdm on stderr): loss, mean log R, valid fraction, samples/s."""

    def __init__(self, cfg, initial: int):
        self.bar = None
        if cfg.run.progress:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=cfg.learner.steps, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, out: dict, record: dict, counts, stats: RunningStats) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        shown = {"loss": f"{out['loss']:.3f}"}
        if "mean_log_r" not in record:  # SFT: no samples
            self.bar.set_postfix(**shown)
            return
        shown["logR"] = f"{record['mean_log_r']:.2f}"
        if counts is not None:
            shown["valid"] = f"{100 * stats.valid_fraction:.0f}%"
        self.bar.set_postfix(**shown, sps=f"{stats.samples_per_second:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The training loop in one process: sample -> score -> replay -> update -> publish.

The same plain classes become Ray actors in the distributed runtime; here they are called directly,
and the sampler shares the learner's model object, so publishing a version is free.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from actors.replay import Replay
from actors.sampler import TransformersSampler
from actors.trajectory import Trajectory
from configs import Config, dump_config
from rewards import make_task

from .policy import Policy
from .schedule import batch_counts, reward_temperature
from .trainer import Learner, latest_checkpoint, load_adapter_weights, rng_state, save_checkpoint, set_rng_state


@dataclass
class Components:
    cfg: Config
    policy: Policy
    task: object
    sampler: TransformersSampler
    replay: Replay
    learner: Learner


def setup_torch(cfg: Config) -> None:
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    random.seed(cfg.learner.seed)
    np.random.seed(cfg.learner.seed)
    torch.manual_seed(cfg.learner.seed)


def build(cfg: Config) -> Components:
    setup_torch(cfg)
    policy = Policy(cfg.model, cfg.lora)
    task = make_task(cfg.task, policy.tokenizer)
    sampler = TransformersSampler(policy.model, policy.device, seed=cfg.learner.seed)
    replay = Replay(cfg.replay.capacity_per_prompt, cfg.replay.dedup_fraction, cfg.replay.sampling, seed=cfg.learner.seed)
    if cfg.replay.seed_with_support and cfg.batch.replay > 0:
        for pid in range(len(task.prompts)):
            replay.add(task.support_trajectories(pid))
    return Components(cfg, policy, task, sampler, replay, Learner(policy, cfg.learner))


def collect(c: Components, prompt_id: int, temperature: float) -> tuple[list[Trajectory], list[Trajectory]]:
    """One micro-batch: (fresh samples, the whole mixed batch)."""
    cfg, task = c.cfg.batch, c.task
    n_on, n_temp, n_rep = batch_counts(cfg, c.replay.size(prompt_id))
    prompt = task.prompt_ids[prompt_id]
    fresh = c.sampler.generate(prompt_id, prompt, n_on, 1.0, task.min_len, task.max_len, task.end_ids)
    if n_temp:
        u = torch.rand(n_temp, generator=c.sampler.generator)
        temps = (cfg.temper_low + (cfg.temper_high - cfg.temper_low) * u).tolist()
        fresh += c.sampler.generate(prompt_id, prompt, n_temp, temps, task.min_len, task.max_len, task.end_ids, source="tempered")
    task.score(fresh)
    c.replay.add(fresh)
    return fresh, fresh + c.replay.sample(prompt_id, n_rep, temperature)


def checkpoint(c: Components, run_dir: str) -> str:
    extra = {
        "learner": c.learner.state_dict(),
        "replay": c.replay.state_dict(),
        "rng": rng_state(c.sampler.generator),
    }
    return save_checkpoint(run_dir, c.learner.step, c.policy, extra, c.cfg.run.keep_checkpoints)


def restore(c: Components, ckpt_dir: str) -> None:
    load_adapter_weights(c.policy, os.path.join(ckpt_dir, "adapter"))
    extra = torch.load(os.path.join(ckpt_dir, "trainer.pt"), weights_only=False)
    c.learner.load_state_dict(extra["learner"])
    c.replay.load_state_dict(extra["replay"])
    set_rng_state(extra["rng"], c.sampler.generator)
    c.sampler.load_weights(None, c.learner.step)


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


def train(cfg: Config, run_dir: str, resume: bool = False, log=print) -> Components:
    """Train for cfg.learner.steps optimizer steps, checkpointing into run_dir."""
    c = build(cfg)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
        restore(c, ckpt)
        log(f"gfnlm: resumed from {ckpt} at step {c.learner.step}")
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    stats = RunningStats()
    bar = None
    if cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.learner.steps, initial=c.learner.step, desc="train", dynamic_ncols=True, file=sys.stderr)
    try:
        while c.learner.step < cfg.learner.steps:
            step = c.learner.step
            temp = reward_temperature(step, cfg.reward_temperature)
            prompt_id = step % len(c.task.prompts)

            t0 = time.perf_counter()
            rounds = [collect(c, prompt_id, temp) for _ in range(cfg.learner.grad_accum)]
            sample_seconds = time.perf_counter() - t0
            fresh = [t for f, _ in rounds for t in f]
            out = c.learner.update([b for _, b in rounds], c.task.prompt_ids, c.task.end_ids, temp)
            c.sampler.load_weights(None, c.learner.step)  # one process: the sampler shares the weights

            on_policy = [t for t in fresh if t.source == "on_policy"]
            stats.push(sum(c.task.value(t.tokens) is not None for t in on_policy), len(on_policy), len(fresh),
                       sample_seconds + out["update_seconds"])
            record = {
                "step": c.learner.step,
                **out,
                "reward_temperature": temp,
                "mean_log_r": float(np.mean([t.final_log_r for t in fresh])) if fresh else float("nan"),
                "valid_fraction": stats.valid_fraction,
                "samples_per_second": stats.samples_per_second,
                "sample_seconds": sample_seconds,
                "replay_size": c.replay.size(),
            }
            if c.learner.step % cfg.run.log_every == 0:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", logR=f"{record['mean_log_r']:.2f}",
                                valid=f"{100 * stats.valid_fraction:.0f}%", sps=f"{stats.samples_per_second:.1f}")
            if c.learner.step % cfg.run.checkpoint_every == 0 and c.learner.step < cfg.learner.steps:
                checkpoint(c, run_dir)
        checkpoint(c, run_dir)
    finally:
        metrics_file.close()
        if bar is not None:
            bar.close()
    return c

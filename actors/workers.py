"""Plain worker classes that the Ray runtime wraps as actors (and tests call directly).

A SamplerWorker owns a copy of the policy (base model + LoRA) and a generation engine; it swaps in
published LoRA weights between generation calls and tags every batch with the version that made
it. A ScorerWorker computes log R of every prefix; with `reward.colocate` the sampler scores its
own batches instead, sharing its weights.
"""

from __future__ import annotations

import os
import time

import torch

from . import max_rss_bytes
from .replay import Replay
from .sampler import sample_fresh
from .trajectory import SampledBatch, SampleRequest, Trajectory  # noqa: F401 (re-exported)


def _metrics(cfg, actor):
    from cluster.metrics import for_process

    return for_process(cfg, actor)


class _ServesMetrics:
    metrics = None

    def metrics_endpoint(self) -> str | None:
        """host:port of this actor's Prometheus endpoint (None when metrics are off)."""
        return self.metrics.endpoint if self.metrics is not None else None


class ScorerWorker(_ServesMetrics):
    """Rewards of every prefix for the configured task. As an actor of its own it serves its
    metrics (actor=reward); inside a sampler it records into the sampler's."""

    def __init__(self, cfg, tokenizer=None, metrics="reward"):
        from learner.models import resolve_model_path
        from rewards import make_task

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
        self.task = make_task(cfg.task, tokenizer)
        self.metrics = _metrics(cfg, metrics) if isinstance(metrics, str) else metrics

    def score(self, batch: SampledBatch) -> SampledBatch:
        t0 = time.perf_counter()
        self.task.score(batch.trajectories)
        seconds = time.perf_counter() - t0
        batch.score_seconds += seconds
        if self.metrics is not None:
            self.metrics.get("gfnlm_score_seconds").observe(seconds)
        return batch

    def memory(self) -> int:
        return max_rss_bytes()


class SamplerWorker(_ServesMetrics):
    """One sampler: an engine with its own copy of the policy (+ colocated scorer)."""

    def __init__(self, cfg, name: str, seed: int, score: bool = True, threads: int = 1):
        from transformers import AutoTokenizer

        from actors.engines import make_sampler
        from learner.models import resolve_model_path

        torch.set_num_threads(max(1, threads))
        self.name = name
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
        self.metrics = _metrics(cfg, name)
        self.scorer = ScorerWorker(cfg, tokenizer, metrics=self.metrics)
        self.task = self.scorer.task
        self.score_here = score
        self.engine = make_sampler(cfg, self.task, tokenizer, seed=seed)
        self.pid = os.getpid()

    @property
    def version(self) -> int:
        return self.engine.version

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Swap in a published LoRA version; returns the seconds it took."""
        t0 = time.perf_counter()
        if version != self.engine.version:
            self.engine.load_weights(state, version)
            if self.metrics is not None:
                self.metrics.get("gfnlm_lora_swap_seconds").observe(time.perf_counter() - t0)
                self.metrics.get("gfnlm_policy_version").set(version)
        return time.perf_counter() - t0

    def sample(self, req: SampleRequest) -> SampledBatch:
        t0 = time.perf_counter()
        trajs = sample_fresh(self.engine, self.task, req.prompt_id, req.n_on_policy, req.temperatures)
        batch = SampledBatch(trajs, self.engine.version, self.name, sample_seconds=time.perf_counter() - t0)
        record_sampling(self.metrics, batch)
        return self.scorer.score(batch) if self.score_here else batch

    def memory(self) -> int:
        return max_rss_bytes()


def record_sampling(metrics, batch: SampledBatch, actor: str | None = None) -> None:
    """Sampler figures of one batch: trajectories by source, tokens, seconds, version."""
    if metrics is None:
        return
    for source in {t.source for t in batch.trajectories}:
        metrics.get("gfnlm_trajectories_sampled_total", actor=actor, source=source).inc(
            sum(t.source == source for t in batch.trajectories))
    metrics.get("gfnlm_tokens_sampled_total", actor=actor).inc(sum(t.length + t.terminated for t in batch.trajectories))
    metrics.get("gfnlm_sample_seconds", actor=actor).observe(batch.sample_seconds)
    metrics.get("gfnlm_policy_version", actor=actor).set(batch.version)


class ReplayWorker(Replay, _ServesMetrics):
    """The replay buffer as an actor: serves its metrics (actor=replay)."""

    def __init__(self, cfg):
        super().__init__(cfg.replay.capacity_per_prompt, cfg.replay.dedup_fraction, cfg.replay.sampling,
                         cfg.learner.seed, metrics=_metrics(cfg, "replay"))

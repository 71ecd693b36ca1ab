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
from .sampler import sample_fresh
from .trajectory import SampledBatch, SampleRequest, Trajectory  # noqa: F401 (re-exported)


class ScorerWorker:
    """Rewards of every prefix for the configured task."""

    def __init__(self, cfg, tokenizer=None):
        from learner.models import resolve_model_path
        from rewards import make_task

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
        self.task = make_task(cfg.task, tokenizer)

    def score(self, batch: SampledBatch) -> SampledBatch:
        t0 = time.perf_counter()
        self.task.score(batch.trajectories)
        batch.score_seconds += time.perf_counter() - t0
        return batch

    def memory(self) -> int:
        return max_rss_bytes()


class SamplerWorker:
    """One sampler: an engine with its own copy of the policy (+ colocated scorer)."""

    def __init__(self, cfg, name: str, seed: int, score: bool = True, threads: int = 1):
        from transformers import AutoTokenizer

        from actors.engines import make_sampler
        from learner.models import resolve_model_path

        torch.set_num_threads(max(1, threads))
        self.name = name
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
        self.scorer = ScorerWorker(cfg, tokenizer)
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
        return time.perf_counter() - t0

    def sample(self, req: SampleRequest) -> SampledBatch:
        t0 = time.perf_counter()
        trajs = sample_fresh(self.engine, self.task, req.prompt_id, req.n_on_policy, req.temperatures)
        batch = SampledBatch(trajs, self.engine.version, self.name, sample_seconds=time.perf_counter() - t0)
        return self.scorer.score(batch) if self.score_here else batch

    def memory(self) -> int:
        return max_rss_bytes()

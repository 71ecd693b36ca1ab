"""Plain worker classes that the Ray runtime wraps as actors (and tests call directly).

A SamplerWorker owns a copy of the policy (base model + LoRA) and a generation engine; it swaps in
published LoRA weights between generation calls, serves `SampleRequest`s (which carry everything
it needs: it knows no task), and tags every batch with the version that made it. Given a
`scorer_factory` it also scores its own batches (reward.colocate), with its base model and the
adapter switched off; without one it loads no reward model at all.
"""

from __future__ import annotations

import os
import time

import torch

from . import max_rss_bytes
from .engines import SamplerSpec
from .replay import Replay
from .sampler import RequestServer
from .trajectory import SampledBatch, SampleRequest, Trajectory  # noqa: F401 (re-exported)


def actor_metrics(metrics_cfg, task: str, actor: str):
    """The actor's Prometheus figures (None with metrics off): the `metrics` section, the task's type."""
    from gfnlm.cluster.metrics import for_process

    return for_process(metrics_cfg, actor, task)


class ServesMetrics:
    metrics = None

    def metrics_endpoint(self) -> str | None:
        """host:port of this actor's Prometheus endpoint (None when metrics are off)."""
        return self.metrics.endpoint if self.metrics is not None else None


class SamplerWorker(ServesMetrics):
    """One sampler: an engine with its own copy of the policy (+ a colocated scorer). Built from a
    `SamplerSpec` (the sections it reads); `scorer_factory(tokenizer, model, device, metrics)` is the
    reward layer's, bound to its own settings by the learner."""

    def __init__(self, spec: SamplerSpec, name: str, seed: int, scorer_factory=None, threads: int = 1,
                 max_model_len: int | None = None):
        from transformers import AutoTokenizer

        from .engines import make_sampler
        from .models import pick_device, resolve_model_path

        torch.set_num_threads(max(1, threads))
        self.name = name
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.model.path))
        self.metrics = actor_metrics(spec.metrics, spec.task, name)
        self.engine = make_sampler(spec, tokenizer, seed=seed, max_model_len=max_model_len)
        self.serve = RequestServer(self.engine, tokenizer)
        self.scorer = None
        if scorer_factory is not None:
            model = getattr(self.engine, "model", None)  # the transformers engine's peft model; vLLM has none here
            self.scorer = scorer_factory(tokenizer, model, pick_device(spec.model.device), self.metrics)
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
        trajs = self.serve(req)
        batch = SampledBatch(trajs, self.engine.version, self.name, sample_seconds=time.perf_counter() - t0, tag=req.tag)
        record_sampling(self.metrics, batch)
        return self.scorer.score(batch) if self.scorer is not None else batch

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


class ReplayWorker(Replay, ServesMetrics):
    """The replay buffer as an actor: serves its metrics (actor=replay)."""

    def __init__(self, replay_cfg, seed: int, metrics_cfg, task: str):
        super().__init__(replay_cfg.capacity_per_prompt, replay_cfg.dedup_fraction, replay_cfg.sampling, seed,
                         metrics=actor_metrics(metrics_cfg, task, "replay"))

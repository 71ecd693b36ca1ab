"""A simulated sampler for orchestration benchmarks: fixed latency per batch, no model, no torch."""

from __future__ import annotations

import time

from . import max_rss_bytes

from .trajectory import SampledBatch, SampleRequest, Trajectory


class SimulatedSampler:
    """Answers `sample` after `latency` seconds with synthetic, already-scored trajectories."""

    latency = 0.5
    """Seconds per batch (set on a subclass by the benchmark)."""
    length = 3
    """Tokens per synthetic trajectory."""

    def __init__(self, spec=None, name: str = "sim", seed: int = 0, scorer_factory=None, threads: int = 1, max_model_len: int = 0):
        # same signature as SamplerWorker, so the Ray driver can start either
        self.name = name
        self.version = 0

    def set_weights(self, state, version: int) -> float:
        self.version = version
        return 0.0

    def sample(self, req: SampleRequest) -> SampledBatch:
        time.sleep(self.latency)
        trajs = [Trajectory(p.record_id, [1] * self.length, log_r=[-1.0] * (self.length + 1), version=self.version)
                 for p in req.prompts for _ in range(p.size)]
        return SampledBatch(trajs, self.version, self.name, sample_seconds=self.latency, tag=req.tag)

    def memory(self) -> int:
        return max_rss_bytes()

    def metrics_endpoint(self):
        return None


class SimulatedScorer:
    """Answers `score` after `latency` seconds, leaving the batch as it is (benchmarks)."""

    latency = 0.5
    """Seconds per batch (set on a subclass by the benchmark)."""

    def __init__(self, cfg=None, name: str = "reward", threads: int = 1):
        self.name = name

    def score(self, batch: SampledBatch) -> SampledBatch:
        time.sleep(self.latency)
        batch.score_seconds += self.latency
        return batch

    def memory(self) -> int:
        return max_rss_bytes()

    def metrics_endpoint(self):
        return None

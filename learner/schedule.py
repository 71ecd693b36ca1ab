"""Reward temperature annealing and the batch mix."""

from __future__ import annotations

from configs.schema import BatchConfig, RewardTemperature


def reward_temperature(step: int, cfg: RewardTemperature) -> float:
    """T moves linearly from cfg.start (step 0) to cfg.end (step >= horizon)."""
    frac = min(max(step / cfg.horizon, 0.0), 1.0)
    return cfg.start + (cfg.end - cfg.start) * frac


def batch_counts(cfg: BatchConfig, replay_available: int) -> tuple[int, int, int]:
    """(on_policy, tempered, replay) counts for one micro-batch; an empty replay is topped up on-policy."""
    tempered = round(cfg.size * cfg.tempered)
    replay = min(round(cfg.size * cfg.replay), cfg.size - tempered) if replay_available > 0 else 0
    return cfg.size - tempered - replay, tempered, replay

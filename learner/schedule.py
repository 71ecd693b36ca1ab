"""Reward temperature annealing, the batch mix, and the record scheduler."""

from __future__ import annotations

from configs import ConfigError
import random

from configs.schema import BatchConfig, RewardTemperature


def reward_temperature(step: int, cfg: RewardTemperature) -> float:
    """T moves linearly from cfg.start (step 0) to cfg.end (step >= horizon)."""
    frac = min(max(step / cfg.horizon, 0.0), 1.0)
    return cfg.start + (cfg.end - cfg.start) * frac


def batch_mix(cfg: BatchConfig, replay_available: int) -> tuple[int, int, int]:
    """(on_policy, tempered, replay) counts for one record's share of a micro-batch. The replay
    share is capped by what the record's buffer holds; fresh on-policy samples fill the rest.
    Both drivers use this one function."""
    size = cfg.samples_per_prompt
    tempered = round(size * cfg.tempered)
    replay = min(round(size * cfg.replay), size - tempered, max(0, replay_available))
    return size - tempered - replay, tempered, replay


class RecordScheduler:
    """Which records each micro-batch trains on: every record once per epoch, in a seeded random
    order, `per_step` at a time. Its state (epoch, position) is checkpointed, so a resumed run
    continues with the very records the uninterrupted run would have taken."""

    def __init__(self, record_ids: list[int], per_step: int, seed: int = 0, shuffle: bool = True):
        if not record_ids:
            raise ConfigError("the task has no training records")
        self.ids = list(record_ids)
        self.per_step = per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(self.ids)
        if self.shuffle and len(order) > 1:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)

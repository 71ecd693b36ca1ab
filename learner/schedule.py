"""Reward temperature annealing, the batch mix, the record scheduler, and the sample request of a
micro-batch (`plan_request`, what both drivers send)."""

from __future__ import annotations

import bisect
import itertools
import random

import torch

from gfnlm.actors.trajectory import MicroBatch, PromptRequest, SampleRequest, Trajectory, by_record
from gfnlm.configs import Config, ConfigError
from gfnlm.configs.learner import BatchConfig, RewardTemperature


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


class GroupScheduler:
    """Records drawn from groups in set shares (e.g. labelled questions 5 % of the draws however
    few the unlabelled ones are): each slot of a step picks a group by a seeded draw, and each group
    gives its records once per epoch in a seeded order, as `RecordScheduler` does. Its state (draws
    made, each group's epoch and position) is checkpointed like RecordScheduler's."""

    def __init__(self, groups: list[tuple[list[int], float]], per_step: int, seed: int = 0):
        groups = [(ids, share) for ids, share in groups if ids and share > 0]
        if not groups:
            raise ConfigError("the task has no training records")
        total = sum(share for _, share in groups)
        self.bounds = list(itertools.accumulate(share / total for _, share in groups))[:-1]  # group g: u below bounds[g]
        self.groups = [RecordScheduler(ids, 1, seed=f"{seed}:group{g}") for g, (ids, _) in enumerate(groups)]
        self.per_step, self.seed, self.draws = per_step, seed, 0

    def next(self) -> list[int]:
        out = []
        for _ in range(self.per_step):
            g = bisect.bisect_right(self.bounds, random.Random(f"{self.seed}:draw{self.draws}").random())
            self.draws += 1
            out += self.groups[g].next()
        return out

    def state_dict(self) -> dict:
        return {"draws": self.draws, "groups": [s.state_dict() for s in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for s, st in zip(self.groups, state["groups"]):
            s.load_state_dict(st)


def scheduler_for(ids: list[int], groups, per_step: int, seed: int):
    """A `GroupScheduler` over the task's draw groups restricted to `ids` (the records trained on),
    or a plain `RecordScheduler` when the task has none."""
    if not groups:
        return RecordScheduler(ids, per_step, seed=seed)
    keep = set(ids)
    return GroupScheduler([([r for r in g if r in keep], share) for g, share in groups], per_step, seed=seed)


def tempered_temperatures(cfg: Config, n: int, generator: torch.Generator) -> list[float]:
    u = torch.rand(n, generator=generator)
    return (cfg.batch.temper_low + (cfg.batch.temper_high - cfg.batch.temper_low) * u).tolist()


def plan_request(cfg: Config, task, record_ids: list[int], replay_sizes: list[int], generator: torch.Generator,
                 tag: int = 0) -> tuple[SampleRequest, list[int]]:
    """The sample request for one micro-batch, and how many replayed trajectories each record adds."""
    prompts, replayed = [], []
    for rid, available in zip(record_ids, replay_sizes):
        n_on, n_temp, n_rep = batch_mix(cfg.batch, available)
        temps = tempered_temperatures(cfg, n_temp, generator) if n_temp else []
        prompts.append(PromptRequest(rid, task.prompt_ids(rid), n_on, temps, end_rule=task.end_rule(rid)))
        replayed.append(n_rep)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return request(cfg, task, prompts, seed, tag), replayed


def request(cfg: Config, task, prompts: list[PromptRequest], seed: int | None = None, tag: int = 0) -> SampleRequest:
    """The one place a request's rules come from the task: its end and banned tokens (those banned
    at Z's first token too), min and max length, and the tools (which say where a state may end)."""
    return SampleRequest(prompts, task.min_len, task.max_len, task.end_ids,
                         tools=[t.model_dump() for t in cfg.sampler.tools], banned_ids=sorted(task.banned_ids),
                         ban_penalty=task.ban_penalty, first_banned_ids=sorted(task.first_banned_ids), seed=seed, tag=tag)


def micro_batch(cfg: Config, task, trajectories: list[Trajectory]) -> MicroBatch:
    """Trajectories that no sampler drew this step (SFT's references, a test's hand-made batch) as a
    micro-batch: a request for their records that asks for no samples."""
    prompts = [PromptRequest(rid, task.prompt_ids(rid), 0, end_rule=task.end_rule(rid)) for rid in by_record(trajectories)]
    return MicroBatch(request(cfg, task, prompts), list(trajectories))


def replay_wanted(plan: SampleRequest, counts: list[int]) -> list[tuple[int, int]]:
    """(record, how many replayed) of a planned request, for `Replay.sample_many`."""
    return [(p.record_id, n) for p, n in zip(plan.prompts, counts) if n]

"""A run's pieces from its config: the policy, the task with its scorer, the engine, the replay,
the learner, the record scheduler and the M-step (`build`), and the process's torch set-up."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from gfnlm.actors.engines import SamplerSpec, context_length, longest_z, make_sampler
from gfnlm.actors.policy import Policy
from gfnlm.actors.replay import Replay
from gfnlm.actors.sampler import TransformersSampler
from gfnlm.configs import Config, ConfigError
from gfnlm.rewards import make_task
from gfnlm.rewards.scorer import attach_scorer

from .schedule import RecordScheduler, scheduler_for
from .trainer import Learner


@dataclass
class Components:
    cfg: Config
    policy: Policy
    task: object
    sampler: object
    """The engine (`actors.sampler.SamplerEngine`)."""
    replay: Replay | None
    learner: Learner
    scheduler: RecordScheduler
    """Which records each micro-batch trains on (seeded, checkpointed)."""
    generator: torch.Generator
    """The driver's generator: tempered temperatures and per-request seeds (checkpointed)."""
    em: object = None
    """The M-step of a task whose reward learns (`learner.em.MStep`), else None."""
    stopped: str | None = None
    """The signal that ended training early (SIGTERM, SIGINT), else None."""
    trackers: object = None
    """The run's experiment trackers (`learner.trackers.Trackers`, run.report_to), else None."""


def torch_threads(cfg: Config) -> int | None:
    """The learner process's torch threads: run.torch_threads, else every core in runtime.mode local
    (one process holds the machine: a step of arithmetic ×1.6 faster on 2 cores than with one thread,
    `gfnlm bench training`), else torch's default (Ray: the actors share the cores)."""
    if cfg.run.torch_threads:
        return cfg.run.torch_threads
    return (os.cpu_count() or 1) if cfg.runtime.mode == "local" else None


def setup_torch(cfg: Config) -> None:
    threads = torch_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    random.seed(cfg.learner.seed)
    np.random.seed(cfg.learner.seed)
    torch.manual_seed(cfg.learner.seed)


def seed_replay(replay, cfg: Config, task, log=None) -> None:
    """Known-good trajectories into the buffer (works on the class or a Ray handle's `add`). Scoring
    them takes minutes on a CPU where a task has hundreds of records: `log` says so, and how long."""
    if cfg.replay.seed_with_support and cfg.batch.replay > 0:
        t0, added = time.perf_counter(), 0
        if log is not None:
            log(f"gfnlm: replay: scoring the seeds of {len(task.train_ids)} training records (task {task.name})")
        for rid in task.train_ids:
            seeds = [t for t in task.seed_trajectories(rid) if task.reachable(t.tokens)]
            if seeds:
                replay.add(seeds)
                added += len(seeds)
        if log is not None:
            log(f"gfnlm: replay: {added} seed trajectories in the buffer ({time.perf_counter() - t0:.0f} s)")


def new_replay(cfg: Config) -> Replay:
    return Replay(cfg.replay.capacity_per_prompt, cfg.replay.dedup_fraction, cfg.replay.sampling, seed=cfg.learner.seed)


def build(cfg: Config, with_replay: bool = True, engine: bool = True, log=None) -> Components:
    """The learner's pieces; the Ray driver keeps its buffer in an actor instead (with_replay=False).
    With engine=False (the Ray driver, `gfnlm eval`) the sampler is the transformers engine on the
    learner's own model, whatever `sampler.engine` says: it only serves evaluation. `log` (a run's)
    hears each slow part of the set-up as it starts."""
    setup_torch(cfg)
    if log is not None:
        log(f"gfnlm: loading the policy ({cfg.model.path}, {cfg.model.dtype}) and task {cfg.task.type}")
    policy = Policy(cfg.model, cfg.lora)
    task = make_task(cfg, policy.tokenizer)
    check_context(cfg, task, policy.model.config)
    attach_scorer(task, cfg, policy.model, policy.device)
    if engine:
        sampler = make_sampler(SamplerSpec.of(cfg), policy.tokenizer, seed=cfg.learner.seed, policy=policy,
                               max_model_len=context_length(cfg, task.max_prompt_len(), task.max_len))
    else:
        sampler = eval_engine(policy, cfg)
    objective = cfg.learner.objective
    if objective.type == "tb" and objective.log_z == "scalar" and len(task.train_ids) > 1:
        raise ConfigError(f"learner.objective.log_z: 'scalar' shares one log Z across the {len(task.train_ids)} training "
                          f"records of task {task.name}, whose partition functions differ; use per_record (the default)")
    learner = Learner(policy, cfg.learner, num_records=len(task.records), state_flows=task.state_log_flows)
    replay = None
    if with_replay:
        replay = new_replay(cfg)
        if learner.objective.samples:  # SFT never draws from the buffer: scoring its seeds would be wasted
            seed_replay(replay, cfg, task, log)
    ids = task.train_ids
    if not learner.objective.samples:  # SFT: the records that have a reference Z the policy can write
        ids = [r for r in ids if (ref := task.reference(r)) is not None and task.reachable(ref.tokens)]
        if not ids:
            raise ConfigError(f"learner.objective {learner.objective.name}: no training record of task {task.name} "
                             f"has a reference Z to train on (that its first-token mask allows)")
    scheduler = scheduler_for(ids, task.draw_groups(), cfg.batch.prompts_per_step, cfg.learner.seed)
    generator = torch.Generator().manual_seed(cfg.learner.seed + 7919)
    em = None
    if getattr(cfg.task, "em", None) is not None and cfg.task.em.e_steps and learner.objective.samples:
        from .em import MStep

        em = MStep(policy, task, cfg.task.em, cfg.lora, seed=cfg.learner.seed, total_steps=cfg.learner.steps)
    return Components(cfg, policy, task, sampler, replay, learner, scheduler, generator, em)


def check_context(cfg: Config, task, model_config) -> None:
    """The longest prompt plus task.max_len fits the model's context (GPT-2 would fail mid-run with an
    IndexError; Llama would silently attend past its trained positions)."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not limit:
        return
    longest = task.max_prompt_len()
    if longest + longest_z(cfg, task.max_len) > limit:
        raise ConfigError(f"task.max_len: the longest prompt of task {task.name} is {longest} tokens; with task.max_len "
                          f"{task.max_len} (and the tools' insertions) that exceeds the {limit} positions of model.path "
                          f"{cfg.model.path}; shorten the prompts or lower task.max_len")


def eval_engine(policy: Policy, cfg: Config) -> TransformersSampler:
    """The transformers engine on the learner's model, with the configured tools."""
    from gfnlm.actors.tools import tool_runner

    tools = tool_runner(cfg.sampler.tools, policy.tokenizer)
    return TransformersSampler(policy.model, policy.device, seed=cfg.learner.seed, tools=tools,
                               pad_id=policy.tokenizer.pad_token_id, decode=policy.tokenizer.decode)

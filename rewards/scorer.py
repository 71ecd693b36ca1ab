"""Giving a task its reward LM, and the reward actor that scores sampled batches.

A task whose reward is a language model gets a `PrefixScorer` over frozen weights: the policy's
own base model with its adapter switched off (one process, or a sampler that colocates scoring),
or `reward.model` / `reward.adapter` loaded on their own. `ScorerWorker` is the plain class that
Ray wraps as a reward actor of the pool (reward.colocate false); `colocated_scorer` builds the
same thing inside a sampler actor from the sampler's model.
"""

from __future__ import annotations

import time

from gfnlm.actors import max_rss_bytes
from gfnlm.actors.scoring import PrefixScorer
from gfnlm.actors.trajectory import SampledBatch
from gfnlm.actors.workers import ServesMetrics, actor_metrics

from . import make_task


def load_reward_lm(cfg, device: str, tokenizer=None):
    """The frozen reward model named by reward.model / reward.adapter (adapter merged). Trajectories
    are token ids of the policy's tokenizer, so a reward model must share it."""
    from gfnlm.actors.models import ModelError, load_model

    model, reward_tok = load_model(cfg.reward.model or cfg.model.path, device, cfg.model.dtype)
    if tokenizer is not None and cfg.reward.model and reward_tok.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"reward.model: {cfg.reward.model!r} has another tokenizer than the policy's model; "
                         f"the reward scores the policy's token ids, so it must share the tokenizer")
    if cfg.reward.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.reward.adapter).merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def attach_scorer(task, cfg, model=None, device: str = "cpu", tokenizer=None) -> None:
    """Give an LM task its `PrefixScorer`: over `model` with its adapter off when the reward is the
    policy's base model, else over reward.model / reward.adapter loaded here."""
    if not task.needs_lm:
        return
    tok = tokenizer or task.tokenizer
    if model is None or cfg.reward.model or cfg.reward.adapter:
        model = load_reward_lm(cfg, device, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task.lm = PrefixScorer(model, pad, device)


class TaskScorer:
    """Scores batches for a task: log R of every prefix, in place, timed."""

    def __init__(self, task, metrics=None):
        self.task = task
        self.metrics = metrics

    def score(self, batch: SampledBatch) -> SampledBatch:
        t0 = time.perf_counter()
        self.task.score(batch.trajectories)
        seconds = time.perf_counter() - t0
        batch.score_seconds += seconds
        if self.metrics is not None:
            self.metrics.get("gfnlm_score_seconds").observe(seconds)
        return batch


def colocated_scorer(cfg, tokenizer, model, device: str, metrics) -> TaskScorer:
    """A sampler actor's own scorer: the task, with the sampler's base model (adapter off). The
    learner binds `cfg` (functools.partial): the task is built from its sections here, in the reward
    layer, and the sampler passes the rest."""
    task = make_task(cfg, tokenizer)
    attach_scorer(task, cfg, model, device)
    return TaskScorer(task, metrics)


class ScorerWorker(TaskScorer, ServesMetrics):
    """A reward actor of the pool: its own frozen LM (no adapter to train), the task, metrics."""

    def __init__(self, cfg, name: str = "reward", threads: int = 1):
        import torch
        from transformers import AutoTokenizer

        from gfnlm.actors.models import pick_device, resolve_model_path

        torch.set_num_threads(max(1, threads))
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
        task = make_task(cfg, tokenizer)
        device = pick_device(cfg.model.device)
        attach_scorer(task, cfg, None, device)
        super().__init__(task, actor_metrics(cfg.metrics, cfg.task.type, name))

    def memory(self) -> int:
        return max_rss_bytes()

"""The learner's update: teacher-forced pass -> loss -> optimizer step (checkpoints.py writes its state)."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from gfnlm.actors.end_rules import restamp
from gfnlm.actors.trajectory import MicroBatch, by_record
from gfnlm.configs.learner import LearnerConfig

from gfnlm.actors.policy import Policy, can_end_mask

from .objective import PolicyTerms, make_objective
from .objectives import forced_cap_ends


class Learner:
    """Owns the optimizer of the LoRA weights and the objective's own parameters (TB's log Z)."""

    def __init__(self, policy: Policy, cfg: LearnerConfig, num_records: int = 1, state_flows=None):
        self.policy = policy
        self.cfg = cfg
        self.state_flows = state_flows
        """(trajectory, reward temperature) -> known log F of its states, or None: what a task that knows
        its states' flows (random numbers) adds to log R; None when no task does."""
        self.objective = make_objective(cfg.objective, policy.device, num_records,
                                        getattr(policy.model.config, "hidden_size", None))
        self._features: dict[tuple, torch.Tensor] = {}
        """(record id, prompt tokens) -> the prompt's pooled hidden state under the frozen base model."""
        groups = [{"params": policy.trainable_parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        self.optimizer = torch.optim.AdamW(groups + self.objective.param_groups())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0

    def terms(self, batch: MicroBatch, reward_temperature: float) -> PolicyTerms:
        """The teacher-forced pass over a micro-batch, under the rules of the request it answers;
        trajectories are grouped by record: each prompt runs once, its cache shared by its rows, or where
        many prompts have a row or two each, every row runs joined to its prompt in one pass
        (`Policy.logprobs_groups`)."""
        req = batch.request
        if any(p.end_rule is not None for p in req.prompts) or any(t.end_allowed is not None for t in batch.trajectories):
            restamp(batch.trajectories, {p.record_id: p.end_rule for p in req.prompts}, self.policy.tokenizer.decode)
        groups = by_record(batch.trajectories)
        ends = req.can_end if self.objective.masks_end else None
        ordered = [t for ts in groups.values() for t in ts]
        log_pf, log_pterm, lengths, tool = self.policy.logprobs_groups(
            [(req.prompt_ids(rid), ts) for rid, ts in groups.items()], req.end_ids, req.banned_ids, req.ban_penalty, 0,
            ends, req.first_banned_ids)
        T = log_pf.shape[1]
        log_r = torch.zeros_like(log_pterm)
        for b, t in enumerate(ordered):
            if t.log_r is not None:
                log_r[b, : t.length + 1] = torch.tensor(t.log_r, dtype=log_r.dtype)
        terminated = torch.tensor([t.terminated for t in ordered], device=log_pf.device)
        can_end = None
        if ends is not None:  # dead ends (cut where they cannot end) end there by force, at their reward
            log_pterm, can_end = forced_cap_ends(log_pterm, can_end_mask(ordered, ends, T + 1).to(log_pf.device),
                                                 lengths, terminated)
        return PolicyTerms(log_pf, log_pterm, log_r / reward_temperature, lengths, tool, terminated, ordered,
                           state_flows(ordered, self.state_flows, reward_temperature, log_r), can_end,
                           lambda rids: self.prompt_features(req, rids))

    def prompt_features(self, request, record_ids: list[int]) -> torch.Tensor:
        """[B, d] each record's prompt, mean-pooled last hidden state under the frozen base model
        (adapter off), computed once per prompt: what a log Z head reads."""
        out = []
        for rid in record_ids:
            prompt = tuple(request.prompt_ids(rid))
            key = (rid, prompt)
            if key not in self._features:
                if len(self._features) > 100_000:
                    self._features.clear()
                model = self.policy.model
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad(), model.disable_adapter():
                        hidden = model(input_ids=torch.tensor([prompt], device=self.policy.device),
                                       output_hidden_states=True).hidden_states[-1]
                finally:
                    model.train(was_training)
                self._features[key] = hidden[0].float().mean(dim=0)
            out.append(self._features[key])
        return torch.stack(out)

    def loss(self, batch: MicroBatch, reward_temperature: float):
        return self.objective.loss(self.terms(batch, reward_temperature))

    def update(self, micro_batches: list[MicroBatch], reward_temperature: float) -> dict:
        """One collected batch: one optimizer step over its micro-batches (gradients accumulated),
        or, for an objective that plans its own (PPO: epochs of minibatches), each step it plans."""
        t0 = time.perf_counter()
        clock = {"forward_seconds": 0.0, "backward_seconds": 0.0, "optimizer_seconds": 0.0}
        self.policy.model.train()
        plan = getattr(self.objective, "plan", None)
        steps = plan(micro_batches, self.policy, reward_temperature) if plan else [micro_batches]
        clock["forward_seconds"] += time.perf_counter() - t0  # PPO's reference pass counts as forward
        params = self.policy.trainable_parameters() + self.objective.extra_parameters()
        totals: dict[str, float] = defaultdict(float)
        for step in steps:
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, extra = 0.0, {}
            for mb in step:
                t1 = time.perf_counter()
                loss, extra = self.loss(mb, reward_temperature)
                t2 = time.perf_counter()
                (loss / len(step)).backward()
                loss_sum += loss.item() / len(step)
                clock["forward_seconds"] += t2 - t1
                clock["backward_seconds"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            self.optimizer.step()
            clock["optimizer_seconds"] += time.perf_counter() - t3
            totals["loss"] += loss_sum / len(steps)
            totals["grad_norm"] += float(grad_norm) / len(steps)
            for k, v in extra.items():
                totals[k] += v / len(steps)
        self.scheduler.step()
        self.step += 1
        self.policy.version = self.step
        return {**totals, "lr": self.scheduler.get_last_lr()[0], "update_seconds": time.perf_counter() - t0, **clock}

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.policy.version = self.step
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state.get("objective", {}))


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of cfg.lr: linear warm-up,
    then constant or a cosine decay to min_lr_ratio at the last step."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - 1 - warmup)
    done = min(1.0, max(0, step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def state_flows(trajectories, known, reward_temperature: float, like: torch.Tensor) -> torch.Tensor | None:
    """[B, T+1] known log F(s_k) - log F(s_0) of each prefix (tempered) from `known(t, T)`, NaN where
    it knows none; None when it knows no state's flow (or there is no `known`)."""
    if known is None:
        return None
    rows = [known(t, reward_temperature) for t in trajectories]
    if all(r is None for r in rows):
        return None
    out = torch.full_like(like, float("nan"))
    for b, r in enumerate(rows):
        if r is not None:
            out[b, : len(r)] = torch.tensor(r, dtype=out.dtype)
    return out



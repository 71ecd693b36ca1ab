"""The objectives the learner can minimise, behind one small protocol.

An objective says which extra parameters it trains (TB's log Z), whether it needs sampled
trajectories and rewards, and turns the policy's teacher-forced log-probs into a loss and its
metrics. The arithmetic is in `objectives.py` (pure torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import random

import torch

from gfnlm.actors.trajectory import by_record, joined

from .objectives import (action_logprobs, group_advantages, importance_weights, ppo_loss, sft_loss, subtb_log_root,
                         subtb_loss, tb_loss, tb_parts, vargrad_loss)


@dataclass
class PolicyTerms:
    """One micro-batch as the objectives see it (shapes as in objectives.py)."""

    log_pf: torch.Tensor
    log_pterm: torch.Tensor
    log_r: torch.Tensor
    """Tempered log R of every prefix (NaN where not scored)."""
    lengths: torch.Tensor
    tool_mask: torch.Tensor
    terminated: torch.Tensor
    trajectories: list = None
    """The micro-batch's trajectories in row order (objectives with per-trajectory state: PPO)."""
    log_flow: torch.Tensor | None = None
    """Known (tempered) log F(s_k) - log F(s_0) of prefixes [B, T+1], NaN where unknown; None: none known."""
    can_end: torch.Tensor | None = None
    """[B, T+1] False where a state cannot end (before the task's min_len), for objectives that
    `masks_end`; None: every state is treated as one that can end."""
    prompt_features: object = None
    """record ids -> [B, d] the prompts' mean-pooled last hidden states under the frozen base model
    (what a log Z head reads); None where the learner offers none."""


class Objective(Protocol):
    name: str
    samples: bool
    """True when it trains on sampled trajectories (samplers, rewards, replay); False: references."""
    masks_end: bool
    """True when it uses the policy the samplers draw from: ⊤ taken out of q before min_len and the
    rest renormalised (`actors.policy.mask_end`), those states marked in PolicyTerms.can_end."""

    def param_groups(self) -> list[dict]: ...
    def extra_parameters(self) -> list[torch.Tensor]: ...
    def loss(self, terms: PolicyTerms) -> tuple[torch.Tensor, dict[str, float]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class _Stateless:
    """Defaults of an objective with no parameters or state of its own."""

    def param_groups(self):
        return []

    def extra_parameters(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class SubTB(_Stateless):
    """Modified SubTB. `states: every` (the default) treats every prefix as a state that can end, the
    ones before min_len with the floor reward and the unmasked q(⊤ | s); `states: can_end` takes ⊤
    out of q there (as the samplers do), balances sub-trajectories between the states that can end
    only, and gives the first state, when it cannot end, the batch's estimate of its flow per record
    (VarGrad's log Z, `subtb_loss`'s root_groups), so the first tokens stay in balanced pairs."""

    name, samples = "subtb", True

    def __init__(self, cfg, device):
        self.lam = cfg.lam
        self.masks_end = cfg.states == "can_end"

    def loss(self, terms: PolicyTerms):
        groups = None
        if terms.can_end is not None and not bool(terms.can_end[:, 0].any()):
            groups = torch.tensor([t.record_id for t in terms.trajectories], device=terms.log_pf.device)
        kw = dict(lam=self.lam, tool_mask=terms.tool_mask, can_end=terms.can_end, root_groups=groups)
        loss = subtb_loss(terms.log_pf, terms.log_pterm, terms.log_r, terms.lengths, log_flow=terms.log_flow, **kw)
        root = subtb_log_root(terms.log_pf.detach(), terms.log_pterm.detach(), terms.log_r, terms.lengths, **kw)
        return loss, log_z_metrics(root, terms)  # log F(s_0): SubTB's log Z of each record


class LogZHead(torch.nn.Module):
    """log Z(x) from the prompt's pooled hidden state: Linear -> GELU -> Linear (FlowRL's and
    red-teaming's form, smaller); the output layer starts at 0, so log Z starts at 0 as the table does."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)


def behaviour_log_q(trajectories, device) -> torch.Tensor:
    """log q_sampler(Z ⊤) of each trajectory as its sampler drew it (NaN for a seed: no sampler)."""
    rows = []
    for t in trajectories:
        if t.version < 0 or not t.logprobs and t.length:
            rows.append(float("nan"))
        else:
            rows.append(sum(behaviour_row(t)))
    return torch.tensor(rows, dtype=torch.float32, device=device)


def flowrl_weights(cfg, terms: PolicyTerms) -> torch.Tensor | None:
    """FlowRL's clipped importance weights of a micro-batch, or None when `importance_clip` is unset."""
    if cfg.importance_clip is None:
        return None
    log_q, _, _, _ = tb_parts(terms.log_pf.detach(), terms.log_pterm.detach(), terms.log_r, terms.lengths, terms.tool_mask)
    return importance_weights(log_q, behaviour_log_q(terms.trajectories, log_q.device), cfg.importance_clip)


class TB:
    """Trajectory balance with a learned log Z: one per record (a table indexed by record id), one
    shared scalar (`log_z: scalar`, for a task with one record), or a head on the prompt's pooled
    hidden state (`log_z: head`). Options: FlowRL's length normalisation and importance weights."""

    name, samples, masks_end = "tb", True, True

    def __init__(self, cfg, device, num_records: int = 1, hidden_size: int | None = None):
        self.cfg = cfg
        self.mode = cfg.log_z
        self.head = None
        if self.mode == "head":
            if hidden_size is None:
                raise ValueError("learner.objective.log_z: 'head' needs the policy's hidden size")
            self.head = LogZHead(hidden_size, cfg.head_hidden).to(device)
            self.log_z = None
        else:
            self.log_z = torch.nn.Parameter(torch.zeros(num_records if self.mode == "per_record" else (), device=device))
        self.lr = cfg.log_z_lr

    def extra_parameters(self):
        return list(self.head.parameters()) if self.head is not None else [self.log_z]

    def param_groups(self):
        return [{"params": self.extra_parameters(), "lr": self.lr, "weight_decay": 0.0}]

    def batch_log_z(self, terms: PolicyTerms) -> torch.Tensor:
        rows = [t.record_id for t in terms.trajectories]
        if self.head is not None:
            if terms.prompt_features is None:
                raise ValueError("learner.objective.log_z: 'head' needs the prompts' features; this learner offers none")
            return self.head(terms.prompt_features(rows))
        if self.mode == "per_record":
            return self.log_z[torch.tensor(rows, device=self.log_z.device)]
        return self.log_z

    def loss(self, terms: PolicyTerms):
        log_r = torch.nan_to_num(terms.log_r, nan=0.0)  # only the final state's reward is used
        log_z = self.batch_log_z(terms)
        loss = tb_loss(terms.log_pf, terms.log_pterm, log_r, terms.lengths, log_z, tool_mask=terms.tool_mask,
                       length_normalize=self.cfg.length_normalize, weights=flowrl_weights(self.cfg, terms))
        return loss, log_z_metrics(log_z.detach(), terms)

    def state_dict(self):
        if self.head is not None:
            return {"log_z_head": {k: v.detach().clone() for k, v in self.head.state_dict().items()}}
        return {"log_z": self.log_z.detach().clone()}

    def load_state_dict(self, state):
        if self.head is not None:
            if "log_z_head" not in state:
                raise ValueError("the checkpoint has no log Z head (learner.objective.log_z changed)")
            self.head.load_state_dict(state["log_z_head"])
            return
        if "log_z" not in state:
            raise ValueError("the checkpoint has no log Z table (learner.objective.log_z changed)")
        saved = state["log_z"]
        if saved.shape != self.log_z.shape:
            raise ValueError(f"the checkpoint's log Z has shape {tuple(saved.shape)}, this run's {tuple(self.log_z.shape)} "
                             f"(learner.objective.log_z or the task's records changed)")
        with torch.no_grad():
            self.log_z.copy_(saved)


def log_z_metrics(log_z: torch.Tensor, terms: PolicyTerms) -> dict[str, float]:
    """log Z of the batch's records: their mean ('log_z') and standard deviation across records
    ('log_z_spread'; 0 with one record), so a run shows it drift."""
    if log_z.dim() == 0:
        return {"log_z": float(log_z), "log_z_spread": 0.0}
    per = {}
    for t, v in zip(terms.trajectories, log_z.tolist()):
        if v == v:  # NaN: no estimate for that record
            per.setdefault(t.record_id, v)
    vals = torch.tensor(list(per.values()), dtype=torch.float64)
    if not len(vals):
        return {}
    return {"log_z": float(vals.mean()), "log_z_spread": float(vals.std(unbiased=False))}


class VarGrad(_Stateless):
    """Trajectory balance with each record's log Z estimated from its samples in the batch
    (`vargrad_loss`): no parameter, no initialisation to get wrong."""

    name, samples, masks_end = "vargrad", True, True

    def __init__(self, cfg, device, num_records: int = 1, hidden_size: int | None = None):
        self.cfg = cfg

    def loss(self, terms: PolicyTerms):
        log_r = torch.nan_to_num(terms.log_r, nan=0.0)
        groups = torch.tensor([t.record_id for t in terms.trajectories], device=terms.log_pf.device)
        loss, log_z = vargrad_loss(terms.log_pf, terms.log_pterm, log_r, terms.lengths, groups, terms.tool_mask,
                                   self.cfg.length_normalize, flowrl_weights(self.cfg, terms))
        return loss, log_z_metrics(log_z, terms)


class SFT(_Stateless):
    name, samples, masks_end = "sft", False, True

    def __init__(self, cfg, device):
        pass

    def loss(self, terms: PolicyTerms):
        return sft_loss(terms.log_pf, terms.log_pterm, terms.lengths, terms.tool_mask, terms.terminated), {}


class PPO:
    """The reward-maximizing baseline: clipped policy gradient on the tempered log R of the whole Z,
    a leave-one-out group-mean baseline over a record's samples instead of a value head, a KL
    penalty to the frozen base model (the adapter switched off) or to the adapter training started
    from (`reference: init`), and `epochs` passes of
    `minibatches` optimizer steps over each collected batch (`plan`)."""

    name, samples, masks_end = "ppo", True, True

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.rng = random.Random(0)
        self._rows: dict[int, tuple[float, list[float], list[float]]] = {}

    def param_groups(self):
        return []

    def extra_parameters(self):
        return []

    def plan(self, micro_batches, policy, reward_temperature: float) -> list[list]:
        """Advantages and reference log-probs of the whole batch, then the optimizer steps: each
        epoch shuffles the batch into `minibatches` parts, one step each."""
        whole = joined(micro_batches)
        req, batch = whole.request, whole.trajectories
        rewards = torch.tensor([t.final_log_r / reward_temperature for t in batch], dtype=torch.float64)
        groups = torch.tensor([t.record_id for t in batch])
        adv = group_advantages(rewards, groups, self.cfg.normalize_advantages).tolist()
        per_record = by_record(batch)
        self._rows = {}
        was_training = policy.model.training
        policy.model.eval()
        try:
            with torch.no_grad(), (policy.starting_policy() if self.cfg.reference == "init" else policy.model.disable_adapter()):
                groups = list(per_record.items())
                log_pf, log_pterm, lengths, tool = policy.logprobs_groups(
                    [(req.prompt_ids(rid), ts) for rid, ts in groups], req.end_ids, req.banned_ids, req.ban_penalty, 0,
                    req.can_end, req.first_banned_ids)
                rows = [t for _, ts in groups for t in ts]
                ref, _ = action_logprobs(log_pf, log_pterm, lengths, tool, torch.tensor([t.terminated for t in rows]))
                for t, row in zip(rows, ref.tolist()):
                    self._rows[id(t)] = (0.0, behaviour_row(t), row[: t.length + 1])
        finally:
            policy.model.train(was_training)
        for t, a in zip(batch, adv):
            self._rows[id(t)] = (a, *self._rows[id(t)][1:])
        steps = []
        parts = max(1, min(self.cfg.minibatches, len(batch)))
        for _ in range(self.cfg.epochs):
            order = list(batch)
            self.rng.shuffle(order)
            steps += [[whole.subset(order[i::parts])] for i in range(parts)]
        return steps

    def loss(self, terms: PolicyTerms):
        lp, actions = action_logprobs(terms.log_pf, terms.log_pterm, terms.lengths, terms.tool_mask, terms.terminated)
        width = lp.shape[1]
        rows = [self._rows[id(t)] for t in terms.trajectories]

        def padded(i):
            return torch.tensor([r[i] + [0.0] * (width - len(r[i])) for r in rows], dtype=lp.dtype, device=lp.device)

        adv = torch.tensor([r[0] for r in rows], dtype=lp.dtype, device=lp.device)
        return ppo_loss(lp, padded(1), padded(2), actions, adv, self.cfg.clip, self.cfg.kl_coef)

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        if "rng" in state:
            self.rng.setstate(state["rng"])


def behaviour_row(t) -> list[float]:
    """The sampler's log-probs of a trajectory's actions (tokens, then ⊤ where it ended)."""
    return list(t.logprobs) + [t.end_logprob if t.terminated and t.end_logprob is not None else 0.0]


def make_objective(cfg, device, num_records: int = 1, hidden_size: int | None = None) -> Objective:
    """The objective of `learner.objective` (a discriminated union in the config); `num_records`
    sizes a per-record log Z table (record ids are 0..num_records-1), `hidden_size` a log Z head."""
    if cfg.type in ("tb", "vargrad"):
        return {"tb": TB, "vargrad": VarGrad}[cfg.type](cfg, device, num_records, hidden_size)
    return {"subtb": SubTB, "sft": SFT, "ppo": PPO}[cfg.type](cfg, device)

"""The objectives the learner can minimise, behind one small protocol.

An objective says which extra parameters it trains (TB's log Z), whether it needs sampled
trajectories and rewards, and turns the policy's teacher-forced log-probs into a loss and its
metrics. The arithmetic is in `objectives.py` (pure torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .objectives import sft_loss, subtb_loss, tb_loss


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


class Objective(Protocol):
    name: str
    samples: bool
    """True when it trains on sampled trajectories (samplers, rewards, replay); False: references."""

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
    name, samples = "subtb", True

    def __init__(self, cfg, device):
        self.lam = cfg.lam

    def loss(self, terms: PolicyTerms):
        loss = subtb_loss(terms.log_pf, terms.log_pterm, terms.log_r, terms.lengths, lam=self.lam, tool_mask=terms.tool_mask)
        return loss, {}


class TB:
    name, samples = "tb", True

    def __init__(self, cfg, device):
        self.log_z = torch.nn.Parameter(torch.zeros((), device=device))
        self.lr = cfg.log_z_lr

    def param_groups(self):
        return [{"params": [self.log_z], "lr": self.lr, "weight_decay": 0.0}]

    def extra_parameters(self):
        return [self.log_z]

    def loss(self, terms: PolicyTerms):
        log_r = torch.nan_to_num(terms.log_r, nan=0.0)  # only the final state's reward is used
        loss = tb_loss(terms.log_pf, terms.log_pterm, log_r, terms.lengths, self.log_z, tool_mask=terms.tool_mask)
        return loss, {"log_z": self.log_z.item()}

    def state_dict(self):
        return {"log_z": self.log_z.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_z.copy_(state["log_z"])


class SFT(_Stateless):
    name, samples = "sft", False

    def __init__(self, cfg, device):
        pass

    def loss(self, terms: PolicyTerms):
        return sft_loss(terms.log_pf, terms.log_pterm, terms.lengths, terms.tool_mask, terms.terminated), {}


def make_objective(cfg, device) -> Objective:
    """The objective of `learner.objective` (a discriminated union in the config)."""
    return {"subtb": SubTB, "tb": TB, "sft": SFT}[cfg.type](cfg, device)

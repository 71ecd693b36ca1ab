"""The frozen reward LM: log R of every prefix in one batched pass (likelihood rewards).

For a prompt X and a trajectory z_1..z_n it returns, for i = 0..n,
    log R(z_1:i ⊤) = sum_{k<=i} log p(z_k | X z_<k) + log p(⊤ | X z_1:i)
from ONE teacher-forced pass of the frozen model (the prompt computed once for the batch).
Frozen means: the base weights, with any LoRA adapter disabled, never trained.
"""

from __future__ import annotations

import contextlib

import torch

from learner.policy import pad_tokens, sequence_logprobs

from .trajectory import Trajectory


class RewardModel:
    def __init__(self, model, pad_id: int, device: str = "cpu", temperature: float = 1.0):
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.temperature = temperature
        """R = p_LM(...)^(1/temperature); the learner's reward temperature comes on top."""

    def _frozen(self):
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if callable(disable) else contextlib.nullcontext()

    @torch.no_grad()
    def prefix_log_likelihoods(self, prompt_ids: list[int], trajectories: list[Trajectory], end_ids: list[int]) -> list[list[float]]:
        tokens, lengths, tool = pad_tokens(trajectories, self.pad_id, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._frozen():
                log_pf, log_pterm = sequence_logprobs(self.model, prompt_ids, tokens, end_ids)
        finally:
            self.model.train(was_training)
        log_pf = torch.where(tool, torch.zeros_like(log_pf), log_pf)
        cum = torch.nn.functional.pad(log_pf.cumsum(1), (1, 0))
        log_r = ((cum + log_pterm) / self.temperature).cpu()
        return [log_r[b, : int(n) + 1].tolist() for b, n in enumerate(lengths.tolist())]

    def score(self, prompt_ids: list[int], trajectories: list[Trajectory], end_ids: list[int]) -> None:
        """Fill each trajectory's log_r in place."""
        for t, lr in zip(trajectories, self.prefix_log_likelihoods(prompt_ids, trajectories, end_ids)):
            t.log_r = lr

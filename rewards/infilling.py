"""Infilling (paper §4.3): a story's middle sentence Z between its beginning X and ending Y.

R(Z) = p_LM(X Z Y) ∝ p_LM(Z Y | X). The policy sees both ends in its prompt ("Beginning: X\nEnding:
Y\nMiddle:"); the reward scores Z in place, between X and Y, for every prefix:
log R(z_1:i) = log p(z_1:i Y | X), all prefixes from one pass over X Z plus one batched pass of
the (prefix, Y) continuations (`actors.scoring`). The records' reference middles seed the replay.
"""

from __future__ import annotations

from functools import lru_cache

from gfnlm.actors.trajectory import Trajectory

from .base import columns_of
from .lm_task import LMTask


class InfillingTask(LMTask):
    name = "infilling"

    def __init__(self, cfg, tokenizer, prefixes: str = "every"):
        super().__init__(cfg, tokenizer, prefixes)
        self._suffix = lru_cache(maxsize=65536)(self._encode_suffix)
        self._reference = lru_cache(maxsize=65536)(self._encode_reference)

    @staticmethod
    def columns(cfg) -> list[str]:
        return columns_of(cfg.prompt_template, cfg.context_template, cfg.suffix_template, cfg.reference_template)

    def suffix_ids(self, record_id: int) -> list[int]:
        return self._suffix(record_id)

    def _encode_suffix(self, record_id: int) -> list[int]:
        return list(self.tokenizer(self.render(self.cfg.suffix_template, record_id), add_special_tokens=False).input_ids)

    def _encode_reference(self, record_id: int) -> list[int] | None:
        if self.cfg.reference_template is None:
            return None
        text = self.render(self.cfg.reference_template, record_id).rstrip()
        for end in self.cfg.end_tokens:
            if text.endswith(end):
                text = text[: -len(end)]
                break
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def reference_text(self, record_id: int) -> str | None:
        ids = self._reference(record_id)
        return None if ids is None else self.tokenizer.decode(ids)

    def lm_scores(self, record_id: int, trajectories: list[Trajectory], prefixes: str | None = None) -> list[list[float]]:
        return self.lm.score(self.context_ids(record_id), trajectories, suffix_ids=self.suffix_ids(record_id),
                             prefixes=prefixes or self.prefixes, first=self.min_len, terminable_only=True,
                             can_end=self.scored_states())

    def reference(self, record_id: int) -> Trajectory | None:
        ids = self._reference(record_id)
        if not ids or not self.min_len <= len(ids) <= self.max_len:
            return None
        return Trajectory(record_id, list(ids), terminated=True, temperature=float("nan"), version=-1, source="seed")

    def seed_trajectories(self, record_id: int) -> list[Trajectory]:
        ref = self.reference(record_id) if self.cfg.seed_replay_with_references else None
        if ref is None:
            return []
        self.score([ref])
        return [ref]

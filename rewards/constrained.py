"""Constrained generation: R(Z) = p_LM(Z ⊤ | X) · c(Z), c from config.

c(Z) = 1 when Z contains every required word, none of the excluded words, and has a word count in
the window; else 0, which puts that finished Z at the floor. Every prefix is judged as a finished
Z of its own, so a prefix that does not yet hold a required word sits at the floor while the
prefixes that do keep their LM likelihood.
"""

from __future__ import annotations

import torch

from gfnlm.actors.decoding import hf_generate
from gfnlm.actors.end_rules import WordRule, rule_states, words  # noqa: F401  (words: part of this module's API)
from gfnlm.actors.trajectory import Trajectory

from .base import columns_of
from .lm_task import LMTask


def satisfies(text: str, include: list[str], exclude: list[str], min_words: int = 0, max_words: int | None = None) -> bool:
    """c(Z) of a text: required words present, excluded words absent, word count in the window."""
    return WordRule(tuple(include), tuple(exclude), min_words, max_words).allows(text)


class ConstrainedTask(LMTask):
    name = "constrained"

    def __init__(self, cfg, tokenizer, prefixes: str = "every"):
        super().__init__(cfg, tokenizer, prefixes)
        # Z that violate c sit at the floor; the satisfying ones have log-likelihoods around -20 to
        # -60 (a typical sentence), so take e^-20 as their mass: generous to the floor's side
        self.warn_if_the_floor_dominates(len(tokenizer) - len(self.banned_ids), valid_log_mass=-20.0)

    @staticmethod
    def columns(cfg) -> list[str]:
        extra = [cfg.constraint.include_column] if cfg.constraint.include_column else []
        return columns_of(cfg.prompt_template, cfg.context_template, cfg.prompting_template) + extra

    def required(self, record_id: int) -> list[str]:
        c = self.cfg.constraint
        own = self.records[record_id].fields[c.include_column].split() if c.include_column else []
        return list(c.include) + own

    def rule(self, record_id: int) -> WordRule:
        """c of a record as a rule on Z's text."""
        c = self.cfg.constraint
        return WordRule(tuple(self.required(record_id)), tuple(c.exclude), c.min_words, c.max_words)

    def constraint_ok(self, record_id: int, text: str) -> bool:
        return self.rule(record_id).allows(text)

    def end_rule(self, record_id: int) -> dict | None:
        """With `constraint.end_when_satisfied`, c itself: Z may end only where its text satisfies c."""
        return self.rule(record_id).as_dict() if self.cfg.constraint.end_when_satisfied else None

    def prefix_ok(self, record_id: int, t: Trajectory, i: int) -> bool:
        return super().prefix_ok(record_id, t, i) and self.constraint_ok(record_id, self.tokenizer.decode(t.tokens[:i]))

    def seed_trajectories(self, record_id: int) -> list[Trajectory]:
        """Rejection sampling (`seed_tries` tries): the base model's continuations of the reward's
        context that end and satisfy c, each once."""
        if not self.cfg.seed_tries or self.lm is None:
            return []
        with torch.random.fork_rng(), self.lm._eval():
            torch.manual_seed(record_id)
            outs = hf_generate(self.lm.model, self.context_ids(record_id), self.cfg.seed_tries, self.max_len,
                               self.min_len, self.end_ids, self.tokenizer.pad_token_id, do_sample=True, top_k=0,
                               suppress_tokens=sorted(self.banned_ids) or None)
        seeds: list[Trajectory] = []
        for z, done in outs:
            t = Trajectory(record_id, list(z), terminated=done, temperature=float("nan"), version=-1, source="seed")
            if done and self.prefix_ok(record_id, t, t.length) and all(t.tokens != s.tokens for s in seeds):
                if self.cfg.constraint.end_when_satisfied:  # the verdicts a sampler would have stamped
                    t.end_allowed = rule_states(self.rule(record_id), t.tokens, self.tokenizer.decode)
                seeds.append(t)
        if seeds:
            self.score(seeds)
        return seeds

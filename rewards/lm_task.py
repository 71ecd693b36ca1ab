"""The base of every task whose reward is a language model: records from files rendered by
templates, R(Z) = p_LM(Z ⊤ | C)^(1/T) by default (the frozen LM's likelihood of Z followed by an
end token, given the reward's context C), every prefix scored in one pass
(`actors.scoring.PrefixScorer`), closed-form terms on top (prefixes shorter than `min_len` and
prefixes holding a disallowed token get the floor), and the shared evaluation (`lm_eval`).
Continuation, infilling, constrained generation, arithmetic and custom tasks build on it.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from gfnlm.actors.trajectory import Trajectory, by_record
from gfnlm.configs import ConfigError

from .base import Task, columns_of
from .records import load_records

_WORD_START = re.compile(r" \S")


def disallowed_token_ids(tokenizer, fragments: list[str], exact: list[str] = ()) -> frozenset[int]:
    """Ids of every token whose text contains one of the fragments or equals one of `exact`."""
    if not fragments and not exact:
        return frozenset()
    whole = set(exact)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = set()
    for i, piece in enumerate(vocab):
        text = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        if text in whole or any(f in text for f in fragments):
            out.add(i)
    return frozenset(out)


class LMTask(Task):
    """A task whose reward is the frozen LM's likelihood; subclasses add a suffix or a constraint."""

    needs_lm = True

    def __init__(self, cfg, tokenizer, prefixes: str = "every"):
        super().__init__(cfg, tokenizer, self.load_records(cfg))
        self.prefixes = prefixes
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} \
            if cfg.disallow_special else set()
        self.disallowed = (self.compute_disallowed(tokenizer, cfg) | special) - set(self.end_ids)
        if cfg.mask_disallowed:
            self.banned_ids = frozenset(self.disallowed)
        self._ref = list(tokenizer("a", add_special_tokens=False).input_ids)  # `text_after`'s context
        self.word_starts: frozenset[int] = frozenset()
        if getattr(cfg, "first_token", "any") == "word":
            self.word_starts = self.first_tokens(tokenizer, self.banned_ids)
            self.first_banned_ids = frozenset(range(len(tokenizer))) - self.word_starts - set(self.end_ids)
            if not self.word_starts - (self.banned_ids if math.isinf(self.ban_penalty) else set()):
                raise ConfigError("task.first_token: word: every token that could start Z's first word is disallowed "
                                  "(task.disallowed / disallowed_tokens); allow one, or set first_token: any")
        self._context = lru_cache(maxsize=65536)(self._encode_context)

    def text_after(self, tokens: list[int], tokenizer=None) -> str:
        """The text of tokens as they read after a word ("a"): SentencePiece drops the leading space
        of a text's first token, which `first_token: word` must see."""
        tokenizer = tokenizer or self.tokenizer
        return tokenizer.decode(self._ref + list(tokens))[len(tokenizer.decode(self._ref)):]

    def first_tokens(self, tokenizer, banned=frozenset()) -> frozenset[int]:
        """The tokens that may start Z under `first_token: word`, the only ones the policy's first
        token may be (the rest are masked out of s_0): those whose text begins with one space and a
        visible character (" The", not "com" after "years.", a vertical tab or a lone space). A
        tokenizer that writes no word so (no allowed token starts " w": a character-level one) has
        its lone space instead, and the reward's rule on the text (`starts_a_word`) floors what a
        space then starts badly. A tokenizer that writes " 5" as a lone space and "5" (SmolLM2,
        Llama) lets no Z start with a digit."""
        texts = [self.text_after([i], tokenizer) for i in range(len(tokenizer))]
        starts = {i for i, text in enumerate(texts) if _WORD_START.match(text)}
        if not starts - set(banned):
            starts = {i for i, text in enumerate(texts) if text == " "}
        return frozenset(starts)

    @staticmethod
    def columns(cfg) -> list[str]:
        return columns_of(cfg.prompt_template, cfg.context_template)

    def load_records(self, cfg):
        """The task's records (train and test) from its `data` section."""
        return load_records(cfg.data, self.columns(cfg))

    def compute_disallowed(self, tokenizer, cfg) -> frozenset[int]:
        """Tokens that may not appear in Z (besides special tokens)."""
        return disallowed_token_ids(tokenizer, list(cfg.disallowed), list(getattr(cfg, "disallowed_tokens", [])))

    # -- text of a record ------------------------------------------------------------------------

    def context_ids(self, record_id: int) -> list[int]:
        """The reward's context C (tokenized on first use, then cached)."""
        return self._context(record_id)

    def _encode_context(self, record_id: int) -> list[int]:
        if self.cfg.context_template is None:
            return self.prompt_ids(record_id)
        return list(self.tokenizer(self.render(self.cfg.context_template, record_id)).input_ids)

    def text(self, t: Trajectory) -> str:
        return self.tokenizer.decode(t.tokens)

    def adhoc_record(self, prompt: str, answer: str | None) -> int:
        """A record from the command line: --prompt fills the one column the templates use, or is a
        JSON object of the record's fields ('{"beginning": "...", "ending": "..."}')."""
        import json

        from .records import Record, RecordError

        c = self.cfg
        cols = columns_of(c.prompt_template, c.context_template, getattr(c, "suffix_template", None))
        extra = getattr(getattr(c, "constraint", None), "include_column", None)
        cols += [extra] if extra and extra not in cols else []
        text = prompt.strip()
        fields = None
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(f"--prompt: not valid JSON ({e.msg}); give the text of {{{cols[0]}}}, or a JSON "
                                  f"object of the fields {', '.join(cols)}") from None
            if not isinstance(fields, dict):
                raise RecordError(f"--prompt: expected a JSON object of the fields {', '.join(cols)}")
            fields = {k: str(v) for k, v in fields.items()}
        elif len(cols) == 1:
            fields = {cols[0]: prompt}
        else:
            raise RecordError(f"--prompt: task {self.name} uses the fields {', '.join(cols)}; give them as a JSON object, "
                              f"e.g. --prompt '{json.dumps({c: '...' for c in cols})}'")
        missing = [c for c in cols if c not in fields]
        if missing:
            raise RecordError(f"--prompt: field '{missing[0]}' missing; task {self.name} uses {', '.join(cols)}")
        fields = {**{k: "" for k in self.columns(c)}, **fields}  # e.g. the reference middle: not needed to sample
        rid = len(self.records)
        self.records.records.append(Record(rid, fields, "adhoc", "command line"))
        return rid

    # -- reward ------------------------------------------------------------------------------

    def lm_scores(self, record_id: int, trajectories: list[Trajectory], prefixes: str | None = None) -> list[list[float]]:
        return self.lm.score(self.context_ids(record_id), trajectories, end_ids=self.end_ids,
                             prefixes=prefixes or self.prefixes, can_end=self.scored_states())

    def log_likelihood(self, record_id: int, trajectories: list[Trajectory]) -> list[float]:
        """The reward LM's log-likelihood of each whole Z (without the closed-form terms)."""
        return [row[-1] for row in self.lm_scores(record_id, trajectories, prefixes="final")] if trajectories else []

    def baseline_prompt_ids(self, record_id: int) -> list[int]:
        """What the base model is given in the evaluation baselines: `prompting_template` where the
        task has one, else the policy's own prompt."""
        template = getattr(self.cfg, "prompting_template", None)
        if template is None:
            return self.prompt_ids(record_id)
        return list(self.tokenizer(self.render(template, record_id)).input_ids)

    def prefix_ok(self, record_id: int, t: Trajectory, i: int) -> bool:
        """Closed-form terms: may a Z ending after i tokens have a reward at all?"""
        if getattr(self.cfg, "first_token", "any") == "word" and i and not self.starts_a_word(t.tokens[:i]):
            return False
        return i >= self.min_len and not any(tok in self.disallowed for tok in t.tokens[:i])

    def starts_a_word(self, tokens: list[int]) -> bool:
        """What `first_token: word` asks of a Z: its first token is one the policy may start with
        (`first_tokens`, the mask on s_0) and its text begins with one space and then a visible
        character, read in context from its first few tokens."""
        return (not tokens or tokens[0] in self.word_starts) and _WORD_START.match(self.text_after(tokens[:4])) is not None

    def score(self, trajectories: list[Trajectory]) -> None:
        if self.lm is None:
            raise RuntimeError(f"task {self.name}: its reward is a language model, but no scorer is attached")
        groups = by_record(trajectories)
        for rid, ts in groups.items():
            for t, row in zip(ts, self.lm_scores(rid, ts)):
                first = t.length if self.prefixes == "final" else 0
                ends = self.can_end(t)
                # prefixes the scorer skipped (too short, or right before a tool token) hold NaN; a state
                # that cannot end (a dead end's last state among them) is worth the floor
                t.log_r = [row[i] if i < first or (ends[i] and self.prefix_ok(rid, t, i) and not math.isnan(row[i]))
                           else self.floor for i in range(t.length + 1)]

    # -- progress ------------------------------------------------------------------------------

    def is_valid(self, t: Trajectory) -> bool:
        """Ended by the policy itself, long enough, no disallowed token."""
        return t.terminated and self.prefix_ok(t.record_id, t, t.length)

    def evaluation(self, policy, sampler, eval_cfg, methods=None):
        from .lm_eval import lm_evaluation

        return lm_evaluation(self, policy, sampler, eval_cfg, methods)

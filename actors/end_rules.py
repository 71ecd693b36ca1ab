"""Where a prompt's Z may end, judged on its text: a rule the samplers apply without knowing the task.

A task that constrains Z's text (constrained generation: "Z uses the word w") can make the states
whose text breaks the constraint states that cannot end: the samplers take ⊤ out of q there, and
the learner and the scorer read the same verdicts off the trajectory (`Trajectory.end_allowed`), so
the loss balances only states that can end (`actors.trajectory.can_end_states`). A rule travels
with its prompt (`PromptRequest.end_rule`) as a plain dict, so requests stay plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    """The lower-cased words of a text (runs of letters, digits and apostrophes)."""
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class WordRule:
    """Ending is allowed where Z's text holds every `include` word and no `exclude` word (whole
    words, case-insensitive) and its word count lies in [min_words, max_words]."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_words: int = 0
    max_words: int | None = None

    @classmethod
    def of(cls, spec: dict | None) -> "WordRule | None":
        """The rule a request's plain dict describes (None: no rule)."""
        if spec is None:
            return None
        return cls(tuple(spec.get("include", ())), tuple(spec.get("exclude", ())), int(spec.get("min_words", 0)),
                   spec.get("max_words"))

    def as_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "min_words": self.min_words,
                "max_words": self.max_words}

    def allows(self, text: str) -> bool:
        ws = words(text)
        have = set(ws)
        return (all(w.lower() in have for w in self.include) and not any(w.lower() in have for w in self.exclude)
                and len(ws) >= self.min_words and (self.max_words is None or len(ws) <= self.max_words))


def rule_states(rule: WordRule, tokens: Sequence[int], decode: Callable[[list[int]], str]) -> list[bool]:
    """For k = 0..len(tokens), whether the rule lets state s_k (the first k tokens) end."""
    return [rule.allows(decode(list(tokens[:k]))) for k in range(len(tokens) + 1)]


def restamp(trajectories, rules: dict, decode: Callable[[list[int]], str]) -> None:
    """Make each trajectory's verdicts those of its record's rule now (`rules`: record id -> rule
    dict or None), in place: a trajectory from a replay or checkpoint written before the rule was on
    gets them, and one whose rule is now off loses them. Trajectories already stamped are kept."""
    for t in trajectories:
        rule = rules.get(t.record_id)
        if rule is None:
            t.end_allowed = None
        elif t.end_allowed is None or len(t.end_allowed) != t.length + 1:
            t.end_allowed = rule_states(WordRule.of(rule), t.tokens, decode)

"""What every task offers the learner and the drivers: record ids, prompt tokens, log R, seeds.

The learner sees record ids, token ids and log R only; a task owns its records, how a record
becomes the policy's prompt and the reward's context and suffix, how trajectories are scored,
which trajectories are known to be good, and what "valid" means for it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from functools import lru_cache

from gfnlm.actors.trajectory import PromptRequest, Trajectory, by_record, can_end_states
from gfnlm.configs import ConfigError
from gfnlm.configs.tasks import template_fields

from .records import RecordSet


class Task:
    name = "task"
    needs_lm = False
    """True when the reward is a language model (a `PrefixScorer` must be attached as `lm`)."""

    def __init__(self, cfg, tokenizer, records: RecordSet):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.records = records
        self.min_len, self.max_len = cfg.min_len, cfg.max_len
        self.floor = cfg.log_reward_floor
        self.end_ids = [self._single_token(t) for t in cfg.end_tokens]
        self.lm = None
        self.banned_ids: frozenset[int] = frozenset()
        """Tokens taken out of the policy's distribution (sampling and teacher forcing)."""
        self.first_banned_ids: frozenset[int] = frozenset()
        """Tokens taken out of Z's first token only (`task.first_token: word`)."""
        self.ban_penalty = math.inf
        """How far the banned tokens' logits are lowered (infinite: taken out)."""
        self._prompt_cache = lru_cache(maxsize=65536)(self._encode_prompt)
        self.end_only_after_tool = False
        """True when the policy may end only right after a tool's insertion (a tool's `end_only_after`)."""

    # -- records -----------------------------------------------------------------------------

    @property
    def train_ids(self) -> list[int]:
        return self.records.train_ids

    def draw_groups(self) -> list[tuple[list[int], float]] | None:
        """Training records in groups drawn in set shares ([(ids, share)], e.g. the labelled
        questions and the rest), or None: every training record equally often."""
        return None

    @property
    def test_ids(self) -> list[int]:
        return self.records.test_ids

    @property
    def validation_ids(self) -> list[int]:
        return getattr(self.records, "validation_ids", [])

    def split_ids(self, split: str) -> list[int]:
        """The records of one split: 'train', 'validation' or 'test'."""
        return {"train": self.train_ids, "validation": self.validation_ids, "test": self.test_ids}[split]

    def render(self, template: str, record_id: int) -> str:
        return template.format(**self.records[record_id].fields)

    def prompt_text(self, record_id: int) -> str:
        return self.render(self.cfg.prompt_template, record_id)

    def prompt_ids(self, record_id: int) -> list[int]:
        """The policy's prompt tokens of a record (tokenized on first use, then cached)."""
        return self._prompt_cache(record_id)

    def _encode_prompt(self, record_id: int) -> list[int]:
        return list(self.tokenizer(self.prompt_text(record_id)).input_ids)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(f"task.end_tokens: {text!r} is {len(ids)} tokens for this tokenizer; expected exactly one")
        return ids[0]

    def can_end(self, t: Trajectory) -> list[bool]:
        """Whether each state s_0..s_n of t may end (`actors.trajectory.can_end_states`)."""
        return can_end_states(t.length, t.tool_mask, self.min_len, self.end_only_after_tool, t.end_allowed)

    def end_rule(self, record_id: int) -> dict | None:
        """Where the record's Z may end, judged on its text (`PromptRequest.end_rule`); None: no rule."""
        return None

    @contextlib.contextmanager
    def final_state_only(self):
        """While inside, an LM reward scores each Z's last state alone (reward.prefixes final): for
        log R of whole Z (evaluation, `gfnlm target`), where every prefix would cost several times more."""
        if getattr(self, "prefixes", None) is None:
            yield
            return
        saved, self.prefixes = self.prefixes, "final"
        try:
            yield
        finally:
            self.prefixes = saved

    def scored_states(self):
        """What an LM reward's scorer takes as `can_end`: this task's `can_end` when reward.prefixes is
        'can_end' (only those states are scored), else None (every prefix the scorer would score)."""
        return self.can_end if getattr(self, "prefixes", "every") == "can_end" else None

    def max_prompt_len(self) -> int:
        return max(len(self.prompt_ids(r)) for r in self.train_ids + self.validation_ids + self.test_ids)

    # -- reward --------------------------------------------------------------------------------

    def score(self, trajectories: list[Trajectory]) -> None:
        """Fill each trajectory's untempered log R of every prefix, in place."""
        raise NotImplementedError

    def seed_trajectories(self, record_id: int) -> list[Trajectory]:
        """Known-good trajectories of a record for the replay (scored); none by default."""
        return []

    def reachable(self, tokens: list[int]) -> bool:
        """Whether the policy can write this Z at all: its first token is not masked out of s_0
        (`first_banned_ids`). A seed, reference or restored replay entry that it cannot write has
        log q = −inf and would make the loss infinite: it is left out."""
        return not (tokens and tokens[0] in self.first_banned_ids)

    def evaluation(self, policy, sampler, eval_cfg, methods=None):
        """The task's evaluation, declared (`rewards.evaluation.Evaluation`): its methods (`methods`
        picks baselines where the task has them), one method's figures, the log line, table and plot."""
        raise NotImplementedError

    def evaluate(self, policy, sampler, eval_cfg, out_dir: str, log=print, methods=None) -> dict:
        """Run the task's evaluation through the one runner: eval.json, eval.md (and eval.png) in
        out_dir; name -> figures of every method."""
        from .evaluation import reseeder, run_evaluation

        return run_evaluation(self.evaluation(policy, sampler, eval_cfg, methods), out_dir, log,
                              reseed=reseeder(sampler, eval_cfg.seed))

    def track(self, policy) -> dict:
        """Cheap figures of the policy for metrics.jsonl every eval.track_every steps (none by default)."""
        return {}

    def state_log_flows(self, t: Trajectory, temperature: float) -> list[float] | None:
        """Known log F(s_k) of the prefixes of t at reward temperature T, NaN where unknown (the
        objective then derives it from the reward); None: no state is known (the default)."""
        return None

    def reference(self, record_id: int) -> Trajectory | None:
        """The record's reference Z as a trajectory (what SFT trains on), if it has one."""
        return None

    def invalid_mass_fraction(self, vocab_size: int, valid_log_mass: float = 0.0) -> float:
        """Share of the total reward held by invalid strings: each has R = e^floor, and there are
        about vocab_size^max_len of them, against e^valid_log_mass for the valid ones."""
        log_invalid = self.floor + self.max_len * math.log(vocab_size) - valid_log_mass
        return 1.0 / (1.0 + math.exp(-log_invalid)) if log_invalid > -700 else 0.0

    def warn_if_the_floor_dominates(self, vocab_size: int, valid_log_mass: float) -> None:
        """The exact GFlowNet samples R-proportionally: a floor that leaves the ~V^max_len invalid
        strings most of the total reward makes it sample invalid text. Say so when a task is built."""
        share = self.invalid_mass_fraction(vocab_size, valid_log_mass)
        if share > 0.01:
            warnings.warn(
                f"task.log_reward_floor={self.floor:g}: the ~{vocab_size}^{self.max_len} invalid strings hold "
                f"{100 * share:.1f}% of the reward's total mass, so the exact GFlowNet samples mostly invalid text; "
                f"use a floor below {-(self.max_len * math.log(vocab_size)) + valid_log_mass - 10:.0f}",
                stacklevel=3,
            )

    def sample_records(self, sampler, record_ids: list[int], n: int, temperature: float, prompt_of=None,
                       chunk: int = 64) -> dict[int, list[Trajectory]]:
        """n samples of each record's Z at one temperature (evaluation, prediction), `chunk` records
        per engine call; `prompt_of` replaces the policy's prompt (e.g. few-shot prompting)."""
        prompt_of = prompt_of or self.prompt_ids
        out: list[Trajectory] = []
        for i in range(0, len(record_ids), chunk):
            reqs = [PromptRequest(r, prompt_of(r), 0, [temperature] * n, end_rule=self.end_rule(r))
                    for r in record_ids[i: i + chunk]]
            out += sampler.generate_batch(reqs, self.min_len, self.max_len, self.end_ids, sorted(self.banned_ids),
                                          self.ban_penalty, first_banned_ids=sorted(self.first_banned_ids))
        return by_record(out)

    # -- progress ------------------------------------------------------------------------------

    def is_valid(self, t: Trajectory) -> bool | None:
        """Whether a sample is valid for this task (None: the task has no such notion). One
        definition for training figures and evaluation."""
        return None

    @contextlib.contextmanager
    def evaluation_lengths(self):
        """max_len as evaluation and prediction sample Z: `task.eval_max_len` where the task has one
        (arithmetic: 5 operands need more room than training gives), restored afterwards."""
        trained = self.max_len
        self.max_len = getattr(self.cfg, "eval_max_len", None) or trained
        try:
            yield
        finally:
            self.max_len = trained


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def columns_of(*templates: str | None) -> list[str]:
    """The record columns a set of templates needs, each once, in order."""
    out: list[str] = []
    for t in templates:
        for name in template_fields(t) if t else []:
            if name not in out:
                out.append(name)
    return out


def vote(answers: list[int | None]) -> tuple[int | None, dict[int, int]]:
    """Majority vote (ties: the answer seen first) over the samples that derive an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, dict(counts)

"""Task sections of the config: where records come from, how they become prompts, what the reward is.

A task is data plus a reward (DESIGN §7). Records come from JSONL or CSV files with named columns;
templates with `{column}` slots turn a record into the policy's prompt, the reward's context, the
suffix Y the reward appends, and the reference Z (lm-evaluation-harness's `doc_to_text`, in
spirit). The random-number task's records are its inline prompts.
"""

from __future__ import annotations

import os
import string
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from .base import Section

DEFAULT_PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "
"""The random-number task's default prompt."""

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewards", "data")
"""Data sets shipped with gfnlm; a data file name that is not a path is looked up here."""


def template_fields(template: str) -> list[str]:
    """The `{column}` slots of a template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _check_template(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        names = template_fields(v)
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); slots are {{column}}, literal braces are {{{{ }}}}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"slot {{{name}}} must name a column, like {{text}}")
    return v




class UniformTarget(Section):
    type: Literal["uniform"] = "uniform"
    """Discriminator: 'uniform'."""
    low: int = Field(0, ge=0)
    """Smallest integer of the support."""
    high: int = Field(100, ge=0)
    """Largest integer of the support (inclusive)."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class PoissonTarget(Section):
    type: Literal["poisson"] = "poisson"
    """Discriminator: 'poisson'."""
    rate: float = Field(gt=0)
    """Mean of the Poisson distribution."""
    max_value: int = Field(100, ge=0)
    """The support is truncated to 0..max_value and renormalised."""


class BinomialTarget(Section):
    type: Literal["binomial"] = "binomial"
    """Discriminator: 'binomial'."""
    n: int = Field(ge=1)
    """Number of trials; the support is 0..n."""
    p: float = Field(gt=0, lt=1)
    """Success probability of one trial."""


class GeometricTarget(Section):
    type: Literal["geometric"] = "geometric"
    """Discriminator: 'geometric'."""
    p: float = Field(gt=0, le=1)
    """P(v) ∝ (1 - p)^v for v = 0, 1, ..."""
    max_value: int = Field(100, ge=0)
    """The support is truncated to 0..max_value and renormalised."""


class TableTarget(Section):
    type: Literal["table"] = "table"
    """Discriminator: 'table'."""
    weights: dict[int, float] = Field(min_length=1)
    """Explicit unnormalised weights, value -> weight (weights > 0; values >= 0)."""

    @field_validator("weights")
    @classmethod
    def _positive(cls, w: dict[int, float]) -> dict[int, float]:
        for v, p in w.items():
            if v < 0 or not p > 0:
                raise ValueError(f"entry {v}: {p} needs a value >= 0 and a weight > 0")
        return w


Target = Annotated[
    Union[UniformTarget, PoissonTarget, BinomialTarget, GeometricTarget, TableTarget],
    Field(discriminator="type"),
]


class RandomNumberTask(Section):
    type: Literal["random_number"] = "random_number"
    """Discriminator: 'random_number'."""

    prompts: list[str] = Field(default_factory=lambda: [DEFAULT_PROMPT], min_length=1)
    """Prompts X; each one is a separate query q(Z | X). Must not be empty."""

    target: Target = Field(default_factory=UniformTarget)
    """The distribution over integers that the policy should sample from."""

    end_tokens: list[str] = Field(default_factory=lambda: ["."], min_length=1)
    """Text of the tokens that terminate Z (the ⊤ action); q(⊤ | s) is their total probability.
    Each must be exactly one token of the model's tokenizer."""

    min_len: int = Field(1, ge=0)
    """Fewest tokens of Z before termination is allowed."""

    max_len: int = Field(3, ge=1)
    """Most tokens of Z the policy chooses (a tool's insertions do not count); a trajectory that
    reaches it stops there, unended."""

    log_reward_floor: float = -50.0
    """log R of anything that is not a canonical integer of the support followed by ⊤. Keep
    floor + max_len × ln(vocabulary size) well below 0: there are about V^max_len invalid strings,
    and with a higher floor their total reward outweighs the valid numbers' (a warning says so)."""

    state_flow: Literal["exact", "reward"] = "exact"
    """How sub-trajectory balance gets the flow F(s) of a prefix s. 'reward': modified SubTB's
    log R(s⊤) − log q(⊤|s) at every prefix (the paper). 'exact': where s's own termination holds
    under 1/1000 of the target mass that extends it (the prefix "1" of 10..30, which is no number
    of the support; the prefixes of a peaked target's tails), the known ratio F(s)/F(empty prefix),
    with F(s) = Σ R(x) over the support members x that extend s, instead; elsewhere as 'reward'.
    The terminal distribution is the target either way; 'exact' converges on supports that are not
    closed under prefixes, where 'reward' asks q(⊤|s) to reach e^floor (see docs/results.md, levers)."""

    @field_validator("prompts")
    @classmethod
    def _non_empty_prompts(cls, v: list[str]) -> list[str]:
        if any(not p for p in v):
            raise ValueError("prompts must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")
        return self


class DataConfig(Section):
    train: str
    """Records to train on: a JSONL file (one object per line) or a CSV file with a header row.
    A bare file name is looked up in the working directory, then in gfnlm's shipped data
    (rewards/data/)."""

    test: str | None = None
    """Held-out records for evaluation (same format); unset takes `test_fraction` of `train`."""

    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """With no `test` file: the seeded fraction of `train` held out for evaluation."""

    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """The seeded fraction of the training records (after the test split) held out for choosing
    settings: never trained on; `eval.split: validation` evaluates on them."""

    subset: int | None = Field(None, ge=1)
    """Train on a seeded subset of this many training records (all when unset; more than there are
    is an error)."""

    seed: int = 0
    """Seed of the split and the subset."""

    @model_validator(mode="after")
    def _one_test_source(self):
        if self.test and self.test_fraction:
            raise ValueError(f"test_fraction: {self.test_fraction} beside a test file ({self.test}) would be ignored; "
                             f"give one of them")
        return self


class ContinuationTask(Section):
    """Sentence continuation (paper §4.2): R(Z) = p_LM(Z ⊤ | X)^(1/T), ⊤ an end token."""

    type: Literal["continuation"] = "continuation"
    """Discriminator: 'continuation'."""

    data: DataConfig
    """Where the records (prompts X) come from."""

    prompt_template: str = "{text}"
    """The policy's prompt X, from a record's columns."""

    context_template: str | None = None
    """The reward's context; unset uses the policy's prompt."""

    end_tokens: list[str] = Field(default_factory=lambda: ["."], min_length=1)
    """Text of the tokens that terminate Z (the ⊤ action); each must be one token."""

    min_len: int = Field(1, ge=0)
    """Fewest tokens of Z before ⊤ may be chosen; shorter prefixes get the floor."""

    max_len: int = Field(30, ge=1)
    """Most tokens of Z the policy chooses (a tool's insertions do not count); a trajectory that
    reaches it stops there, unended."""

    disallowed: list[str] = Field(default_factory=lambda: ["\n"])
    """Tokens whose text contains any of these strings are disallowed: a prefix holding one gets
    the floor."""

    first_token: Literal["any", "word"] = "any"
    """'word': Z must begin with one space and then a visible character, a word of its own. The
    tokens that do not start so ("com" after "years.", a vertical tab, a lone space) are masked out
    of the policy's first token (sampling in both engines, teacher forcing, PPO and the evaluation
    baselines), so a tokenizer that writes " 5" as a lone space and "5" (SmolLM2)
    lets no Z start with a digit. The reward gives the floor to a Z that breaks the rule; seeds and
    references the mask does not allow are left out. 'any': no rule."""

    disallowed_tokens: list[str] = Field(default_factory=list)
    """Tokens whose whole text equals one of these (a leading space counts: "A" is not " A") are
    disallowed too, e.g. the single capitals that end abbreviations ("U.S.") with a period."""

    mask_disallowed: bool = True
    """Also take disallowed tokens out of the policy: never sampled, and the policy's log-probs
    renormalised without them, in sampling and in the learner's teacher-forced pass alike."""

    disallow_special: bool = True
    """Treat the tokenizer's special tokens (BOS, chat markers, ...) other than the end tokens as
    disallowed."""

    log_reward_floor: float = -99.0
    """log R of prefixes that are too short or hold a disallowed token."""

    @field_validator("prompt_template", "context_template")
    @classmethod
    def _templates(cls, v):
        return _check_template(v)

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")
        return self


class InfillingTask(ContinuationTask):
    """Infilling (paper §4.3): R(Z) = p_LM(X Z Y) with X the beginning, Y the ending."""

    type: Literal["infilling"] = "infilling"
    """Discriminator: 'infilling'."""

    prompt_template: str = "Beginning: {beginning}\nEnding: {ending}\nMiddle:"
    """The policy's prompt, from a record's columns."""

    context_template: str | None = "{beginning}"
    """The reward's context X (what comes before Z in the scored text)."""

    suffix_template: str = ". {ending}"
    """Y, scored after Z: log R(z_1:i) = log p(z_1:i Y | X). It starts with the end token's text,
    since ⊤ ends the middle sentence."""

    reference_template: str | None = " {middle}"
    """The reference Z of a record (its trailing end-token text is dropped); seeds the replay and
    is what SFT trains on and BLEU compares against."""

    min_len: int = Field(3, ge=0)
    """Fewest tokens of Z before ⊤ may be chosen; shorter prefixes get the floor."""

    max_len: int = Field(25, ge=1)
    """Most tokens of Z the policy chooses (a tool's insertions do not count); a trajectory that
    reaches it stops there, unended."""

    seed_replay_with_references: bool = True
    """Put each training record's reference Z into the replay at the start."""

    @field_validator("suffix_template", "reference_template")
    @classmethod
    def _more_templates(cls, v):
        return _check_template(v)


class ConstraintConfig(Section):
    include: list[str] = Field(default_factory=list)
    """Words Z must contain (whole words, case-insensitive)."""

    exclude: list[str] = Field(default_factory=list)
    """Words Z must not contain (whole words, case-insensitive)."""

    min_words: int = Field(0, ge=0)
    """Fewest words of Z."""

    max_words: int | None = Field(None, ge=1)
    """Most words of Z (unset: no limit)."""

    include_column: str | None = None
    """A record column holding more required words (space-separated), per record."""

    end_when_satisfied: bool = False
    """Let Z end (⊤) only where its text satisfies c: the states before the required word (or
    with an excluded one) become states that cannot end. The samplers take ⊤ out of q there, and
    with learner.objective `{type: subtb, states: can_end}` the loss balances only states that can
    end, so prefixes without the word no longer pin it at the floor. Needs sampler.engine
    transformers (or auto, which then takes it)."""


class ConstrainedTask(ContinuationTask):
    """Constrained generation: R(Z) = p_LM(Z ⊤ | X) · c(Z). A finished Z with c = 0 gets the floor;
    every prefix is judged as a finished Z of its own. Keep the floor below −(max_len · ln V): the
    ~V^max_len strings that violate c otherwise hold most of the reward (a warning says so)."""

    type: Literal["constrained"] = "constrained"
    """Discriminator: 'constrained'."""

    constraint: ConstraintConfig = Field(default_factory=ConstraintConfig)
    """c(Z): what a finished Z must satisfy."""

    prompting_template: str | None = None
    """The prompt of the 'prompting' baselines in evaluation (the base model told the constraint
    in words); unset uses the policy's prompt."""

    seed_tries: int = Field(0, ge=0)
    """Replay seeds by rejection sampling: the base model continues each training record's reward
    context this many times (adapter off, T = 1) and the continuations that end and satisfy c go
    into the replay at the start; 0: none."""

    @field_validator("prompting_template")
    @classmethod
    def _prompting(cls, v):
        return _check_template(v)

    @model_validator(mode="after")
    def _something_to_satisfy(self):
        c = self.constraint
        if not (c.include or c.exclude or c.min_words or c.max_words or c.include_column):
            raise ValueError("constraint: give at least one of include, exclude, min_words, max_words, include_column")
        return self


class QuestionGenerator(Section):
    """Seeded arithmetic questions of a shape (operand counts, digits, operators), distinct, each with
    its answer."""

    count: int = Field(0, ge=0)
    """Questions to generate (0: none)."""

    operands: list[int] = Field(default_factory=lambda: [3, 4], min_length=1)
    """Operand counts, drawn uniformly per question (each >= 2)."""

    digits: int = Field(1, ge=1, le=6)
    """Digits of each operand: operands are drawn from 0 .. 10^digits - 1."""

    operators: str = "+-"
    """Operators drawn uniformly between operands: any of + - *."""

    seed: int = 0
    """Seed of the generator."""

    @field_validator("operands")
    @classmethod
    def _two_or_more(cls, v):
        if any(n < 2 for n in v):
            raise ValueError(f"operand counts must be at least 2, got {v}")
        return v

    @field_validator("operators")
    @classmethod
    def _known_operators(cls, v):
        if not v or set(v) - set("+-*"):
            raise ValueError(f"expected a non-empty string of + - *, got {v!r}")
        return v


class ArithmeticData(DataConfig):
    """The arithmetic task's `data`: the same fields, with the authors' worked examples as the
    default `train`, so `-o task.data.validation_fraction=0.1` needs nothing else."""

    train: str = "../shared/data/arithmetic/1digit_34_op+-_train_50.json"
    """Worked examples (used unless `worked` generates them)."""

    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """The seeded fraction of the generated training questions (`generate`) held out for choosing
    settings: never trained on; `eval.split: validation` evaluates them as one set."""


class ArithmeticTask(InfillingTask):
    """Arithmetic with a latent chain of thought (paper §4.5): X a question, Z a rationale whose
    results a calculator inserts, Y ". The answer is N."; R(Z) = p_LM(Z Y | shots X), the reward
    context holding `shots` worked training examples."""

    type: Literal["arithmetic"] = "arithmetic"
    """Discriminator: 'arithmetic'."""

    data: ArithmeticData = Field(default_factory=ArithmeticData)
    """Worked examples (`data.train`: columns of the templates plus the rationale); `data.seed`
    picks the labelled ones and the shots. `data.test` is not used: see `test_sets`."""

    test_sets: dict[str, str | QuestionGenerator] = Field(default_factory=lambda: {
        n: f"../shared/data/arithmetic/1digit_{n}_op+-_test.json" for n in ("3", "4", "5")})
    """Evaluation sets by name (e.g. operand count) -> a file of questions and answers (the authors'),
    or a generator of questions of that shape, e.g. {count: 500, operands: [5], seed: 105}; a
    generated set holds no question that a training record holds."""

    worked: QuestionGenerator | None = None
    """Generated worked examples in place of `data.train`'s file: questions with their left-to-right
    rationale ("9 + 4 =, 13 - 8 ="; + and - only), e.g. {count: 50, operands: [3, 4], seed: 1}."""

    prompt_template: str = "{str_query}"
    """The policy's prompt X."""

    context_template: str | None = "{str_query}"
    """X as the reward sees it, after the shots."""

    suffix_template: str = ". The answer is {num_sol}."
    """Y, scored after Z (starts with the end token's text)."""

    reference_template: str | None = None
    """Not used: a record's reference Z is its rationale with the calculator's results filled in."""

    rationale_column: str = "str_rationale"
    """Column of the worked examples' rationales ("9 + 4 =, 13 - 8 ="); the calculator fills in
    the results, exactly as it does during sampling."""

    answer_column: str = "num_sol"
    """Column of the integer answer."""

    labelled: int = Field(10, ge=0)
    """Worked examples trained on (their rationales seed the replay; SFT trains on them)."""

    labelled_share: float | None = Field(None, gt=0.0, lt=1.0)
    """Share of the training draws that are labelled questions, e.g. 0.05 (the authors' weights
    give ~5 %), however many unlabelled questions there are; unset: every training question
    equally often (the labelled ones then make labelled / (labelled + unlabelled) of the draws)."""

    shots: int = Field(3, ge=0)
    """Worked examples in the reward's context (others than the labelled ones); their KV cache is
    computed once."""

    shot_separator: str = "\n"
    """Text after each worked example in a few-shot context."""

    generate: QuestionGenerator = Field(default_factory=QuestionGenerator)
    """Unlabelled training questions."""

    allowed_chars: str = " 0123456789,.=+-"
    """Z may only hold tokens made of these characters; other tokens get `disallowed_penalty` in
    the policy and the floor in the reward."""

    disallowed_penalty: float = Field(float("inf"), gt=0)
    """Log-probability penalty of the other tokens in the policy (infinite: taken out)."""

    disallowed: list[str] = Field(default_factory=list)
    """Not used: see `allowed_chars`."""

    min_len: int = Field(1, ge=0)
    """Fewest tokens of Z."""

    max_len: int = Field(40, ge=1)
    """Most tokens of Z the policy chooses in training; the calculator's insertions do not count
    (the authors: 18 GPT-J tokens, a 4-operand rationale; SmolLM2 spells " 6" as two tokens, so the
    same rationale takes 20-22 here)."""

    eval_max_len: int | None = Field(None, ge=1)
    """Most tokens of Z the policy chooses at evaluation (None: max_len): a 5-operand rationale
    takes more than a 3- or 4-operand one (about 28 SmolLM2 tokens)."""

    @model_validator(mode="after")
    def _enough_worked_examples(self):
        if not self.test_sets:
            raise ValueError("test_sets: name at least one evaluation set")
        for name, spec in self.test_sets.items():
            if not isinstance(spec, str) and spec.count < 1:
                raise ValueError(f"test_sets.{name}.count: a generated test set needs at least one question")
        if self.eval_max_len is not None and self.eval_max_len < self.min_len:
            raise ValueError(f"eval_max_len ({self.eval_max_len}) must not be below min_len ({self.min_len})")
        if self.worked is not None:
            if set(self.worked.operators) - set("+-"):
                raise ValueError(f"worked.operators: {self.worked.operators!r}: a generated rationale works left to "
                                 f"right, so + and - only")
            if self.worked.count < self.labelled + self.shots:
                raise ValueError(f"worked.count ({self.worked.count}) must hold labelled ({self.labelled}) + shots "
                                 f"({self.shots}) examples")
        return self


class EMConfig(Section):
    """E-steps (q(Z | X), the GFlowNet) and M-steps (the classifier p(Y | X Z), a second adapter)."""

    schedule: Literal["after", "alternate"] = "after"
    """'after' (the authors'): the E-steps train q against a fixed reward, then one M phase trains the
    classifier on Z from the trained q; 'alternate': an M phase every `e_steps` learner steps."""

    e_reward: Literal["base", "m"] = "base"
    """The E-step's reward LM: 'base' the frozen base model (the authors'; the reward never changes),
    'm' the base with the M adapter (the reward moves after each M phase and the replay is rescored).
    Prediction always classifies with base + M."""

    e_steps: int = Field(20, ge=0)
    """With schedule 'alternate': E-steps (learner steps) between two M phases. 0: no M-step at all
    (prediction then classifies with the base LM)."""

    m_steps: int = Field(10, ge=1)
    """Optimizer steps of one M phase."""

    m_lr: float = Field(1e-4, gt=0)
    """Learning rate of the M adapter (AdamW)."""

    m_samples: int = Field(4, ge=1)
    """Z sampled from q per training record for each M step."""

    m_records: int = Field(0, ge=0)
    """Training records per M step, a fresh draw without replacement each step (the M phase's own
    seeded generator); 0: every one. An M step costs a sampling pass and a forward and backward pass
    per record, so with 50 labelled reviews 10 per step is about 5× cheaper than all of them."""

    z_from: Literal["q", "base"] = "q"
    """Where the M phase's Z and prediction's Z come from: 'q' the E-step's policy; 'base' the base
    model (adapter off): the M-only ablation, which says what the E-step earns (give it few learner
    steps: they train nothing it uses). Needs the transformers engine."""


class SubjectivityTask(InfillingTask):
    """Classification with a latent rationale (paper §4.4, SUBJ): X a review in an instruction, Z
    1–5 tokens, R(Z) = p_LM(Z Y | X) with Y ", so it is <label>." for the record's label; the
    M-step trains a second adapter to predict Y from X Z, and the reward uses it."""

    type: Literal["subjectivity"] = "subjectivity"
    """Discriminator: 'subjectivity'."""

    data: DataConfig = Field(default_factory=lambda: DataConfig(train="../shared/data/subj/train.10.jsonl",
                                                                test="../shared/data/subj/test.jsonl"))
    """Labelled training examples and the test set (columns `text` and `label`)."""

    prompt_template: str = 'Classify this movie review as objective or subjective: "{text}" This review is'
    """The policy's prompt X."""

    context_template: str | None = None
    """The reward's context (unset: X itself)."""

    label_column: str = "label"
    """Column of the label: 0 or 1."""

    label_words: list[str] = Field(default_factory=lambda: ["objective", "subjective"], min_length=2, max_length=2)
    """The words of labels 0 and 1, available to templates as {label_word}."""

    suffix_template: str = ", so it is {label_word}."
    """Y, scored after Z (starts with the end token's text)."""

    reference_template: str | None = " {label_word}"
    """What SFT trains the policy to write as Z (the label word itself)."""

    end_tokens: list[str] = Field(default_factory=lambda: [","], min_length=1)
    """Tokens that end Z."""

    min_len: int = Field(1, ge=0)
    """Fewest tokens of Z."""

    max_len: int = Field(5, ge=1)
    """Most tokens of Z."""

    wrong_label_penalty: float = Field(-20.0, le=0)
    """Added to log R of a prefix after which the reward LM prefers the other label's Y."""

    seed_samples: int = Field(20, ge=0)
    """Rationales per training X that the base model writes into the replay at the start."""

    seed_prompt: str | None = " {label_word} because it is"
    """Label-conditioned seeds (the authors'): the base model continues X + this text (formatted
    with the record's fields), each continuation cut before its first token that is not a word or a
    number, kept when at least `min_len` tokens remain, and scored as a Z of X. None: the base
    model's own continuations of X."""

    seed_replay_with_references: bool = False
    """The label word as Z is not put into the replay (it would teach Z = the answer)."""

    prompting_shots: int = Field(10, ge=0)
    """Labelled training examples in the prompt of the few-shot prompting baseline."""

    em: EMConfig = Field(default_factory=EMConfig)
    """E/M alternation."""


class CustomTask(ContinuationTask):
    """Your own posterior: R(Z) from a Python function of yours (`reward.function`), over records from
    your files with templates as every task; with `beta`, times the frozen LM's prior p_LM(Z ⊤ | C)."""

    type: Literal["custom"] = "custom"
    """Discriminator: 'custom'."""

    prompt_template: str = "{prompt}"
    """The policy's prompt X, from a record's columns."""

    beta: float | None = Field(None, gt=0)
    """None: log R(Z) = the function's value. A number β: log R(Z) = log p_LM(Z ⊤ | C) + value / β,
    the KL-to-prior form TBA and red-teaming use (the frozen base model as the prior)."""

    @model_validator(mode="after")
    def _held_out_by_default(self):
        """With neither `data.test` nor `data.test_fraction`, 10 % of the records (at least one) are
        held out for evaluation, so the smallest config trains and evaluates on unseen prompts."""
        if self.data.test is None and self.data.test_fraction == 0:
            self.data = self.data.model_copy(update={"test_fraction": 0.1})
        return self


Task = Annotated[Union[RandomNumberTask, ContinuationTask, InfillingTask, ConstrainedTask, ArithmeticTask,
                       SubjectivityTask, CustomTask], Field(discriminator="type")]

TASK_TYPES = ("random_number", "continuation", "infilling", "constrained", "arithmetic", "subjectivity", "custom")


def support_size(target) -> int:
    """Members of a random-number target's support."""
    if isinstance(target, UniformTarget):
        return target.high - target.low + 1
    if isinstance(target, BinomialTarget):
        return target.n + 1
    if isinstance(target, TableTarget):
        return len(target.weights)
    return target.max_value + 1


def seeds_per_record(task) -> int:
    """Known-good trajectories a task puts into the replay per record at the start."""
    if isinstance(task, RandomNumberTask):
        return support_size(task.target)
    if isinstance(task, SubjectivityTask):
        return task.seed_samples
    if isinstance(task, ConstrainedTask) and task.seed_tries:
        return task.seed_tries
    return 1 if getattr(task, "seed_replay_with_references", False) else 0



def has_references(task) -> bool:
    """Whether a task's records carry a reference Z (what SFT trains on)."""
    if isinstance(task, ArithmeticTask):
        return task.labelled > 0
    return getattr(task, "reference_template", None) is not None


def transformers_only(task) -> str | None:
    """What in the task only the transformers sampler applies (None: nothing): text end rules."""
    if text_end_rules(task):
        return "task.constraint.end_when_satisfied (a rule on Z's text)"
    return None


def text_end_rules(task) -> bool:
    """True when the task's prompts carry text end rules (`PromptRequest.end_rule`): constrained
    generation with `constraint.end_when_satisfied`."""
    constraint = getattr(task, "constraint", None)
    return bool(constraint is not None and constraint.end_when_satisfied)

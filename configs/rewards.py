"""Config sections of the rewards layer: the reward model (and its fit) and the evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section
from .tasks import _check_template


class RewardFit(Section):
    """SFT of the reward LM on the training records' text before training: the paper's infilling
    reward is the base model fine-tuned on the training stories. The fitted model (a LoRA of rank
    `r` trained for `steps`, then merged) is saved once into $GFNLM_HOME/fitted/<hash of the base
    model, the records' texts and these settings> and reused by every later run with the same."""

    template: str
    """The text of one training record to fit on, from its columns, e.g. "{beginning} {middle} {ending}"."""

    steps: int = Field(200, ge=1)
    """Optimizer steps of the fit."""

    batch_size: int = Field(8, ge=1)
    """Records per step (a seeded draw)."""

    lr: float = Field(5e-4, gt=0)
    """Learning rate of the fit's LoRA (AdamW, constant)."""

    r: int = Field(16, ge=1)
    """Rank of the fit's LoRA (alpha = 2r) on the policy's `lora.target_modules`."""

    seed: int = 0
    """Seed of the fit's draws and initialisation."""

    validation_every: int = Field(25, ge=1)
    """Every this many steps the fit's NLL per token on the validation records' texts (never trained
    on) is measured and logged, when the task has a validation split (`task.data.validation_fraction`)."""

    keep_best: bool = False
    """Early stopping on the validation split: keep the LoRA of the measurement with the lowest
    validation NLL, and stop after `patience` measurements without a new lowest. With a few hundred
    texts a fit of `steps` memorises them (their NLL falls far below the held-out texts'). Measured
    on the infilling preset, though, the early-stopped fit made every method score lower on the
    validation stories (docs/tasks.md), so it is off there. Needs `task.data.validation_fraction` > 0."""

    patience: int = Field(2, ge=1)
    """With `keep_best`: measurements without a new lowest validation NLL before the fit stops."""

    policy_starts_here: bool = True
    """The policy's base model is the fitted one too (the authors start the policy from the SFT
    model); then the reward shares it (adapter off) and no second model is loaded. False: the
    policy starts from `model.path` and the fitted reward is loaded beside it."""

    @field_validator("template")
    @classmethod
    def _template(cls, v):
        return _check_template(v)


class RewardConfig(Section):
    function: str | None = None
    """Task 'custom': your reward, "module:function" (importable from the working directory) or
    "path/to/file.py:function". It is called as function(texts, records) with the decoded Z strings
    and each one's record fields (a dict), in batches, and returns one log R (a finite float) per
    text. Every prefix that can end is scored as a finished Z of its own unless
    `reward.prefixes: final`."""

    fit: RewardFit | None = None
    """Fit the reward LM on the training records first (see RewardFit); unset: no fit. Not with
    `model` or `adapter`."""

    model: str | None = None
    """The frozen reward LM of tasks whose reward is a language model: a local Hugging Face
    folder sharing the policy's tokenizer; unset uses the policy's base model (adapter off)."""

    adapter: str | None = None
    """A peft LoRA folder applied to the reward LM (e.g. fitted by SFT on the training stories,
    as the paper does for infilling); unset: the plain base model."""

    prefixes: Literal["every", "final", "can_end"] = "every"
    """Score every prefix of Z (what SubTB with `states: every` needs), only the states that can end
    (past task.min_len, and with a tool's `end_only_after` only right after its insertions: what
    SubTB with `states: can_end` needs, and fewer suffix passes), or only the whole Z (one pass;
    TB, SFT and PPO)."""

    colocate: bool = True
    """Ray runtime: score inside each sampler actor (with its base model, adapter off); False
    chains a pool of reward actors to the samplers."""

    num_actors: int = Field(1, ge=1)
    """Reward actors in the pool (reward.colocate false)."""

    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each reward actor."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each reward actor."""

    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a reward actor."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each reward actor asks for, e.g. {gfnlm_reward: 1}."""


class EvalConfig(Section):
    num_samples: int = Field(10_000, ge=1)
    """Samples drawn from each of the base model and the trained policy."""

    batch_size: int = Field(1000, ge=1)
    """Samples generated per call during evaluation."""

    include_base: bool = True
    """Also evaluate the base model (adapter disabled) for comparison."""

    track_every: int = Field(25, ge=0)
    """Steps between the task's cheap exact figures in metrics.jsonl while training (random
    numbers: exact KL, TV and invalid mass from one teacher-forced pass); 0: never."""

    samples_per_record: int = Field(16, ge=1)
    """Tasks over records: samples drawn per test record by each method."""

    seed: int = 0
    """Seed of the evaluation's samples: each method starts from it (mixed with the method's name),
    so the figures a run wrote at the end of training are what `gfnlm eval --run` writes again,
    whatever the generator drew before, and adding a baseline changes no other method's samples."""

    max_records: int | None = Field(None, ge=1)
    """Tasks over records: evaluate on at most this many test records (seeded choice)."""

    split: Literal["test", "validation", "train"] = "test"
    """Tasks over records: the records evaluated. 'test' (held out: `task.data.test` or
    `test_fraction`), 'validation' (`task.data.validation_fraction`, for choosing settings), or
    'train' (the records the policy trained on: labelled so in every table). An empty split is an
    error before anything starts."""

    baselines: list[str] = Field(default_factory=lambda: ["sample", "greedy", "nucleus"])
    """Tasks over records: decoding baselines on the base model, compared with the trained policy.
    Names: sample, tempered (T = eval.tempered_temperature), nucleus (p = 0.95), greedy, beam
    (n beams), beam5 (5n beams), diverse_beam (n beams in n groups), diverse_beam5 (5n beams),
    sample5 (5n samples: 5× the compute); constrained generation also rejection5 (up to 5 samples of
    p_LM(Z | X) per output, the first that satisfies c) and, with constraint.end_when_satisfied,
    sample_rule (sample under the same rule on where Z may end as the trained policy)."""

    tempered_temperature: float = Field(0.7, gt=0)
    """Temperature of the 'tempered' baseline."""

    vote_temperature: float = Field(0.5, gt=0)
    """Tasks with answers (arithmetic): temperature of the samples whose answers are voted on."""

    embedding_model: str | None = None
    """A local sentence-embedding model folder (mean-pooled last hidden states) for diversity;
    unset uses the base LM's own hidden states."""

    bertscore_model: str | None = None
    """A local model folder for BERTScore in infilling evaluation (skipped when unset)."""

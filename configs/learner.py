"""Config sections of the learner layer: the reward temperature, the batch mix, the objectives,
the optimizer and the run folder."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from .base import Section


class RewardTemperature(Section):
    start: float = Field(1.0, gt=0)
    """Reward temperature T at step 0; the loss sees log R / T."""
    end: float = Field(1.0, gt=0)
    """Reward temperature after `horizon` steps."""
    horizon: int = Field(1, ge=1)
    """Steps over which T moves linearly from start to end."""


class BatchConfig(Section):
    prompts_per_step: int = Field(1, ge=1)
    """Records (prompts) per micro-batch, picked by the learner's seeded record scheduler."""

    samples_per_prompt: int = Field(32, ge=1)
    """Trajectories per record in a micro-batch (fresh, tempered and replayed together); a
    micro-batch holds prompts_per_step × samples_per_prompt trajectories."""

    on_policy: float = Field(0.5, ge=0, le=1)
    """Fraction of a record's trajectories sampled from the current policy at temperature 1."""

    tempered: float = Field(0.0, ge=0, le=1)
    """Fraction sampled at a temperature drawn from U[temper_low, temper_high] per sample."""

    replay: float = Field(0.5, ge=0, le=1)
    """Fraction drawn from the record's replay buffer; while it holds fewer, fresh on-policy
    samples fill the rest."""

    temper_low: float = Field(0.5, gt=0)
    """Lowest sampling temperature for tempered samples."""

    temper_high: float = Field(2.0, gt=0)
    """Highest sampling temperature for tempered samples."""

    @model_validator(mode="after")
    def _mix(self):
        total = self.on_policy + self.tempered + self.replay
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"on_policy + tempered + replay must be 1, got {total:g}")
        if self.temper_low > self.temper_high:
            raise ValueError(f"temper_low ({self.temper_low}) must not exceed temper_high ({self.temper_high})")
        return self


# ----------------------------------------------------------------------------------------------
# learner, evaluation, run


class SubTBObjective(Section):
    """Modified sub-trajectory balance over every prefix (the paper's objective)."""

    type: Literal["subtb"] = "subtb"
    """Discriminator: 'subtb'."""

    lam: float = Field(1.0, ge=0)
    """λ: pair (i, j) weighs λ^(j-i-1). 1.0 in the paper; 0 is detailed balance."""

    states: Literal["every", "can_end"] = "every"
    """Which prefixes are states that can end. 'every': all of them, those before task.min_len with
    the floor reward and the unmasked q(⊤ | s) (the paper's code). 'can_end': only those the samplers
    may end at; ⊤ is out of q before min_len, sub-trajectories are balanced between states that can
    end, and a first state that cannot end takes the batch's estimate of its flow per record."""


class TBObjective(Section):
    """Trajectory balance with a learned log Z, for rewards known only at the end."""

    type: Literal["tb"] = "tb"
    """Discriminator: 'tb'."""

    log_z_lr: float = Field(1e-2, gt=0)
    """Learning rate of log Z."""

    log_z: Literal["per_record", "scalar", "head"] = "per_record"
    """'per_record': one learned log Z per record (a table indexed by record id, checkpointed with
    the run): records of an LM task have different partition functions. 'scalar': one log Z shared
    by every record, refused when the task trains on more than one record (one shared value cannot
    settle at q ∝ R for all of them once replayed or tempered samples enter the batch). 'head': a
    small MLP (FlowRL's and red-teaming's form) on the prompt's mean-pooled last hidden state under
    the frozen base model, so it also gives a log Z for prompts it never trained on."""

    head_hidden: int = Field(128, ge=1)
    """Width of the log Z head's hidden layer (log_z: head)."""

    length_normalize: bool = False
    """FlowRL's residual: log q(Z ⊤) and log R(Z) divided by the actions (tokens the policy chose
    + ⊤). For Z of one length it is TB rescaled; across lengths its optimum is not q ∝ R."""

    importance_clip: float | None = Field(None, gt=0)
    """FlowRL's clipped importance weights: each squared residual times min(q_θ(Z) / q_sampler(Z),
    this), without gradient (their recipe's cap: 10). Unset: no weights (TB needs none off-policy)."""


class VarGradObjective(Section):
    """Trajectory balance with log Z estimated per record from the batch (VarGrad, as TBA does): the
    mean over that record's samples of log R − log q(Z ⊤), without gradient; no parameter to learn.
    Needs batch.samples_per_prompt ≥ 2."""

    type: Literal["vargrad"] = "vargrad"
    """Discriminator: 'vargrad'."""

    length_normalize: bool = False
    """As TB's: the estimate and the residuals per action (FlowRL's normalisation)."""

    importance_clip: float | None = Field(None, gt=0)
    """As TB's: FlowRL's clipped importance weights on the squared residuals."""


class SFTObjective(Section):
    """Maximum likelihood of the records' reference Z (and ⊤) under the policy; no sampling."""

    type: Literal["sft"] = "sft"
    """Discriminator: 'sft'."""


class PPOObjective(Section):
    """The reward-maximizing baseline: clipped policy gradient on log R with a group-mean baseline
    (RLOO/GRPO, no value head) and a KL penalty to a frozen reference (`reference`). On-policy only."""

    type: Literal["ppo"] = "ppo"
    """Discriminator: 'ppo'."""

    clip: float = Field(0.2, gt=0, lt=1)
    """ε of the clipped ratio."""

    kl_coef: float = Field(0.05, ge=0)
    """β: weight of the KL penalty to the reference policy (`reference`), per action."""

    reference: Literal["base", "init"] = "base"
    """The policy the KL penalty holds the run near: 'base', the base model with the adapter off;
    'init', the adapter training started from (lora.init, e.g. an SFT run's: the usual RLHF
    reference), frozen. 'init' needs lora.init."""

    epochs: int = Field(2, ge=1)
    """Passes over each collected batch."""

    minibatches: int = Field(2, ge=1)
    """Optimizer steps per pass (the batch is shuffled into this many parts)."""

    normalize_advantages: bool = True
    """Divide each leave-one-out advantage by its record group's reward standard deviation (GRPO)."""


Objective = Annotated[Union[SubTBObjective, TBObjective, VarGradObjective, SFTObjective, PPOObjective],
                      Field(discriminator="type")]


class LearnerConfig(Section):
    objective: Objective = Field(default_factory=SubTBObjective)
    """What the update minimises: {type: subtb, lam, states}, {type: tb, log_z, log_z_lr},
    {type: vargrad}, {type: sft} or {type: ppo, clip, kl_coef, epochs, minibatches}; a bare name
    ('subtb', 'tb', 'vargrad', 'sft', 'ppo') takes that objective's defaults."""

    @field_validator("objective", mode="before")
    @classmethod
    def _bare_name(cls, v):
        return {"type": v} if isinstance(v, str) else v

    steps: int = Field(300, ge=1)
    """Optimizer steps of the run."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of the LoRA weights (AdamW)."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up, in optimizer steps."""

    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warm-up: 'constant' keeps lr; 'cosine' decays it to lr × min_lr_ratio at the last
    step (learner.steps), so the policy settles instead of jittering around the target."""

    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """'cosine': the last step's learning rate as a fraction of lr."""

    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clipping threshold."""

    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""

    seed: int = 0
    """Seed of every random generator of the run."""


class RunConfig(Section):
    output_dir: str = "runs/random_number"
    """Folder of the run: resolved config, checkpoints, metrics, evaluation."""

    checkpoint_every: int = Field(50, ge=1)
    """Steps between checkpoints (a final one is always written)."""

    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are removed."""

    log_every: int = Field(1, ge=1)
    """Steps between metric lines in metrics.jsonl."""

    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads of the learner's process; unset: every core in runtime.mode local (one
    process holds the machine), torch's default in ray mode (which honours OMP_NUM_THREADS)."""

    progress: bool = True
    """Show a progress bar on the terminal."""

    evaluate_at_end: bool = True
    """Run the evaluation (see `eval`) when training ends."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """Experiment trackers that get the per-step figures of metrics.jsonl, the resolved config as
    hyperparameters, and at the end the evaluation figures and PNGs (as TRL's `report_to`; needs
    `pip install gfnlm[tracking]`). TensorBoard: event files in <run>/tensorboard. W&B: offline
    files in <run>/wandb unless WANDB_MODE says otherwise. MLflow: run.mlflow_tracking_uri."""

    wandb_project: str = "gfnlm"
    """W&B project of the run (report_to: wandb); the run's name is the run folder's."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (report_to: mlflow); unset: a local store in <run>/mlruns, or the
    MLFLOW_TRACKING_URI environment variable when set."""

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        missing = [t for t in v if importlib.util.find_spec(t) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} is not installed; pip install 'gfnlm[tracking]' "
                             f"(or the package itself), or leave it out of run.report_to")
        if len(set(v)) != len(v):
            raise ValueError("names a tracker twice")
        return v

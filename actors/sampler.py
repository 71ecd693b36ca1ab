"""Samplers: continuations of several prompts with per-token behaviour log-probs.

`SamplerEngine` is the interface every engine implements: the transformers engine here, the vLLM
engine in `vllm_engine.py`; `engines.make_sampler` picks one. The transformers engine runs all
distinct prompts of a call in one left-padded pass, repeats each prompt's KV cache over its
samples, and drops finished samples from the batch as they end. Both engines run tools (`tools.py`): when a sample's text ends with a trigger, the
tool's text follows as forced environment tokens (log-prob 0, tool mask set, no termination).
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol, Sequence

import torch

from .end_rules import WordRule
from .policy import allowed_head, ban_first, penalize
from .tools import ToolRunner, longest_with_tools
from .trajectory import PromptRequest, SampleRequest, Trajectory


class SamplerEngine(Protocol):
    version: int

    def generate(
        self,
        record_id: int,
        prompt_ids: list[int],
        n: int,
        temperatures: float | Sequence[float],
        min_new_tokens: int,
        max_new_tokens: int,
        end_ids: list[int],
        source: str = "on_policy",
        banned_ids: Sequence[int] = (),
        ban_penalty: float = math.inf,
        end_rule: dict | None = None,
        first_banned_ids: Sequence[int] = (),
    ) -> list[Trajectory]: ...

    def generate_batch(self, prompts: Sequence[PromptRequest], min_new_tokens: int, max_new_tokens: int,
                       end_ids: list[int], banned_ids: Sequence[int] = (), ban_penalty: float = math.inf,
                       first_banned_ids: Sequence[int] = ()) -> list[Trajectory]: ...

    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None: ...


def left_pad(prompts: list[list[int]], pad_id: int):
    """(ids [P, L], attention mask [P, L] or None when no row is padded, position ids [P, L])."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, (None if bool(mask.all()) else mask), positions


class PromptRows:
    """The two entry points of an engine, as rows (prompt index, record, temperature, source) for
    the engine's own `_sample(prompts, rows, min_new, max_new, end_ids, banned_ids, ban_penalty, end_rules,
    first_banned_ids)`. `first_banned_ids` are out of Z's first token only (`task.first_token: word`)."""

    def generate(self, record_id, prompt_ids, n, temperatures, min_new_tokens, max_new_tokens, end_ids, source="on_policy",
                 banned_ids=(), ban_penalty=math.inf, end_rule: dict | None = None, first_banned_ids=()):
        """n samples of one prompt, at one temperature or one per sample; `end_rule` as
        `PromptRequest.end_rule`."""
        temps = [float(temperatures)] * n if isinstance(temperatures, (int, float)) else [float(t) for t in temperatures]
        assert len(temps) == n, "one temperature per sample"
        rules = None if end_rule is None else [end_rule]
        return self._sample([list(prompt_ids)], [(0, record_id, t, source) for t in temps], min_new_tokens,
                            max_new_tokens, end_ids, banned_ids, ban_penalty, end_rules=rules,
                            first_banned_ids=first_banned_ids)

    def generate_batch(self, prompts, min_new_tokens, max_new_tokens, end_ids, banned_ids=(), ban_penalty=math.inf,
                       first_banned_ids=()):
        """Every prompt's samples in one call: on-policy ones at T = 1, then the tempered ones."""
        rows = []
        for i, p in enumerate(prompts):
            rows += [(i, p.record_id, 1.0, "on_policy")] * p.n_on_policy
            rows += [(i, p.record_id, float(t), "tempered") for t in p.temperatures]
        rules = [p.end_rule for p in prompts]
        return self._sample([list(p.prompt_ids) for p in prompts], rows, min_new_tokens, max_new_tokens, end_ids,
                            banned_ids, ban_penalty, end_rules=rules if any(r is not None for r in rules) else None,
                            first_banned_ids=first_banned_ids)


class TransformersSampler(PromptRows):
    """Generation with a transformers (optionally peft) model.

    Distinct prompts run in one left-padded pass; each prompt's KV cache is then repeated over its
    samples, so a prompt shared by n samples is computed once. In one process it can share the
    learner's model object: then `load_weights(None, v)` only records the version. Otherwise it
    loads the published adapter state.
    """

    def __init__(self, model, device: str = "cpu", seed: int = 0, tools: ToolRunner | None = None, pad_id: int = 0,
                 decode=None):
        self.model = model
        self.device = device
        self.tools = tools
        self.pad_id = pad_id
        self.decode = decode
        """token ids -> text (the tokenizer's decode): what prompts' text rules (`end_rule`) judge."""
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.version = 0

    def load_weights(self, state, version: int) -> None:
        if state is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state)
        self.version = version

    @torch.no_grad()
    def _sample(self, prompts, rows, min_new, max_new, end_ids, banned_ids=(), ban_penalty=math.inf, end_rules=None,
                first_banned_ids=()):
        if not rows:
            return []
        rules = None
        if end_rules is not None:
            if self.decode is None:
                raise ValueError("a prompt has a text end rule (end_rule) but this sampler has no decode: "
                                 "build TransformersSampler with decode=tokenizer.decode")
            rules = [WordRule.of(r) for r in end_rules]
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, rows, min_new, max_new, end_ids, list(banned_ids), ban_penalty, rules,
                                  list(first_banned_ids))
        finally:
            self.model.train(was_training)

    def _step(self, head, **kw):
        """Next-token logits [rows, V] (or [rows, allowed] through `head`) and the cache."""
        if head is None:
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :].float().cpu(), out.past_key_values
        body, weight, bias, _ = head
        out = body(**kw, use_cache=True)
        logits = torch.nn.functional.linear(out.last_hidden_state[:, -1, :], weight, bias)
        return logits.float().cpu(), out.past_key_values

    def _generate(self, prompts, rows, min_new, max_new, end_ids, banned, ban_penalty=math.inf, rules=None, first=()):
        n = len(rows)
        temps = torch.tensor([r[2] for r in rows], dtype=torch.float32)
        head = allowed_head(self.model, banned, ban_penalty)  # most of the vocabulary banned: its allowed columns
        if head is not None:  # token ids <-> columns of the allowed vocabulary
            allowed = head[3]
            column = {int(t): i for i, t in enumerate(allowed)}
            end = torch.tensor([column[t] for t in end_ids if t in column], dtype=torch.long)
            first = [column[t] for t in first if t in column]
            banned = []
        else:
            end = torch.tensor(end_ids, dtype=torch.long)
        ids, mask, positions = left_pad(prompts, self.pad_id)
        logits, cache = self._step(head, input_ids=ids.to(self.device),
                                   attention_mask=None if mask is None else mask.to(self.device),
                                   position_ids=positions.to(self.device))
        owner = torch.tensor([r[0] for r in rows], dtype=torch.long)  # row -> prompt
        if len(prompts) == 1:
            cache.batch_repeat_interleave(n)
        else:
            cache.batch_select_indices(owner.to(self.device))
        logits = logits[owner]
        if mask is not None:
            mask = mask[owner]
        next_pos = positions[owner, -1] + 1

        tokens: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tool: list[list[bool]] = [[] for _ in range(n)]
        forced: list[list[int]] = [[] for _ in range(n)]  # tool tokens still to be fed, per sample
        end_lp: list[float | None] = [None] * n
        chosen = [0] * n  # tokens the policy chose: max_new counts these (a tool's insertions are the environment's)
        longest = longest_with_tools(max_new, self.tools)  # a hard cap, insertions included
        alive = torch.arange(n)
        verdicts: list[list[bool]] = [[] for _ in range(n)]  # per sample, the text rule's verdict on s_0, s_1, ...
        after_tool = bool(self.tools) and self.tools.end_only_after
        for step in itertools.count():
            scaled = penalize(logits, banned, ban_penalty)
            if step == 0:
                scaled = ban_first(scaled, first)
            scaled = scaled / temps[alive, None]
            if step < min_new:
                scaled[:, end] = -float("inf")
            elif after_tool:  # ⊤ only right after a tool's insertion (`can_end_states`)
                no_end = torch.tensor([not (tool[r] and tool[r][-1] and not forced[r]) for r in alive.tolist()])
                scaled[no_end[:, None] & torch.isin(torch.arange(scaled.shape[1]), end)[None, :]] = -float("inf")
            if rules is not None:  # ⊤ only where the prompt's text rule allows it; the verdict of s_k kept
                for r in alive.tolist():
                    if rules[rows[r][0]] is not None:
                        verdicts[r].append(rules[rows[r][0]].allows(self.decode(tokens[r])))
                no_end = torch.tensor([bool(verdicts[r]) and not verdicts[r][-1] for r in alive.tolist()])
                scaled[no_end[:, None] & torch.isin(torch.arange(scaled.shape[1]), end)[None, :]] = -float("inf")
            logp = torch.log_softmax(scaled, dim=-1)
            tok = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
            lp = logp.gather(1, tok[:, None]).squeeze(1)
            is_end_l = torch.isin(tok, end).tolist()
            if head is not None:
                tok = allowed[tok]
            tok_l, lp_l, end_l = tok.tolist(), lp.tolist(), is_end_l
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
                    chosen[row] += 1
                    if self.tools:
                        forced[row] = self.tools.insertion(tokens[row]) or []
            tok, is_end = torch.tensor(tok_l, dtype=torch.long), torch.tensor(end_l, dtype=torch.bool)
            full = torch.tensor([(chosen[r] >= max_new and not forced[r]) or len(tokens[r]) >= longest
                                 for r in alive.tolist()], dtype=torch.bool)
            keep = ~is_end & ~full  # ended by ⊤, or max_new chosen tokens and every insertion fed (or the hard cap)
            if not keep.any():
                break
            alive = alive[keep]
            if not keep.all():
                kept = keep.nonzero().squeeze(1)
                cache.batch_select_indices(kept.to(self.device))
                next_pos = next_pos[kept]
                if mask is not None:
                    mask = mask[kept]
            if mask is not None:
                mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
            logits, cache = self._step(
                head, input_ids=tok[keep][:, None].to(self.device), past_key_values=cache,
                attention_mask=None if mask is None else mask.to(self.device),
                position_ids=next_pos[:, None].to(self.device))
            next_pos = next_pos + 1
        return [
            Trajectory(
                record_id=rows[i][1],
                tokens=tokens[i],
                terminated=end_lp[i] is not None,
                logprobs=lps[i],
                end_logprob=end_lp[i],
                tool_mask=tool[i] if any(tool[i]) else [],
                temperature=rows[i][2],
                version=self.version,
                source=rows[i][3],
                end_allowed=None if rules is None or rules[rows[i][0]] is None
                else self._last_verdict(verdicts[i], rules[rows[i][0]], tokens[i]),
            )
            for i in range(n)
        ]


    def _last_verdict(self, verdicts: list[bool], rule, tokens: list[int]) -> list[bool]:
        """The verdicts of s_0..s_n: those judged while sampling, and s_n's where a sample was cut
        at max length before it was judged."""
        return verdicts + [rule.allows(self.decode(tokens))] if len(verdicts) == len(tokens) else verdicts


class RequestServer:
    """Runs `SampleRequest`s on an engine: reseeds it per request, sets the request's tools, and
    samples every prompt of the request in one engine call. Used by the sampler actor and by the
    one-process driver alike."""

    def __init__(self, engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self._tools: dict[str, ToolRunner | None] = {}

    def tools_for(self, specs: list[dict]) -> ToolRunner | None:
        import json

        key = json.dumps(specs, sort_keys=True)
        if key not in self._tools:
            from gfnlm.configs.actors import CalculatorTool

            from .tools import tool_runner

            self._tools[key] = tool_runner([CalculatorTool.model_validate(s) for s in specs], self.tokenizer)
        return self._tools[key]

    def __call__(self, req: SampleRequest) -> list[Trajectory]:
        if req.seed is not None:
            self.engine.generator.manual_seed(req.seed)
        self.engine.tools = self.tools_for(req.tools)
        return self.engine.generate_batch(req.prompts, req.min_len, req.max_len, req.end_ids, req.banned_ids,
                                          req.ban_penalty, first_banned_ids=req.first_banned_ids)

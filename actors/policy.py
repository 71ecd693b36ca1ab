"""The policy q_θ: the frozen base LM plus a trainable peft LoRA adapter."""

from __future__ import annotations

from gfnlm.configs import ConfigError
import contextlib
import math

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs.actors import LoraConfig, ModelConfig

from .kv import cache_of, full_cache, layers_of
from .models import check_targets, init_adapter_state, load_model, pick_device


def pad_tokens(trajectories: list[Trajectory], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, T], lengths [B], tool_mask [B, T]) right-padded to the longest trajectory."""
    T = max((t.length for t in trajectories), default=0)
    B = len(trajectories)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    tool = torch.zeros((B, T), dtype=torch.bool)
    for b, t in enumerate(trajectories):
        tokens[b, : t.length] = torch.tensor(t.tokens, dtype=torch.long)
        if t.tool_mask:
            tool[b, : t.length] = torch.tensor(t.tool_mask, dtype=torch.bool)
    lengths = torch.tensor([t.length for t in trajectories], dtype=torch.long)
    return tokens.to(device), lengths.to(device), tool.to(device)


def penalize(logits: torch.Tensor, banned_ids, ban_penalty: float = math.inf) -> torch.Tensor:
    """Logits with the banned tokens' lowered by `ban_penalty` (taken out altogether when infinite):
    the policy's distribution, renormalised, in sampling and teacher forcing alike. The penalty
    applies before any temperature."""
    if not len(banned_ids):
        return logits
    idx = torch.as_tensor(list(banned_ids), device=logits.device)
    if math.isinf(ban_penalty):
        return logits.index_fill(-1, idx, -float("inf"))
    return logits.index_add(-1, idx, torch.full((*logits.shape[:-1], len(idx)), -float(ban_penalty),
                                                 dtype=logits.dtype, device=logits.device))


def ban_first(logits: torch.Tensor, first_banned_ids) -> torch.Tensor:
    """Logits [B, T+1, V] (or [B, V] of the first step) with `first_banned_ids` taken out of the first
    state s_0 only: a rule on Z's first token (`task.first_token: word`), applied in sampling and
    teacher forcing alike."""
    if not len(first_banned_ids):
        return logits
    idx = torch.as_tensor(list(first_banned_ids), device=logits.device)
    if logits.dim() == 2:
        return logits.index_fill(-1, idx, -float("inf"))
    where = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)  # [T+1, V]: s_0's banned columns
    where[0, idx] = True
    return logits.masked_fill(where, -float("inf"))


def body_and_head(model):
    """(body, LM head) where the logits are a plain linear layer over the body's last hidden state
    (most causal LMs), so that the head can run on the positions that need it alone; None otherwise
    (e.g. a model that soft-caps its logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = getattr(base, "base_model", None)
    if (not isinstance(head, torch.nn.Linear) or body is None or body is base
            or getattr(base.config, "final_logit_softcapping", None)):
        return None
    return body, head


def allowed_head(model, banned_ids, ban_penalty: float = math.inf):
    """(body, head weight rows, head bias rows or None, allowed ids) when most of the vocabulary is
    banned outright (arithmetic allows ~15 of SmolLM2's 49,152 tokens): the LM head then needs only
    the allowed columns, and the softmax runs over them, which is the same distribution as masking
    the rest. None when the ban is partial or finite, or the model's head is not a plain linear layer
    over its body's last hidden state."""
    if not len(banned_ids) or not math.isinf(ban_penalty):
        return None
    split = body_and_head(model)
    if split is None:
        return None
    body, head = split
    vocab = head.weight.shape[0]
    if len(banned_ids) < vocab // 2:
        return None
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[torch.as_tensor(list(banned_ids), dtype=torch.long)] = False
    allowed = keep.nonzero().squeeze(1)
    rows = allowed.to(head.weight.device)
    return body, head.weight[rows], None if head.bias is None else head.bias[rows], allowed


def can_end_mask(trajectories, can_end, width: int) -> torch.Tensor:
    """[B, width] True where s_k of trajectory b may end, from `can_end(trajectory)` (a list over its
    states, e.g. `Task.can_end`); False past each trajectory's end."""
    mask = torch.zeros((len(trajectories), width), dtype=torch.bool)
    for b, t in enumerate(trajectories):
        mask[b, : t.length + 1] = torch.tensor(can_end(t), dtype=torch.bool)
    return mask


def _no_end(logits: torch.Tensor, min_len: int, can_end: torch.Tensor | None) -> torch.Tensor | None:
    """[B or 1, T+1] True at the states that cannot end: ~can_end where given, else k < min_len."""
    if can_end is not None:
        return ~can_end.to(device=logits.device, dtype=torch.bool)[:, : logits.shape[1]]
    if min_len <= 0:
        return None
    return (torch.arange(logits.shape[1], device=logits.device) < min_len)[None, :]


def mask_end(logits: torch.Tensor, end_columns, min_len: int, can_end: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T+1, V] of states s_0..s_T with ⊤ (every end token) taken out of the states that
    cannot end (s_k with k < min_len, or where the [B, T+1] mask `can_end` is False): the one
    definition of q there, q(z | s) / (1 − q(⊤ | s)), that the samplers sample from and the learner
    and PPO's ratios use."""
    rows = _no_end(logits, min_len, can_end)
    if rows is None or not len(end_columns):
        return logits
    cols = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    cols[torch.as_tensor(list(end_columns), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(rows[:, :, None] & cols[None, None, :], -float("inf"))


def _end_logprobs(logits: torch.Tensor, end_columns, min_len: int, can_end: torch.Tensor | None = None):
    """(log-softmax [B, T+1, V] with ⊤ out where a state cannot end, log q(⊤ | s_k) [B, T+1], -inf
    there). Where ⊤ is out, log q(⊤) comes from the unmasked logits and is then set to -inf: a
    logsumexp over nothing but -inf would put NaN into the gradients."""
    rows = _no_end(logits, min_len, can_end)
    if rows is None:
        logp = torch.log_softmax(logits, dim=-1)
        return logp, torch.logsumexp(logp[:, :, end_columns], dim=-1)
    log_pterm = torch.logsumexp(logits[:, :, end_columns], dim=-1) - torch.logsumexp(logits, dim=-1)
    log_pterm = log_pterm.masked_fill(rows, -float("inf"))
    return torch.log_softmax(mask_end(logits, end_columns, min_len, can_end), dim=-1), log_pterm


def length_buckets(lengths: list[int], overhead: int = 48) -> list[list[int]]:
    """Rows grouped by length so that each group is padded only to its own longest row: the
    partition of the rows sorted by length that minimises Σ (rows × longest + `overhead`) over its
    groups (the overhead stands for one more pass through the model, in tokens)."""
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _continue(run, cache, tokens: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
    """run(input_ids, cache) over the B continuations `tokens` [B, T] of one prompt whose cache
    (batch 1) is given: [B, T, ...] right-padded. With `lengths`, the rows run in `length_buckets`,
    each padded to its own longest row (what follows a row's end is zeros); the prompt's keys and
    values are shared by every bucket and gradients flow back to them from each."""
    B, T = tokens.shape
    layers = layers_of(cache)
    if layers is None:  # a cache of another kind (one that drops positions): one pass, its own type
        cache.batch_repeat_interleave(B)
        return run(tokens, cache)

    def sub(rows: int):
        return cache_of((k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in layers)

    buckets = length_buckets(lengths) if lengths is not None and len(lengths) == B else [list(range(B))]
    if len(buckets) == 1:
        return run(tokens, sub(B))
    parts, order = [], []
    for rows in buckets:
        width = max(1, max(lengths[b] for b in rows))
        idx = torch.tensor(rows, device=tokens.device)
        out = run(tokens[idx, :width], sub(len(rows)))
        parts.append(torch.nn.functional.pad(out, (0, 0, 0, T - width)))
        order += rows
    inverse = torch.empty(B, dtype=torch.long, device=tokens.device)
    inverse[torch.tensor(order, device=tokens.device)] = torch.arange(B, device=tokens.device)
    return torch.cat(parts)[inverse]


def _subset_logprobs(head, prompt, tokens, end_ids, min_len: int = 0, can_end=None, first_banned_ids=(), lengths=None):
    """`sequence_logprobs` through the allowed columns of the head (`allowed_head`)."""
    body = head[0]
    B, T = tokens.shape
    out = body(input_ids=prompt, use_cache=T > 0, past_key_values=full_cache() if T > 0 else None)
    hidden = out.last_hidden_state[:, -1:, :].expand(B, 1, -1)
    if T > 0:
        rest = _continue(lambda ids, cache: body(input_ids=ids, past_key_values=cache, use_cache=False).last_hidden_state,
                         out.past_key_values, tokens, lengths)
        hidden = torch.cat([hidden, rest], dim=1)
    return _subset_from_hidden(head, hidden, tokens, end_ids, min_len, can_end, first_banned_ids)


def _subset_from_hidden(head, hidden, tokens, end_ids, min_len: int = 0, can_end=None, first_banned_ids=()):
    """(log_pf, log_pterm) from the body's last hidden state [B, T+1, d] at s_0..s_T, through the
    allowed columns of the head: the softmax runs over them alone."""
    _, weight, bias, allowed = head
    device = tokens.device
    T = tokens.shape[1]
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [B, T+1, A]
    column = torch.full((int(allowed.max()) + 2,), -1, dtype=torch.long)  # ids past it: banned (the last entry)
    column[allowed] = torch.arange(len(allowed))
    cols = column[tokens.cpu().clamp(max=len(column) - 1)].to(device)
    ends = [int(column[e]) for e in end_ids if e < len(column) and column[e] >= 0]
    first = [int(column[i]) for i in first_banned_ids if i < len(column) and column[i] >= 0]
    logits = ban_first(logits, first)
    if not ends:  # every end token banned: ⊤ is impossible
        logp = torch.log_softmax(logits, dim=-1)
        log_pterm = torch.full(logp.shape[:2], -float("inf"), device=device)
    else:
        logp, log_pterm = _end_logprobs(logits, ends, min_len, can_end)
    log_pf = logp[:, :T, :].gather(2, cols.clamp(min=0)[:, :, None]).squeeze(2)
    log_pf = torch.where(cols >= 0, log_pf, torch.full_like(log_pf, -float("inf")))  # a banned token: impossible
    return log_pf, log_pterm


def _from_logits(logits, tokens, end_ids, banned_ids=(), ban_penalty: float = math.inf, min_len: int = 0,
                 can_end=None, first_banned_ids=()):
    """(log_pf, log_pterm) from the LM's logits [B, T+1, V] at s_0..s_T: bans, the first-token rule
    and ⊤ taken out where a state cannot end, as the samplers draw."""
    T = tokens.shape[1]
    logits = ban_first(penalize(logits, banned_ids, ban_penalty), first_banned_ids)
    logp, log_pterm = _end_logprobs(logits, end_ids, min_len, can_end)  # [B, T+1, V]
    log_pf = logp[:, :T, :].gather(2, tokens[:, :, None]).squeeze(2)
    return log_pf, log_pterm


def sequence_logprobs(model, prompt_ids: list[int], tokens: torch.Tensor, end_ids: list[int], banned_ids=(),
                      ban_penalty: float = math.inf, min_len: int = 0, can_end: torch.Tensor | None = None,
                      first_banned_ids=(), lengths: list[int] | None = None):
    """Teacher-forced log-probs at temperature 1 for B continuations of ONE prompt.

    The prompt runs once (batch 1); its KV cache is repeated over the B continuations, and
    gradients flow back through it. Returns log_pf [B, T] = log q(tokens[:, k] | s_k) and
    log_pterm [B, T+1] = log q(⊤ | s_k), with ⊤ the set of end tokens. States s_k with k < min_len
    cannot end: ⊤ is taken out of q there and the rest renormalised, as the samplers draw
    (`mask_end`), and log_pterm is -inf; a [B, T+1] bool `can_end` (False where s_k cannot end,
    `actors.trajectory.can_end_states`) replaces the min_len rule. `first_banned_ids` are taken out
    of s_0 alone (`ban_first`). Right padding in `tokens` only changes entries past each
    trajectory's end; with `lengths` (each row's own) the rows run in buckets of similar length
    (`length_buckets`), so that little padding goes through the model.
    """
    device = tokens.device
    B, T = tokens.shape
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    head = allowed_head(model, banned_ids, ban_penalty)
    if head is not None:
        return _subset_logprobs(head, prompt, tokens, end_ids, min_len, can_end, first_banned_ids, lengths)
    out = model(input_ids=prompt, use_cache=T > 0, past_key_values=full_cache() if T > 0 else None,
                logits_to_keep=1)  # only the last position's logits; a cache that keeps every position (actors.kv)
    first = out.logits[:, -1:, :].float().expand(B, 1, -1)
    if T > 0:
        rest = _continue(lambda ids, cache: model(input_ids=ids, past_key_values=cache, use_cache=False).logits.float(),
                         out.past_key_values, tokens, lengths)
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    return _from_logits(logits, tokens, end_ids, banned_ids, ban_penalty, min_len, can_end, first_banned_ids)


def _joined(prompts: list[list[int]], tokens: torch.Tensor, lengths: list[int], pad_id: int):
    """(input_ids [B, L], index [B, T+1]): each row's prompt followed by its own tokens, right-padded,
    and where the output at state s_k of row b sits in it (its prompt's last position + k; past the
    row's end, the last column). Causal attention: padding changes nothing before a row's end."""
    B, T = tokens.shape
    sizes = [len(p) for p in prompts]
    L = max(n + m for n, m in zip(sizes, lengths))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    for b, (p, m) in enumerate(zip(prompts, lengths)):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[b, len(p): len(p) + m] = tokens[b, :m].cpu()
    index = (torch.tensor(sizes)[:, None] - 1 + torch.arange(T + 1)[None, :]).clamp(max=L - 1)
    return ids.to(tokens.device), index.to(tokens.device)


def rows_logprobs(model, prompts: list[list[int]], tokens: torch.Tensor, end_ids: list[int], banned_ids=(),
                  ban_penalty: float = math.inf, min_len: int = 0, can_end: torch.Tensor | None = None,
                  first_banned_ids=(), lengths: list[int] | None = None, pad_id: int = 0):
    """`sequence_logprobs` for B rows that each have their own prompt (`prompts[b]`), in one pass
    over the rows joined to their prompts (`_joined`): what runs fastest when few rows share a
    prompt (SFT's one reference per record), where a pass per prompt would be many small passes.
    The same values as `sequence_logprobs` row by row, up to float rounding."""
    B, T = tokens.shape
    lengths = lengths if lengths is not None else [T] * B
    ids, index = _joined(prompts, tokens, lengths, pad_id)
    split = body_and_head(model)
    if split is None:  # the logits at the positions some row needs, from the first row's s_0 on
        lo = int(index.min())
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=torch.arange(lo, ids.shape[1], device=ids.device)).logits
        logits = logits.gather(1, (index - lo)[:, :, None].expand(-1, -1, logits.shape[-1])).float()
        return _from_logits(logits, tokens, end_ids, banned_ids, ban_penalty, min_len, can_end, first_banned_ids)
    # the head runs on each row's own states alone: B × (T+1) rows, as a pass per prompt
    hidden = split[0](input_ids=ids, use_cache=False).last_hidden_state
    hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    head = allowed_head(model, banned_ids, ban_penalty)  # most of the vocabulary banned: its allowed columns
    if head is not None:
        return _subset_from_hidden(head, hidden, tokens, end_ids, min_len, can_end, first_banned_ids)
    return _from_logits(split[1](hidden).float(), tokens, end_ids, banned_ids, ban_penalty, min_len, can_end,
                        first_banned_ids)


PASS_OVERHEAD = 48
"""One more pass through the model, counted in tokens (as `length_buckets` counts it)."""


def joined_is_cheaper(prompt_sizes: list[int], group_lengths: list[list[int]], overhead: int = PASS_OVERHEAD) -> bool:
    """Whether one pass over every row joined to its prompt (`rows_logprobs`) costs fewer tokens than
    two passes per prompt (the prompt, then its rows over its shared cache): true when many prompts
    have few rows each, as SFT's batches of one reference per record."""
    if len(group_lengths) < 2:
        return False
    shared = sum(n + sum(ls) + 2 * overhead for n, ls in zip(prompt_sizes, group_lengths))
    joined = sum(n * len(ls) + sum(ls) for n, ls in zip(prompt_sizes, group_lengths)) + overhead
    return joined < shared


@contextlib.contextmanager
def active_adapter(model, name: str):
    """Run with another named adapter of a peft model active; the previous one and every
    parameter's trainable flag are restored afterwards (peft's set_adapter changes them)."""
    previous = model.active_adapter
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


INIT_ADAPTER = "init"
"""The frozen copy of the adapter training started from (lora.init), when a reference needs it."""


class Policy:
    """Base model + LoRA. Only the adapter's parameters require gradients."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig):
        self.device = pick_device(model_cfg.device)
        base, self.tokenizer = load_model(model_cfg.path, self.device, model_cfg.dtype)
        for p in base.parameters():
            p.requires_grad_(False)
        # log q must be the policy that samples: no dropout in the base model (GPT-2 ships 0.1).
        # Only the adapter's own dropout (lora.dropout) stays.
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        check_targets(base, lora_cfg.target_modules)
        peft_cfg = PeftLoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            self.model = get_peft_model(base, peft_cfg)
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
        # LoRA weights in float32 even over a bfloat16 base.
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if lora_cfg.init:  # e.g. an SFT run's adapter: training starts from it (`starting_policy`)
            loaded = set_peft_model_state_dict(self.model, init_adapter_state(lora_cfg.init, self.device))
            if loaded.unexpected_keys:
                raise ConfigError(f"lora.init: {lora_cfg.init} holds weights this adapter does not have "
                                  f"({loaded.unexpected_keys[0]}); it was trained with other lora settings")
        self.lora_cfg = lora_cfg
        self.version = 0
        self.join_rows: bool | None = None
        """How `logprobs_groups` runs several prompts' rows: None chooses by cost (`joined_is_cheaper`);
        True joins every row to its prompt in one pass, False runs a pass per prompt (benchmarks)."""

    def starting_policy(self):
        """A context in which the model is the policy training started from, frozen: the adapter lora.init
        names (a frozen copy, loaded once), or the base model with the adapter off when there is none."""
        if not self.lora_cfg.init:
            return self.model.disable_adapter()
        if INIT_ADAPTER not in self.model.peft_config:
            for p in self.add_adapter(INIT_ADAPTER, self.lora_cfg):
                p.requires_grad_(False)
            set_peft_model_state_dict(self.model, init_adapter_state(self.lora_cfg.init, self.device), adapter_name=INIT_ADAPTER)
        return active_adapter(self.model, INIT_ADAPTER)

    def saved_adapters(self) -> list[str]:
        """The adapters a checkpoint holds: every one but the frozen copy of lora.init."""
        return [n for n in self.model.peft_config if n != INIT_ADAPTER]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The default adapter's weights (what the learner's optimizer trains)."""
        return [p for n, p in self.model.named_parameters() if p.requires_grad and ".default." in n]

    def add_adapter(self, name: str, lora_cfg: LoraConfig) -> list[torch.nn.Parameter]:
        """A second named LoRA adapter on the same base (e.g. the M-step's classifier); its weights,
        float32, trainable by their own optimizer. The default adapter stays active."""
        self.model.add_adapter(name, PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                                    target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM"))
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def logprobs(self, prompt_ids: list[int], trajectories: list[Trajectory], end_ids: list[int], banned_ids=(),
                 ban_penalty: float = math.inf, min_len: int = 0, can_end=None, first_banned_ids=()):
        """(log_pf, log_pterm, lengths, tool_mask) for trajectories that share one prompt; ⊤ out of q
        before min_len, or where `can_end(trajectory)` (a list over its states) is False, and
        `first_banned_ids` out of the first token (`sequence_logprobs`)."""
        tokens, lengths, tool = pad_tokens(trajectories, self.tokenizer.pad_token_id, self.device)
        mask = None if can_end is None else can_end_mask(trajectories, can_end, tokens.shape[1] + 1).to(self.device)
        log_pf, log_pterm = sequence_logprobs(self.model, prompt_ids, tokens, end_ids, banned_ids, ban_penalty, min_len, mask,
                                              first_banned_ids, lengths.tolist())
        return log_pf, log_pterm, lengths, tool

    def logprobs_groups(self, groups: list[tuple[list[int], list[Trajectory]]], end_ids: list[int], banned_ids=(),
                        ban_penalty: float = math.inf, min_len: int = 0, can_end=None, first_banned_ids=()):
        """`logprobs` for several (prompt, trajectories) groups at once, their rows in the groups' order
        and right-padded to the longest: one pass per prompt over its shared cache, or, where many
        prompts have few rows each (`joined_is_cheaper`), one pass over every row joined to its prompt."""
        trajectories = [t for _, ts in groups for t in ts]
        sizes = [len(p) for p, _ in groups]
        join = self.join_rows
        if join is None:
            join = joined_is_cheaper(sizes, [[t.length for t in ts] for _, ts in groups])
        if not join:
            parts = [self.logprobs(p, ts, end_ids, banned_ids, ban_penalty, min_len, can_end, first_banned_ids)
                     for p, ts in groups]
            T = max(part[0].shape[1] for part in parts)

            def cat(i, width, value):
                return torch.cat([torch.nn.functional.pad(part[i], (0, width - part[i].shape[1]), value=value) for part in parts])

            return cat(0, T, 0.0), cat(1, T + 1, 0.0), torch.cat([part[2] for part in parts]), cat(3, T, False)
        tokens, lengths, tool = pad_tokens(trajectories, self.tokenizer.pad_token_id, self.device)
        mask = None if can_end is None else can_end_mask(trajectories, can_end, tokens.shape[1] + 1).to(self.device)
        prompts = [p for p, ts in groups for _ in ts]
        log_pf, log_pterm = rows_logprobs(self.model, prompts, tokens, end_ids, banned_ids, ban_penalty, min_len, mask,
                                          first_banned_ids, lengths.tolist(), self.tokenizer.pad_token_id)
        return log_pf, log_pterm, lengths, tool

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (a few MB): what a learner publishes to samplers."""
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

"""The frozen reward LM: log-likelihood of every prefix of Z given a context, with or without a suffix.

For a context C and a trajectory z_1..z_n, `PrefixScorer.score` returns for i = 0..n either
    log p(z_1:i ⊤ | C) = Σ_{k<=i} log p(z_k | C z_<k) + log p(⊤ | C z_1:i)      (end_ids given)
or  log p(z_1:i Y | C) = Σ_{k<=i} log p(z_k | C z_<k) + log p(Y | C z_1:i)      (suffix_ids given)
Tokens inserted by a tool are environment steps: they add no log p.

Cost. The end-token form is one teacher-forced pass. The suffix form runs C once, Z once with
the cache of every prefix kept, then the (prefix i, Y) continuations of a trajectory, a few
prefixes to a sequence, against that cache under a tree attention mask: the copy of Y for prefix i
attends to C z_1:i only (the rest of Z is masked out) and to its own earlier tokens, at positions
|C| + i + k. That costs about |C| + n + (n + 1)·|Y| tokens instead of the naive Σ_i |C z_1:i Y|
(`score_naive`, kept as the reference for tests and the benchmark); sequences of the same number
of prefixes run together, so no padding goes through the model.
`prefixes="final"` scores only the whole Z (what trajectory balance needs): one row per
trajectory; the other prefixes are NaN.
Frozen means: the base weights, any LoRA adapter disabled, never trained.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .kv import cache_of, full_cache, layers_of, window_of
from .policy import pad_tokens
from .trajectory import Trajectory


def need_layers(cache) -> list:
    """`layers_of` a cache the scorer built, or a one-line error naming what the model returned."""
    layers = layers_of(cache)
    if layers is None:
        raise TypeError(f"PrefixScorer: the model returned a {type(cache).__name__} without per-layer keys and values "
                        f"for a plain DynamicCache; models with other cache kinds (e.g. linear attention) are not supported")
    return layers


class PrefixScorer:
    def __init__(self, model, pad_id: int, device: str = "cpu", max_rows: int = 1024):
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.max_rows = max_rows
        """Suffix tokens (over all prefixes) per batched pass; bounds the memory of the logits."""
        self._shared: tuple[tuple[int, ...], list, torch.Tensor] | None = None
        """((adapter, tokens), per-layer keys and values, last logits) of the last shared context prefix."""

    prefixes_per_row: int = 4
    """The most wanted prefixes whose suffix copies share one sequence (and one cache row) in the
    suffix pass: fewer means a smaller tree mask, more means fewer cache rows gathered."""

    adapter: str | None = None
    """A named adapter of the model that is part of the reward (the M-step's classifier); unset:
    every adapter off."""

    def _frozen(self):
        if self.adapter is not None:
            from .policy import active_adapter

            return active_adapter(self.model, self.adapter)
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if callable(disable) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._frozen():
                yield
        finally:
            self.model.train(was_training)

    def score(self, context_ids: list[int], trajectories: list[Trajectory], end_ids: list[int] | None = None,
              suffix_ids: list[int] | None = None, prefixes: str = "every", shared: int = 0,
              first: int = 0, terminable_only: bool = False, can_end=None) -> list[list[float]]:
        """log p(z_1:i ⊤ | C) or log p(z_1:i Y | C) for i = 0..n of each trajectory (see module).
        `shared`: the first `shared` tokens of C are the same for every record (few-shot examples);
        their KV cache is computed once and kept for the next calls. With a suffix, prefixes shorter
        than `first`, with `terminable_only` states right before a tool token, and with `can_end`
        (a trajectory's list over its states, `Task.can_end`) the states that cannot end, are not
        scored: NaN (the suffix pass is the cost; the task floors them). The whole Z always is."""
        if (end_ids is None) == (suffix_ids is None):
            raise ValueError("PrefixScorer.score: give either end_ids or suffix_ids")
        if not trajectories:
            return []
        if not context_ids:
            raise ValueError("PrefixScorer.score: the context must hold at least one token (e.g. BOS)")
        with self._eval():
            return self._score(list(context_ids), trajectories, end_ids, suffix_ids, prefixes, shared,
                               self._wanted(trajectories, prefixes, first, terminable_only, can_end))

    @staticmethod
    def _wanted(trajectories, prefixes: str, first: int, terminable_only: bool, can_end=None) -> list[list[int]]:
        """The prefixes of each trajectory that the suffix pass scores."""
        out = []
        for t in trajectories:
            n = t.length
            if prefixes == "final":
                out.append([n])
                continue
            mask = t.tool_mask if terminable_only and t.tool_mask else [False] * n
            ends = can_end(t) if can_end is not None else [True] * (n + 1)
            keep = [i for i in range(min(first, n), n + 1) if i == n or (not mask[i] and ends[i])]
            out.append(keep or [n])
        return out

    def _context(self, ctx: list[int], shared: int):
        """(cache, last logits [1, 1, V]) of the context, reusing the shared prefix's cache."""
        dev = self.device
        shared = min(shared, len(ctx) - 1)
        if shared <= 0:
            out = self.model(input_ids=torch.tensor([ctx], device=dev), past_key_values=full_cache(), use_cache=True,
                             logits_to_keep=1)
            return out.past_key_values, out.logits[:, -1:, :]
        head = (self.adapter, tuple(ctx[:shared]))  # the cache holds what this adapter computed
        if self._shared is None or self._shared[0] != head:
            out = self.model(input_ids=torch.tensor([ctx[:shared]], device=dev), past_key_values=full_cache(),
                             use_cache=True, logits_to_keep=1)
            self._shared = (head, need_layers(out.past_key_values), None)
        cache = cache_of(self._shared[1])  # the stored tensors are never written to: updates concatenate
        positions = torch.arange(shared, len(ctx), device=dev)[None, :]
        out = self.model(input_ids=torch.tensor([ctx[shared:]], device=dev), past_key_values=cache, use_cache=True,
                         position_ids=positions, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1:, :]

    def _score(self, ctx, trajectories, end_ids, suffix_ids, prefixes, shared=0, wanted=None):
        dev = self.device
        tokens, lengths, tool = pad_tokens(trajectories, self.pad_id, dev)
        B, T = tokens.shape
        cache, last = self._context(ctx, shared)
        first = last.float().expand(B, 1, -1)
        cache.batch_repeat_interleave(B)
        if T > 0:
            rest = self.model(input_ids=tokens, past_key_values=cache, use_cache=True).logits.float()
            logp = torch.log_softmax(torch.cat([first, rest], 1), -1)  # [B, T+1, V]: after prefix k
        else:
            logp = torch.log_softmax(first, -1)
        log_pf = logp[:, :T, :].gather(2, tokens[:, :, None]).squeeze(2).masked_fill(tool, 0.0)
        cum = torch.nn.functional.pad(log_pf.cumsum(1), (1, 0))  # [B, T+1]
        if end_ids is not None:
            tail = torch.logsumexp(logp[:, :, end_ids], -1)
        else:
            tail = logp[:, :, suffix_ids[0]].clone()
            if len(suffix_ids) > 1:
                tail += self._suffix_rest(cache, len(ctx), wanted, suffix_ids).to(tail.device)
        total = (cum + tail).cpu()
        result = []
        for b, n in enumerate(lengths.tolist()):
            row = total[b, : n + 1].tolist()
            if prefixes == "final":
                row = [math.nan] * n + [row[n]]
            elif suffix_ids is not None and len(wanted[b]) < n + 1:
                keep = set(wanted[b])
                row = [v if i in keep else math.nan for i, v in enumerate(row)]
            result.append(row)
        return result

    def _suffix_rest(self, cache, C: int, wanted: list[list[int]], suffix_ids: list[int]) -> torch.Tensor:
        """Σ_{k>=1} log p(Y_k | C z_1:i Y_<k) for every trajectory b and each wanted prefix i (shape
        [B, T+1], 0 elsewhere), reusing the cache of C Z.

        A trajectory's wanted prefixes are cut into groups of at most `prefixes_per_row`; each group
        runs as ONE sequence of (group size)·(|Y|−1) tokens against its trajectory's cache row, under
        a tree mask: the copy of Y for prefix i sees C z_1:i and its own earlier tokens, at positions
        |C| + i + k. Groups of the same size run together, so nothing is padded."""
        dev = self.device
        k, G = len(suffix_ids) - 1, max(1, self.prefixes_per_row)
        T = max(max(w) for w in wanted)
        y_in = torch.tensor(suffix_ids[:-1], device=dev)
        y_out = torch.tensor(suffix_ids[1:], device=dev)
        layers = need_layers(cache)
        window = window_of(self.model)
        if window is not None and C + T + k > window:  # the tree mask would see past the model's window
            return self._suffix_rest_by_prefix(layers, C, wanted, suffix_ids)
        P = layers[0][0].shape[2]
        dtype = layers[0][0].dtype
        by_size: dict[int, list[tuple[int, list[int]]]] = {}
        for b, w in enumerate(wanted):
            for g in range(0, len(w), G):
                by_size.setdefault(len(w[g:g + G]), []).append((b, w[g:g + G]))
        out = torch.zeros((len(wanted), T + 1))
        for size, groups in sorted(by_size.items()):
            q = size * k
            own_block = torch.arange(q, device=dev)
            own = (own_block[:, None] // k == own_block[None, :] // k) & (own_block[None, :] % k <= own_block[:, None] % k)
            jj = torch.arange(k, device=dev).repeat(size)
            per_pass = max(1, self.max_rows // q)  # groups per batched pass: at most max_rows query tokens
            for start in range(0, len(groups), per_pass):
                chunk = groups[start:start + per_pass]
                rows = torch.tensor([b for b, _ in chunk], device=dev)
                pref = torch.tensor([grp for _, grp in chunk], device=dev)  # [n, size]
                pi = pref.repeat_interleave(k, dim=1)  # [n, q]: the prefix each query row continues
                sees_past = torch.arange(P, device=dev)[None, None, :] < (C + pi)[:, :, None]
                allowed = torch.cat([sees_past, own[None].expand(len(chunk), -1, -1)], dim=2)
                mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
                sub = cache_of((key[rows], value[rows]) for key, value in layers)
                logits = self.model(input_ids=y_in[jj][None, :].expand(len(chunk), -1), past_key_values=sub,
                                    attention_mask=mask[:, None], position_ids=C + pi + jj[None, :], use_cache=True).logits
                lp = torch.log_softmax(logits.float(), -1).gather(2, y_out[jj][None, :, None].expand(len(chunk), -1, 1))
                per_prefix = lp.squeeze(2).view(len(chunk), size, k).sum(-1).cpu()
                out[rows.cpu()[:, None].expand(-1, size), pref.cpu()] = per_prefix
        return out

    def _suffix_rest_by_prefix(self, layers, C: int, wanted: list[list[int]], suffix_ids: list[int]) -> torch.Tensor:
        """`_suffix_rest` for a sliding-window model whose window the sequences outgrow: one pass per
        prefix length i over the trajectories that want it, each row's cache cut at C + i, under the
        model's own mask (which applies the window)."""
        dev = self.device
        k = len(suffix_ids) - 1
        y_in = torch.tensor(suffix_ids[:-1], device=dev)
        y_out = torch.tensor(suffix_ids[1:], device=dev)
        out = torch.zeros((len(wanted), max(max(w) for w in wanted) + 1))
        by_prefix: dict[int, list[int]] = {}
        for b, w in enumerate(wanted):
            for i in w:
                by_prefix.setdefault(i, []).append(b)
        per_pass = max(1, self.max_rows // k)  # rows per pass: at most max_rows query tokens
        for i, rows in sorted(by_prefix.items()):
            for start in range(0, len(rows), per_pass):
                chunk = rows[start:start + per_pass]
                idx = torch.tensor(chunk, device=dev)
                sub = cache_of((key[idx, :, : C + i], value[idx, :, : C + i]) for key, value in layers)
                positions = (C + i + torch.arange(k, device=dev))[None, :].expand(len(chunk), -1)
                logits = self.model(input_ids=y_in[None, :].expand(len(chunk), -1), past_key_values=sub,
                                    position_ids=positions, use_cache=True).logits
                lp = torch.log_softmax(logits.float(), -1).gather(2, y_out[None, :, None].expand(len(chunk), -1, 1))
                out[chunk, i] = lp.squeeze(2).sum(-1).cpu()
        return out

    def score_naive(self, context_ids: list[int], trajectories: list[Trajectory], end_ids: list[int] | None = None,
                    suffix_ids: list[int] | None = None) -> list[list[float]]:
        """The same figures from one full forward pass per prefix (tests, benchmark)."""
        result = []
        with self._eval():
            for t in trajectories:
                mask = t.tool_mask or [False] * t.length
                row = []
                for i in range(t.length + 1):
                    tail = list(suffix_ids or [])
                    seq = list(context_ids) + t.tokens[:i] + tail
                    logp = torch.log_softmax(self.model(input_ids=torch.tensor([seq], device=self.device)).logits[0].float(), -1)
                    C = len(context_ids)
                    total = sum(float(logp[C + k - 1, t.tokens[k]]) for k in range(i) if not mask[k])
                    if suffix_ids:
                        total += sum(float(logp[C + i + k - 1, suffix_ids[k]]) for k in range(len(suffix_ids)))
                    else:
                        total += float(torch.logsumexp(logp[C + i - 1, end_ids], 0))
                    row.append(total)
                result.append(row)
        return result

"""The frozen reward LM: log-likelihood of every prefix of Z given a context, with or without a suffix.

For a context C and a trajectory z_1..z_n, `PrefixScorer.score` returns for i = 0..n either
    log p(z_1:i ⊤ | C) = Σ_{k<=i} log p(z_k | C z_<k) + log p(⊤ | C z_1:i)      (end_ids given)
or  log p(z_1:i Y | C) = Σ_{k<=i} log p(z_k | C z_<k) + log p(Y | C z_1:i)      (suffix_ids given)
Tokens inserted by a tool are environment steps: they add no log p.

Cost. The end-token form is one teacher-forced pass. The suffix form runs C once, Z once with
the cache of every prefix kept, then every (prefix i, Y) continuation in one batched pass that
reuses that cache: row (b, i) attends to C z_1:i only (the rest of Z is masked out) and Y sits at
positions |C| + i + k. That costs about |C| + n + (n + 1)·|Y| tokens instead of the naive
Σ_i |C z_1:i Y| (`score_naive`, kept as the reference for tests and the benchmark).
`prefixes="final"` scores only the whole Z (what trajectory balance needs): one row per
trajectory; the other prefixes are NaN.
Frozen means: the base weights, any LoRA adapter disabled, never trained.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .policy import pad_tokens
from .trajectory import Trajectory


class PrefixScorer:
    def __init__(self, model, pad_id: int, device: str = "cpu", max_rows: int = 128):
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.max_rows = max_rows
        """(prefix, suffix) rows per batched pass; bounds the memory of the expanded cache."""

    def _frozen(self):
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
              suffix_ids: list[int] | None = None, prefixes: str = "every") -> list[list[float]]:
        """log p(z_1:i ⊤ | C) or log p(z_1:i Y | C) for i = 0..n of each trajectory (see module)."""
        if (end_ids is None) == (suffix_ids is None):
            raise ValueError("PrefixScorer.score: give either end_ids or suffix_ids")
        if not trajectories:
            return []
        if not context_ids:
            raise ValueError("PrefixScorer.score: the context must hold at least one token (e.g. BOS)")
        with self._eval():
            return self._score(list(context_ids), trajectories, end_ids, suffix_ids, prefixes)

    def _score(self, ctx, trajectories, end_ids, suffix_ids, prefixes):
        dev = self.device
        tokens, lengths, tool = pad_tokens(trajectories, self.pad_id, dev)
        B, T = tokens.shape
        out = self.model(input_ids=torch.tensor([ctx], device=dev), use_cache=True)
        cache = out.past_key_values
        first = out.logits[:, -1:, :].float().expand(B, 1, -1)
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
                pairs = [(b, i) for b in range(B) for i in range(int(lengths[b]) + 1)
                         if prefixes == "every" or i == int(lengths[b])]
                rest_lp = self._suffix_rest(cache, len(ctx), T, pairs, suffix_ids)
                for (b, i), v in zip(pairs, rest_lp):
                    tail[b, i] += v
        total = (cum + tail).cpu()
        result = []
        for b, n in enumerate(lengths.tolist()):
            row = total[b, : n + 1].tolist()
            if prefixes == "final":
                row = [math.nan] * n + [row[n]]
            result.append(row)
        return result

    def _suffix_rest(self, cache, C: int, T: int, pairs: list[tuple[int, int]], suffix_ids: list[int]) -> list[float]:
        """Σ_{k>=1} log p(Y_k | C z_1:i Y_<k) for each (trajectory b, prefix i), reusing the cache of C Z."""
        dev = self.device
        y = torch.tensor(suffix_ids, device=dev)
        m = len(suffix_ids)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        out: list[float] = []
        for start in range(0, len(pairs), self.max_rows):
            chunk = pairs[start: start + self.max_rows]
            rows = torch.tensor([b for b, _ in chunk], device=dev)
            prefix = torch.tensor([i for _, i in chunk], device=dev)
            from transformers import DynamicCache

            sub = DynamicCache([(k[rows], v[rows]) for k, v in layers])
            past = torch.arange(C + T, device=dev)[None, :]
            keep_past = (past < C + prefix[:, None]).long()  # C z_1:i, not the rest of Z (nor padding)
            mask = torch.cat([keep_past, torch.ones((len(chunk), m - 1), dtype=torch.long, device=dev)], 1)
            positions = C + prefix[:, None] + torch.arange(m - 1, device=dev)[None, :]
            logits = self.model(input_ids=y[None, :-1].expand(len(chunk), -1), past_key_values=sub,
                                attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
            lp = torch.log_softmax(logits, -1).gather(2, y[None, 1:, None].expand(len(chunk), -1, 1)).squeeze(2)
            out += lp.sum(1).tolist()
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

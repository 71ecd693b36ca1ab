"""Deterministic decoding baselines on a transformers model: greedy, beam and diverse beam search.

Beam search and greedy come from transformers' `generate`. Diverse (group) beam search
(Vijayakumar et al. 2018) left transformers' core for a hub repository that machines without a
model hub cannot load, so `group_beam_search` implements it here: B beams in G groups; at each
step group g picks its candidates with the log-probs of tokens already chosen by groups < g at
this step lowered by `diversity_penalty` per use (Hamming diversity). Finished hypotheses are
ranked by log-prob / length (transformers' default length penalty 1.0).

All functions return Z as token lists without the end token, and whether the search ended it.
"""

from __future__ import annotations

import torch


def _cut(ids: list[int], end_ids: list[int], pad_id: int | None) -> tuple[list[int], bool]:
    ends = set(end_ids)
    for k, t in enumerate(ids):
        if t in ends:
            return ids[:k], True
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id not in ends:
        ids = ids[:-1]
    return ids, False


@torch.no_grad()
def hf_generate(model, prompt_ids: list[int], n: int, max_new: int, min_new: int, end_ids: list[int], pad_id: int,
                **kw) -> list[tuple[list[int], bool]]:
    """`model.generate` for one prompt (greedy, beam, nucleus, ...): n continuations."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         min_new_tokens=min_new, eos_token_id=list(end_ids), pad_token_id=pad_id,
                         num_return_sequences=n, **kw)
    return [_cut(row[len(prompt_ids):].tolist(), end_ids, pad_id) for row in out]


@torch.no_grad()
def group_beam_search(model, prompt_ids: list[int], num_beams: int, num_groups: int, max_new: int, min_new: int,
                      end_ids: list[int], diversity_penalty: float = 1.0, banned_ids=()) -> list[tuple[list[int], bool]]:
    """Diverse beam search: num_beams hypotheses, num_beams / num_groups per group."""
    if num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a multiple of num_groups ({num_groups})")
    per = num_beams // num_groups
    dev = model.device
    out = model(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_beams)
    logits = out.logits[:, -1, :].float().expand(num_beams, -1)
    seqs: list[list[int]] = [[] for _ in range(num_beams)]
    scores = torch.full((num_beams,), -float("inf"))
    scores[::per] = 0.0  # one live beam per group at the start, so the group does not pick copies
    finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(num_groups)]
    end = torch.tensor(end_ids)
    for step in range(max_new):
        logits = logits.clone()
        if banned_ids:
            logits[:, list(banned_ids)] = -float("inf")
        logp = torch.log_softmax(logits, -1).cpu()
        if step < min_new:
            logp[:, end] = -float("inf")
        used = torch.zeros(logp.shape[1])
        new_src, new_tok, new_score = [], [], []
        for g in range(num_groups):
            rows = list(range(g * per, (g + 1) * per))
            if len(finished[g]) >= per and all(scores[r] == -float("inf") for r in rows):
                new_src += rows
                new_tok += [0] * per
                new_score += [-float("inf")] * per
                continue
            cand = scores[rows, None] + logp[rows] - diversity_penalty * used[None, :]
            raw = scores[rows, None] + logp[rows]
            top = torch.topk(cand.flatten(), min(2 * per, cand.numel()))
            kept = 0
            for flat in top.indices.tolist():
                r, tok = rows[flat // logp.shape[1]], flat % logp.shape[1]
                value = float(raw[flat // logp.shape[1], tok])
                if value == -float("inf"):
                    continue
                if tok in end_ids:
                    if len(finished[g]) < per:
                        finished[g].append((value / max(1, len(seqs[r]) + 1), seqs[r], True))
                    continue
                new_src.append(r)
                new_tok.append(tok)
                new_score.append(value)
                used[tok] += 1
                kept += 1
                if kept == per:
                    break
            while kept < per:  # not enough live candidates: pad the group with dead beams
                new_src.append(rows[0])
                new_tok.append(0)
                new_score.append(-float("inf"))
                kept += 1
        if all(len(f) >= per for f in finished):
            break
        src = torch.tensor(new_src)
        seqs = [seqs[s] + [t] for s, t in zip(new_src, new_tok)]
        scores = torch.tensor(new_score)
        cache.reorder_cache(src.to(dev))
        logits = model(input_ids=torch.tensor(new_tok, device=dev)[:, None], past_key_values=cache,
                       use_cache=True).logits[:, -1, :].float()
    result = []
    for g in range(num_groups):
        hyps = list(finished[g])
        if len(hyps) < per:  # cut at max_new: the best live beams, not terminated
            rows = range(g * per, (g + 1) * per)
            live = sorted((float(scores[r]) / max(1, len(seqs[r])), seqs[r], False) for r in rows
                          if scores[r] > -float("inf"))[::-1]
            hyps += live[: per - len(hyps)]
        hyps.sort(key=lambda h: -h[0])
        result += [(h[1], h[2]) for h in hyps[:per]]
    return result

"""Deterministic decoding baselines on a transformers model: greedy, beam and diverse beam search.

Beam search and greedy come from transformers' `generate`. Diverse (group) beam search
(Vijayakumar et al. 2018) left transformers' core for a hub repository that machines without a
model hub cannot load, so `group_beam_search` implements it here: B beams in G groups, each
group transformers' beam search of width B / G (its defaults: length penalty 1.0, early_stopping
False; with G = 1 and no penalty the hypotheses and their order are `generate(num_beams=B)`'s);
at each step group g picks its candidates with the log-probs of tokens already chosen by
groups < g at this step lowered by `diversity_penalty` per use (Hamming diversity).

All functions return Z as token lists without the end token, and whether the search ended it.
"""

from __future__ import annotations

import torch

from .policy import ban_first


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
                      end_ids: list[int], diversity_penalty: float = 1.0, banned_ids=(),
                      first_banned_ids=()) -> list[tuple[list[int], bool]]:
    """Diverse beam search: num_beams hypotheses, P = num_beams / num_groups per group.

    Each group is transformers' beam search (length_penalty 1.0, early_stopping False) of width P:
    at every step the group ranks its candidates (live beam, token) and walks its best
    max(2, 1 + len(end_ids)) · P of them; an end token among the first P ranks offers the beam as a
    finished hypothesis worth (log q(z) + log q(end | z)) / (|z| + 1); the first P other tokens become
    the live beams (their score: the summed log-prob). The group keeps its best P finished hypotheses
    by value, and is done when it holds P of them and its best live beam's score / its length is no
    better than the worst (transformers' heuristic), or when it has no live beam left. At max_new the
    live beams join the finished set as cut hypotheses worth log q(z) / max_new.

    With several groups, groups go in order at every step and group g ranks its candidates by score
    − diversity_penalty × (times the token was chosen for a live beam at this step by groups < g);
    the penalty only steers the choice: scores and values stay the raw log-probs. Banned tokens are
    taken out before the softmax (the rest renormalised), and `first_banned_ids` at the first step;
    end tokens get −inf before min_new.

    Returns each group's hypotheses best first (at most P: fewer when the model offers fewer
    sequences), group after group, as (tokens without the end token, terminated)."""
    if num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a multiple of num_groups ({num_groups})")
    per = num_beams // num_groups
    if max_new <= 0:
        return [([], False)] * num_groups
    ends = set(end_ids)
    walk = max(2, 1 + len(end_ids)) * per  # candidates a group looks at per step, as transformers does
    dev = model.device
    out = model(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1, :].float()
    live: list[list[tuple[float, list[int], int]]] = [[(0.0, [], 0)] for _ in range(num_groups)]  # (score, z, row)
    finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(num_groups)]  # best first, <= per
    done = [False] * num_groups
    end = torch.tensor(sorted(ends), dtype=torch.long)
    for step in range(max_new):
        last = step == max_new - 1
        if banned_ids:
            logits = logits.clone()
            logits[:, list(banned_ids)] = -float("inf")
        if step == 0:
            logits = ban_first(logits, first_banned_ids)
        logp = torch.log_softmax(logits, -1).cpu()
        if step < min_new:
            logp[:, end] = -float("inf")
        vocab = logp.shape[1]
        used = torch.zeros(vocab)
        for g in range(num_groups):
            if done[g]:
                continue
            beams = live[g]
            raw = torch.tensor([s for s, _, _ in beams])[:, None] + logp[[r for _, _, r in beams]]
            ranked = raw - diversity_penalty * used[None, :] if diversity_penalty else raw
            top = torch.topk(ranked.flatten(), min(walk, ranked.numel()))
            chosen, offered = [], []
            for rank, (v, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                if v == -float("inf") or len(chosen) == per:
                    break
                b, tok = divmod(flat, vocab)
                _, z, row = beams[b]
                value = float(raw[b, tok])
                if tok in ends:
                    if rank < per:
                        offered.append((value / (len(z) + 1), z, True))
                    continue
                chosen.append((value, z + [tok], row))
                used[tok] += 1
            if last:  # cut at max_new: the live beams become hypotheses too
                offered += [(s / len(z), z, False) for s, z, _ in chosen]
            finished[g] = sorted(finished[g] + offered, key=lambda h: -h[0])[:per]
            live[g] = chosen
            # done: nothing left to extend, or (transformers' heuristic) the best live beam's score over
            # its length no better than the worst of P finished hypotheses
            full = len(finished[g]) == per
            if not chosen or full and max(s for s, _, _ in chosen) / (step + 1) <= finished[g][-1][0]:
                done[g] = True
        if last or all(done):
            break
        beams = [b for g in range(num_groups) if not done[g] for b in live[g]]
        cache.reorder_cache(torch.tensor([r for _, _, r in beams], device=dev))
        logits = model(input_ids=torch.tensor([[z[-1]] for _, z, _ in beams], device=dev), past_key_values=cache,
                       use_cache=True).logits[:, -1, :].float()
        k = 0
        for g in range(num_groups):
            if not done[g]:
                live[g] = [(s, z, k + i) for i, (s, z, _) in enumerate(live[g])]
                k += len(live[g])
    return [(z, term) for g in range(num_groups) for _, z, term in finished[g]]

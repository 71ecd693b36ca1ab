"""What a task's target R(Z)^(1/T) looks like before any training (`gfnlm target`).

A GFlowNet learns to sample Z with probability ∝ R(Z)^(1/T). Whether its samples are right (long
enough, likely enough) depends on what that target is, which the reward alone does not say. This
estimates it by self-normalised importance sampling: n draws from a proposal q, each weighted
w ∝ R(Z)^(1/T) / q(Z) over the draws that end (a Z cut at max_len has no reward), so that weighted
means over the draws stand for means under the target. The proposal is the model training starts
from with its adapter off, under the task's own masks (min_len, banned and first tokens: its
log-probs are those of the masked distribution), given either the policy's prompt or the reward
LM's context alone (`context`: p(Z | X) for infilling, the reward's own prior, as `rejection5`).

An estimate is only as good as its effective sample size, ESS = (Σw)² / Σw², printed per record:
with ESS near 1 one draw stands for the whole target.
"""

from __future__ import annotations

import math
import statistics
import time


def snis_weights(log_r: list[float], log_q: list[float], temperature: float = 1.0) -> list[float]:
    """Normalised weights ∝ exp(log_r / T − log_q) (empty lists for no draws)."""
    if not log_r:
        return []
    logw = [r / temperature - q for r, q in zip(log_r, log_q)]
    top = max(logw)
    w = [math.exp(x - top) for x in logw]
    total = sum(w)
    return [x / total for x in w]


def ess(weights: list[float]) -> float:
    """(Σw)² / Σw² of normalised weights: how many draws the estimate is worth."""
    return 1.0 / sum(x * x for x in weights) if weights else 0.0


def record_estimate(lengths: list[int], log_r: list[float], log_q: list[float], temperature: float) -> dict:
    """One record's figures from its ended draws: under the target (weighted) and the proposal (plain)."""
    w = snis_weights(log_r, log_q, temperature)
    return {"draws": len(lengths), "ess": ess(w),
            "target_length": sum(x * n for x, n in zip(w, lengths)),
            "target_log_r": sum(x * r for x, r in zip(w, log_r)),
            "proposal_length": statistics.mean(lengths), "proposal_log_r": statistics.mean(log_r)}


def estimate(task, model, sampler, record_ids: list[int], draws: int, temperatures=(1.0,),
             proposal: str = "prompt", log=None) -> dict:
    """The target's figures per record and their means at each temperature, all from the same draws
    (records with no ended draw are counted out); `log` hears the progress every tenth of the records."""
    prompt_of = task.context_ids if proposal == "context" else task.prompt_ids
    ended, no_end = {}, []
    t0, every = time.perf_counter(), max(1, len(record_ids) // 10)
    for i, rid in enumerate(record_ids):  # one record per engine call: draws × the prompt's cache stay small
        if log is not None and i and i % every == 0:
            log(f"gfnlm target: {i} of {len(record_ids)} records drawn and scored ({time.perf_counter() - t0:.0f} s)")
        with model.disable_adapter():
            drawn = task.sample_records(sampler, [rid], draws, 1.0, prompt_of=prompt_of).get(rid, [])
        kept = [t for t in drawn if t.terminated]
        if not kept:
            no_end.append(rid)
            continue
        with task.final_state_only():
            task.score(kept)
        ended[rid] = ([t.length for t in kept], [t.final_log_r for t in kept], [t.sampled_log_q for t in kept])
    by_t = {}
    for T in temperatures:
        per_record = {rid: record_estimate(*ended[rid], T) for rid in ended}
        keys = ("target_length", "target_log_r", "proposal_length", "proposal_log_r", "ess")
        means = {k: statistics.mean(f[k] for f in per_record.values()) for k in keys} if per_record else {}
        if per_record:
            means["ess_median"] = statistics.median(f["ess"] for f in per_record.values())
        by_t[f"{T:g}"] = {"mean": means, "per_record": per_record}
    return {"proposal": proposal, "draws_per_record": draws, "records": len(ended),
            "records_without_an_ended_draw": no_end, "temperatures": by_t}

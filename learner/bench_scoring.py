"""`gfnlm bench scoring`: log R of every prefix with a suffix, three ways, on the same batch.

- shared: gfnlm's PrefixScorer: C once, Z once, then all (prefix, Y) continuations of a
  trajectory as one sequence against that cache under a tree attention mask;
- final: the same scorer with reward.prefixes=final (only the whole Z: what TB needs);
- naive: one full forward pass over C z_1:i Y per prefix.
Ratios are measured in one run, on one batch of the given config's task (random Z of the task's
max length).

With --bf16 the reward LM is also run with bfloat16 weights (what `model.dtype: bfloat16` gives):
the shared way timed again, and every scored prefix of the first training records' references (real
text, each record with its own context and suffix) compared with float32: how far the rewards move
against how far they spread. CPUs with bfloat16 matrix instructions (AVX512-BF16, AMX) run it
faster; on others it is slower than float32.
"""

from __future__ import annotations

import copy
import random
import statistics
import time

import torch

from gfnlm.configs import load_config


def main(args) -> int:
    from gfnlm.actors.policy import Policy
    from gfnlm.actors.scoring import PrefixScorer
    from gfnlm.actors.trajectory import Trajectory
    from gfnlm.rewards import make_task

    cfg = load_config(args.config or "infilling.yaml", list(args.override))
    torch.set_num_threads(args.threads)
    policy = Policy(cfg.model, cfg.lora)
    tok = policy.tokenizer
    task = make_task(cfg, tok)
    if not hasattr(task, "suffix_ids"):
        print(f"task {task.name} has no suffix; use an infilling config")
        return 2
    rid = task.train_ids[0]
    ctx, suffix = task.context_ids(rid), task.suffix_ids(rid)
    rng = random.Random(0)
    vocab = [i for i in range(len(tok)) if i not in task.banned_ids and i not in task.end_ids]
    trajs = [Trajectory(rid, [rng.choice(vocab) for _ in range(args.length)]) for _ in range(args.trajectories)]
    scorer = PrefixScorer(policy.model, tok.pad_token_id, policy.device)
    print(f"{args.trajectories} trajectories of {args.length} tokens, context {len(ctx)} tokens, suffix {len(suffix)} "
          f"tokens; {args.threads} thread(s), best of {args.repeats}")

    def best(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_shared, shared = best(lambda: scorer.score(ctx, trajs, suffix_ids=suffix))
    t_final, _ = best(lambda: scorer.score(ctx, trajs, suffix_ids=suffix, prefixes="final"))
    naive_trajs = trajs[: max(1, args.trajectories // args.naive_fraction)]
    t_naive, naive = best(lambda: scorer.score_naive(ctx, naive_trajs, suffix_ids=suffix))
    t_naive *= len(trajs) / len(naive_trajs)
    err = max(abs(a - b) for r1, r2 in zip(shared, naive) for a, b in zip(r1, r2))
    prefixes = args.trajectories * (args.length + 1)
    print(f"{'shared cache, every prefix':<32}{t_shared:>9.2f} s  {prefixes / t_shared:>8.1f} prefixes/s")
    print(f"{'naive, one pass per prefix':<32}{t_naive:>9.2f} s  {prefixes / t_naive:>8.1f} prefixes/s"
          f"  (timed on {len(naive_trajs)} trajectories, scaled)")
    print(f"{'shared cache, final only':<32}{t_final:>9.2f} s")
    print(f"speed-up of shared over naive: {t_naive / t_shared:.1f}x; largest difference {err:.2e} nats")
    if args.bf16:
        low = PrefixScorer(copy.deepcopy(policy.model).to(torch.bfloat16), tok.pad_token_id, policy.device)
        t_low, _ = best(lambda: low.score(ctx, trajs, suffix_ids=suffix))
        print(f"{'bfloat16, shared, every prefix':<32}{t_low:>9.2f} s  {prefixes / t_low:>8.1f} prefixes/s  "
              f"(x{t_shared / t_low:.2f} of float32)")
        print(dtype_error(task, scorer, low, args.records))
    return 0


def dtype_error(task, scorer, low, records: int) -> str:
    """bfloat16 against float32 on every scored prefix of the first `records` training references."""
    diffs, finals = [], []
    for rid in task.train_ids[:records]:
        ref = task.reference(rid)
        if ref is None:
            continue
        args = (task.context_ids(rid), [ref])
        hi, lo = scorer.score(*args, suffix_ids=task.suffix_ids(rid))[0], low.score(*args, suffix_ids=task.suffix_ids(rid))[0]
        diffs += [b - a for a, b in zip(hi, lo) if a == a]  # NaN: a prefix not scored
        finals.append((hi[-1], lo[-1]))
    if len(finals) < 2:
        return "bfloat16 against float32: fewer than two training records have a reference to compare on"
    whole = [b - a for a, b in finals]
    return (f"bfloat16 against float32 on {len(finals)} training references ({len(diffs)} scored prefixes): "
            f"log R moves by {statistics.mean(diffs):+.3f} ± {statistics.pstdev(diffs):.3f} nats (largest "
            f"{max(map(abs, diffs)):.3f}); the whole Z's by {statistics.pstdev(whole):.3f} (sd), where the "
            f"references' float32 log R spread by {statistics.pstdev([a for a, _ in finals]):.2f} (sd)")

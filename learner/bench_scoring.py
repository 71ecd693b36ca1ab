"""`gfnlm bench scoring`: log R of every prefix with a suffix, three ways, on the same batch.

- shared: gfnlm's PrefixScorer: C once, Z once, then all (prefix, Y) continuations of a
  trajectory as one sequence against that cache under a tree attention mask;
- final: the same scorer with reward.prefixes=final (only the whole Z: what TB needs);
- naive: one full forward pass over C z_1:i Y per prefix.
Ratios are measured in one run, on one batch of the given config's task (random Z of the task's
max length when its records have no reference).
"""

from __future__ import annotations

import random
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
    return 0

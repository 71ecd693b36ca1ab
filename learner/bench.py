"""`gfnlm bench learner`: learner throughput against what the machine's matmuls can do.

Prints, for one batch of the given config: trajectories/s and tokens/s of the learner update
(teacher-forced forward + backward + optimizer step) with the prompt computed once per batch, the
same with the prompt repeated per sample (the plain design), the sampler's tokens/s, and the
machine's measured fp32 matmul FLOP/s, so the fraction of the machine the learner uses is visible.
"""

from __future__ import annotations

import time

import torch

from gfnlm.configs import load_config


def matmul_flops(seconds: float = 2.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0)


def naive_update_seconds(c, batch, repeats: int) -> float:
    """Forward + backward with the prompt repeated per sample: one padded pass over prompt + Z."""
    tok = c.policy.tokenizer
    prompt = c.task.prompt_ids(c.task.train_ids[0])
    T = max(t.length for t in batch)
    ids = torch.full((len(batch), len(prompt) + T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, t in enumerate(batch):
        seq = prompt + t.tokens
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
    params = c.policy.trainable_parameters()
    t0 = time.perf_counter()
    for _ in range(repeats):
        logits = c.policy.model(input_ids=ids, attention_mask=mask).logits[:, len(prompt) - 1 :].float()
        logp = torch.log_softmax(logits, -1)
        loss = logp[:, :T].gather(2, ids[:, len(prompt) :, None]).mean() + logp[:, :, c.task.end_ids].mean()
        torch.autograd.grad(loss, params)
    return (time.perf_counter() - t0) / repeats


def main(args) -> int:
    from gfnlm.learner.loop import build, collect

    cfg = load_config(args.config or "random_number.yaml", list(args.override) + ["run.progress=false"])
    print(f"torch threads: {torch.get_num_threads()}")
    flops = matmul_flops()
    print(f"machine: fp32 matmul 1024^3: {flops / 1e9:.1f} GFLOP/s")

    c = build(cfg)
    n_params = sum(p.numel() for p in c.policy.model.parameters())
    t0 = time.perf_counter()
    _, batch = collect(c, c.task.train_ids[:1], 1.0)
    sample_s = time.perf_counter() - t0
    fresh = [t for t in batch.trajectories if t.source != "replay"]
    print(f"sampler: {len(fresh)} samples, {sum(t.length + t.terminated for t in fresh)} tokens in {sample_s:.2f} s "
          f"({sum(t.length + t.terminated for t in fresh) / sample_s:.1f} tokens/s, prompt computed once)")

    P = len(c.task.prompt_ids(c.task.train_ids[0]))
    z_tokens = sum(t.length for t in batch.trajectories)
    seq_tokens = len(batch) * P + z_tokens  # what each trajectory means: prompt + Z
    computed = P + z_tokens  # what the shared-prompt pass actually runs

    c.learner.update([batch], 1.0)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        c.learner.update([batch], 1.0)
    shared = (time.perf_counter() - t0) / args.steps
    # forward 2·N·tokens; backward through frozen weights to the adapters ≈ 2·N·tokens more
    achieved = 4 * n_params * computed / shared
    print(f"learner, prompt once per batch: {len(batch)} trajectories ({P} prompt + {z_tokens} Z tokens) "
          f"in {shared:.3f} s/update -> {len(batch) / shared:.1f} trajectories/s, {seq_tokens / shared:.0f} tokens/s "
          f"(~{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / flops:.0f}% of the matmul rate)")

    naive = naive_update_seconds(c, batch.trajectories, max(1, args.steps // 2))
    achieved_naive = 4 * n_params * seq_tokens / naive
    print(f"learner, prompt repeated per sample: {naive:.3f} s/update -> {len(batch) / naive:.1f} trajectories/s, "
          f"{seq_tokens / naive:.0f} tokens/s (~{achieved_naive / 1e9:.1f} GFLOP/s = {100 * achieved_naive / flops:.0f}%)")
    print(f"prompt sharing speed-up: x{naive / shared:.2f}")
    many_prompts(c, max(1, args.steps // 2))
    return 0


def many_prompts(c, steps: int, records: int = 16) -> None:
    """SFT's batch: `records` prompts with one reference each. The learner's update with a pass per
    prompt against every row joined to its prompt in one pass (`Policy.join_rows`), side by side."""
    from .loop import references

    batch = references(c, c.task.train_ids[:records])
    if len(batch.trajectories) < 2:
        print("many prompts, one row each: skipped (the task's records have no references to train on)")
        return
    seconds = {}
    for join in (False, True, False, True):  # alternated, so that a change in the machine's load hits both
        c.policy.join_rows = join
        c.learner.update([batch], 1.0)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            c.learner.update([batch], 1.0)
        seconds.setdefault(join, []).append((time.perf_counter() - t0) / steps)
    c.policy.join_rows = None
    per_prompt, joined = min(seconds[False]), min(seconds[True])
    print(f"many prompts, one row each ({len(batch.trajectories)} references, the {c.cfg.learner.objective.type} update): "
          f"a pass per prompt {per_prompt:.3f} s/update, joined in one pass {joined:.3f} s/update -> x{per_prompt / joined:.2f}")


def orchestration(args) -> int:
    """Throughput of the Ray driver with simulated samplers (fixed latency per batch, no model),
    against the ideal linear line; the learner-side cost per batch; broadcast time per MB."""
    import tempfile

    import numpy as np
    import ray

    from gfnlm.actors.simulated import SimulatedSampler
    from gfnlm.learner.distributed import RayDriver
    from gfnlm.cluster.ray_session import ray_session
    from gfnlm.actors.tiny import build_model

    model = build_model(tempfile.mkdtemp(prefix="gfnlm-bench-"), "llama")
    print(f"simulated sampler: {args.latency:.2f} s per batch of {args.batch} trajectories; learner: tiny model")
    print(f"{'samplers':>8} {'traj/s':>9} {'ideal':>9} {'of ideal':>9} {'learner-side µs/batch':>22} {'update ms':>10} {'dropped':>8}")
    for n in args.samplers:
        cfg = load_config("random_number.yaml", [
            f"model.path={model}", "lora.r=4", "lora.target_modules=[q_proj,v_proj]", f"batch.samples_per_prompt={2 * args.batch}",
            "batch.on_policy=0.5", "batch.replay=0.5", "task.target={type: uniform, low: 0, high: 20}", "task.max_len=2",
            "replay.capacity_per_prompt=64", "runtime.mode=ray", f"samplers.num_actors={n}", "samplers.num_cpus=0.01",
            f"runtime.max_staleness={10 * n}", "run.progress=false",
        ])
        sim = type("Sim", (SimulatedSampler,), {"latency": args.latency})
        with ray_session(cfg, log=lambda m: None):
            driver = RayDriver(cfg, log=lambda m: None, worker_cls=sim)
            driver.start()
            for _ in range(n):  # warm-up: every actor has answered once
                driver.step(1.0)
            steps = max(args.steps, 4 * n)
            t0 = time.perf_counter()
            update, fresh = 0.0, 0
            for _ in range(steps):
                trajs, out = driver.step(1.0)
                update += out["update_seconds"]
                fresh += len(trajs)
            wall = time.perf_counter() - t0
            driver.close()
        ideal = n * args.batch / args.latency
        per_batch = (wall - update) / steps
        print(f"{n:>8} {fresh / wall:>9.1f} {ideal:>9.1f} {100 * fresh / wall / ideal:>8.0f}% {1e6 * per_batch:>22.0f} "
              f"{1e3 * update / steps:>10.1f} {driver.counters['batches_dropped_stale_total']:>8}")

    pipeline(args, model)

    # broadcast: one ray.put, N actors get the same reference
    cfg = load_config("random_number.yaml", ["runtime.mode=ray", f"samplers.num_actors={max(args.samplers)}"])
    with ray_session(cfg, log=lambda m: None):
        actors = [ray.remote(SimulatedSampler).options(num_cpus=0.01).remote() for _ in range(4)]
        ray.get([a.set_weights.remote(None, 0) for a in actors])
        for mb in (1, 8, 32):
            state = {"w": np.random.rand(mb * 2**20 // 8)}
            t0 = time.perf_counter()
            ref = ray.put(state)
            ray.get([a.set_weights.remote(ref, 1) for a in actors])
            dt = time.perf_counter() - t0
            print(f"broadcast {mb:>3} MB to {len(actors)} actors: {1e3 * dt:.1f} ms ({1e3 * dt / mb:.2f} ms per MB)")
    return 0


def pipeline(args, model: str) -> None:
    """A pool of reward actors chained to the samplers against scoring on the driver's path."""
    from gfnlm.actors.simulated import SimulatedSampler, SimulatedScorer
    from gfnlm.cluster.ray_session import ray_session
    from gfnlm.learner.distributed import RayDriver

    n = args.pipeline_actors
    print(f"\nscorer pool: {n} simulated samplers and {n} simulated scorers, {args.latency:.2f} s per batch each")
    print(f"{'scoring':<28} {'steps/s':>8} {'traj/s':>8}")
    rates = {}
    for chain in (True, False):
        cfg = load_config("random_number.yaml", [
            f"model.path={model}", "lora.r=4", "lora.target_modules=[q_proj,v_proj]", f"batch.samples_per_prompt={args.batch}",
            "batch.on_policy=1.0", "batch.replay=0", "task.target={type: uniform, low: 0, high: 20}", "task.max_len=2",
            "runtime.mode=ray", f"samplers.num_actors={n}", "samplers.num_cpus=0.01", "samplers.in_flight=2",
            "reward.colocate=false", f"reward.num_actors={n}", "reward.num_cpus=0.01", f"runtime.max_staleness={10 * n}",
            "run.progress=false", "metrics.enabled=false"])
        sampler = type("Sim", (SimulatedSampler,), {"latency": args.latency})
        scorer = type("SimScorer", (SimulatedScorer,), {"latency": args.latency})
        with ray_session(cfg, log=lambda m: None):
            driver = RayDriver(cfg, log=lambda m: None, worker_cls=sampler, scorer_cls=scorer, chain=chain)
            driver.start()
            for _ in range(2 * n):
                driver.step(1.0)
            steps = max(args.steps // 2, 4 * n)
            t0 = time.perf_counter()
            fresh = sum(len(driver.step(1.0)[0]) for _ in range(steps))
            wall = time.perf_counter() - t0
            driver.close()
        rates[chain] = steps / wall
        name = "chained to the samplers" if chain else "on the driver's path"
        print(f"{name:<28} {steps / wall:>8.2f} {fresh / wall:>8.1f}")
    print(f"chained / driver's path: {rates[True] / rates[False]:.1f}x")


class ModelWork:
    """Counts what forward passes push through the models while a stage runs: input tokens (each
    runs through the transformer body) and LM-head rows (each a d × V matmul), by forward hooks on
    each model's input embedding and output layer. FLOPs: 2·N_body per token and 2·d·V per head row
    forward (N_body: the parameters outside the embedding and the head); a backward pass through
    frozen weights to the adapters costs about the same again (activation gradients; the adapters'
    own weight gradients are rank-r and left out). Attention scores and softmax are not counted
    (4·L·d per token and layer: ~10 % of the body at the ~300-token contexts of these presets)."""

    def __init__(self, models):
        self.tokens = self.rows = 0
        self.handles = []
        self.flops_per_token = self.flops_per_row = 0.0
        seen = set()
        for m in models:
            base = m.get_base_model() if hasattr(m, "get_base_model") else m
            if base is None or id(base) in seen:
                continue
            seen.add(id(base))
            emb, head = base.get_input_embeddings(), base.get_output_embeddings()
            n_body = sum(p.numel() for n, p in base.named_parameters()
                         if p.data_ptr() not in {emb.weight.data_ptr(), head.weight.data_ptr()})
            self.flops_per_token = max(self.flops_per_token, 2.0 * n_body)
            self.flops_per_row = max(self.flops_per_row, 2.0 * head.weight.numel())
            self.handles.append(emb.register_forward_hook(self._count_tokens))
            self.handles.append(head.register_forward_hook(self._count_rows))

    def _count_tokens(self, module, inputs, output):
        self.tokens += inputs[0].numel()

    def _count_rows(self, module, inputs, output):
        self.rows += inputs[0].shape[:-1].numel()

    def take(self) -> tuple[int, int]:
        """(tokens, head rows) since the last take."""
        out = (self.tokens, self.rows)
        self.tokens = self.rows = 0
        return out

    def flops(self, tokens: float, rows: float) -> float:
        """Forward FLOPs of that work (a backward through it: about the same again)."""
        return tokens * self.flops_per_token + rows * self.flops_per_row

    def close(self) -> None:
        for h in self.handles:
            h.remove()


STAGES = ("sample", "score", "forward", "backward", "optimizer", "replay", "other")


def stages(args) -> int:
    """`gfnlm bench training`: local training steps taken apart. Per stage (sampling with its tools,
    scoring, the learner's forward, backward and optimizer step, replay, the rest): seconds per step,
    the tokens and LM-head rows it pushed through the models, the FLOPs they imply (`ModelWork`), and
    that as a fraction of the machine's measured fp32 matmul rate at the same thread count."""
    from gfnlm.actors.sampler import RequestServer
    from gfnlm.actors.trajectory import MicroBatch

    from .loop import build, plan_request, replay_wanted

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config or "arithmetic.yaml", list(args.override) + [
        "run.progress=false", "runtime.mode=local", f"run.torch_threads={args.threads}"])
    rate = matmul_flops()
    c = build(cfg)
    serve = RequestServer(c.sampler, c.policy.tokenizer)
    task = c.task
    work = ModelWork([c.policy.model, getattr(getattr(task, "lm", None), "model", None)])
    secs = {k: 0.0 for k in STAGES}
    tokens = {k: [0, 0] for k in STAGES}
    n_traj = n_fresh = n_tool = 0
    for step in range(args.steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        work.take()
        rids = c.scheduler.next()
        req, counts = plan_request(cfg, task, rids, [c.replay.size(r) for r in rids], c.generator)
        fresh = serve(req)
        t1 = time.perf_counter()
        got = {"sample": work.take()}
        task.score(fresh)
        t2 = time.perf_counter()
        got["score"] = work.take()
        c.replay.add(fresh)
        mixed = MicroBatch(req, fresh + c.replay.sample_many(replay_wanted(req, counts), 1.0))
        t3 = time.perf_counter()
        got["replay"] = work.take()
        out = c.learner.update([mixed], 1.0)
        t4 = time.perf_counter()
        got["forward"] = work.take()
        if step == 0:
            continue
        parts = {"sample": t1 - t0, "score": t2 - t1, "replay": t3 - t2, "forward": out["forward_seconds"],
                 "backward": out["backward_seconds"], "optimizer": out["optimizer_seconds"]}
        parts["other"] = (t4 - t0) - sum(parts.values())
        for k, v in parts.items():
            secs[k] += v
        for k, (tk, rw) in got.items():
            tokens[k][0] += tk
            tokens[k][1] += rw
        tokens["backward"] = list(tokens["forward"])  # the backward runs back through the forward's tokens
        n_traj += len(mixed)
        n_fresh += len(fresh)
        n_tool += sum(sum(t.tool_mask) for t in fresh if t.tool_mask)
    work_total = sum(secs.values())
    n = args.steps
    print(f"gfnlm bench training: {cfg.task.type}, {n} steps of {cfg.batch.prompts_per_step} records × "
          f"{cfg.batch.samples_per_prompt} trajectories ({n_fresh / n:.0f} fresh, {(n_traj - n_fresh) / n:.0f} replayed "
          f"per step), {args.threads} torch thread(s); machine fp32 matmul {rate / 1e9:.1f} GFLOP/s")
    print(f"  per token {work.flops_per_token / 1e6:.0f} MFLOP (body), per LM-head row {work.flops_per_row / 1e6:.0f} MFLOP; "
          f"tool-inserted tokens per step {n_tool / n:.0f}")
    print(f"  {'stage':<10} {'s/step':>7} {'share':>6} {'tokens':>7} {'head rows':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'of rate':>8}")
    for k in STAGES:
        tk, rw = tokens[k][0] / n, tokens[k][1] / n
        gf = work.flops(tk, rw) / 1e9
        s_ = secs[k] / n
        achieved = gf / s_ if s_ > 0 else 0.0
        print(f"  {k:<10} {s_:7.2f} {100 * secs[k] / work_total:5.1f}% {tk:7.0f} {rw:9.0f} {gf:7.1f} {achieved:8.1f} "
              f"{100 * achieved * 1e9 / rate:7.0f}%")
    print(f"  step {work_total / n:.2f} s; trained trajectories/s {n_traj / work_total:.2f}")
    work.close()
    return 0

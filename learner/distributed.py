"""The Ray driver: sampler, reward and replay actors around the learner, overlapped.

Samplers always have `samplers.in_flight` requests queued, so they keep generating while the
learner updates. The learner takes whichever batch is ready first (`ray.wait`), never the slowest
sampler's; batches older than `runtime.max_staleness` versions, and batches of an actor that died,
are dropped and counted, never half-used. Weights go out once per version: one `ray.put`, and
every sampler gets the same object reference, swapped in between two generation calls.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors import max_rss_bytes
from actors.trajectory import Trajectory
from actors.workers import ReplayWorker, SampledBatch, SampleRequest, SamplerWorker, ScorerWorker

from .loop import build, seed_replay, tempered_temperatures
from .schedule import batch_counts


class ActorFailed(RuntimeError):
    """An actor raised; the message names the actor and its error."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _cause(e: RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else _last_line(str(e))


class RayDriver:
    def __init__(self, cfg, log=print, worker_cls=SamplerWorker, metrics=None):
        self.cfg, self.log = cfg, log
        self.metrics = metrics
        self.c = build(cfg, with_replay=False, engine=False)  # the learner's policy, task and optimizer; the buffer is an actor
        s, r = cfg.samplers, cfg.reward
        self.replay = ray.remote(ReplayWorker).options(name="replay", num_cpus=0).remote(cfg)
        seed_replay(_Sync(self.replay), cfg, self.c.task)
        self.names = [f"sampler-{i}" for i in range(s.num_actors)]
        options = dict(num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=s.max_restarts, max_task_retries=0,
                       resources=dict(s.resources))
        if s.memory_mb:
            options["memory"] = s.memory_mb * 2**20
        self.samplers = [
            ray.remote(worker_cls).options(name=name, **options).remote(
                cfg, name, cfg.learner.seed + 1 + i, score=r.colocate, threads=int(s.num_cpus))
            for i, name in enumerate(self.names)
        ]
        self.scorer = None
        if not r.colocate:
            self.scorer = ray.remote(ScorerWorker).options(
                name="reward", num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=r.max_restarts, max_task_retries=0,
                resources=dict(r.resources)).remote(cfg)
        if metrics is not None:  # every series the dashboard shows exists from the start, at 0
            for name in self.names + ([] if r.colocate else ["reward"]):
                metrics.get("gfnlm_actor_restarts_total", target=name)
            for reason in ("stale", "actor_failed"):
                metrics.get("gfnlm_batches_dropped_total", reason=reason)
            metrics.get("gfnlm_errors_total", kind="ActorFailed")
        self.pending: dict = {}  # ObjectRef -> sampler index
        self.recovering: dict[int, tuple[float, float]] = {}  # sampler -> (retry time, back-off)
        self.retry_at: dict[int, float] = {}  # back-off of samplers retried but not yet healthy
        self.next_prompt = 0
        self.weights = None
        self.counters = {"batches_dropped_stale_total": 0, "batches_dropped_failed_total": 0,
                         "actor_failures_total": 0, "broadcast_bytes": 0, "broadcast_seconds": 0.0,
                         "staleness": 0}

    # -- weights -------------------------------------------------------------------------------

    def publish(self) -> None:
        t0 = time.perf_counter()
        state = self.c.policy.adapter_state()
        self.weights = (ray.put(state), self.c.learner.step)
        for actor in self.samplers:
            actor.set_weights.remote(*self.weights)
        self.counters["broadcast_bytes"] = sum(v.numel() * v.element_size() for v in state.values())
        self.counters["broadcast_seconds"] = time.perf_counter() - t0
        self._metric("gfnlm_weight_broadcast_bytes_total", "inc", self.counters["broadcast_bytes"])
        self._metric("gfnlm_weight_broadcast_seconds", "observe", self.counters["broadcast_seconds"])

    def _metric(self, name: str, how: str, value: float = 1.0, **labels) -> None:
        if self.metrics is not None:
            getattr(self.metrics.get(name, **labels), how)(value)

    def metrics_endpoints(self) -> dict[str, str]:
        """name -> host:port of every process's metrics endpoint (learner and actors)."""
        if self.metrics is None:
            return {}
        actors = dict(zip(self.names, self.samplers), replay=self.replay)
        if self.scorer is not None:
            actors["reward"] = self.scorer
        out = {"learner": self.metrics.endpoint}
        for name, a in actors.items():
            try:
                out[name] = ray.get(a.metrics_endpoint.remote(), timeout=60)
            except (RayActorError, RayTaskError):
                self.log(f"gfnlm: {name} did not report its metrics endpoint")
        return out

    # -- requests ------------------------------------------------------------------------------

    def _submit(self, i: int) -> None:
        cfg = self.cfg
        n_on, n_temp, _ = batch_counts(cfg.batch, replay_available=1 if cfg.batch.replay > 0 else 0)
        temps = tempered_temperatures(cfg, n_temp, self.c.sampler.generator) if n_temp else []
        req = SampleRequest(self.next_prompt % len(self.c.task.prompts), n_on, temps)
        self.next_prompt += 1
        self.pending[self.samplers[i].sample.remote(req)] = i

    def start(self) -> None:
        self.publish()
        for i in range(len(self.samplers)):
            for _ in range(self.cfg.samplers.in_flight):
                self._submit(i)

    def _revive(self) -> None:
        """Send work again to samplers whose back-off after a failure has passed."""
        now = time.monotonic()
        for i, (when, _) in list(self.recovering.items()):
            if now >= when:
                self.samplers[i].set_weights.remote(*self.weights)  # a restarted actor starts from scratch
                for _ in range(self.cfg.samplers.in_flight):
                    self._submit(i)
                self.retry_at[i] = self.recovering.pop(i)[1]

    def _failed(self, i: int) -> None:
        """Sampler i lost a batch (it died; Ray restarts it): drop and count, retry later."""
        self.counters["batches_dropped_failed_total"] += 1
        self._metric("gfnlm_batches_dropped_total", "inc", reason="actor_failed")
        if i in self.recovering:
            return
        delay = min(2 * self.retry_at.pop(i, 0.25), 10.0)
        if delay <= 0.5:
            self.counters["actor_failures_total"] += 1
            self._metric("gfnlm_actor_restarts_total", "inc", target=self.names[i])
            self.log(f"gfnlm: {self.names[i]} died; its batches in flight are dropped, Ray restarts it")
        # cancel what is still queued for it, then wait before sending more
        for ref, j in list(self.pending.items()):
            if j == i:
                del self.pending[ref]
        self.recovering[i] = (time.monotonic() + delay, delay)

    def _next_batch(self) -> SampledBatch:
        """The first ready batch that is usable; keeps every healthy sampler busy."""
        deadline = time.monotonic() + self.cfg.runtime.sampler_timeout
        while True:
            if time.monotonic() > deadline:
                raise ActorFailed(f"no sampler delivered a batch for {self.cfg.runtime.sampler_timeout:g} s "
                                  f"(failed: {', '.join(self.names[i] for i in self.recovering) or 'none'})")
            self._revive()
            if not self.pending:
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            if not ready:
                continue
            ref = ready[0]
            i = self.pending.pop(ref)
            try:
                batch = ray.get(ref)
            except RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise ActorFailed(f"{self.names[i]} could not start: {_last_line(str(e))}") from None
                self._failed(i)
                continue
            except RayTaskError as e:
                raise ActorFailed(f"{self.names[i]} failed: {_cause(e)}") from None
            self.retry_at.pop(i, None)
            self._submit(i)
            staleness = self.c.learner.step - batch.version
            if staleness > self.cfg.runtime.max_staleness:
                self.counters["batches_dropped_stale_total"] += 1
                self._metric("gfnlm_batches_dropped_total", "inc", reason="stale")
                continue
            self.counters["staleness"] = staleness
            self._metric("gfnlm_staleness_versions", "observe", staleness)
            if self.scorer is not None:
                try:
                    batch = ray.get(self.scorer.score.remote(batch))
                except RayActorError:
                    self.counters["actor_failures_total"] += 1
                    self.counters["batches_dropped_failed_total"] += 1
                    self._metric("gfnlm_actor_restarts_total", "inc", target="reward")
                    self._metric("gfnlm_batches_dropped_total", "inc", reason="actor_failed")
                    continue
                except RayTaskError as e:
                    raise ActorFailed(f"reward failed: {_cause(e)}") from None
            return batch

    # -- the step ------------------------------------------------------------------------------

    def step(self, prompt_id: int, temperature: float) -> tuple[list[Trajectory], dict]:
        c, cfg = self.c, self.cfg
        batches = [self._next_batch() for _ in range(cfg.learner.grad_accum)]
        _, _, n_rep = batch_counts(cfg.batch, replay_available=1)
        mixed, fresh = [], []
        for b in batches:
            self.replay.add.remote(b.trajectories)
            replayed = ray.get(self.replay.sample.remote(b.prompt_id, n_rep, temperature))
            fresh += b.trajectories
            mixed.append(b.trajectories + replayed)
        out = c.learner.update(mixed, c.task.prompt_ids, c.task.end_ids, temperature)
        out["trained"] = sum(len(m) for m in mixed)
        if c.learner.step % cfg.runtime.publish_every == 0:
            self.publish()
        return fresh, out

    # -- replay, memory, shutdown ----------------------------------------------------------------

    def replay_state(self) -> dict:
        return ray.get(self.replay.state_dict.remote())

    def load_replay_state(self, state: dict) -> None:
        ray.get(self.replay.load_state_dict.remote(state))

    def replay_size(self) -> int:
        return ray.get(self.replay.size.remote())

    def memory(self) -> dict[str, int]:
        """Peak resident memory of every actor, by name."""
        actors = dict(zip(self.names, self.samplers))
        if self.scorer is not None:
            actors["reward"] = self.scorer
        return {name: ray.get(a.memory.remote(), timeout=30) for name, a in actors.items()}

    def close(self) -> None:
        try:
            mem = self.memory()
            mem["learner"] = max_rss_bytes()
            self.log("gfnlm: peak memory " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
        except (RayActorError, RayTaskError):
            pass
        for ref in list(self.pending):
            ray.cancel(ref, force=False)
        for a in self.samplers + [self.replay] + ([self.scorer] if self.scorer else []):
            ray.kill(a)


class _Sync:
    """Calls a Ray actor's `add` synchronously, so seed_replay works on it as on the class."""

    def __init__(self, handle):
        self.handle = handle

    def add(self, trajectories):
        return ray.get(self.handle.add.remote(trajectories))

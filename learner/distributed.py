"""The Ray driver: sampler, reward and replay actors around the learner, overlapped.

Samplers always have `samplers.in_flight` requests queued, so they keep generating while the
learner updates. With `reward.colocate` a sampler scores its own batches; otherwise every sample
call is chained to a reward actor of the pool (`scorer.score.remote(sampler.sample.remote(req))`),
so sampling, scoring and learning overlap and the driver only ever waits for scored batches. The
learner takes whichever batch is ready first (`ray.wait`); batches older than
`runtime.max_staleness` versions, and batches of an actor that died, are dropped and counted.

Faults: deaths are read from Ray's actor table (`check_actors`, every step and on every lost
batch), so each restart is counted once per actor, whether or not a call was in flight. A lost
request goes out again with the same plan. A sampler or reward actor past its max_restarts is
replaced by a fresh one while `runtime.actor_replacements` lasts, then the run stops after a
checkpoint. The replay actor restarts (`runtime.replay_max_restarts`) and is refilled from the
last checkpoint, or from the task's seeds before the first.
Weights go out once per version: one `ray.put`, every sampler gets the same object reference.

The driver's concerns live in three files: its actors (ray_supervision.py: start, watch, replace),
its requests (ray_requests.py: plan, send, collect, resend), and here the weights, the step and
shutdown.

Requests are planned by the learner (`loop.plan_request`): the record scheduler picks the records,
the replay's sizes decide the fresh/replayed split, the driver's generator gives the tempered
temperatures and the request's seed. Requests in flight are checkpointed and sent again on
resume; what a resumed Ray run does not restore is timing, i.e. which policy version serves a
request, so its losses match an uninterrupted run only where the versions happen to match.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from gfnlm.actors import max_rss_bytes
from gfnlm.actors.engines import context_length
from gfnlm.actors.trajectory import MicroBatch, Trajectory
from gfnlm.actors.workers import SamplerWorker
from gfnlm.rewards.scorer import ScorerWorker

from .components import build, seed_replay
from .ray_requests import RequestPipeline
from .ray_supervision import ActorFailed, ActorSupervision, _Sync  # noqa: F401 (ActorFailed re-exported)
from .schedule import replay_wanted


class RayDriver(ActorSupervision, RequestPipeline):
    """Sampler, reward and replay actors around the learner: ActorSupervision (its actors),
    RequestPipeline (its requests), and here the weights, the step, the replay's state and shutdown.
    Implements `driver.Driver`."""

    def __init__(self, cfg, log=print, worker_cls=SamplerWorker, metrics=None, scorer_cls=ScorerWorker, chain: bool = True):
        self.cfg, self.log = cfg, log
        self.metrics = metrics
        self.generation: dict[str, int] = {}  # actors started per logical name (replacements get name.rN)
        self.c = build(cfg, with_replay=False, engine=False, log=log)  # the learner's policy, task and optimizer; the buffer is an actor
        s, r = cfg.samplers, cfg.reward
        self.replay = self._new_replay()
        seed_replay(_Sync(self.replay), cfg, self.c.task, log)
        self.names = [f"sampler-{i}" for i in range(s.num_actors)]
        self.ctx = context_length(cfg, self.c.task.max_prompt_len(), self.c.task.max_len)
        self.worker_cls, self.scorer_cls = worker_cls, scorer_cls
        self.samplers = [self._new_sampler(i) for i in range(s.num_actors)]
        self.scorer_names = [] if r.colocate else (["reward"] if r.num_actors == 1 else [f"reward-{k}" for k in range(r.num_actors)])
        self.chain = chain
        """False scores on the driver's path (sampler -> driver -> scorer -> driver): benchmarks only."""
        self.scorers = [self._new_scorer(k) for k in range(len(self.scorer_names))]
        if metrics is not None:  # every series the dashboard shows exists from the start, at 0
            for name in ["replay", *self.names, *self.scorer_names]:
                metrics.get("gfnlm_actor_restarts_total", target=name)
            for reason in ("stale", "actor_failed"):
                metrics.get("gfnlm_batches_dropped_total", reason=reason)
            metrics.get("gfnlm_errors_total", kind="ActorFailed")
        self.pending: dict = {}  # ObjectRef -> (sampler index, tag)
        self.plans: dict[int, tuple] = {}  # tag -> (request, replay counts)
        self.deferred: list[int] = []  # samplers to send work to once the step's weights are out
        self.recovering: dict[int, tuple[float, float]] = {}  # sampler -> (retry time, back-off)
        self.retry_at: dict[int, float] = {}  # back-off of samplers retried but not yet healthy
        self.next_tag = 0
        self.next_scorer = 0
        self.resend: list = []  # plans restored from a checkpoint, sent before new ones
        self.weights = None
        self.run_dir = None  # set by the loop: where a restarted replay actor's contents come back from
        self.seen: dict[str, int] = {}  # actor id -> restarts already counted (Ray's actor table)
        self.failures: dict[str, int] = {name: 0 for name in ["replay", *self.names, *self.scorer_names]}
        """Deaths per actor name, as Ray reports them: its restarts, plus a death for good."""
        self.replacements_left = cfg.runtime.actor_replacements
        self.abandoned: list = []  # refs of requests given up on, collected by _drain_abandoned
        self.lost_tags: set[int] = set()  # requests whose batch a dead actor lost, each counted once
        self.last_check = 0.0
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

    def metrics_endpoints(self) -> dict[str, str]:
        """name -> host:port of every process's metrics endpoint (learner and actors)."""
        if self.metrics is None:
            return {}
        actors = dict(zip(self.names, self.samplers), replay=self.replay, **dict(zip(self.scorer_names, self.scorers)))
        out = {"learner": self.metrics.endpoint}
        for name, a in actors.items():
            try:
                out[name] = ray.get(a.metrics_endpoint.remote(), timeout=300)
            except (RayActorError, RayTaskError, GetTimeoutError):
                self.log(f"gfnlm: {name} did not report its metrics endpoint (not in prometheus_targets.json)")
        return out











    # -- the step ------------------------------------------------------------------------------

    def step(self, temperature: float) -> tuple[list[Trajectory], dict]:
        c, cfg = self.c, self.cfg
        self.check_actors()
        batches = [self._next_batch() for _ in range(cfg.learner.grad_accum)]
        mixed, fresh = [], []
        for b in batches:
            self.replay.add.remote(b.trajectories)
            req, counts = b.plan
            replayed = self._replay_get("sample_many", replay_wanted(req, counts), temperature)
            fresh += b.trajectories
            mixed.append(MicroBatch(req, b.trajectories + replayed))
        out = c.learner.update(mixed, temperature)
        out["trained"] = sum(len(m) for m in mixed)
        if c.learner.step % cfg.runtime.publish_every == 0:
            self.publish()
        while self.deferred:
            self._submit(self.deferred.pop(0))
        return fresh, out

    # -- checkpoints, replay, memory, shutdown ----------------------------------------------------

    def replay_state(self) -> dict:
        return self._replay_get("state_dict")

    def load_replay_state(self, state: dict) -> None:
        self._replay_get("load_state_dict", state)

    def replay_size(self) -> int:
        return self._replay_get("size")

    def memory(self) -> dict[str, int]:
        """Peak resident memory of every actor, by name."""
        actors = dict(zip(self.names, self.samplers), **dict(zip(self.scorer_names, self.scorers)))
        return {name: ray.get(a.memory.remote(), timeout=30) for name, a in actors.items()}

    def close(self) -> None:
        try:
            mem = self.memory()
            mem["learner"] = max_rss_bytes()
            self.log("gfnlm: peak memory " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
        except (RayActorError, RayTaskError, GetTimeoutError):
            pass
        for ref in list(self.pending):
            ray.cancel(ref, force=False)
        for a in self.samplers + [self.replay] + self.scorers:
            ray.kill(a)

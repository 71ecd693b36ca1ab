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

Requests are planned by the learner (`loop.plan_request`): the record scheduler picks the records,
the replay's sizes decide the fresh/replayed split, the driver's generator gives the tempered
temperatures and the request's seed. Requests in flight are checkpointed and sent again on
resume; what a resumed Ray run does not restore is timing, i.e. which policy version serves a
request, so its losses match an uninterrupted run only where the versions happen to match.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from gfnlm.actors import max_rss_bytes
from gfnlm.actors.engines import context_length
from gfnlm.actors.trajectory import PromptRequest, SampleRequest, Trajectory
from gfnlm.actors.workers import ReplayWorker, SampledBatch, SamplerWorker
from gfnlm.rewards.scorer import ScorerWorker, colocated_scorer

from .components import build, seed_replay
from .schedule import plan_request, replay_wanted


class ActorFailed(RuntimeError):
    """An actor raised, or died past every restart and replacement; the message names the actor.
    With checkpoint_first the loop writes a checkpoint before the run stops."""

    def __init__(self, message: str, checkpoint_first: bool = False):
        super().__init__(message)
        self.checkpoint_first = checkpoint_first


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _cause(e: RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else _last_line(str(e))


def _actor_id(handle) -> str:
    return handle._actor_id.hex()


class RayDriver:
    def __init__(self, cfg, log=print, worker_cls=SamplerWorker, metrics=None, scorer_cls=ScorerWorker, chain: bool = True):
        self.cfg, self.log = cfg, log
        self.metrics = metrics
        self.generation: dict[str, int] = {}  # actors started per logical name (replacements get name.rN)
        self.c = build(cfg, with_replay=False, engine=False)  # the learner's policy, task and optimizer; the buffer is an actor
        s, r = cfg.samplers, cfg.reward
        self.replay = self._new_replay()
        seed_replay(_Sync(self.replay), cfg, self.c.task)
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

    # -- actors ------------------------------------------------------------------------------------

    def _ray_name(self, name: str) -> str:
        """The Ray actor name of a logical actor: its own at first, `name.rN` for its N-th replacement
        (Ray frees a dead actor's name only once every handle to it is gone)."""
        n = self.generation.get(name, 0)
        self.generation[name] = n + 1
        return name if n == 0 else f"{name}.r{n}"

    def _new_replay(self):
        rt = self.cfg.runtime
        return ray.remote(ReplayWorker).options(name=self._ray_name("replay"), num_cpus=0, max_restarts=rt.replay_max_restarts,
                                                 max_task_retries=0).remote(self.cfg)

    def _new_sampler(self, i: int):
        s, r = self.cfg.samplers, self.cfg.reward
        options = dict(num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=s.max_restarts, max_task_retries=0,
                       resources=dict(s.resources))
        if s.memory_mb:
            options["memory"] = s.memory_mb * 2**20
        return ray.remote(self.worker_cls).options(name=self._ray_name(self.names[i]), **options).remote(
            self.cfg, self.names[i], self.cfg.learner.seed + 1 + i, scorer_factory=colocated_scorer if r.colocate else None,
            threads=int(s.num_cpus), max_model_len=self.ctx)

    def _new_scorer(self, k: int):
        r = self.cfg.reward
        return ray.remote(self.scorer_cls).options(
            name=self._ray_name(self.scorer_names[k]), num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=r.max_restarts,
            max_task_retries=0, resources=dict(r.resources)).remote(self.cfg, self.scorer_names[k], threads=int(r.num_cpus))

    @property
    def _scorer_ids(self) -> dict[str, int]:
        return {_actor_id(a): k for k, a in enumerate(self.scorers)}

    def check_actors(self) -> None:
        """Count every death Ray's actor table records since the last look (restarts per actor, and a
        death for good), refill a restarted replay buffer, and put a fresh actor in place of one that
        is dead for good while runtime.actor_replacements lasts; past it, raise ActorFailed."""
        from gfnlm.cluster.ray_session import actor_states

        self.last_check = time.monotonic()
        self._drain_abandoned()
        named = [("replay", self.replay), *zip(self.names, self.samplers), *zip(self.scorer_names, self.scorers)]
        states = actor_states([h for _, h in named])
        for name, handle in named:
            aid = _actor_id(handle)
            state, restarts = states.get(aid, ("UNKNOWN", 0))
            new = restarts - self.seen.get(aid, 0)
            dead = state == "DEAD"
            if new > 0:
                self.seen[aid] = restarts
                self._count_failure(name, new)
                self.log(f"gfnlm: {name} died; Ray restarted it (restart {restarts} of "
                         f"{self._max_restarts(name)})")
                if name == "replay" and not dead:
                    self._refill_replay()
            if dead:
                self._count_failure(name, 1)
                self._replace(name)

    def _drain_abandoned(self) -> None:
        """Collect the errors of requests given up on (their plans went out again), so Ray does not
        report them as unhandled."""
        if not self.abandoned:
            return
        ready, self.abandoned = ray.wait(self.abandoned, num_returns=len(self.abandoned), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # the failure is already counted and the work resent
                pass

    def _max_restarts(self, name: str):
        if name == "replay":
            return "unlimited" if self.cfg.runtime.replay_max_restarts < 0 else self.cfg.runtime.replay_max_restarts
        return self.cfg.samplers.max_restarts if name in self.names else self.cfg.reward.max_restarts

    def _count_failure(self, name: str, n: int) -> None:
        self.failures[name] = self.failures.get(name, 0) + n
        self.counters["actor_failures_total"] += n
        self._metric("gfnlm_actor_restarts_total", "inc", n, target=name)

    def _replace(self, name: str) -> None:
        """A fresh actor in place of one dead for good, from the replacement budget."""
        budget = self.cfg.runtime.actor_replacements
        if self.replacements_left <= 0:
            raise ActorFailed(f"{name} died for good after {self._max_restarts(name)} restarts and the "
                              f"{budget} replacements of runtime.actor_replacements are used up; a checkpoint "
                              f"is written: raise runtime.actor_replacements or the actors' max_restarts, and "
                              f"continue with --resume", checkpoint_first=True)
        self.replacements_left -= 1
        if name == "replay":
            self.replay = self._new_replay()
            self._refill_replay()
        elif name in self.names:
            i = self.names.index(name)
            for ref, (j, t) in list(self.pending.items()):
                if j == i:
                    del self.pending[ref]
                    self.abandoned.append(ref)
                    self._requeue(t)
            self.recovering.pop(i, None)
            self.retry_at.pop(i, None)
            self.samplers[i] = self._new_sampler(i)
            self.samplers[i].set_weights.remote(*self.weights)
            for _ in range(self.cfg.samplers.in_flight):
                self._submit(i)
        else:
            self.scorers[self.scorer_names.index(name)] = self._new_scorer(self.scorer_names.index(name))
        self.log(f"gfnlm: {name} used up its {self._max_restarts(name)} restarts; a fresh one took its place "
                 f"({self.replacements_left} of runtime.actor_replacements={budget} left)")

    def _refill_replay(self) -> None:
        """A restarted (empty) replay actor gets the last checkpoint's buffer, else the task's seeds."""
        from .checkpoints import newest_intact

        self._wait_alive(self.replay, "replay")
        found = newest_intact(self.run_dir, log=self.log) if self.run_dir else None
        if found is not None:
            ckpt, state = found
            ray.get(self.replay.load_state_dict.remote(state["replay"]))
            self.log(f"gfnlm: replay refilled from {ckpt} (trajectories added since are gone)")
        else:
            seed_replay(_Sync(self.replay), self.cfg, self.c.task)
            self.log("gfnlm: replay refilled from the task's seeds (no checkpoint yet)")

    def _wait_alive(self, handle, name: str) -> None:
        from gfnlm.cluster.ray_session import actor_states

        deadline = time.monotonic() + self.cfg.runtime.sampler_timeout
        while actor_states([handle])[_actor_id(handle)][0] != "ALIVE":
            if time.monotonic() > deadline:
                raise ActorFailed(f"{name} did not come back within runtime.sampler_timeout "
                                  f"({self.cfg.runtime.sampler_timeout:g} s)", checkpoint_first=name != "replay")
            time.sleep(0.1)

    def _replay_get(self, method: str, *args):
        """A replay call; if the actor died meanwhile, wait for its restart, refill it, call again."""
        deadline = time.monotonic() + self.cfg.runtime.sampler_timeout
        while True:
            try:
                return ray.get(getattr(self.replay, method).remote(*args))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise ActorFailed(f"replay did not come back within runtime.sampler_timeout "
                                      f"({self.cfg.runtime.sampler_timeout:g} s)") from None
                time.sleep(0.2)
                self.check_actors()

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
        actors = dict(zip(self.names, self.samplers), replay=self.replay, **dict(zip(self.scorer_names, self.scorers)))
        out = {"learner": self.metrics.endpoint}
        for name, a in actors.items():
            try:
                out[name] = ray.get(a.metrics_endpoint.remote(), timeout=300)
            except (RayActorError, RayTaskError, GetTimeoutError):
                self.log(f"gfnlm: {name} did not report its metrics endpoint (not in prometheus_targets.json)")
        return out

    # -- requests ------------------------------------------------------------------------------

    def _plan(self):
        """The next request: a restored one first, else new records from the scheduler."""
        if self.resend:
            return self.resend.pop(0)
        c = self.c
        rids = c.scheduler.next()
        sizes = self._replay_get("sizes", rids)
        req, counts = plan_request(self.cfg, c.task, rids, sizes, c.generator, tag=self.next_tag)
        self.next_tag += 1
        return req, counts

    def _submit(self, i: int) -> None:
        req, counts = self._plan()
        self.plans[req.tag] = (req, counts)
        ref = self.samplers[i].sample.remote(req)
        if self.scorers and self.chain:  # chained: the reward actor takes the sampler's output when it is ready
            k = self.next_scorer % len(self.scorers)
            self.next_scorer += 1
            ref = self.scorers[k].score.remote(ref)
        self.pending[ref] = (i, req.tag)

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

    def _requeue(self, tag: int) -> None:
        """A lost request's plan goes out again (same records, same seed)."""
        plan = self.plans.pop(tag, None)
        if plan is not None:
            self.resend.append(plan)

    def _lost(self, tag: int) -> None:
        """A request's batch was lost with its actor: counted once, however often it is sent again."""
        if tag not in self.lost_tags:
            self.lost_tags.add(tag)
            self.counters["batches_dropped_failed_total"] += 1
            self._metric("gfnlm_batches_dropped_total", "inc", reason="actor_failed")
        self._requeue(tag)

    def _failed(self, i: int, tag: int) -> None:
        """Sampler i lost a batch: Ray restarts it, or the driver replaces it; its work goes out again."""
        self._lost(tag)
        handle = self.samplers[i]
        self.check_actors()
        if self.samplers[i] is not handle:  # replaced by a fresh actor, already sent work
            return
        if i in self.recovering:
            return
        delay = min(2 * self.retry_at.pop(i, 0.25), 10.0)
        # cancel what is still queued for it, then wait before sending more
        for ref, (j, t) in list(self.pending.items()):
            if j == i:
                del self.pending[ref]
                self.abandoned.append(ref)
                self._requeue(t)
        self.recovering[i] = (time.monotonic() + delay, delay)

    def _scorer_failed(self, k: int, i: int, tag: int) -> None:
        self._lost(tag)
        self.check_actors()
        self._submit(i)

    def _next_batch(self) -> SampledBatch:
        """The first ready batch that is usable; keeps every healthy sampler busy."""
        deadline = time.monotonic() + self.cfg.runtime.sampler_timeout
        while True:
            if time.monotonic() > deadline:
                raise ActorFailed(f"no sampler delivered a batch for {self.cfg.runtime.sampler_timeout:g} s "
                                  f"(failed: {', '.join(self.names[i] for i in self.recovering) or 'none'})")
            if time.monotonic() - self.last_check > 2.0:
                self.check_actors()  # deaths nobody was waiting on (a reward or replay actor between calls)
            self._revive()
            if not self.pending:
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            if not ready:
                continue
            ref = ready[0]
            i, tag = self.pending.pop(ref)
            try:
                batch = ray.get(ref)
            except RayActorError as e:
                aid = getattr(e, "actor_id", None) or ""
                k = self._scorer_ids.get(aid)
                if getattr(e, "actor_init_failed", False):
                    who = self.scorer_names[k] if k is not None else self.names[i]
                    raise ActorFailed(f"{who} could not start: {_last_line(str(e))}") from None
                if k is not None or (aid and aid != _actor_id(self.samplers[i])):  # a reward actor (maybe replaced)
                    self._scorer_failed(k, i, tag)
                else:
                    self._failed(i, tag)
                continue
            except RayTaskError as e:
                who = "reward" if self.scorers and "ScorerWorker" in str(e).splitlines()[0] else self.names[i]
                raise ActorFailed(f"{who} failed: {_cause(e)}") from None
            plan = self.plans.pop(tag, None)
            self.retry_at.pop(i, None)
            if self.cfg.runtime.max_staleness == 0:
                self.deferred.append(i)  # on-policy: its next request must see this step's weights
            else:
                self._submit(i)
            staleness = self.c.learner.step - batch.version
            if staleness > self.cfg.runtime.max_staleness:
                self.counters["batches_dropped_stale_total"] += 1
                self._metric("gfnlm_batches_dropped_total", "inc", reason="stale")
                continue
            self.counters["staleness"] = staleness
            self._metric("gfnlm_staleness_versions", "observe", staleness)
            if self.scorers and not self.chain:  # the old way: the driver waits for the scorer
                k = self.next_scorer % len(self.scorers)
                self.next_scorer += 1
                batch = ray.get(self.scorers[k].score.remote(batch))
            batch.plan = plan
            return batch

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
            mixed.append(b.trajectories + replayed)
        out = c.learner.update(mixed, c.task, temperature)
        out["trained"] = sum(len(m) for m in mixed)
        if c.learner.step % cfg.runtime.publish_every == 0:
            self.publish()
        while self.deferred:
            self._submit(self.deferred.pop(0))
        return fresh, out

    # -- checkpoints, replay, memory, shutdown ----------------------------------------------------

    def in_flight_plans(self) -> list[dict]:
        """Plans of the requests not yet trained on, as plain data (checkpointed; sent again on resume)."""
        plans = [self.plans[t] for _, t in self.pending.values() if t in self.plans] + list(self.resend)
        return [{"request": asdict(req), "replay_counts": list(counts)} for req, counts in plans]

    def restore_plans(self, plans: list[dict]) -> None:
        self.resend = []
        for p in plans:
            req = dict(p["request"])
            req["prompts"] = [PromptRequest(**q) for q in req["prompts"]]
            self.resend.append((SampleRequest(**req), list(p["replay_counts"])))
        self.next_tag = max([req.tag + 1 for req, _ in self.resend] + [self.next_tag])

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


class _Sync:
    """Calls a Ray actor's `add` synchronously, so seed_replay works on it as on the class."""

    def __init__(self, handle):
        self.handle = handle

    def add(self, trajectories):
        return ray.get(self.handle.add.remote(trajectories))

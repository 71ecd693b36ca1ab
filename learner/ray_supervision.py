"""The Ray driver's first concern: its actors. Starting the sampler, reward and replay actors,
reading their deaths from Ray's actor table (each restart counted once per actor), putting a fresh
actor in place of one dead for good while runtime.actor_replacements lasts, refilling a restarted
replay buffer, and waiting out a replay restart.

`ActorSupervision` is a part of `RayDriver` (learner/distributed.py): it uses the driver's cfg, log,
metrics, actor handles and names, and hands a replaced sampler new work through the request
pipeline (`_submit`, learner/ray_requests.py).
"""

from __future__ import annotations

import functools
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from gfnlm.actors.engines import SamplerSpec
from gfnlm.actors.workers import ReplayWorker
from gfnlm.rewards.scorer import colocated_scorer

from .components import seed_replay


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


class _Sync:
    """Calls a Ray actor's `add` synchronously, so seed_replay works on it as on the class."""

    def __init__(self, handle):
        self.handle = handle

    def add(self, trajectories):
        return ray.get(self.handle.add.remote(trajectories))


class ActorSupervision:
    """Start, watch and replace the driver's actors (a part of RayDriver)."""

    def _ray_name(self, name: str) -> str:
        """The Ray actor name of a logical actor: its own at first, `name.rN` for its N-th replacement
        (Ray frees a dead actor's name only once every handle to it is gone)."""
        n = self.generation.get(name, 0)
        self.generation[name] = n + 1
        return name if n == 0 else f"{name}.r{n}"

    def _new_replay(self):
        rt = self.cfg.runtime
        return ray.remote(ReplayWorker).options(name=self._ray_name("replay"), num_cpus=0, max_restarts=rt.replay_max_restarts,
                                                 max_task_retries=0).remote(
            self.cfg.replay, self.cfg.learner.seed, self.cfg.metrics, self.cfg.task.type)

    def _new_sampler(self, i: int):
        s, r = self.cfg.samplers, self.cfg.reward
        options = dict(num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=s.max_restarts, max_task_retries=0,
                       resources=dict(s.resources))
        if s.memory_mb:
            options["memory"] = s.memory_mb * 2**20
        return ray.remote(self.worker_cls).options(name=self._ray_name(self.names[i]), **options).remote(
            SamplerSpec.of(self.cfg), self.names[i], self.cfg.learner.seed + 1 + i,
            scorer_factory=functools.partial(colocated_scorer, self.cfg) if r.colocate else None,
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

    def _metric(self, name: str, how: str, value: float = 1.0, **labels) -> None:
        if self.metrics is not None:
            getattr(self.metrics.get(name, **labels), how)(value)

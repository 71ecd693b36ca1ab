"""The Ray driver's second concern: the request pipeline. Every sampler keeps
`samplers.in_flight` requests queued (planned by the learner: the record scheduler's records, the
replay's sizes, the driver's generator), each chained to a reward actor of the pool unless the
sampler scores its own; the learner takes whichever scored batch is ready first, drops batches
older than runtime.max_staleness versions, and sends a lost request out again with the same plan,
counted once. Requests in flight are checkpointed as plain data and sent again on resume.

`RequestPipeline` is a part of `RayDriver` (learner/distributed.py): it uses the driver's actors
and asks `ActorSupervision` (learner/ray_supervision.py) to look at them when a batch is lost.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import ray
from ray.exceptions import RayActorError, RayTaskError

from gfnlm.actors.trajectory import PromptRequest, SampleRequest
from gfnlm.actors.workers import SampledBatch

from .ray_supervision import ActorFailed, _actor_id, _cause, _last_line
from .schedule import plan_request


class RequestPipeline:
    """Plan, send, collect and resend sample requests (a part of RayDriver)."""

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

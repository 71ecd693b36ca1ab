"""The training loop: schedule records -> sample -> score -> replay -> update -> publish.

`train` runs it with one of two drivers that take a step the same way:
- LocalDriver: every piece in this process; the transformers engine shares the learner's model
  object, so publishing a version is free (tests, debugging, one laptop); a vLLM engine gets the
  adapter after every step.
- RayDriver (learner/distributed.py): sampler, reward and replay actors, sampling overlapped with
  learning.
Both build their pieces with `components.build` and plan their sample requests with
`schedule.plan_request` (the one batch mix) from the learner's record scheduler; neither driver
module imports the other's. What they share lives beside it: checkpoints.py (a run's state in
files and back) and reporting.py (progress, metrics.jsonl, the learner's Prometheus figures, curves).
"""

from __future__ import annotations

import os
import time


from gfnlm.actors.sampler import RequestServer
from gfnlm.actors.trajectory import MicroBatch, SampledBatch, Trajectory
from gfnlm.actors.workers import record_sampling
from gfnlm.configs import Config, dump_config

from .components import Components, build, check_context, eval_engine, new_replay, seed_replay, setup_torch, torch_threads  # noqa: F401 (re-exported)
from .schedule import micro_batch, plan_request, replay_wanted, reward_temperature, tempered_temperatures  # noqa: F401 (re-exported)
from .checkpoints import checkpoint, newest_intact, restore
from .driver import Driver
from .reporting import (Progress, RunningStats, draw_curves, record_step, step_record, trim_metrics,  # noqa: F401 (re-exported)
                        valid_counts, write_line, write_targets)


def collect(c: Components, record_ids: list[int], temperature: float, serve=None) -> tuple[list[Trajectory], MicroBatch]:
    """One micro-batch in this process: (fresh samples, the whole mixed batch and its request)."""
    req, counts = plan_request(c.cfg, c.task, record_ids, [c.replay.size(r) for r in record_ids], c.generator)
    fresh = (serve or RequestServer(c.sampler, c.policy.tokenizer))(req)
    c.task.score(fresh)
    c.replay.add(fresh)
    replayed = c.replay.sample_many(replay_wanted(req, counts), temperature)
    version = getattr(c.task, "reward_version", 0)
    stale = [t for t in replayed if t.reward_version != version]
    if stale:  # scored by a reward that has changed since (the M-step's): score them again, and keep
        c.task.score(stale)  # the new values in the buffer (its priorities and eviction compare them)
        c.replay.refresh(stale)
    return fresh, MicroBatch(req, fresh + replayed)


def references(c: Components, record_ids: list[int]) -> MicroBatch:
    """SFT's micro-batch: the records' reference Z (those the policy can write: `Task.reachable`)."""
    refs = [c.task.reference(r) for r in record_ids]
    return micro_batch(c.cfg, c.task, [t for t in refs if t is not None and c.task.reachable(t.tokens)])


class LocalDriver:
    """Every piece in this process (implements `driver.Driver`)."""

    def __init__(self, cfg: Config, log=print, metrics=None):
        self.c = build(cfg, log=log)
        self.counters: dict[str, float] = {}
        self.run_dir: str | None = None
        self.metrics = metrics
        self.c.replay.metrics = metrics
        self.serve = RequestServer(self.c.sampler, self.c.policy.tokenizer)

    def metrics_endpoints(self) -> dict[str, str]:
        return {"learner": self.metrics.endpoint} if self.metrics is not None else {}

    def start(self) -> None:
        pass

    def step(self, temperature: float) -> tuple[list[Trajectory], dict]:
        c = self.c
        fresh, batches = [], []
        for _ in range(c.cfg.learner.grad_accum):
            rids = c.scheduler.next()
            if not c.learner.objective.samples:
                batches.append(references(c, rids))
                continue
            t0 = time.perf_counter()
            new, mixed = collect(c, rids, temperature, self.serve)
            record_sampling(self.metrics, SampledBatch(new, c.sampler.version, "learner",
                                                       sample_seconds=time.perf_counter() - t0))
            fresh += new
            batches.append(mixed)
        out = c.learner.update(batches, temperature)
        if c.em is not None and c.em.due(c.learner.step):
            out.update(c.em.run(c.sampler))
        publish(c)
        out["trained"] = sum(len(b) for b in batches)
        return fresh, out

    def replay_state(self) -> dict:
        return self.c.replay.state_dict()

    def load_replay_state(self, state: dict) -> None:
        self.c.replay.load_state_dict(state)

    def replay_size(self) -> int:
        return self.c.replay.size()

    def in_flight_plans(self) -> list[dict]:
        return []  # every request of a step is trained on within the step

    def restore_plans(self, plans: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def _shares_model(c: Components) -> bool:
    """True when the engine samples from the learner's own model object."""
    return getattr(c.sampler, "model", None) is c.policy.model


def eval_sampler(c: Components):
    """Evaluation samples with the transformers engine on the learner's model (it can switch the
    adapter off for the base model's figures), with the configured tools."""
    if _shares_model(c):
        return c.sampler
    return eval_engine(c.policy, c.cfg)


def publish(c: Components) -> None:
    """Hand the learner's current weights to the in-process engine (the transformers engine
    samples from the learner's own model, so it only takes the version number)."""
    c.sampler.load_weights(None if _shares_model(c) else c.policy.adapter_state(), c.learner.step)


def with_job(cfg: Config, run_dir: str) -> Config:
    """cfg with metrics.job named after the run folder when unset (the job label of its metrics)."""
    if cfg.metrics.job is not None:
        return cfg
    return cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"job": os.path.basename(os.path.abspath(run_dir))})})


def train(cfg: Config, run_dir: str, resume: bool = False, log=print, on_step=None, keep_trackers: bool = False,
          **driver_kw) -> Components:
    """Train for cfg.learner.steps optimizer steps, checkpointing into run_dir. The trackers of
    run.report_to are closed at the end unless keep_trackers (the evaluation reports to them too)."""
    from gfnlm.cluster.metrics import for_process

    from .reward_fit import fitted_config

    cfg = with_job(fitted_config(cfg, log), run_dir)  # reward.fit: the fitted model in place (fitted once per content)
    metrics = for_process(cfg.metrics, "learner", cfg.task.type)
    c = None
    try:
        if cfg.runtime.mode == "ray" and cfg.learner.objective.type == "sft":
            log("gfnlm: objective sft trains on the records' references: no samplers needed, running in this process")
        elif cfg.runtime.mode == "ray":
            from gfnlm.cluster.ray_session import ray_session

            from .distributed import RayDriver

            with ray_session(cfg, log):
                driver = RayDriver(cfg, log, metrics=metrics, **driver_kw)
                c = driver.c
                try:
                    return run(driver, cfg, run_dir, resume, log, on_step)
                finally:
                    driver.close()
        driver = LocalDriver(cfg, log, metrics=metrics)
        c = driver.c
        return run(driver, cfg, run_dir, resume, log, on_step)
    except BaseException:
        if c is not None and c.trackers is not None:  # nobody will report an evaluation to them
            c.trackers.close()
        raise
    finally:
        if metrics is not None:
            metrics.close()
        if c is not None and c.trackers is not None and not keep_trackers:
            c.trackers.close()


class StopRequest:
    """SIGTERM/SIGINT while training (a Kubernetes pod being preempted, Ctrl-C): the step under way
    finishes, a checkpoint is written, the run ends cleanly; a second signal exits at once."""

    def __init__(self, log):
        self.log, self.signal, self.previous = log, None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.signal is not None:
            self.log(f"gfnlm: second {name}: stopping now, without a checkpoint")
            raise SystemExit(128 + signum)
        self.signal = name
        self.log(f"gfnlm: {name}: finishing this step, then a checkpoint (send it again to stop at once)")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def resume_from(driver: Driver, run_dir: str, log) -> None:
    """The run's state from its newest intact checkpoint, the version published, metrics.jsonl cut
    back to it."""
    c = driver.c
    found = newest_intact(run_dir, log)
    if found is None:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
    ckpt, extra = found
    restore(driver, ckpt, extra)
    publish(c)
    trim_metrics(os.path.join(run_dir, "metrics.jsonl"), c.learner.step)
    log(f"gfnlm: resumed from {ckpt} at step {c.learner.step}")


def open_run_folder(c: Components, cfg: Config, run_dir: str) -> None:
    """The run folder with its config.yaml, and the trackers of run.report_to."""
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    if cfg.run.report_to:
        from .trackers import Trackers

        c.trackers = Trackers(cfg, run_dir)


def guarded_step(driver: Driver, temperature: float, metrics, run_dir: str, log):
    """driver.step, with an error counted, and a checkpoint first where the error asks for one (an
    actor gone for good: the run cannot go on, but what it learnt is kept)."""
    try:
        return driver.step(temperature)
    except Exception as e:
        if metrics is not None:
            metrics.get("gfnlm_errors_total", kind=type(e).__name__).inc()
        if getattr(e, "checkpoint_first", False):
            try:
                log(f"gfnlm: checkpoint before stopping: {checkpoint(driver, run_dir)}")
            except Exception as ce:  # e.g. the replay actor is gone too: the last checkpoint stays
                log(f"gfnlm: no checkpoint could be written ({type(ce).__name__}: {ce}); the run resumes from its last one")
        raise


def run(driver: Driver, cfg: Config, run_dir: str, resume: bool, log, on_step=None) -> Components:
    c = driver.c
    c.stopped, driver.run_dir = None, run_dir
    if resume:
        resume_from(driver, run_dir, log)
    open_run_folder(c, cfg, run_dir)
    shared_targets = write_targets(driver, run_dir, log, cfg.metrics)  # before any work is queued: the actors answer at once
    driver.start()
    metrics = getattr(driver, "metrics", None)
    stats, progress = RunningStats(), Progress(cfg, c.learner.step)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as metrics_file, StopRequest(log) as stop:
        try:
            while c.learner.step < cfg.learner.steps and stop.signal is None:
                t0 = time.perf_counter()
                temp = reward_temperature(c.learner.step, cfg.reward_temperature)
                fresh, out = guarded_step(driver, temp, metrics, run_dir, log)
                counts = valid_counts(c.task, fresh)
                stats.push(*(counts or (0, 0)), len(fresh), time.perf_counter() - t0)
                record = step_record(c, driver, out, fresh, temp, counts, stats, t0)
                record_step(metrics, out, fresh, out.get("trained", len(fresh)), temp, record.get("valid_fraction"),
                            record["step_seconds"])
                if on_step is not None:
                    on_step(c.learner.step, driver)
                if c.learner.step % cfg.run.log_every == 0:
                    write_line(metrics_file, c.trackers, record)
                progress.update(out, record, counts, stats)
                if c.learner.step % cfg.run.checkpoint_every == 0 and c.learner.step < cfg.learner.steps:
                    checkpoint(driver, run_dir)
            ckpt = checkpoint(driver, run_dir)
            draw_curves(run_dir, log)
            if stop.signal is not None:
                c.stopped = stop.signal
                log(f"gfnlm: stopped by {stop.signal} at step {c.learner.step} of {cfg.learner.steps}; checkpoint in {ckpt}; "
                    f"continue with: gfnlm train --resume {run_dir}")
        finally:
            progress.close()
            if shared_targets and os.path.exists(shared_targets):
                os.remove(shared_targets)  # the endpoints close with the run: Prometheus drops them
    return c

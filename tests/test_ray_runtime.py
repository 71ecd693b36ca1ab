"""The Ray runtime: actors, asynchrony, faults, and `ray job submit` against a real head."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from gfnlm.actors.workers import SamplerWorker
from gfnlm.configs import load_config
from gfnlm.learner.loop import train

from conftest import tiny_overrides

# the sampler subclasses below travel to the actors by value (tests/ is not on their path)
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ray_cfg(model, run, *extra):
    return load_config("random_number.yaml", tiny_overrides(model, run) + ["runtime.mode=ray", *extra])


def records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ray_run_with_two_samplers_takes_every_step_and_resumes(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    train(ray_cfg(tiny_llama, run, "samplers.num_actors=2", "learner.steps=3", "runtime.max_staleness=1"), run)
    # resume: the learner state and the replay actor's snapshot come back, the run goes on at step 4
    c = train(ray_cfg(tiny_llama, run, "samplers.num_actors=2", "learner.steps=6", "runtime.max_staleness=1"), run, resume=True)
    assert c.learner.step == 6
    rs = records(run)
    assert [r["step"] for r in rs] == [1, 2, 3, 4, 5, 6]
    assert rs[3]["replay_size"] >= rs[2]["replay_size"]
    assert all(r["staleness"] <= 1 for r in rs)
    assert rs[-1]["broadcast_bytes"] > 0 and rs[-1]["replay_size"] > 0
    assert os.path.isfile(os.path.join(run, "checkpoints", "latest"))


def test_on_policy_ray_runs_drop_no_batch_as_stale(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    train(ray_cfg(tiny_llama, run, "learner.steps=6", "runtime.max_staleness=0", "samplers.in_flight=1"), run)
    rs = records(run)
    assert [r["step"] for r in rs] == list(range(1, 7))
    assert rs[-1]["batches_dropped_stale_total"] == 0 and all(r["staleness"] == 0 for r in rs)


def test_lm_task_on_ray_with_a_chained_scorer_pool(tiny_llama, tmp_path):
    """Two reward actors hold the frozen LM; the samplers load none and only sample."""
    import ray

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": f"Prompt {i}"}) + "\n" for i in range(4)))
    run = str(tmp_path / "run")
    ov = [o for o in tiny_overrides(tiny_llama, run) if not o.startswith("task.")]
    cfg = load_config("continuation.yaml", ov + [
        f"task={{type: continuation, data: {{train: {data}}}, min_len: 1, max_len: 5}}", "runtime.mode=ray",
        "reward.colocate=false", "reward.num_actors=2", "reward.num_cpus=0.5", "samplers.num_cpus=0.5",
        "batch.prompts_per_step=2", "batch.samples_per_prompt=4", "learner.steps=4", "runtime.max_staleness=2",
        "replay.seed_with_support=false", "run.evaluate_at_end=false"])
    seen = {}

    def probe(step, driver):
        if step == 2:
            seen["sampler_scorer"] = ray.get(driver.samplers[0].__ray_call__.remote(lambda w: w.scorer is None))
            seen["scorers"] = driver.scorer_names

    c = train(cfg, run, on_step=probe)
    assert c.learner.step == 4 and seen == {"sampler_scorer": True, "scorers": ["reward-0", "reward-1"]}
    rs = records(run)
    assert all(r["trained"] == 8 and r["mean_log_r"] < 0 for r in rs)


class BlockingSampler(SamplerWorker):
    """Puts the kill of sampler-0 in known states rather than in a window of time.

    The actors are other processes: they signal through files in `marks`, set on the class before
    the actors start (the class travels to them by value, with it).
    - sampler-0 blocks in the middle of its BLOCK_ON-th batch, after creating `blocking`, until it
      is killed (at most LIMIT seconds: without the kill the batch completes and the test fails
      rather than hangs). The restarted sampler-0, a new process, finds `blocking` and creates
      `served` instead, on its first batch: the driver sends it work only after it has counted the
      batch the kill lost (the task is not retried: max_task_retries=0).
    - the other samplers make at most GATE batches before `served` exists, then wait for it (at most
      LIMIT seconds): the run cannot end on their batches alone before the loss is counted."""

    marks: str | None = None
    BLOCK_ON = 3  # a few steps into the run
    GATE = 4  # BLOCK_ON - 1 + GATE batches before `served`: fewer than the test's 12 steps
    LIMIT = 120.0

    def _wait_for(self, name: str) -> None:
        deadline = time.monotonic() + self.LIMIT
        while not os.path.exists(os.path.join(self.marks, name)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def sample(self, req):
        self.calls = getattr(self, "calls", 0) + 1
        blocking = os.path.join(self.marks, "blocking")
        if self.name != "sampler-0":
            if self.calls > self.GATE:
                self._wait_for("served")
        elif os.path.exists(blocking):  # the restarted sampler-0
            open(os.path.join(self.marks, "served"), "a").close()
        elif self.calls == self.BLOCK_ON:
            os.close(os.open(blocking, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            self._wait_for("never")  # blocks until killed
        return super().sample(req)


def test_a_killed_sampler_is_restarted_and_the_run_finishes(tiny_llama, tmp_path, monkeypatch):
    import ray

    run = str(tmp_path / "run")
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(BlockingSampler, "marks", str(marks))
    killed, errors = threading.Event(), []

    def killer():
        deadline = time.time() + 300
        try:
            while not (marks / "blocking").exists():  # sampler-0 is inside sample(), a request in flight
                if time.time() > deadline:
                    errors.append("sampler-0 never blocked")
                    return
                time.sleep(0.05)
            ray.kill(ray.get_actor("sampler-0"), no_restart=False)
            killed.set()
        except Exception as e:  # surfaced by the assertion below
            errors.append(repr(e))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = ray_cfg(tiny_llama, run, "samplers.num_actors=2", "learner.steps=12", "runtime.max_staleness=100")
    c = train(cfg, run, worker_cls=BlockingSampler)
    thread.join()
    assert killed.is_set(), errors
    assert (marks / "served").exists(), "the restarted sampler-0 never sampled"
    assert c.learner.step == 12
    rs = records(run)
    assert [r["step"] for r in rs] == list(range(1, 13))
    assert rs[-1]["actor_failures_total"] >= 1 and rs[-1]["batches_dropped_failed_total"] >= 1


class BrokenSampler(SamplerWorker):
    def sample(self, req):
        raise ValueError("engine exploded")


class UnbuildableSampler(SamplerWorker):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("no such device")


def test_an_actor_error_names_the_actor(tiny_llama, tmp_path):
    from gfnlm.learner.distributed import ActorFailed

    run = str(tmp_path / "run")
    with pytest.raises(ActorFailed, match=r"^sampler-0 failed: ValueError: engine exploded$"):
        train(ray_cfg(tiny_llama, run), run, worker_cls=BrokenSampler)
    with pytest.raises(ActorFailed, match=r"^sampler-0 could not start: .*RuntimeError: no such device"):
        train(ray_cfg(tiny_llama, run + "2"), run + "2", worker_cls=UnbuildableSampler)


def test_ray_job_submit_runs_the_entry_point(ray_head, tiny_llama, tmp_path):
    url, env = ray_head
    run = tmp_path / "job-run"
    # with a stand-alone reward actor this time
    ov = tiny_overrides(tiny_llama, run) + ["runtime.mode=ray", "learner.steps=3", "reward.colocate=false"]
    entry = ["gfnlm", "train", "configs/random_number.yaml"] + [x for o in ov for x in ("-o", o)]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    deadline = time.time() + 120
    while True:  # the head's job agent registers a little after its dashboard answers
        out = subprocess.run([ray_cli, "job", "submit", "--address", url, "--working-dir", REPO, "--no-wait", "--", *entry],
                             env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.time() + 300
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish in 300 s"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert (run / "checkpoints" / "latest").exists()
    assert "joined the Ray cluster" in logs


def test_faults_past_max_restarts_are_survived_and_counted(tiny_llama, tmp_path):
    """Samplers killed more often than their max_restarts, the reward and the replay actor once each:
    every step is taken, losses stay finite, and the counters equal the kills, per actor."""
    import math

    import ray

    from gfnlm.cluster.ray_session import actor_states

    run = str(tmp_path / "run")
    cfg = ray_cfg(tiny_llama, run, "samplers.num_actors=2", "samplers.num_cpus=0.5", "samplers.max_restarts=1",
                  "reward.colocate=false", "reward.num_cpus=1", "learner.steps=36", "runtime.max_staleness=100",
                  "runtime.actor_replacements=2", "run.checkpoint_every=2")
    schedule = [("sampler", 0), ("sampler", 1), ("sampler", 0), ("sampler", 1), ("reward", 0), ("sampler", 0),
                ("replay", 0), ("sampler", 1)]
    kills, seen = [], {}

    def killer(step, driver):
        seen["driver"] = driver
        if len(kills) == len(schedule) or step < 3 * (len(kills) + 1):
            return
        kind, i = schedule[len(kills)]
        handle = {"sampler": lambda: driver.samplers[i], "reward": lambda: driver.scorers[0],
                  "replay": lambda: driver.replay}[kind]()
        if actor_states([handle])[handle._actor_id.hex()][0] != "ALIVE":
            return  # still restarting from the last kill: kill it once it is back
        ray.kill(handle, no_restart=False)
        kills.append(f"sampler-{i}" if kind == "sampler" else kind)

    c = train(cfg, run, on_step=killer)
    assert len(kills) == len(schedule) and c.learner.step == 36
    rs = records(run)
    assert [r["step"] for r in rs] == list(range(1, 37))
    assert all(math.isfinite(r["loss"]) for r in rs)
    driver = seen["driver"]
    want = {name: kills.count(name) for name in ("sampler-0", "sampler-1", "reward", "replay")}
    assert driver.failures == want  # sampler-k: 3 kills = 1 restart, 1 death for good (replaced), 1 restart
    assert rs[-1]["actor_failures_total"] == len(kills) and driver.replacements_left == 0
    assert 1 <= rs[-1]["batches_dropped_failed_total"] <= 2 * len(kills)


def test_sigterm_checkpoints_exits_0_and_the_run_resumes_to_its_end(tiny_llama, tmp_path):
    """A preempted pod: SIGTERM to a running ray-mode `gfnlm train`, exit 0 with a checkpoint, resume."""
    import signal

    run = tmp_path / "run"
    args = [sys.executable, "-m", "gfnlm.learner.cli", "train", "random_number.yaml"]
    for o in tiny_overrides(tiny_llama, run) + ["runtime.mode=ray", "learner.steps=60", "run.checkpoint_every=1000",
                                                 "run.evaluate_at_end=false", "samplers.num_cpus=0.5"]:
        args += ["-o", o]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 60; checkpoint in (\S+); continue with: "
                        r"gfnlm train --resume (\S+)", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 60 and os.path.isdir(stopped.group(2)) and "Traceback" not in out
    resumed = subprocess.run([sys.executable, "-m", "gfnlm.learner.cli", "train", "--resume", str(run)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in records(run)] == list(range(1, 61))


def test_a_sampler_dead_past_its_budget_stops_the_run_after_a_checkpoint(tiny_llama, tmp_path):
    import ray

    from gfnlm.cluster.ray_session import actor_states
    from gfnlm.learner.distributed import ActorFailed
    from gfnlm.learner.checkpoints import latest_checkpoint

    run = str(tmp_path / "run")
    cfg = ray_cfg(tiny_llama, run, "samplers.max_restarts=0", "runtime.actor_replacements=0", "learner.steps=50",
                  "run.checkpoint_every=100")
    killed = []

    def killer(step, driver):
        h = driver.samplers[0]
        if step >= 3 and not killed and actor_states([h])[h._actor_id.hex()][0] == "ALIVE":
            ray.kill(h, no_restart=False)
            killed.append(step)

    with pytest.raises(ActorFailed, match=r"^sampler-0 died for good after 0 restarts and the 0 replacements of "
                                          r"runtime.actor_replacements are used up"):
        train(cfg, run, on_step=killer)
    # stopped because the death was detected, not after runtime.sampler_timeout (600 s): the error is the
    # detection's (the timeout raises "no sampler delivered a batch for 600 s"), and past the kill the run
    # took no more steps than the batches sampler-0, the only sampler, could have made before it
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    step = int(ckpt.rsplit("_", 1)[1])
    assert [r["step"] for r in records(run)] == list(range(1, step + 1))
    assert killed[0] <= step <= killed[0] + cfg.samplers.in_flight * cfg.learner.grad_accum

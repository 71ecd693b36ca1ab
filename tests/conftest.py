"""Fixtures: tiny random Llama and GPT-2 models with a character-level tokenizer, built offline."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # as the gfnlm command sets it: stdout is for results

import pytest
import torch

from gfnlm.actors.tiny import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny-gpt2")), "gpt2")


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_overrides(model_dir: str, run_dir, targets=LLAMA_TARGETS, **extra) -> list[str]:
    """Overrides that make a fast run of the random-number preset on a tiny model."""
    ov = {
        "model.path": model_dir,
        "lora.target_modules": "[" + ",".join(targets) + "]",
        "lora.r": 4,
        "batch.samples_per_prompt": 8,
        "learner.steps": 3,
        "learner.warmup_steps": 0,
        "learner.lr_schedule": "constant",  # the preset decays to 0 over its steps; these runs last 3
        "learner.lr": 1e-2,
        "eval.num_samples": 20,
        "eval.batch_size": 10,
        "run.output_dir": str(run_dir),
        "run.progress": False,
        "run.checkpoint_every": 2,
        "task.target": "{type: uniform, low: 0, high: 20}",
        "task.max_len": 2,
        "replay.capacity_per_prompt": 32,
        "runtime.mode": "local",
        "run.torch_threads": 1,  # the suite's processes share the machine
        "metrics.port": 0,
        "metrics.targets_dir": "null",  # tests write no targets into the checkout's runs/
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def tiny_llama_vllm(tmp_path_factory) -> str:
    """A tiny Llama whose head_dim (32) vLLM's CPU attention supports."""
    return build_model(str(tmp_path_factory.mktemp("tiny-llama-vllm")), "llama", hidden=64, heads=2)


def free_port() -> int:
    """A port that was free a moment ago. Another process can take it before the caller binds it:
    use it only where the process being started can neither bind port 0 nor say which port it bound,
    and retry that start when the port turns out to be taken (see `ray_head`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_START_ATTEMPTS = 5


def _port_taken(log: str, port: int) -> bool:
    """Whether a start failed because `port` was taken (grpc's and Python's wording of EADDRINUSE)."""
    return any(f":{port}" in line and ("Failed to bind" in line or "Address already in use" in line)
               for line in log.splitlines())


def _group_listens(pgid: int, port: int) -> bool:
    """Whether a process of the process group `pgid` listens on TCP `port`."""
    import psutil

    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            with contextlib.suppress(OSError):
                if os.getpgid(c.pid) == pgid:
                    return True
    return False


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the process has exited, leaving it unreaped: while it is a zombie its PID, and so its
    process group's ID, cannot be reused, and killpg reaches only its own group."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and its whole process group, nothing else."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 10
    while not _exited(proc) and time.time() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # what is left of the group (agents, workers outlive the leader)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 in its own temp dir; stopped by its process group only.

    Every port the head can bind itself is 0 (GCS, dashboard, agents, metrics, workers): nothing is
    reserved ahead, so no other process can take it in between; the dashboard's address is read from
    the head's log. The Ray Client server has to be given a port (Ray refuses 0 and always starts it):
    if that port was taken meanwhile, the client server fails to bind, `--block` stops the head, and
    the start is retried with a fresh port, at most RAY_START_ATTEMPTS times. The head counts as up
    once the job API answers and the client server listens, so it cannot fail later for its port."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=bin_dir + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    head, temp, url = None, None, None
    try:
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            client = free_port()
            temp = tempfile.mkdtemp(prefix="gfr-")  # short: Ray's socket paths must fit in 107 bytes
            log = tmp_path / f"head-{attempt}.log"
            with open(log, "w") as out:
                head = subprocess.Popen(
                    [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                     "--port=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port=0",
                     f"--temp-dir={temp}", "--num-cpus=4", "--disable-usage-stats",
                     "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--metrics-export-port=0",
                     "--runtime-env-agent-port=0", "--min-worker-port=0", "--max-worker-port=0",
                     f"--ray-client-server-port={client}"],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            up, deadline = False, time.time() + 120
            while not up and not _exited(head):
                found = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", log.read_text())
                if found:
                    url = found.group(1)
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(url + "/api/version", timeout=2)
                        urllib.request.urlopen(url + "/api/jobs/", timeout=2)  # the job API starts after the version route
                        up = _group_listens(head.pid, client)
                if not up:
                    if time.time() > deadline:
                        pytest.fail("the Ray head did not come up: " + log.read_text()[-2000:])
                    time.sleep(0.5)
            if up:
                break
            _stop_group(head)
            shutil.rmtree(temp, ignore_errors=True)
            head, temp = None, None
            text = log.read_text()
            if not _port_taken(text, client) or attempt == RAY_START_ATTEMPTS:
                pytest.fail(f"the Ray head did not come up (attempt {attempt} of {RAY_START_ATTEMPTS}): " + text[-2000:])
        yield url, env
    finally:
        if head is not None:
            _stop_group(head)  # this head's own process group (its GCS, raylet, dashboard, workers), nothing else
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


SESSION = pytest.StashKey[pytest.Session]()
"""The finished session, kept for `pytest_unconfigure`, which reads its exit status as the last
plugin left it (config.stash: pytest's documented place for plugin state)."""


def pytest_sessionfinish(session, exitstatus):
    """Release what in-process engines left behind while the interpreter is whole: a Ray this
    process started and vLLM's process-wide parallel groups (tests build in-process vLLM engines)."""
    session.config.stash[SESSION] = session
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "vllm.distributed" in sys.modules:
        from vllm.distributed import cleanup_dist_env_and_memory

        with contextlib.suppress(Exception):  # best effort: the session's result is already decided
            cleanup_dist_env_and_memory()
    import gc

    gc.collect()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with the session's exit status once every report is written, skipping the interpreter's
    teardown: CI saw the whole suite pass and the process then die of SIGSEGV while native extensions
    (torch, vLLM, Ray's core worker) destroyed their globals, which failed `make test`. The status is
    the session's own, so a failing test still fails the command. GFNLM_TEST_FULL_TEARDOWN=1 keeps
    the full teardown (to look for the crash; PYTHONFAULTHANDLER=1 prints where it happens)."""
    session = config.stash.get(SESSION, None)
    if session is None or os.environ.get("GFNLM_TEST_FULL_TEARDOWN"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))

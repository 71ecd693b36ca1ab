"""Fixtures: tiny random Llama and GPT-2 models with a character-level tokenizer, built offline."""

import contextlib
import os
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

from actors.tiny import build_model

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 in its own temp dir; stopped by its PID only."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=bin_dir + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="gfr-")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--num-cpus=4", "--disable-usage-stats",
         # free ports for the head's agents too: another Ray on the machine may hold the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                urllib.request.urlopen(url + "/api/jobs/", timeout=2)  # the job API starts after the version route
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the Ray head did not come up: " + (tmp_path / "head.log").read_text()[-2000:])
                time.sleep(1)
        yield url, env
    finally:
        # this head's own process group (its GCS, raylet, dashboard, workers), nothing else
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

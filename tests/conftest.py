"""Fixtures: tiny random Llama and GPT-2 models with a character-level tokenizer, built offline."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from learner.tiny import build_model

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
        "batch.size": 8,
        "learner.steps": 3,
        "learner.warmup_steps": 0,
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
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def tiny_llama_vllm(tmp_path_factory) -> str:
    """A tiny Llama whose head_dim (32) vLLM's CPU attention supports."""
    return build_model(str(tmp_path_factory.mktemp("tiny-llama-vllm")), "llama", hidden=64, heads=2)

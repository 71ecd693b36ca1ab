"""Checkpoints: a run's state in files and back (the adapter in peft format, trainer.pt with the
optimizer, scheduler, RNG states, step, replay and in-flight plans), written to a temporary folder
and renamed so that a crash never leaves half a checkpoint, and read with weights_only."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from gfnlm.actors.policy import Policy
from gfnlm.actors.checkpoint_files import (  # noqa: F401  (the learner reads them from here)
    CheckpointError, check_adapter_file, intact_checkpoint, latest_checkpoint, newest_intact, read_trainer_state)

from .driver import Driver


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG state as tensors and plain lists, so trainer.pt loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": py_rng_state(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "sampler": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(py_rng_from(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])


def py_rng_state(state: tuple) -> list:
    """random.getstate() as nested lists (what weights_only unpickling allows)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def py_rng_from(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_checkpoint(run_dir: str, step: int, policy: Policy, extra: dict, keep: int) -> str:
    """Write checkpoints/step_N atomically (temp folder, then rename) and point `latest` at it."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    policy.model.save_pretrained(os.path.join(tmp, "adapter"), selected_adapters=policy.saved_adapters())
    torch.save(extra, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, ".latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(root, ".latest.tmp"), os.path.join(root, "latest"))
    for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def load_adapter_weights(policy: Policy, adapter_dir: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"), device=str(policy.device))
    set_peft_model_state_dict(policy.model, state)


def checkpoint(driver: Driver, run_dir: str) -> str:
    c = driver.c
    extra = {"learner": c.learner.state_dict(), "replay": driver.replay_state(), "scheduler": c.scheduler.state_dict(),
             "rng": rng_state(c.sampler.generator), "driver_rng": c.generator.get_state(),
             "plans": driver.in_flight_plans()}
    if c.em is not None:
        extra["em"] = c.em.state_dict()
    return save_checkpoint(run_dir, c.learner.step, c.policy, extra, c.cfg.run.keep_checkpoints)


def restore(driver: Driver, ckpt_dir: str, extra: dict | None = None) -> None:
    """The run's state from a checkpoint; `extra` is its trainer.pt when already read."""
    c = driver.c
    load_adapter_weights(c.policy, os.path.join(ckpt_dir, "adapter"))
    extra = extra if extra is not None else read_trainer_state(ckpt_dir)
    c.learner.load_state_dict(extra["learner"])
    replay = dict(extra["replay"])  # a buffer written before the task masked Z's first token keeps what it still allows
    replay["buffers"] = {k: [t for t in v if c.task.reachable(t["tokens"])] for k, v in replay["buffers"].items()}
    driver.load_replay_state(replay)
    set_rng_state(extra["rng"], c.sampler.generator)
    c.scheduler.load_state_dict(extra["scheduler"])
    c.generator.set_state(extra["driver_rng"])
    plans = [dict(p, request={"first_banned_ids": sorted(c.task.first_banned_ids), **p["request"]})
             for p in extra.get("plans", [])]  # (plans written before the mask existed get the task's)
    driver.restore_plans(plans)
    if c.em is not None and "em" in extra:
        c.em.load_state_dict(extra["em"])

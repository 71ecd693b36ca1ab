"""A run folder's checkpoints as files, read side: which checkpoint is the newest intact one (its
adapter's safetensors file whole, its trainer.pt readable with weights_only) and where its adapter
is. Below the learner, so that a run may start from another run's adapter (lora.init) through the
same lookup the learner resumes and evaluates with."""

from __future__ import annotations

import json
import os

import torch

from gfnlm.configs import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names its file."""


def read_trainer_state(ckpt_dir: str) -> dict:
    """trainer.pt of a checkpoint, unpickling nothing but tensors and plain containers."""
    path = os.path.join(ckpt_dir, "trainer.pt")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as e:  # truncated zip, bytes that are not a checkpoint, a pickled object weights_only refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {first[:160]})") from None


def check_adapter_file(adapter_dir: str) -> None:
    """Raise CheckpointError unless the adapter's safetensors file is whole: its JSON header reads and
    the file holds every byte the header promises."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if size < 8 + header + end:
            raise ValueError(f"{size} bytes, the header promises {8 + header + end}")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read ({first[:160]})") from None


def newest_intact(run_dir: str, log=print) -> tuple[str, dict] | None:
    """(path, trainer state) of the newest checkpoint of run_dir whose adapter and trainer state both
    read; a damaged newer one is named in the log and skipped. None if the run has no checkpoint at
    all; CheckpointError if every one is damaged."""
    root = os.path.join(run_dir, "checkpoints")
    steps = sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True) if os.path.isdir(root) else []
    latest = latest_checkpoint(run_dir)
    if latest is not None and os.path.basename(latest) in steps:  # the pointer first (normally the newest)
        steps.remove(os.path.basename(latest))
        steps.insert(0, os.path.basename(latest))
    errors = []
    for name in steps:
        path = os.path.join(root, name)
        try:
            check_adapter_file(os.path.join(path, "adapter"))
            return path, read_trainer_state(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"gfnlm: warning: {e}; trying the previous checkpoint")
    if errors:
        raise CheckpointError(f"{root}: no intact checkpoint ({errors[0]})")
    return None


def intact_checkpoint(run_dir: str, log=print) -> str | None:
    """The path of `newest_intact`'s checkpoint."""
    found = newest_intact(run_dir, log)
    return found[0] if found else None


def latest_checkpoint(run_dir: str) -> str | None:
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isdir(path) else None

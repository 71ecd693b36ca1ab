"""What `gfnlm train` checks before anything starts: no model weights loaded, no Ray, nothing written.

The run folder (new: free of any earlier run and writable; resumed: an intact checkpoint whose
adapter fits the config) and, for a private Ray on this machine, whether the
actors fit its cores and memory. Each problem is a one-line `UserError` naming the field or file.
"""

from __future__ import annotations

import datetime
import json
import os

from gfnlm.configs import EMBEDDED_MODEL, Config, ConfigError

from .checkpoints import CheckpointError, intact_checkpoint

RUN_TRACES = ("checkpoints", "config.yaml", "metrics.jsonl")
"""Files any run leaves in its folder from its first second on."""

ACTOR_OVERHEAD = 200 * 2**20
"""Resident memory of an idle Ray worker process with torch and transformers imported (~140 MB measured)."""

RAY_OVERHEAD = 2**30
"""Ray's own processes (GCS, raylet, dashboard) on a private node."""


def run_folder(cfg: Config, resume: str | None) -> str:
    """The run's folder, checked: a resumed one holds an intact checkpoint matching the config; a new
    one holds no trace of another run and can be written."""
    if resume:
        check_resume(cfg, resume)
        return resume
    run_dir = cfg.run.output_dir.replace("{time}", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    traces = [n for n in RUN_TRACES if os.path.exists(os.path.join(run_dir, n))]
    if traces:
        raise ConfigError(
            f"run.output_dir: {run_dir} already holds a run ({', '.join(traces)}); continue it with --resume {run_dir}, "
            f"or choose another folder with -o run.output_dir=..."
        )
    check_writable(run_dir, "run.output_dir")
    return run_dir


def check_writable(folder: str, field: str) -> None:
    """The folder exists and is writable, or can be created: its nearest existing ancestor is a writable folder."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{field}: {path} is a file; expected a folder (or a path under one) for the run")
    if not os.access(path, os.W_OK | os.X_OK):
        what = "the run folder" if path == os.path.abspath(folder) else f"{path}, where {folder} would be created,"
        raise ConfigError(f"{field}: {what} is not writable; choose another folder with -o {field}=...")


def check_resume(cfg: Config, run_dir: str) -> str:
    """The checkpoint a resume will start from; raises if there is none or it does not fit the config."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume: {run_dir} is not a folder; expected the folder of an earlier run")
    ckpt = intact_checkpoint(run_dir, log=lambda m: None)  # the fallback is reported once, when it is loaded
    if ckpt is None:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint (the run stopped before its first one, "
                          f"run.checkpoint_every); start it again into a new folder")
    check_adapter_config(os.path.join(ckpt, "adapter"), cfg)
    check_writable(run_dir, "--resume")
    return ckpt


def check_reference(cfg: Config) -> None:
    """PPO's `reference: init` needs lora.init (not a schema rule: a trained run is read back with
    lora.init off, its checkpoint holding the adapter)."""
    objective = cfg.learner.objective
    if objective.type == "ppo" and objective.reference == "init" and not cfg.lora.init:
        raise ConfigError("learner.objective.reference: 'init' holds the run near the adapter it started from, "
                          "and lora.init names none; set lora.init, or reference: base")


def check_init(cfg: Config) -> None:
    """The adapter lora.init starts from: found, whole, and of the config's rank and target modules
    (and `check_reference`)."""
    check_reference(cfg)
    if not cfg.lora.init:
        return
    from gfnlm.actors.models import init_adapter_dir

    from .checkpoints import check_adapter_file

    try:
        folder = init_adapter_dir(cfg.lora.init)
        check_adapter_file(folder)
        check_adapter_config(folder, cfg, hint="set lora.r and lora.target_modules as that adapter's run had them")
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(str(e) if str(e).startswith("lora.init") else f"lora.init: {e}") from None


def check_adapter_config(adapter_dir: str, cfg: Config,
                         hint: str = "use the run's own lora settings (drop the lora overrides)") -> None:
    """The adapter's rank and target modules are the config's (peft would fail with pages of size mismatches)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected a peft adapter folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if saved.get("r") != cfg.lora.r:
        raise ConfigError(f"lora.r: the adapter in {adapter_dir} has rank {saved.get('r')}, the config says {cfg.lora.r}; "
                          f"{hint}")
    targets = saved.get("target_modules") or []
    if sorted(targets) != sorted(cfg.lora.target_modules):
        raise ConfigError(f"lora.target_modules: the adapter in {adapter_dir} was trained on {sorted(targets)}, "
                          f"the config names {sorted(cfg.lora.target_modules)}; {hint}")


def _weights_bytes(path: str | None) -> int:
    """Bytes of a model folder's weight files (the embedded model: its converted size)."""
    if path is None or path == EMBEDDED_MODEL:
        return 540 * 2**20  # SmolLM2-135M in float32
    total = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                if n.endswith((".safetensors", ".bin", ".pt")))
    return total


def available_memory() -> int | None:
    """MemAvailable of this machine (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_machine(cfg: Config, cores: int | None = None, memory: int | None = None) -> None:
    """On a private Ray (no runtime.address, no RAY_ADDRESS) every actor runs on this machine: refuse
    a config whose actors need more CPUs or memory than it has, before Ray starts any process."""
    if cfg.runtime.mode != "ray" or cfg.runtime.address or os.environ.get("RAY_ADDRESS"):
        return
    from gfnlm.cluster.ray_session import required_cpus

    s, r = cfg.samplers, cfg.reward
    cores = cores or os.cpu_count() or 1
    need = required_cpus(cfg)
    scorers = "" if r.colocate else f" + reward.num_actors × reward.num_cpus ({r.num_actors} × {r.num_cpus:g})"
    if need > cores:
        raise ConfigError(f"samplers.num_actors × samplers.num_cpus ({s.num_actors} × {s.num_cpus:g}){scorers} = {need:g} CPUs, "
                          f"but this machine has {cores} and the private Ray runs every actor here; lower them, "
                          f"or join a cluster with --address")
    memory = memory if memory is not None else available_memory()
    if memory is None:
        return
    weights = _weights_bytes(cfg.model.path)
    kv = cfg.sampler.vllm.cpu_kv_cache_gb * 2**30 if cfg.sampler.engine == "vllm" else 0
    per_sampler = s.memory_mb * 2**20 if s.memory_mb else ACTOR_OVERHEAD + weights + kv
    per_scorer = ACTOR_OVERHEAD + _weights_bytes(r.model or cfg.model.path)
    total = (s.num_actors * per_sampler + (0 if r.colocate else r.num_actors * per_scorer)
             + ACTOR_OVERHEAD + 3 * weights + RAY_OVERHEAD)  # + the learner (weights, gradients, activations) + Ray
    if total > memory:
        raise ConfigError(f"samplers.num_actors: {s.num_actors} samplers{'' if r.colocate else f' and {r.num_actors} reward actors'} "
                          f"need about {total / 2**30:.1f} GiB ({per_sampler / 2**20:.0f} MiB each), but this machine has "
                          f"{memory / 2**30:.1f} GiB available; lower samplers.num_actors, or join a cluster with --address")


BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of the bfloat16 matrix instructions that make bfloat16 weights faster than
float32 on a CPU (×1.7 per reward pass on AVX512-BF16, `gfnlm bench scoring --bf16`)."""


def cpu_flags() -> set[str] | None:
    """This CPU's flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def dtype_note(cfg: Config, device: str, flags: set[str] | None = None) -> str | None:
    """A line for a run whose bfloat16 weights run on a CPU without bfloat16 matrix instructions:
    there they are slower than float32 (emulated), so the run pays the rounding and gains nothing."""
    if cfg.model.dtype != "bfloat16" or device != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or any(f in flags for f in BF16_FLAGS):
        return None
    return (f"model.dtype: bfloat16 on a CPU without bfloat16 matrix instructions ({' or '.join(BF16_FLAGS)} in "
            f"/proc/cpuinfo): slower than float32 here; model.dtype=float32 runs faster and rounds nothing")

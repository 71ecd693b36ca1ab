"""Config sections of the cluster layer: where the actors run (their count and resources), the
Ray runtime, the metrics endpoints and job submission."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class SamplersConfig(Section):
    num_actors: int = Field(1, ge=1)
    """Sampler actors (runtime.mode 'ray'); each holds its own copy of the policy."""

    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each sampler actor."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each sampler actor (fractions share a GPU)."""

    memory_mb: int | None = Field(None, ge=1)
    """Memory Ray reserves for each sampler actor; unset reserves none."""

    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a sampler actor that died; its batches in flight are dropped."""

    in_flight: int = Field(1, ge=1)
    """Sample requests queued per sampler actor, so it never idles while the learner updates."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each sampler actor asks for, e.g. {gfnlm_sampler: 1} to place samplers
    on the sampler worker group of cluster/k8s/raycluster.yaml."""


class SubmitConfig(Section):
    entrypoint_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for the job's driver (the learner) by `gfnlm submit`."""

    entrypoint_num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved for the job's driver (the learner); Ray places the driver on a node that has them."""

    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    """Custom resources of the driver, e.g. {gfnlm_learner: 1} for the learner worker group."""

    pip: list[str] = Field(default_factory=list)
    """Extra pip requirements installed into the job's runtime environment (empty: the image has them)."""

    env_vars: dict[str, str] = Field(default_factory=lambda: {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    """Environment variables of the job and its actors."""

    excludes: list[str] = Field(default_factory=lambda: [".venv", "runs", ".git", "*.gguf", "__pycache__"])
    """Paths of the working directory not uploaded with the job."""


class RuntimeConfig(Section):
    mode: Literal["local", "ray"] = "local"
    """'local': every piece in this process (tests, debugging); 'ray': sampler, reward and replay
    actors with sampling and learning overlapped."""

    address: str | None = None
    """Ray cluster to join ('auto', 'ray://host:10001', 'host:6379'); unset joins RAY_ADDRESS if
    set, else starts a private local Ray on 127.0.0.1 and stops it at the end."""

    max_staleness: int = Field(2, ge=0)
    """Largest learner version − sampling version a batch may have; older batches are dropped."""

    publish_every: int = Field(1, ge=1)
    """Optimizer steps between weight broadcasts to the samplers."""

    sampler_timeout: float = Field(600.0, gt=0)
    """Seconds without any usable batch from any sampler before the run stops with an error."""

    temp_dir: str | None = None
    """Temp folder of a private local Ray (default: a fresh folder under the system temp dir)."""

    dashboard: bool = False
    """Start the Ray dashboard with a private local Ray (on 127.0.0.1)."""

    replay_max_restarts: int = Field(-1, ge=-1)
    """Times Ray restarts the replay actor after it dies (-1: always). A restarted buffer is refilled
    from the last checkpoint's replay (or, before the first, from the task's seeds); the log says which."""

    actor_replacements: int = Field(4, ge=0)
    """Fresh actors the driver may start in place of samplers or reward actors that died for good
    (used up their max_restarts), over the whole run. When none is left, the run stops after a
    checkpoint, naming the actor and this budget."""


class MetricsConfig(Section):
    enabled: bool = True
    """Serve Prometheus metrics (and /health) from the learner and every actor."""

    host: str = "127.0.0.1"
    """Address the endpoints bind: 127.0.0.1 keeps them on this machine; use 0.0.0.0 in a
    cluster so Prometheus can scrape the pods."""

    port: int = Field(9400, ge=0, le=65535)
    """First port tried by each process (the next free one is taken when it is busy); 0 takes any
    free port. The endpoints of a run are listed in its prometheus_targets.json."""

    port_range: int = Field(64, ge=1)
    """How many ports above `port` a process may try."""

    job: str | None = None
    """Value of the `job` label; unset takes the run folder's name."""

    targets_dir: str | None = "runs/prometheus"
    """Folder where a run also writes its endpoints as `<job>.json` while it trains (removed at the
    end): the one folder cluster/prometheus/prometheus.yml watches (Prometheus' file discovery
    allows a `*` in the last path segment only). Unset writes only the run folder's copy."""

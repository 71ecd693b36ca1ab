"""Joining a Ray cluster, or starting a private one on 127.0.0.1 and stopping only that."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def required_cpus(cfg) -> float:
    need = cfg.samplers.num_actors * cfg.samplers.num_cpus
    if not cfg.reward.colocate:
        need += cfg.reward.num_cpus
    return need


@contextlib.contextmanager
def ray_session(cfg, log=print):
    """Yield with Ray initialised: cfg.runtime.address, else RAY_ADDRESS, else a private local Ray."""
    import ray

    rt = cfg.runtime
    address = rt.address or os.environ.get("RAY_ADDRESS") or None
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("GFNLM_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        log(f"gfnlm: joined the Ray cluster at {address}")
        short = resource_shortfall(cfg, ray.cluster_resources())
        if short:
            log(f"gfnlm: warning: {short}; actors wait until the cluster (or its autoscaler) has room")
        try:
            yield
        finally:
            ray.shutdown()  # disconnects; the cluster is not ours to stop
        return
    # A private Ray, on loopback, in its own temp dir. Token auth would be switched on by the first
    # ray.init and then break `ray job submit`; a private loopback Ray needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = rt.temp_dir or tempfile.mkdtemp(prefix="gfnlm-ray-")  # short: socket paths must fit 107 bytes
    cpus = max(float(os.cpu_count() or 1), required_cpus(cfg) + 1)
    ray.init(
        address="local",  # never attach to some other Ray running on this machine
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
        num_cpus=int(cpus + 0.999),
        include_dashboard=rt.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    log(f"gfnlm: started a private Ray on 127.0.0.1 (temp dir {temp})")
    try:
        yield
    finally:
        ray.shutdown()  # stops the Ray this process started, nothing else
        if not rt.temp_dir:
            shutil.rmtree(temp, ignore_errors=True)


def resource_shortfall(cfg, available: dict) -> str | None:
    """What the cluster lacks to hold the requested actors, or None."""
    need_cpu = required_cpus(cfg)
    need_gpu = cfg.samplers.num_actors * cfg.samplers.num_gpus + (0 if cfg.reward.colocate else cfg.reward.num_gpus)
    if available.get("CPU", 0) < need_cpu:
        return (f"samplers.num_actors: {cfg.samplers.num_actors} samplers × {cfg.samplers.num_cpus:g} CPU need "
                f"{need_cpu:g} CPUs; the cluster has {available.get('CPU', 0):g}")
    if available.get("GPU", 0) < need_gpu:
        return f"samplers.num_gpus: the actors need {need_gpu:g} GPUs; the cluster has {available.get('GPU', 0):g}"
    return None

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
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        # inside a submitted job the job's runtime env applies (Ray refuses a second one that
        # names the same variables); run from a laptop, ours goes to the actors
        inside_job = RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ
        ray.init(address=address, runtime_env=None if inside_job else {"env_vars": env}, log_to_driver=True)
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


def required_resources(cfg, with_driver: bool = False) -> dict[str, float]:
    """Ray resources the run's actors reserve (and its driver's, for a submitted job)."""
    s, r = cfg.samplers, cfg.reward
    need: dict[str, float] = {"CPU": s.num_actors * s.num_cpus, "GPU": s.num_actors * s.num_gpus}
    if s.memory_mb:
        need["memory"] = s.num_actors * s.memory_mb * 2**20
    for k, v in s.resources.items():
        need[k] = need.get(k, 0) + s.num_actors * v
    if not r.colocate:
        need["CPU"] += r.num_cpus
        need["GPU"] += r.num_gpus
        for k, v in r.resources.items():
            need[k] = need.get(k, 0) + v
    if with_driver:
        d = cfg.submit
        need["CPU"] += d.entrypoint_num_cpus
        need["GPU"] += d.entrypoint_num_gpus
        for k, v in d.entrypoint_resources.items():
            need[k] = need.get(k, 0) + v
    return {k: v for k, v in need.items() if v > 0}


def resource_shortfall(cfg, available: dict, with_driver: bool = False) -> str | None:
    """What the cluster lacks to hold the requested actors, or None."""
    lacking = [f"{k} {v:g} (the cluster has {available.get(k, 0):g})"
               for k, v in required_resources(cfg, with_driver).items() if available.get(k, 0) < v]
    if not lacking:
        return None
    return (f"samplers/reward/submit: {cfg.samplers.num_actors} samplers"
            f"{'' if cfg.reward.colocate else ' + a reward actor'}{' + the driver' if with_driver else ''} need "
            + ", ".join(lacking))


def actor_states(handles) -> dict[str, tuple[str, int]]:
    """actor id (hex) -> (state, restarts) as Ray's actor table records them, for the given handles.
    States: ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD."""
    import ray
    from ray._private import state  # the GCS actor table; ray.util.state needs the dashboard

    wanted = {h._actor_id.hex() for h in handles}
    # one request for this job's actors (the driver asks every step: one request per actor made the
    # step's cost grow with the sampler count), then one per actor the job's table does not hold
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    table = state.actors(job_id=job) if len(wanted) > 1 else {}
    out = {}
    for aid in wanted:
        info = table.get(aid) or state.actors(actor_id=aid) or {}
        out[aid] = (info.get("State", "UNKNOWN"), int(info.get("NumRestarts", 0)))
    return out

"""`gfnlm submit CONFIG --address URL`: check a run locally, then hand it to a Ray cluster.

1. The config (with its overrides) is validated here: a bad key fails in a second, not on the
   cluster after the upload.
2. When the cluster answers, its resources (summed over its nodes) must hold the samplers, the
   reward actor and the job's driver (the learner); an autoscaling cluster may be short now and
   grow later: `--no-resource-check` skips the check.
3. Ray's job submission gets the working directory (less `submit.excludes`), the runtime
   environment and the driver's resources (`submit.entrypoint_*`), and the entry point
   `gfnlm train CONFIG -o ...`. The job id and the commands to follow it are printed.
"""

from __future__ import annotations

import os
import shlex
import time

from gfnlm.configs import ConfigError, UserError, load_config
from gfnlm.configs.load import resolve_path


class SubmitError(UserError, RuntimeError):
    """A one-line reason the job was not submitted."""


def cluster_resources(address: str, wait: float = 20.0) -> dict[str, float] | None:
    """Total resources of the cluster's live nodes, or None when it does not say (a head that
    just came up lists no node for a few seconds: ask again until `wait` has passed)."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + wait
    while True:
        try:
            nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False, timeout=30)
        except Exception:
            return None
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(1)
    total: dict[str, float] = {}
    for n in nodes:
        if getattr(n, "state", "ALIVE") != "ALIVE":
            continue
        for k, v in (getattr(n, "resources_total", None) or {}).items():
            total[k] = total.get(k, 0.0) + float(v)
    return total or None


def entrypoint(config_rel: str, overrides: list[str]) -> str:
    return " ".join(["gfnlm", "train", shlex.quote(config_rel)] + [f"-o {shlex.quote(o)}" for o in overrides])


def submit(config: str, address: str, overrides: list[str] = (), working_dir: str = ".", resource_check: bool = True,
           submission_id: str | None = None, log=print, agent_wait: float = 120.0) -> str:
    overrides = list(overrides)
    cfg = load_config(config, overrides)  # ConfigError: one line naming the key
    if cfg.runtime.mode != "ray":
        overrides.append("runtime.mode=ray")
    wd = os.path.abspath(working_dir)
    if not os.path.isdir(wd):
        raise SubmitError(f"--working-dir: no such directory {working_dir!r}")
    rel = os.path.relpath(os.path.abspath(resolve_path(config)), wd)
    if rel.startswith(".."):
        raise SubmitError(f"{config}: the config must lie inside the working directory {wd} (it is uploaded with the job)")

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a bad URL
        raise SubmitError(f"--address: no Ray dashboard answers at {address} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); expected e.g. http://127.0.0.1:8265") from None
    if resource_check:
        from gfnlm.cluster.ray_session import resource_shortfall

        available = cluster_resources(address)
        if available is None:
            log("gfnlm: the cluster did not report its resources; skipping the resource check")
        else:
            short = resource_shortfall(cfg, available, with_driver=True)
            if short:
                raise SubmitError(f"{short}. Scale the worker groups, lower the request, or pass --no-resource-check "
                                  f"if the cluster autoscales")
    s = cfg.submit
    runtime_env = {"working_dir": wd, "excludes": list(s.excludes),
                   "env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **s.env_vars}}
    if s.pip:
        runtime_env["pip"] = list(s.pip)
    entry = entrypoint(rel, overrides)
    deadline = time.monotonic() + agent_wait
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entry, runtime_env=runtime_env, submission_id=submission_id,
                entrypoint_num_cpus=s.entrypoint_num_cpus, entrypoint_num_gpus=s.entrypoint_num_gpus,
                entrypoint_resources=dict(s.entrypoint_resources) or None,
                metadata={"gfnlm_config": rel},
            )
            break
        except RuntimeError as e:
            # a fresh head's job agent registers a little after its dashboard answers
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"the cluster refused the job: {str(e).strip().splitlines()[-1]}") from None
    log(f"gfnlm: submitted {job_id}: {entry}")
    log(f"  follow:  ray job logs --address {address} --follow {job_id}")
    log(f"  status:  ray job status --address {address} {job_id}")
    log(f"  stop:    ray job stop --address {address} {job_id}")
    return job_id


def wait(address: str, job_id: str, timeout: float | None = None, log=print) -> str:
    """Follow a submitted job to its end; returns its final status name."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if deadline is not None and time.monotonic() > deadline:
            return str(status.value)
        time.sleep(1)
    return str(status.value)


__all__ = ["ConfigError", "SubmitError", "submit", "wait", "cluster_resources"]

"""Prometheus metrics of every gfnlm process, on an HTTP endpoint of its own (with /health).

Every process (the learner and each actor) builds one `Metrics` in its own registry, labelled with
`job` (the run), `actor` (learner, sampler-0, reward, replay …) and `task`, and serves it with
`serve()`. Names follow Prometheus conventions: snake_case, base units, `_total` on counters,
`_seconds` on durations. `METRICS` is the one list of what the code exports: the Grafana dashboard
test checks every expression against it.

Ports: a process binds `metrics.port` when it is free, else the next free one (up to
`metrics.port_range` ports up); port 0 takes any free port. The learner writes the endpoints of a
run into `prometheus_targets.json` (Prometheus file_sd format) in the run folder.
"""

from __future__ import annotations

from gfnlm.configs import ConfigError
import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

LABELS = ("job", "actor", "task")

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = SECONDS_BUCKETS


METRICS: tuple[Spec, ...] = (
    # samplers
    Spec("gfnlm_trajectories_sampled_total", "counter", "Trajectories sampled.", ("source",)),
    Spec("gfnlm_tokens_sampled_total", "counter", "Tokens sampled (policy and tool tokens)."),
    Spec("gfnlm_sample_seconds", "histogram", "Seconds per sampling call (one prompt's batch)."),
    Spec("gfnlm_policy_version", "gauge", "Policy version (learner step) the sampler currently serves."),
    Spec("gfnlm_lora_swap_seconds", "histogram", "Seconds to swap in a published LoRA version."),
    # reward
    Spec("gfnlm_score_seconds", "histogram", "Seconds to compute log R of every prefix of one batch."),
    # learner
    Spec("gfnlm_learner_steps_total", "counter", "Optimizer steps taken."),
    Spec("gfnlm_trained_trajectories_total", "counter", "Trajectories in the learner's batches (fresh + replayed)."),
    Spec("gfnlm_learner_step_seconds", "histogram", "Seconds per learner step (waiting for data included)."),
    Spec("gfnlm_learner_update_seconds", "histogram", "Seconds per learner update (forward, backward, optimizer)."),
    Spec("gfnlm_loss", "gauge", "Training loss of the last step."),
    Spec("gfnlm_log_reward_mean", "gauge", "Mean untempered log R of the last step's fresh trajectories."),
    Spec("gfnlm_log_reward_max", "gauge", "Largest untempered log R of the last step's fresh trajectories."),
    Spec("gfnlm_reward_temperature", "gauge", "Reward temperature of the last step."),
    Spec("gfnlm_learning_rate", "gauge", "Learning rate of the last step."),
    Spec("gfnlm_log_z", "gauge", "TB / VarGrad: mean log Z of the last step's records (learned or estimated)."),
    Spec("gfnlm_log_z_spread", "gauge", "TB / VarGrad: standard deviation of log Z across the last step's records."),
    Spec("gfnlm_valid_fraction", "gauge", "Fraction of recent on-policy samples the task accepts."),
    Spec("gfnlm_staleness_versions", "histogram", "Policy versions between a used batch and the learner.",
         buckets=STALENESS_BUCKETS),
    Spec("gfnlm_batches_dropped_total", "counter", "Sampled batches not used.", ("reason",)),
    Spec("gfnlm_weight_broadcast_bytes_total", "counter", "Bytes of LoRA weights published to samplers."),
    Spec("gfnlm_weight_broadcast_seconds", "histogram", "Seconds to publish one LoRA version."),
    Spec("gfnlm_actor_restarts_total", "counter", "Actor failures after which Ray restarted the actor.", ("target",)),
    Spec("gfnlm_errors_total", "counter", "Errors by kind.", ("kind",)),
    # replay
    Spec("gfnlm_replay_size", "gauge", "Trajectories held by the replay buffer (all prompts)."),
    Spec("gfnlm_replay_offered_total", "counter", "Fresh trajectories offered to the replay buffer."),
    Spec("gfnlm_replay_admitted_total", "counter", "Offered trajectories the buffer kept (new top-k, not near-duplicates)."),
    Spec("gfnlm_replay_requested_total", "counter", "Replayed trajectories asked for."),
    Spec("gfnlm_replay_served_total", "counter", "Replayed trajectories returned."),
    Spec("gfnlm_replay_hit_rate", "gauge", "Served / requested replay draws of the last request."),
)

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def exported_names() -> set[str]:
    """Every sample name a scrape can show (histograms add _bucket, _sum and _count)."""
    names = set()
    for s in METRICS:
        names.add(s.name)
        if s.kind == "histogram":
            names |= {s.name + "_bucket", s.name + "_sum", s.name + "_count"}
    return names


class Metrics:
    """The metric families of one process, bound to its job/actor/task labels.

    `m.get("gfnlm_loss")` returns the labelled child; extra labels are passed as keywords:
    `m.get("gfnlm_errors_total", kind="ValueError").inc()`.
    """

    def __init__(self, job: str, actor: str, task: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.base = {"job": job, "actor": actor, "task": task}
        self.families = {}
        for s in METRICS:
            cls = _KINDS[s.kind]
            # prometheus_client appends _total to counters itself: declare them without it
            name = s.name[: -len("_total")] if s.kind == "counter" else s.name
            kw = {"buckets": s.buckets} if s.kind == "histogram" else {}
            self.families[s.name] = cls(name, s.help, LABELS + s.extra_labels, registry=self.registry, **kw)
        self.server: ThreadingHTTPServer | None = None

    def get(self, name: str, actor: str | None = None, **extra):
        labels = dict(self.base, **({"actor": actor} if actor else {}), **extra)
        return self.families[name].labels(**labels)

    # ---- serving
    def serve(self, host: str = "127.0.0.1", port: int = 0, port_range: int = 64) -> str:
        """Start the endpoint (GET /metrics, GET /health) in a daemon thread; returns host:port."""
        if self.server is not None:
            return self.endpoint
        registry = self.registry
        base = MetricsHandler.factory(registry)

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self):
                if self.path.split("?")[0] == "/health":
                    body = b"ok\n"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                return super().do_GET()

            def log_message(self, *args):  # no access log on stderr
                pass

        candidates = [0] if port == 0 else range(port, port + max(1, port_range))
        last = None
        for p in candidates:
            try:
                self.server = ThreadingHTTPServer((host, p), Handler)
                break
            except OSError as e:
                last = e
        if self.server is None:
            raise ConfigError(f"metrics.port: no free port in {port}..{port + port_range - 1} on {host} ({last})")
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="gfnlm-metrics", daemon=True).start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        if host in ("0.0.0.0", ""):
            host = socket.gethostbyname(socket.gethostname())
        return f"{host}:{port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def for_process(metrics_cfg, actor: str, task: str, job: str | None = None) -> Metrics | None:
    """The process's Metrics (the `metrics` section; `task` labels every series), serving on the
    configured host/port; None when metrics are off."""
    if not metrics_cfg.enabled:
        return None
    m = Metrics(job or metrics_cfg.job or "gfnlm", actor, task)
    m.serve(metrics_cfg.host, metrics_cfg.port, metrics_cfg.port_range)
    return m

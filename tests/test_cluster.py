"""Operating on a cluster: metrics endpoints, the Grafana dashboard, KubeRay manifests, submit."""

import json
import math
import os
import re
import socket
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import LABELS, METRICS, Metrics, exported_names
from configs import load_config

from conftest import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
KUBERAY = os.path.join(os.path.dirname(REPO), "shared", "kuberay")
DASHBOARD = os.path.join(CLUSTER, "grafana", "gfnlm-dashboard.json")

PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "avg", "max", "min", "count",
    "le", "job", "actor", "task", "source", "reason", "kind", "target", "on", "ignoring", "group_left",
    "label_values", "offset", "bool", "and", "or", "unless", "topk", "bottomk", "delta", "deriv", "clamp_min",
}


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    return exprs


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS}


def scrape(endpoint: str) -> dict:
    """{(sample name, labels tuple): value} of one endpoint."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---------------------------------------------------------------------------------------------
# names and endpoints


def test_metric_names_follow_prometheus_conventions():
    for s in METRICS:
        assert re.fullmatch(r"gfnlm_[a-z][a-z0-9_]*", s.name), s.name
        assert s.name.endswith("_total") == (s.kind == "counter"), s.name
        if "seconds" in s.name:
            assert s.name.endswith("_seconds") and s.kind == "histogram", s.name
        assert not re.search(r"_(ms|milliseconds|minutes|kb|mb)\b", s.name), "base units"
    assert len({s.name for s in METRICS}) == len(METRICS)


def test_endpoint_serves_metrics_and_health_with_labels():
    m = Metrics("run-a", "sampler-3", "random_number")
    try:
        ep = m.serve("127.0.0.1", 0)
        assert urllib.request.urlopen(f"http://{ep}/health", timeout=5).read() == b"ok\n"
        m.get("gfnlm_tokens_sampled_total").inc(7)
        m.get("gfnlm_sample_seconds").observe(0.2)
        got = scrape(ep)
        labels = (("actor", "sampler-3"), ("job", "run-a"), ("task", "random_number"))
        assert got[("gfnlm_tokens_sampled_total", labels)] == 7
        assert got[("gfnlm_sample_seconds_count", labels)] == 1
    finally:
        m.close()


def test_a_busy_port_moves_the_endpoint_to_the_next_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = Metrics("j", "learner", "t")
        try:
            ep = m.serve("127.0.0.1", port, port_range=20)
            assert int(ep.rsplit(":", 1)[1]) != port
        finally:
            m.close()


# ---------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_expressions_name_only_exported_metrics():
    exported = exported_names()
    used = set().union(*map(metric_names, dashboard_exprs()))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"the dashboard queries metrics no code exports: {sorted(used - exported)}"
    with open(DASHBOARD) as f:
        titles = " | ".join(p["title"].lower() for p in json.load(f)["panels"])
    for topic in ["per sampler", "tokens/s", "learner step", "loss", "log r", "staleness", "replay", "weight sync", "restarts"]:
        assert topic in titles, topic


def test_metric_name_extraction_catches_unknown_names():
    assert metric_names('sum by (actor) (rate(gfnlm_nope_total{job=~"$job"}[1m]))') == {"gfnlm_nope_total"}


# ---------------------------------------------------------------------------------------------
# a live run


def test_live_endpoints_of_a_short_ray_run(tiny_llama, tmp_path):
    from learner.loop import train

    run = tmp_path / "run"
    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, run) + [
        "runtime.mode=ray", "learner.steps=6", "reward.colocate=false", "metrics.job=scrape-test"])
    scrapes = {}

    def on_step(step, driver):
        if step in (2, 6):
            eps = driver.metrics_endpoints()
            scrapes[step] = {name: scrape(ep) for name, ep in eps.items()}
            for ep in eps.values():
                assert urllib.request.urlopen(f"http://{ep}/health", timeout=5).status == 200

    train(cfg, str(run), on_step=on_step)
    assert set(scrapes[6]) == {"learner", "sampler-0", "reward", "replay"}
    with open(run / "prometheus_targets.json") as f:
        assert {t["labels"]["gfnlm_process"] for t in json.load(f)} == set(scrapes[6])

    def total(step, name, actor=None):
        return sum(v for proc in scrapes[step].values() for (n, labels), v in proc.items()
                   if n == name and (actor is None or dict(labels)["actor"] == actor))

    present = {n for proc in scrapes[6].values() for (n, _) in proc}
    used = set().union(*map(metric_names, dashboard_exprs()))
    assert used <= present, f"the dashboard's metrics missing from a live run: {sorted(used - present)}"
    for proc in scrapes[6].values():
        for (n, labels), _ in proc.items():
            if n.startswith("gfnlm_"):
                d = dict(labels)
                assert all(k in d for k in LABELS) and d["job"] == "scrape-test" and d["task"] == "random_number"
    for counter in ["gfnlm_trajectories_sampled_total", "gfnlm_tokens_sampled_total", "gfnlm_learner_steps_total",
                    "gfnlm_replay_offered_total", "gfnlm_weight_broadcast_bytes_total", "gfnlm_score_seconds_count"]:
        assert total(6, counter) > total(2, counter) > 0, counter
    assert total(6, "gfnlm_learner_steps_total") == 6
    assert math.isfinite(total(6, "gfnlm_loss")) and total(6, "gfnlm_loss") >= 0
    assert 0 < total(6, "gfnlm_learning_rate") <= cfg.learner.lr
    assert total(6, "gfnlm_log_reward_max") >= total(6, "gfnlm_log_reward_mean")
    assert total(6, "gfnlm_replay_size") > 0 and 0 <= total(6, "gfnlm_replay_hit_rate") <= 1
    assert total(6, "gfnlm_policy_version", actor="sampler-0") >= 1
    assert total(6, "gfnlm_staleness_versions_count") == 6
    assert total(6, "gfnlm_actor_restarts_total") == 0

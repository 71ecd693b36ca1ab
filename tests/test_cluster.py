"""Operating on a cluster: metrics endpoints, the Grafana dashboard, KubeRay manifests, submit."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gfnlm.cluster.metrics import LABELS, METRICS, Metrics, exported_names
from gfnlm.configs import load_config

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
    from gfnlm.learner.loop import train

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


# ---------------------------------------------------------------------------------------------
# KubeRay manifests, checked offline against the CRDs


def strict(schema):
    """The CRD's openAPIV3Schema as JSON Schema that rejects unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crds():
    if not os.path.isdir(KUBERAY):
        pytest.skip(f"the KubeRay CRDs are not at {KUBERAY} (../shared/kuberay beside the checkout)")
    out = {}
    for name, kind in [("ray.io_rayclusters.yaml", "RayCluster"), ("ray.io_rayjobs.yaml", "RayJob")]:
        with open(os.path.join(KUBERAY, name)) as f:
            crd = yaml.safe_load(f)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[kind] = strict(version["schema"]["openAPIV3Schema"])
    return out


def manifests():
    with open(os.path.join(CLUSTER, "k8s", "raycluster.yaml")) as f:
        cluster = yaml.safe_load(f)
    with open(os.path.join(CLUSTER, "k8s", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    return cluster, job


def errors(schema, doc):
    import jsonschema

    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def test_manifests_validate_against_the_kuberay_crds(crds):
    cluster, job = manifests()
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert errors(crds["RayCluster"], cluster) == []
    assert errors(crds["RayJob"], job) == []


def test_the_offline_check_rejects_unknown_fields_and_wrong_types(crds):
    cluster, _ = manifests()
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["replicaz"] = 3
    assert any("replicaz" in e for e in errors(crds["RayCluster"], bad))
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert errors(crds["RayCluster"], bad)
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    assert errors(crds["RayCluster"], bad)


def group_capacity(group) -> tuple[dict, dict]:
    """(Ray resources per pod, container limits) of a head or worker group."""
    params = group["rayStartParams"]
    ray_res = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
    if "resources" in params:
        ray_res.update(json.loads(json.loads(params["resources"])))
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return ray_res, limits


def mebibytes(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)", q)
    assert m, q
    return float(m.group(1)) * units[m.group(2)]


def test_the_cluster_preset_fits_the_worker_groups():
    cfg = load_config("cluster.yaml")
    cluster, job = manifests()
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", "the dashboard stays inside the cluster"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"sampler", "learner", "reward"}

    def holds(group_name, cpus, gpus, custom, memory_mb, count):
        g = groups[group_name]
        res, limits = group_capacity(g)
        assert res["GPU"] == float(limits.get("nvidia.com/gpu", 0)), f"{group_name}: num-gpus matches the pod's GPUs"
        assert res["CPU"] <= float(limits["cpu"]), f"{group_name}: num-cpus within the CPU limit"
        per_pod = min([math.floor(res["CPU"] / cpus) if cpus else math.inf,
                       math.floor(res["GPU"] / gpus) if gpus else math.inf]
                      + [math.floor(res.get(k, 0) / v) for k, v in custom.items()])
        if memory_mb:
            per_pod = min(per_pod, math.floor(mebibytes(limits["memory"]) / memory_mb))
        assert per_pod >= 1, f"{group_name}: one actor does not fit a pod ({res}, {limits})"
        assert per_pod * g["replicas"] >= count, f"{group_name}: {count} actors, room for {per_pod * g['replicas']}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]

    s, r, d = cfg.samplers, cfg.reward, cfg.submit
    assert s.num_gpus >= 1 and s.resources == {"gfnlm_sampler": 1}
    holds("sampler", s.num_cpus, s.num_gpus, s.resources, s.memory_mb, s.num_actors)
    assert not r.colocate
    holds("reward", r.num_cpus, r.num_gpus, r.resources, None, 1)
    holds("learner", d.entrypoint_num_cpus, d.entrypoint_num_gpus, d.entrypoint_resources, None, 1)
    assert groups["sampler"]["maxReplicas"] > groups["sampler"]["replicas"], "samplers can scale out"
    # the RayJob places its driver where `gfnlm submit` does
    assert json.loads(job["spec"]["entrypointResources"]) == d.entrypoint_resources
    assert job["spec"]["entrypointNumGpus"] == d.entrypoint_num_gpus
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "configs/cluster.yaml" in job["spec"]["entrypoint"]


def test_every_pod_exposes_the_ports_prometheus_scrapes():
    cluster, _ = manifests()
    with open(os.path.join(CLUSTER, "prometheus", "podmonitor.yaml")) as f:
        monitor = yaml.safe_load(f)
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    cfg = load_config("cluster.yaml")
    assert cfg.metrics.host == "0.0.0.0"
    for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        pod = g["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert scraped <= set(ports)
        assert sorted(ports[p] for p in scraped) == list(range(cfg.metrics.port, cfg.metrics.port + len(scraped)))
    with open(os.path.join(CLUSTER, "prometheus", "prometheus.yml")) as f:
        local = yaml.safe_load(f)
    assert local["scrape_configs"][0]["honor_labels"] is True


# ---------------------------------------------------------------------------------------------
# gfnlm submit


def test_submit_checks_the_config_before_contacting_the_cluster(capsys):
    from gfnlm.learner.cli import main

    # port 9 (discard) on loopback: nothing answers, but the config error comes first
    assert main(["submit", "configs/random_number.yaml", "--address", "http://127.0.0.1:9", "-o", "learner.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "learner.lr" in err and len(err.splitlines()) == 1
    assert main(["submit", "configs/random_number.yaml", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--address" in err and "http://127.0.0.1:9" in err and len(err.splitlines()) == 1


def test_gfnlm_submit_to_a_local_head(ray_head, tiny_llama, tmp_path, monkeypatch):
    from gfnlm.cluster.submit import SubmitError, submit, wait

    url, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run = tmp_path / "submitted"
    ov = tiny_overrides(tiny_llama, run) + ["learner.steps=3", "submit.entrypoint_num_cpus=0"]
    # the head has 4 CPUs: 8 samplers of 1 CPU do not fit, and submit says so before uploading
    with pytest.raises(SubmitError, match=r"CPU 8 \(the cluster has 4\)"):
        submit("configs/random_number.yaml", url, ov + ["samplers.num_actors=8"], working_dir=REPO)
    lines = []
    job_id = submit("configs/random_number.yaml", url, ov, working_dir=REPO, log=lines.append)
    assert job_id in lines[0] and any(f"ray job logs --address {url} --follow {job_id}" in ln for ln in lines)
    assert "runtime.mode=ray" in lines[0], "a local-mode config runs on the cluster's Ray"
    status = wait(url, job_id, timeout=300)
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(url).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert (run / "checkpoints" / "latest").exists() and "joined the Ray cluster" in logs


def test_a_preempted_learner_pod_signals_the_driver_before_ray_stops():
    import yaml

    with open(os.path.join(CLUSTER, "k8s", "raycluster.yaml")) as f:
        groups = {g["groupName"]: g for g in yaml.safe_load(f)["spec"]["workerGroupSpecs"]}
    spec = groups["learner"]["template"]["spec"]
    hook = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert hook.index("pkill -TERM -f '[g]fnlm train'") < hook.index("ray stop")
    assert spec["terminationGracePeriodSeconds"] >= 110  # the hook's wait fits the grace period


# ---------------------------------------------------------------------------------------------
# A real Prometheus (the Debian package) scraping a Ray run, answering the dashboard's queries

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_promtool_accepts_the_shipped_config():
    out = subprocess.run([PROMTOOL, "check", "config", os.path.join(CLUSTER, "prometheus", "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_podmonitor_keeps_gfnlms_job_label():
    with open(os.path.join(CLUSTER, "prometheus", "podmonitor.yaml")) as f:
        endpoints = yaml.safe_load(f)["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e.get("honorLabels") is True for e in endpoints)
    assert not any(r.get("targetLabel") == "job" for e in endpoints for r in e.get("relabelings", []))


def listening_address(proc: subprocess.Popen, log, timeout: float = 60) -> str:
    """host:port that Prometheus bound: it logs `msg="Listening on" ... address=HOST:PORT` once its
    listener is open (the port it was given may be 0)."""
    deadline = time.time() + timeout
    while True:
        found = re.search(r'msg="Listening on".*?\baddress=(\S+)', log.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError("Prometheus did not report its address: " + log.read_text()[-2000:])
        time.sleep(0.2)


def prom_query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)")
def test_a_real_prometheus_scrapes_a_ray_run_and_answers_every_panel(tiny_llama, tmp_path):
    from gfnlm.learner.loop import train

    # the shipped config, copied into the same layout (cluster/prometheus/ beside runs/), scraping every second
    conf_dir = tmp_path / "cluster" / "prometheus"
    conf_dir.mkdir(parents=True)
    with open(os.path.join(CLUSTER, "prometheus", "prometheus.yml")) as f:
        text = f.read().replace("scrape_interval: 5s", "scrape_interval: 1s")
    (conf_dir / "prometheus.yml").write_text(text)
    job = "prom-e2e"
    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path / "run") + [
        "runtime.mode=ray", "samplers.num_actors=2", "samplers.num_cpus=0.5", "reward.colocate=false",
        "learner.steps=40", f"metrics.job={job}", f"metrics.targets_dir={tmp_path / 'runs' / 'prometheus'}",
        "runtime.max_staleness=4"])
    # port 0: Prometheus binds a free port itself and logs the one it bound
    prom_log = tmp_path / "prometheus.log"
    with open(prom_log, "w") as out:
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={conf_dir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=127.0.0.1:0"],
                                stdout=subprocess.DEVNULL, stderr=out)
    try:
        base = "http://" + listening_address(prom, prom_log)
    except BaseException:
        prom.kill()
        prom.wait()
        raise
    answers, scraped = {}, {}

    def on_step(step, driver):
        if step != 4 or answers:
            return
        assert (tmp_path / "runs" / "prometheus" / f"{job}.json").exists()
        deadline = time.time() + 90
        while time.time() < deadline:  # every process of the run scraped at least twice
            counts = prom_query(base, 'count_over_time(up{gfnlm_process!=""}[5m])')
            scraped.update({r["metric"]["gfnlm_process"]: int(float(r["value"][1])) for r in counts})
            if len(scraped) == 5 and min(scraped.values()) >= 2:
                break
            time.sleep(0.5)
        for expr in dashboard_exprs():
            answers[expr] = prom_query(base, expr.replace("$job", job))

    try:
        train(cfg, str(tmp_path / "run"), on_step=on_step)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        err = prom_log.read_text()
    assert set(scraped) == {"learner", "sampler-0", "sampler-1", "reward", "replay"}, (scraped, err[-2000:])
    assert min(scraped.values()) >= 2
    assert not (tmp_path / "runs" / "prometheus" / f"{job}.json").exists()  # removed with the run
    empty = [e for e, r in answers.items() if not r]
    assert len(answers) == len(dashboard_exprs()) and not empty, empty
    summary = {e: len(r) for e, r in answers.items()}
    print(json.dumps(summary, indent=1))  # the note's list: series per panel query

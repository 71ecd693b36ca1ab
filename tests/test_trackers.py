"""Experiment trackers (run.report_to), read back with each library's own reader."""

import glob
import importlib.util
import json
import os

import pytest

from gfnlm.configs import ConfigError, load_config
from gfnlm.learner.cli import main

from conftest import tiny_overrides

INSTALLED = [t for t in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(t) is not None]


def test_a_tracker_that_is_not_installed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"run.report_to: wandb is not installed; pip install 'gfnlm\[tracking\]'"):
        load_config("random_number.yaml", ["run.report_to=[wandb]"])
    with pytest.raises(ConfigError, match="run.report_to.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"):
        load_config("random_number.yaml", ["run.report_to=[comet]"])


def wandb_records(path: str):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header, then records framed
    as in LevelDB's log (CRC, length, type; 32 KiB blocks), each a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


@pytest.mark.skipif(len(INSTALLED) < 3, reason=f"trackers installed: {INSTALLED or 'none'} (pip install 'gfnlm[tracking]')")
def test_a_run_reports_to_all_three_trackers(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["train", "random_number.yaml"]
    for o in tiny_overrides(tiny_llama, run) + ["run.report_to=[tensorboard,wandb,mlflow]", "metrics.job=tracked"]:
        args += ["-o", o]
    assert main(args) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps]
    tv = json.loads((run / "eval.json").read_text())["trained"]["tv"]

    # TensorBoard: its event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert ea.Scalars("eval/trained/tv")[-1].value == pytest.approx(tv)
    assert {"curves", "eval"} <= set(ea.Tags()["images"]) and "config/text_summary" in ea.Tags()["tensors"]

    # MLflow: the tracking client on the local store in the run folder
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file://" + str(run / "mlruns"))
    (mrun,) = client.search_runs([client.get_experiment_by_name("gfnlm").experiment_id])
    assert mrun.info.run_name == "tracked" and mrun.data.params["learner.lr"] == "0.01"
    assert [m.value for m in client.get_metric_history(mrun.info.run_id, "train.loss")] == pytest.approx(losses, rel=1e-6)
    assert mrun.data.metrics["eval.trained.tv"] == pytest.approx(tv)
    assert {"curves.png", "eval.png"} <= {a.path for a in client.list_artifacts(mrun.info.run_id)}

    # W&B: the offline run's transaction log, decoded with W&B's own record schema
    (log,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for rec in wandb_records(log):
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif rec.WhichOneof("record_type") == "run":  # the run's start carries its config
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    train_rows = [h for h in history if "train/loss" in h]
    assert [h["train/loss"] for h in train_rows] == pytest.approx(losses, rel=1e-6)
    assert any(h.get("eval/trained/tv") == pytest.approx(tv) for h in history)
    assert config["learner"]["lr"] == 0.01 and config["metrics"]["job"] == "tracked"
    assert glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "images" / "curves_*.png"))
    assert os.path.isfile(run / "curves.png")

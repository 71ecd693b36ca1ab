"""Experiment trackers (`run.report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets what metrics.jsonl gets, step by step (numbers only), the resolved config as
hyperparameters, and at the end the evaluation figures and the run's PNGs. A tracker's library is
imported only when it is named (`pip install gfnlm[tracking]`).
"""

from __future__ import annotations

import math
import os


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, keys joined with '/'."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _flat(tree: dict, prefix: str = "") -> dict[str, str | float | int | bool]:
    """The config as flat `section.key` hyperparameters (lists as text)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, bool, str)) else str(v)
    return out


class TensorBoard:
    def __init__(self, run_dir: str, config: dict, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(config).items()), 0)

    def log(self, step: int, figures: dict[str, float]) -> None:
        for k, v in figures.items():
            self.w.add_scalar(k, v, step)

    def image(self, path: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.w.add_image(os.path.splitext(os.path.basename(path))[0], np.asarray(Image.open(path).convert("RGB")),
                         step, dataformats="HWC")

    def close(self) -> None:
        self.w.close()


class WandB:
    def __init__(self, run_dir: str, config: dict, name: str, project: str):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless the user says so
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config, reinit="finish_previous")

    def log(self, step: int, figures: dict[str, float]) -> None:
        self.run.log(figures, step=step)

    def image(self, path: str, step: int) -> None:
        self.run.log({os.path.splitext(os.path.basename(path))[0]: self.wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: str, config: dict, name: str, uri: str | None):
        import mlflow

        self.mlflow = mlflow
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "file://" + os.path.abspath(os.path.join(run_dir, "mlruns"))
        if uri.startswith("file:") or "://" not in uri:
            # a folder store needs no server or database (MLflow 3 keeps it, in maintenance mode, behind this switch)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("gfnlm")
        self.run = mlflow.start_run(run_name=name)
        params = _flat(config)
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(params.items())[i:i + 100]))

    def log(self, step: int, figures: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in figures.items()}, step=step)

    def image(self, path: str, step: int) -> None:
        self.mlflow.log_artifact(path)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """The configured trackers, as one."""

    def __init__(self, cfg, run_dir: str):
        config = cfg.model_dump(mode="json")
        name = cfg.metrics.job or os.path.basename(os.path.abspath(run_dir))
        self.run_dir, self.step, self.all = run_dir, 0, []
        for t in cfg.run.report_to:
            if t == "tensorboard":
                self.all.append(TensorBoard(run_dir, config, name))
            elif t == "wandb":
                self.all.append(WandB(run_dir, config, name, cfg.run.wandb_project))
            elif t == "mlflow":
                self.all.append(MLflow(run_dir, config, name, cfg.run.mlflow_tracking_uri))

    def log_step(self, record: dict) -> None:
        self.step = int(record["step"])
        figures = {f"train/{k}": v for k, v in _numbers(record).items() if k != "step"}
        for t in self.all:
            t.log(self.step, figures)

    def log_evaluation(self, results: dict | None) -> None:
        """The evaluation figures (eval/<method>/<figure>) and every PNG of the run folder."""
        figures = {f"eval/{k}": v for k, v in _numbers(results or {}).items()}
        for t in self.all:
            if figures:
                t.log(self.step, figures)
            for png in sorted(n for n in os.listdir(self.run_dir) if n.endswith(".png")):
                t.image(os.path.join(self.run_dir, png), self.step)

    def close(self) -> None:
        for t in self.all:
            t.close()
        self.all = []

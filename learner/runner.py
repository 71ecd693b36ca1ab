"""Train a config, then evaluate it: what `gfnlm train` and every run of `gfnlm experiment` do."""

from __future__ import annotations

import os
import sys


class TrainingStopped(Exception):
    """Training ended early on a signal, after its checkpoint (the message is the signal's name)."""


def train_and_evaluate(cfg, run_dir: str, resume: bool = False, methods=None) -> dict | None:
    """What `gfnlm train` does after the checks: train, then evaluate (run.evaluate_at_end)."""
    from gfnlm.actors.models import pick_device
    from gfnlm.learner.loop import eval_sampler, train
    from gfnlm.learner.preflight import dtype_note

    note = dtype_note(cfg, pick_device(cfg.model.device))
    if note:  # a hint: the run goes on
        print(f"gfnlm: {note}", file=sys.stderr)
    c = train(cfg, run_dir, resume=resume, keep_trackers=True)
    try:
        if c.stopped:  # preempted: the checkpoint is written; evaluation waits for the resumed run's end
            raise TrainingStopped(c.stopped)
        print(f"gfnlm: trained {c.learner.step} steps; adapter in {os.path.join(run_dir, 'checkpoints')}", file=sys.stderr)
        results = None
        if cfg.run.evaluate_at_end:
            if cfg.runtime.mode == "ray" and not cfg.run.torch_threads:
                import torch

                torch.set_num_threads(os.cpu_count() or 1)  # the actors are gone: every core is free
            results = c.task.evaluate(c.policy, eval_sampler(c), cfg.eval, run_dir,
                                      log=lambda m: print(m, file=sys.stderr), methods=methods)
            print(f"gfnlm: evaluation in {written(run_dir)}", file=sys.stderr)
        if c.trackers is not None:
            c.trackers.log_evaluation(results)
        return results
    finally:
        if c.trackers is not None:
            c.trackers.close()


def written(folder: str) -> str:
    """The evaluation files a task wrote into folder (not every task draws eval.png)."""
    names = [n for n in ("eval.json", "eval.md", "eval.png") if os.path.isfile(os.path.join(folder, n))]
    return os.path.join(folder, names[0]) + "".join(f", {n}" for n in names[1:]) if names else folder

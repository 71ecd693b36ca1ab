"""Evaluation after training and in `gfnlm eval`: the task's own figures, tables and plots."""

from __future__ import annotations


def evaluate(policy, task, sampler, eval_cfg, out_dir: str, log=print, methods=None) -> dict:
    """The task evaluates the trained policy (and the base model and baselines it compares with);
    `methods` picks some of them (tasks over records)."""
    return task.evaluate(policy, sampler, eval_cfg, out_dir, log, methods=methods)

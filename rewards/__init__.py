"""Tasks: records and splits, the policy's prompt vs the reward's context and suffix, log R of every prefix, seeds, evaluation."""

from .base import Task
from .random_number import RandomNumberTask, log_target, number_metrics, parse_number
from .records import RecordError


def make_task(cfg, tokenizer) -> Task:
    """The task object of a config (its `task` section; `reward.prefixes` for LM rewards)."""
    t = cfg.task
    if t.type == "random_number":
        return RandomNumberTask(t, tokenizer)
    from .constrained import ConstrainedTask
    from .continuation import ContinuationTask
    from .infilling import InfillingTask

    cls = {"continuation": ContinuationTask, "infilling": InfillingTask, "constrained": ConstrainedTask}[t.type]
    return cls(t, tokenizer, prefixes=cfg.reward.prefixes)


__all__ = ["RandomNumberTask", "RecordError", "Task", "log_target", "make_task", "number_metrics", "parse_number"]

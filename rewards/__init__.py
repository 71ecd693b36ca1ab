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


def check_data(cfg) -> str:
    """Read and check a config's task data without a tokenizer or a model; one line of what is there.
    Raises RecordError (file, line, field) on a bad file."""
    t = cfg.task
    if t.type == "random_number":
        return f"{len(t.prompts)} inline prompt(s)"
    from .constrained import ConstrainedTask
    from .continuation import ContinuationTask
    from .infilling import InfillingTask
    from .records import load_records

    cls = {"continuation": ContinuationTask, "infilling": InfillingTask, "constrained": ConstrainedTask}[t.type]
    records = load_records(t.data, cls.columns(t))
    return (f"{len(records.train_ids)} train and {len(records.test_ids)} test records "
            f"(columns {', '.join(cls.columns(t))})")


__all__ = ["check_data", "RandomNumberTask", "RecordError", "Task", "log_target", "make_task", "number_metrics", "parse_number"]

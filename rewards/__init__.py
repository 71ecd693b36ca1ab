"""Tasks: prompts, rewards of every prefix, known-good trajectories, evaluation."""

from .random_number import RandomNumberTask, log_target, number_metrics, parse_number


def make_task(cfg, tokenizer):
    """The task object for a config's `task` section."""
    if cfg.type == "random_number":
        return RandomNumberTask(cfg, tokenizer)
    raise ValueError(f"task.type: unknown task {cfg.type!r}")  # pragma: no cover


__all__ = ["RandomNumberTask", "log_target", "make_task", "number_metrics", "parse_number"]

"""Tasks: records and splits, the policy's prompt vs the reward's context and suffix, log R of every prefix, seeds, evaluation."""

from gfnlm.configs import ConfigError
from .base import Task
from .random_number import RandomNumberTask, log_target, number_metrics, parse_number
from .records import RecordError


def make_task(cfg, tokenizer) -> Task:
    """The task object of a config (its `task` section; `reward.prefixes` for LM rewards)."""
    task = _build_task(cfg, tokenizer)
    task.end_only_after_tool = any(tool.end_only_after for tool in cfg.sampler.tools)
    return task


def _build_task(cfg, tokenizer) -> Task:
    t = cfg.task
    if t.type == "random_number":
        return RandomNumberTask(t, tokenizer)
    if t.type == "arithmetic":
        from .arithmetic import ArithmeticTask

        return ArithmeticTask(t, tokenizer, prefixes=cfg.reward.prefixes, tools_cfg=cfg.sampler.tools)
    if t.type == "custom":
        from .custom import CustomTask

        return CustomTask(t, tokenizer, prefixes=cfg.reward.prefixes, function=cfg.reward.function)
    from .constrained import ConstrainedTask
    from .continuation import ContinuationTask
    from .infilling import InfillingTask
    from .subjectivity import SubjectivityTask

    cls = {"continuation": ContinuationTask, "infilling": InfillingTask, "constrained": ConstrainedTask,
           "subjectivity": SubjectivityTask}[t.type]
    return cls(t, tokenizer, prefixes=cfg.reward.prefixes)


def check_data(cfg) -> str:
    """Read and check a config's task data without a tokenizer or a model; one line of what is there.
    Raises RecordError (file, line, field) on a bad file."""
    t = cfg.task
    if t.type == "random_number":
        return f"{len(t.prompts)} inline prompt(s)"
    if t.type == "arithmetic":
        from .arithmetic import arithmetic_sets, validation_questions

        worked, sets, unlabelled = arithmetic_sets(t)  # as training reads them: the same refusals
        held = validation_questions(t, len(unlabelled))
        if cfg.eval.split == "validation" and not held and cfg.run.evaluate_at_end:
            from .lm_eval import empty_split

            raise ConfigError(empty_split(t.type, "validation"))
        tests = {name: len(rows) for name, rows in sets.items()}
        return (f"{len(worked)} {'generated ' if t.worked else ''}worked examples ({t.labelled} labelled, {t.shots} shots), "
                f"{len(unlabelled)} generated questions ({len(held)} of them held out for validation), test sets "
                + ", ".join(f"{n}: {k}" for n, k in tests.items())
                + (f"; evaluated on the {cfg.eval.split} questions" if cfg.eval.split != "test" else ""))
    from .constrained import ConstrainedTask
    from .continuation import ContinuationTask
    from .infilling import InfillingTask
    from .records import load_records, one_of
    from .subjectivity import SubjectivityTask

    from .custom import CustomTask, load_reward_function

    cls = {"continuation": ContinuationTask, "infilling": InfillingTask, "constrained": ConstrainedTask,
           "subjectivity": SubjectivityTask, "custom": CustomTask}[t.type]
    if t.type == "custom":
        load_reward_function(cfg.reward.function)  # importable, and callable, before anything loads
    checks = {t.label_column: one_of("0", "1")} if t.type == "subjectivity" else None
    records = load_records(t.data, cls.columns(t), checks)
    if cfg.reward.fit is not None:  # its template's columns, in every training record
        from gfnlm.configs.tasks import template_fields

        load_records(t.data, template_fields(cfg.reward.fit.template))
    split = cfg.eval.split
    evaluated = {"train": records.train_ids, "validation": records.validation_ids, "test": records.test_ids}[split]
    if not evaluated and cfg.run.evaluate_at_end:
        from .lm_eval import empty_split

        raise ConfigError(empty_split(t.type, split))
    k = min(len(evaluated), cfg.eval.max_records or len(evaluated))
    labels = ""
    if t.type == "subjectivity":  # the label balance per split: what a downloaded copy of SUBJ should show
        from collections import Counter

        def balance(ids):
            n = Counter(records[i].fields[t.label_column] for i in ids)
            return f"{n['0']}/{n['1']}"

        labels = (f"; labels 0/1: train {balance(records.train_ids)}, validation {balance(records.validation_ids)}, "
                  f"test {balance(records.test_ids)}")
    return (f"{len(records.train_ids)} train, {len(records.validation_ids)} validation and {len(records.test_ids)} "
            f"test records (columns {', '.join(dict.fromkeys(cls.columns(t)))}{labels}); evaluates on {k} of the "
            f"{len(evaluated)} "
            + ("TRAINING records (eval.split train: not held out)" if split == "train" else f"{split} records")
            + f"; train file {t.data.train}" + (f", test file {t.data.test}" if t.data.test else ""))


__all__ = ["check_data", "RandomNumberTask", "RecordError", "Task", "log_target", "make_task", "number_metrics", "parse_number"]

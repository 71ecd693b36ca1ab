"""The Python API: what the `gfnlm` command line does, as functions (the command line calls them).

    import gfnlm

    cfg = gfnlm.load_config("continuation", ["learner.steps=20"])       # a preset, a YAML path or a dict
    run = gfnlm.train(cfg, run_dir="runs/mine")                          # trains, then evaluates
    run = gfnlm.resume("runs/mine", ["learner.steps=40"])                # continues from its checkpoint
    figures = gfnlm.evaluate("runs/mine")                                # the task's figures and baselines
    lines = gfnlm.sample("runs/mine", "The cat sat", n=4)                # [{"z", "tokens", "log_q", ...}]
    with gfnlm.open_run("runs/arith") as trained:                         # a loaded run, for many calls
        trained.predict("Question: 3 + 4 - 2 = ?", k=10)

Errors are the command line's: `gfnlm.ConfigError` (a bad key, file or value, one line naming it),
FileNotFoundError for a folder that holds no run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

from gfnlm.configs import Config, ConfigError
from gfnlm.configs import load_config as _load


def load_config(config: str | dict | Config | None = None, overrides: Iterable[str] = ()) -> Config:
    """A validated config: `config` is a preset's name (e.g. "continuation"), a YAML file, a dict of
    sections as such a file holds them (it may name a preset as `base`), a Config, or None (the
    defaults); `overrides` are dotted KEY=VALUE strings applied on top, as `-o` does."""
    if isinstance(config, Config):
        config = config.model_dump(mode="json")
    return _load(config, overrides)


def check(config: str | dict | Config | None, overrides: Iterable[str] = (), model: bool = True) -> str:
    """What `gfnlm check` checks: the data files read and checked and (`model`) the LoRA targets
    against the model's config.json, without weights or Ray. Returns the data's summary line
    ("3 train, 0 validation and 1 test records"); raises ConfigError on the first problem."""
    from gfnlm.actors.models import check_lora_targets
    from gfnlm.rewards import check_data

    from .preflight import check_reference

    cfg = load_config(config, overrides)
    check_reference(cfg)
    data = check_data(cfg)
    if model:
        check_lora_targets(cfg)
    return data


@dataclasses.dataclass
class Run:
    """A training run: its folder, the task's figures per method (None when run.evaluate_at_end is
    off or the run stopped), and `stopped` (the signal that stopped it, to resume from its checkpoint)."""

    dir: str
    results: dict | None
    stopped: str | None = None


def train(config: str | dict | Config | None, overrides: Iterable[str] = (), run_dir: str | None = None) -> Run:
    """Train as `gfnlm train` does (checks first, then trains, then evaluates with
    run.evaluate_at_end). `run_dir` sets run.output_dir; a folder that holds another run is refused."""
    from . import preflight
    from .runner import TrainingStopped, train_and_evaluate

    cfg = load_config(config, overrides)
    if run_dir:  # as typed, not read as YAML (a folder named 123 stays a string)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(run_dir)})})
    check(cfg, model=False)  # the policy checks its LoRA targets when it loads, before the run writes anything
    folder = preflight.run_folder(cfg, None)
    preflight.check_init(cfg)
    preflight.check_machine(cfg)
    try:
        return Run(folder, train_and_evaluate(cfg, folder))
    except TrainingStopped as e:
        return Run(folder, None, str(e))


def resume(run_dir: str, overrides: Iterable[str] = ()) -> Run:
    """Continue the run in run_dir from its latest intact checkpoint with its own config.yaml
    (`overrides` change some of its values, e.g. learner.steps), as `gfnlm train --resume` does."""
    from . import preflight
    from .runner import TrainingStopped, train_and_evaluate

    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir) or not os.path.isfile(saved):
        raise ConfigError(f"resume: {saved} not found; expected the folder of an earlier run")
    cfg = load_config(saved, overrides)
    check(cfg, model=False)
    preflight.run_folder(cfg, run_dir)
    preflight.check_init(cfg)
    preflight.check_machine(cfg)
    try:
        return Run(run_dir, train_and_evaluate(cfg, run_dir, resume=True))
    except TrainingStopped as e:
        return Run(run_dir, None, str(e))


def evaluate(run: str, overrides: Iterable[str] = (), out: str | None = None, config=None, log=None) -> dict:
    """The task's figures per method (the trained policy and cfg.eval.baselines) for a run folder (its
    latest intact checkpoint, with its own config.yaml) or an adapter folder (with `config`), as
    `gfnlm eval` computes them; eval.json and eval.md go to `out` (default: beside the adapter)."""
    from .amortized import locate

    folder, adapter = locate(run, need_run=False)
    return evaluate_located(folder, adapter, overrides, out or os.path.dirname(os.path.abspath(adapter)), config, log)


def evaluate_located(folder: str | None, adapter: str, overrides: Iterable[str], out: str, config=None, log=None) -> dict:
    """`evaluate` of an adapter already found (`amortized.locate`): in its run `folder`, or alone."""
    import sys

    from .checkpoints import check_adapter_file, load_adapter_weights
    from .components import build
    from .em import load_m_adapter
    from .preflight import check_adapter_config

    if folder is not None:
        if config is not None:
            raise ConfigError(f"eval: {folder} is evaluated with its own config.yaml; drop CONFIG "
                              f"(change one of its values with -o KEY=VALUE)")
        cfg = load_config(os.path.join(folder, "config.yaml"), ["runtime.mode=local", *overrides])
    else:
        cfg = load_config(config, overrides)
        check_adapter_file(adapter)  # a run's adapter is already checked whole (its newest intact checkpoint)
    # the adapter evaluated replaces the one its training started from, which need not exist any more
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init": None})})
    check_adapter_config(adapter, cfg)
    c = build(cfg, engine=False)
    load_adapter_weights(c.policy, adapter)
    load_m_adapter(c.policy, adapter, cfg.lora, c.task)
    return c.task.evaluate(c.policy, c.sampler, cfg.eval, out, log=log or (lambda m: print(m, file=sys.stderr)))


def target(config: str | dict | Config | None, overrides: Iterable[str] = (), draws: int = 64, temperature=1.0,
           proposal: str = "auto", split: str = "validation", records: int | None = None, log=None) -> dict:
    """What the target R(Z)^(1/T) looks like before training, as `gfnlm target` estimates it
    (`rewards.target`): its mean length and log R per record of `split`, and each estimate's ESS, at
    `temperature` (one T, or several estimated from the same draws).
    `proposal`: 'prompt' (the starting policy given its prompt), 'context' (the reward LM given the
    context alone, for tasks with one), 'auto' (context where the task has one)."""
    from gfnlm.rewards.lm_eval import eval_records
    from gfnlm.rewards.target import estimate

    from .components import build
    from .reward_fit import fitted_config

    cfg = load_config(config, ["runtime.mode=local", f"eval.split={split}", *overrides,
                               *([f"eval.max_records={records}"] if records else [])])
    check(cfg, model=False)
    temperatures = [float(t) for t in (temperature if isinstance(temperature, (list, tuple)) else [temperature])]
    if draws < 2 or not temperatures or not all(t > 0 for t in temperatures):
        raise ConfigError(f"target: --draws {draws} and --temperature {' '.join(map(str, temperatures))}: expected at "
                          f"least 2 draws and temperatures above 0")
    cfg = fitted_config(cfg, log or (lambda m: None))
    c = build(cfg, with_replay=False, engine=False)
    has_context = hasattr(c.task, "context_ids")
    if proposal == "context" and not has_context:
        raise ConfigError(f"target: --proposal context: task {c.task.name} has no context of its own; use prompt")
    chosen = "context" if proposal == "context" or (proposal == "auto" and has_context) else "prompt"
    return estimate(c.task, c.policy.model, c.sampler, eval_records(c.task, cfg.eval, cfg.learner.seed), draws,
                    temperatures, chosen, log)


class TrainedRun:
    """A trained run loaded once (policy with its adapter, the task and its reward, a sampler) for
    many `sample` and `predict` calls; `open_run` makes one."""

    def __init__(self, run: str, engine: str | None = None, overrides: Iterable[str] = ()):
        from .amortized import load_run

        self.cfg, self.policy, self.task, self.sampler = load_run(run, engine, list(overrides))
        self.sampler.tools = getattr(self.task, "tools", None) or getattr(self.sampler, "tools", None)

    def __enter__(self) -> "TrainedRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()

    def _record(self, prompt: str | dict, answer: str | None) -> int:
        make = getattr(self.task, "adhoc_record", None)
        if make is None:
            raise ConfigError(f"task {self.task.name}: building a record from a prompt is not supported")
        return make(json.dumps(prompt) if isinstance(prompt, dict) else prompt, answer)

    def _draw(self, rid: int, n: int, temperature: float):
        with self.task.evaluation_lengths():  # as evaluation samples (task.eval_max_len)
            return self.task.sample_records(self.sampler, [rid], n, temperature)[rid]

    def sample(self, prompt: str | dict, n: int = 8, answer: str | None = None,
               temperature: float | None = None) -> list[dict]:
        """n latent Z for the prompt X (the text of the prompt's one column, or a dict of the record's
        fields when the task uses several): per Z its text `z`, `tokens`, `terminated`, `log_q`, and
        `log_r` (when the task scores Z as it is, or with `answer`) and `answer` (tasks with answers)."""
        rid = self._record(prompt, answer)
        trajs = self._draw(rid, n, 1.0 if temperature is None else temperature)
        has_answers = hasattr(self.task, "answers")
        if answer is not None or not has_answers:
            self.task.score(trajs)
        answers = self.task.answers(trajs) if has_answers else [None] * len(trajs)
        lines = []
        for t, a in zip(trajs, answers):
            line = {"z": self.policy.tokenizer.decode(t.tokens), "tokens": t.length, "terminated": t.terminated,
                    "log_q": t.sampled_log_q,
                    "log_r": t.final_log_r if t.log_r is not None else None}
            if has_answers:
                line["answer"] = a
            lines.append(line)
        return lines

    def predict(self, question: str, k: int = 10, temperature: float | None = None) -> dict:
        """The posterior predictive: k latent Z for the question, their answers, the vote: `prediction`,
        `distribution` (answer: share of the votes), `no_answer`, `samples`. Tasks with answers only
        (arithmetic, subjectivity)."""
        from gfnlm.rewards.base import vote

        if not hasattr(self.task, "answers"):
            raise ConfigError(f"gfnlm predict: task {self.task.name} has no answers to vote on (arithmetic and "
                              f"subjectivity do)")
        rid = self._record(question, None)
        temperature = temperature if temperature is not None else self.cfg.eval.vote_temperature
        trajs = self._draw(rid, k, temperature)
        answers = self.task.answers(trajs)
        winner, counts = vote(answers)
        total = sum(counts.values())
        return {"question": self.task.prompt_text(rid), "k": k, "temperature": temperature, "prediction": winner,
                "distribution": {str(a): c / total for a, c in sorted(counts.items(), key=lambda x: -x[1])},
                "no_answer": len(answers) - total,
                "samples": [self.policy.tokenizer.decode(t.tokens) for t in trajs]}


def open_run(run: str, engine: str | None = None, overrides: Iterable[str] = ()) -> TrainedRun:
    """A run folder (its latest intact checkpoint) or an adapter folder in one, loaded for sampling;
    `engine` transformers | vllm (default: the run's); `overrides` change its config.yaml's values."""
    return TrainedRun(run, engine, overrides)


def sample(run: str, prompt: str | dict, n: int = 8, answer: str | None = None, temperature: float | None = None,
           engine: str | None = None, overrides: Iterable[str] = ()) -> list[dict]:
    """`gfnlm sample`: n latent Z from a trained run (see TrainedRun.sample); loads the run each call."""
    with open_run(run, engine, overrides) as trained:
        return trained.sample(prompt, n, answer, temperature)


def predict(run: str, question: str, k: int = 10, temperature: float | None = None, engine: str | None = None,
            overrides: Iterable[str] = ()) -> dict:
    """`gfnlm predict`: the vote over k latent Z from a trained run (see TrainedRun.predict)."""
    with open_run(run, engine, overrides) as trained:
        return trained.predict(question, k, temperature)

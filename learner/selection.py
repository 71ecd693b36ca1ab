"""Settings chosen on the validation split (a run's `select` in an experiment preset): the candidates'
configs, the choice (the best metric among the candidates within the bounds), the table's line about
it, and the chosen candidate's selection run taken as the table's first seed (`reuse_selection`)."""

from __future__ import annotations

import math
import os
import re

import yaml

from gfnlm.configs import ConfigError, load_config

from .experiment_runs import FOLDER, WALL_FILE, flat, same_config, saved_form, without


def check_select(sel, where: str) -> None:
    """A run's `select`: {metric, goal: max | min, candidates: {name: [overrides]}, at_least / at_most:
    {figure: bound}}: the candidate settings, of which the one with the best `metric` of the trained
    policy on the validation split, among those whose other figures keep within the bounds (e.g.
    at_least: {distinct_2: 0.7}, so that satisfaction is not bought with one sentence per record),
    trains the run's seeds for the table."""
    if not isinstance(sel, dict):
        raise ConfigError(f"{where}: expected a mapping with metric, goal and candidates")
    unknown = set(sel) - {"metric", "goal", "candidates", "at_least", "at_most"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; expected metric, goal, candidates, at_least, at_most")
    for bound in ("at_least", "at_most"):
        limits = sel.setdefault(bound, {})
        if not isinstance(limits, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in limits.items()):
            raise ConfigError(f"{where}.{bound}: expected a mapping of figure to a finite number, e.g. {{distinct_2: 0.7}}")
    crossed = [k for k in sel["at_least"] if k in sel["at_most"] and sel["at_least"][k] > sel["at_most"][k]]
    if crossed:
        raise ConfigError(f"{where}: at_least.{crossed[0]} ({sel['at_least'][crossed[0]]:g}) is above at_most.{crossed[0]} "
                          f"({sel['at_most'][crossed[0]]:g}): no candidate could keep within both")
    if not isinstance(sel.get("metric"), str):
        raise ConfigError(f"{where}.metric: missing; name a figure of the trained policy's evaluation, e.g. loglik_max")
    sel.setdefault("goal", "max")
    if sel["goal"] not in ("max", "min"):
        raise ConfigError(f"{where}.goal: {sel['goal']!r}; expected max or min")
    cands = sel.get("candidates")
    if (not isinstance(cands, dict) or len(cands) < 2
            or not all(isinstance(v, list) and all(isinstance(o, str) for o in v) for v in cands.values())):
        raise ConfigError(f"{where}.candidates: expected at least two named lists of overrides, e.g. "
                          f"{{floor99: [task.log_reward_floor=-99], floor400: [task.log_reward_floor=-400]}}")
    for name, overrides in cands.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ConfigError(f"{where}.candidates: name {name!r}: use letters, digits, '_' and '.' (it names a folder)")
        for o in overrides:
            if o.split("=", 1)[0].strip().startswith(SELECT_FIXED):
                raise ConfigError(f"{where}.candidates.{name}: {o!r}: a candidate may not set "
                                  f"{', '.join(SELECT_FIXED)}: they fix what it is judged on")


SELECT_FIXED = ("eval.", "learner.seed", "run.", "task.data")
"""What a candidate may not change: the split and records it is judged on, its seed, its folder."""


def run_overrides(run: dict, out: str, seed: int) -> list[str]:
    """A run's own overrides with `{out}` (the experiment's folder) and `{seed}` (this run's seed)
    filled in, e.g. lora.init={out}/sft-seed{seed}: start from the same seed's SFT adapter."""
    return [o.replace("{out}", out).replace("{seed}", str(seed)) for o in run["overrides"]]


def selection_plan(spec: dict, out: str, extra: list[str]) -> list[tuple[str, str, object]]:
    """(run name, candidate, config) of every selection run: each candidate of each run with
    `select`, trained with the preset's first seed (`select_seed`, whatever --seeds says) into
    <out>/select/<run>/<candidate>-seed<k>, and evaluated on the validation split alone (the
    trained policy only). Validated, data included, before anything trains."""
    from gfnlm.rewards import check_data

    seed = spec["select_seed"]
    plan = []
    for run in spec["runs"]:
        for cand, picked in run.get("select", {}).get("candidates", {}).items():
            ov = [*spec["overrides"], *run_overrides(run, out, seed), *picked, *extra, f"learner.seed={seed}",
                  "run.output_dir=" + os.path.join(out, "select", run["name"], f"{cand}-seed{seed}"),
                  "eval.baselines=[]", "eval.include_base=false", "eval.split=validation", "run.evaluate_at_end=true"]
            cfg = load_config(spec["config"], ov)
            if cfg.task.type == "random_number":
                raise ConfigError(f"runs[{run['name']}].select: task random_number has no validation split to choose on")
            check_data(cfg)  # the validation records exist (or a one-line error now, not after a run)
            plan.append((run["name"], cand, cfg))
    return plan


def figure(results: dict, metric: str, where: str, field: str = "select.metric") -> float:
    """The trained policy's `metric` in an evaluation's results (NaN counts as the worst)."""
    figures = flat((results or {}).get("trained", {}))
    if not isinstance(figures.get(metric), (int, float)) or isinstance(figures.get(metric), bool):
        raise ConfigError(f"{where}: {field}: the evaluation has no numeric figure {metric!r}; it has "
                          f"{', '.join(sorted(k for k, v in figures.items() if isinstance(v, (int, float))))}")
    return float(figures[metric])


def best(scores: dict[str, float], goal: str, allowed: set[str] | None = None) -> str:
    """The candidate with the best score among `allowed` (all when none is allowed or None; the first
    of equals; NaN never wins over a number)."""
    sign = 1.0 if goal == "max" else -1.0
    pool = [c for c in scores if c in allowed] if allowed else list(scores)
    return max(pool, key=lambda c: -math.inf if math.isnan(scores[c]) else sign * scores[c])


def missed(figures: dict[str, float], sel: dict) -> list[str]:
    """The at_least / at_most bounds of a select that a candidate's figures miss (NaN misses every bound)."""
    out = [f"{k} {figures[k]:.4g} < {v:g}" for k, v in sel.get("at_least", {}).items() if not figures[k] >= v]
    return out + [f"{k} {figures[k]:.4g} > {v:g}" for k, v in sel.get("at_most", {}).items() if not figures[k] <= v]


def bounds_text(e: dict) -> str:
    """The bounds a selection entry applied and who missed which, for table.md; '' without bounds."""
    parts = [f"{k} ≥ {v:g}" for k, v in e.get("at_least", {}).items()] + [f"{k} ≤ {v:g}" for k, v in e.get("at_most", {}).items()]
    if not parts:
        return ""
    misses = "; ".join(f"{c}: {', '.join(missed(e['bounded'][c], e))}" for c in e["scores"] if c not in e.get("within", []))
    if not e.get("within"):
        return f"; bounds {' and '.join(parts)}: none kept within ({misses}), so the metric alone chose"
    return f"; only candidates with {' and '.join(parts)} could be chosen" + (f" ({misses})" if misses else "")


JUDGED_ONLY = (("eval",), *FOLDER, ("run", "evaluate_at_end"), ("metrics", "job"))
"""Where a selection run's config may differ from the table run it stands for: how it is judged and its folder."""


def training_form(cfg) -> dict:
    """`saved_form` without `JUDGED_ONLY`: what decides the trained adapter."""
    return without(saved_form(cfg), JUDGED_ONLY)


TRAINED_IN = "trained_in.txt"
"""A table run's file naming the selection run whose training it took (`reuse_selection`)."""


def reuse_selection(cfg, chosen_cfg, log) -> bool:
    """Seed k of the chosen candidate already trained in its selection run: copy that run's training
    (checkpoints, metrics, curves; not its evaluation or trackers) into the table run's folder, which
    must not exist, with the table run's config.yaml, so that the table run resumes at its last step
    and only evaluates, on the test split. False (and nothing copied) unless the selection run
    finished with this very training config and has its last checkpoint intact."""
    import shutil

    from .checkpoints import CheckpointError, newest_intact

    src, dst = chosen_cfg.run.output_dir, cfg.run.output_dir
    if os.path.exists(dst) and os.listdir(dst):
        return False  # the table run's folder holds something: `prepare_folder` decides
    if not os.path.isfile(os.path.join(src, "eval.json")) or not same_config(chosen_cfg):
        return False
    if training_form(cfg) != training_form(chosen_cfg):
        return False
    try:
        found = newest_intact(src, log)
    except CheckpointError:
        return False
    if found is None or found[1].get("learner", {}).get("step") != cfg.learner.steps:
        return False
    tmp = dst.rstrip(os.sep) + ".copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda folder, names: [n for n in names if folder == src and n in NOT_TAKEN])
    with open(os.path.join(tmp, "config.yaml"), "w") as f:  # as training writes it (configs.load.dump_config)
        yaml.safe_dump(saved_form(cfg), f, sort_keys=False)
    with open(os.path.join(tmp, TRAINED_IN), "w") as f:
        f.write(src + "\n")
    if os.path.isdir(dst):
        os.rmdir(dst)  # empty
    os.replace(tmp, dst)
    log(f"gfnlm experiment: {dst} takes its training from {src} (the chosen candidate, the same seed and config): "
        f"it only evaluates, on the test split")
    return True


NOT_TAKEN = ("eval.json", "eval.md", "eval.png", "config.yaml", WALL_FILE, "prometheus_targets.json", "tensorboard", "wandb", "mlruns")
"""What `reuse_selection` leaves behind: the selection run's evaluation, config and trackers."""

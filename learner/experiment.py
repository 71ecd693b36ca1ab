"""`gfnlm experiment NAME`: regenerate one of the paper's tables on this machine.

An experiment preset (configs/experiments/NAME.yaml) names a base config, the budget overrides,
the seeds, and the runs to train (e.g. GFlowNet and SFT), each with the evaluation methods it
contributes, and optional display labels of methods (e.g. sample: prompting). Every run trains
into <out>/<run>-seed<k>/ and evaluates itself (eval.json); the rows are then merged into one table
(mean ± std over seeds) in <out>/table.md and table.json, the trained policy's row named after its
run, and the table's headline figures are drawn as bars in table.png.

A run may choose its settings on the validation split first (`select`: a metric of the trained
policy, max or min, and named candidate override lists): each candidate trains with the preset's
first seed into <out>/select/<run>/ and is evaluated on the validation split alone; the best one
then trains every other seed of the run, and its selection run, copied into the table's folder
(`reuse_selection`), stands for the first seed: every table run is evaluated on the test split
whatever the overrides say. The table says what was chosen over what, and its wall time counts the
selection runs. Give every trained method a `select` of its own so that each
gets the same tuning effort.

Running an experiment again into the same --out reuses every run that finished there with the same
config (its config.yaml) and evaluated the methods asked for (its eval.json): `--seeds 0,1,2` adds
seeds to a table without training the finished ones again, and an experiment stopped midway resumes
the run it stopped in from its last checkpoint. A run folder that holds anything else is moved aside
(`<run>.replaced-<time>`) before the run trains there.

`--runs gflownet,sft` trains only those runs (and their selection candidates; `gflownet/floor250_t1.0`
names one candidate alone), so that several processes on one machine can share one --out, each
training its own part. Runs not named join that call's table where they finished there with the
same config, and are left out of it (with a line saying so) where not. A run whose selection
candidates have not all finished has no candidate chosen yet, and its table runs are left out until
a later call. A run trains under a lock (<folder>/.locks/<run>.lock), so a call that meets a run
another process is training leaves it alone. Only a plain call once every part has finished writes
the complete table and its total wall time; each run keeps its own wall time in its folder
(`wall_seconds.txt`) for it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import yaml

from gfnlm.configs import ConfigError, load_config
from gfnlm.configs.load import resolve_path
from gfnlm.rewards.evaluation import methods_of


def read_spec(name: str) -> dict:
    path = name if os.path.isfile(name) else resolve_path(os.path.join("experiments", name if name.endswith(".yaml") else name + ".yaml"))
    with open(path) as f:
        try:
            spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e}); quote list items "
                              f"that hold ': ', e.g. - \"task.em={{e_steps: 20}}\"") from None
    for key in ("config", "runs"):
        if key not in spec:
            raise ConfigError(f"{path}: {key}: missing; an experiment names a base config and its runs")
    spec.setdefault("seeds", [0])
    spec["select_seed"] = spec["seeds"][0]  # selection runs keep the preset's first seed whatever --seeds says
    spec.setdefault("overrides", [])
    spec.setdefault("labels", {})
    spec["path"] = path
    for i, run in enumerate(spec["runs"]):
        if "name" not in run:
            raise ConfigError(f"{path}: runs[{i}].name: missing")
        run.setdefault("overrides", [])
        run.setdefault("methods", ["trained"])
        if "select" in run:
            check_select(run["select"], f"{path}: runs[{i}].select")
    return spec


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


def same_config(cfg) -> bool:
    """cfg.run.output_dir holds a run of this very config: its config.yaml as training saves it
    (fitted reward model in place, job named, fields added since then at their defaults)."""
    try:
        saved = load_config(os.path.join(cfg.run.output_dir, "config.yaml")).model_dump(mode="json")
    except (OSError, ValueError, ConfigError):
        return False
    return saved == saved_form(cfg)


def finished(cfg, methods: list[str]) -> dict | None:
    """The figures of a run that already trained and evaluated `methods` in cfg.run.output_dir with
    this very config (`same_config`); None when it has to run."""
    try:
        with open(os.path.join(cfg.run.output_dir, "eval.json")) as f:
            evaluated = json.load(f)
    except (OSError, ValueError):
        return None
    results = methods_of(evaluated)
    if not isinstance(results, dict) or any(m not in results for m in methods) or not same_config(cfg):
        return None
    return {m: figures for m, figures in results.items() if m in methods}  # in the order the run wrote them


def saved_form(cfg) -> dict:
    """cfg as training saves it in its folder's config.yaml (`same_config`'s form)."""
    from .loop import with_job
    from .reward_fit import fit_folder, with_fitted

    return with_job(with_fitted(cfg, fit_folder(cfg)) if cfg.reward.fit else cfg, cfg.run.output_dir).model_dump(mode="json")


JUDGED_ONLY = (("eval",), ("run", "output_dir"), ("run", "evaluate_at_end"), ("metrics", "job"))
"""Where a selection run's config may differ from the table run it stands for: how it is judged and its folder."""


def training_form(cfg) -> dict:
    """`saved_form` without `JUDGED_ONLY`: what decides the trained adapter."""
    form = saved_form(cfg)
    for path in JUDGED_ONLY:
        node = form
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
    return form


WALL_FILE = "wall_seconds.txt"
"""A run's wall time as the experiment measured it (training and evaluation), in its folder."""

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


def prepare_folder(cfg, log) -> bool:
    """Whether the run resumes: a folder that holds an unfinished run of this config with an intact
    checkpoint continues from it; a folder that holds anything else of a run is moved aside whole
    (nothing written is lost), so that no old metrics, checkpoint or eval.json mixes with the new run."""
    from .checkpoints import intact_checkpoint
    from .preflight import RUN_TRACES

    folder = cfg.run.output_dir
    if not any(os.path.exists(os.path.join(folder, n)) for n in (*RUN_TRACES, "eval.json")):
        return False
    if same_config(cfg) and not os.path.exists(os.path.join(folder, "eval.json")) and intact_checkpoint(folder, log):
        log(f"gfnlm experiment: {folder} holds an unfinished run of this config: resuming it")
        return True
    aside = f"{folder.rstrip(os.sep)}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    os.replace(folder, aside)
    log(f"gfnlm experiment: {folder} held another run (or an evaluation of another config); moved to {aside}")
    return False


def save_wall(folder: str, seconds: float) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, WALL_FILE), "w") as f:
        f.write(f"{seconds:.1f}\n")


def stored_wall(folder: str, key: str, before: dict[str, float]) -> float | None:
    """The wall seconds of a finished run: its own file, else what an earlier table.json recorded."""
    try:
        with open(os.path.join(folder, WALL_FILE)) as f:
            return float(f.read())
    except (OSError, ValueError):
        return before.get(key)


def parse_runs(text: str | None, spec: dict) -> set[tuple[str, str | None]] | None:
    """--runs: {(run, None)} for a whole run, {(run, candidate)} for one selection candidate; None: all."""
    if text is None:
        return None
    runs = {r["name"]: r for r in spec["runs"]}
    wanted = set()
    for item in (x.strip() for x in text.split(",")):
        if not item:
            raise ConfigError(f"--runs: {text!r} names an empty run; expected RUN or RUN/CANDIDATE, comma-separated, "
                              f"e.g. --runs {next(iter(runs))}")
        run, _, cand = item.partition("/")
        if run not in runs:
            raise ConfigError(f"--runs: {run!r} is not a run of {spec['path']}; expected one of {', '.join(runs)}")
        cands = runs[run].get("select", {}).get("candidates", {})
        if cand and cand not in cands:
            raise ConfigError(f"--runs: {item!r}: {run} has " + (f"the selection candidates {', '.join(cands)}" if cands
                              else "no selection candidates") + f"; expected {run} or {run}/CANDIDATE")
        wanted.add((run, cand or None))
    return wanted


def previous_walls(out: str) -> dict[str, float]:
    """The wall seconds of the runs an earlier table.json in `out` recorded (reused runs keep theirs)."""
    try:
        with open(os.path.join(out, "table.json")) as f:
            return dict(json.load(f).get("wall_seconds", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def configs_of(spec: dict, out: str, extra: list[str], chosen: dict | None = None) -> list[tuple[str, int, object, list[str]]]:
    """(run name, seed, config, methods) of every run, validated before anything trains; a run with
    `select` takes its `chosen` candidate's overrides (default: its first candidate's)."""
    plan = []
    for seed in spec["seeds"]:
        for run in spec["runs"]:
            if seed not in run.get("seeds", spec["seeds"]):
                continue
            methods = list(run["methods"])
            baselines = [m for m in methods if m != "trained"]
            picked, pinned = [], []
            if "select" in run:  # the chosen candidate, judged on the test split whatever else says
                cands = run["select"]["candidates"]
                picked = cands[(chosen or {}).get(run["name"], next(iter(cands)))]
                pinned = ["eval.split=test"]
            ov = [*spec["overrides"], *run["overrides"], *picked, f"learner.seed={seed}",
                  "run.output_dir=" + os.path.join(out, f"{run['name']}-seed{seed}"),
                  f"eval.baselines=[{', '.join(baselines)}]", f"eval.include_base={'true' if baselines else 'false'}", *extra,
                  *pinned]
            plan.append((run["name"], seed, load_config(spec["config"], ov), methods))
    return plan


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
            ov = [*spec["overrides"], *run["overrides"], *picked, *extra, f"learner.seed={seed}",
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


NUMBER_KEYS = ("valid_fraction", "kl", "tv", "exact_kl", "exact_tv", "exact_invalid_mass")
"""The columns of a random-number table (its evaluation nests the exact figures under 'exact')."""


def flat(figures: dict) -> dict:
    """A method's figures with nested ones (random numbers' exact distribution) as exact_<name>."""
    out = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    for k, v in figures.items():
        if isinstance(v, dict):
            out.update({f"{k}_{name}": x for name, x in v.items() if isinstance(x, (int, float))})
    return out


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict[str, str]]:
    """{method: {figure: cell}}: the mean ± sample std over the runs that report the figure as a
    number ("0.250", without ±, from one run; NaN counts as no figure). Infinite values (e.g.
    random_number's kl_unsmoothed when a target value was never drawn) stay out of the mean and
    std and are counted in the cell instead: "1.000 ± 0.141 (1 of 3 inf)" when some runs are
    finite (k of n: the runs with an infinite value, of those that report the figure), "inf"
    when all are; "-inf" in place of "inf" for −∞, "±inf" when both occur."""
    table = {}
    for method, runs in rows.items():
        keys = sorted({k for r in runs for k in r})
        cell = {}
        for k in keys:
            xs = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
            if not xs:
                continue
            finite = [x for x in xs if not math.isinf(x)]
            signs = {x > 0 for x in xs if math.isinf(x)}
            inf = "±inf" if len(signs) == 2 else "inf" if True in signs else "-inf"
            if not finite:
                cell[k] = inf
                continue
            cell[k] = f"{statistics.mean(finite):.3f}" + (f" ± {statistics.stdev(finite):.3f}" if len(finite) > 1 else "")
            if signs:
                cell[k] += f" ({len(xs) - len(finite)} of {len(xs)} {inf})"
        table[method] = cell
    return table


def write_atomically(path: str, text: str) -> None:
    """Write a file whole or not at all (processes sharing an --out may write the table at once)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    readable(tmp)
    os.replace(tmp, path)


def readable(path: str) -> None:
    """The mode an ordinary file gets under the umask (mkstemp makes its files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def plot_table_png(out: str, rows: dict, title: str) -> None:
    """table.png of the rows (`table_plot`), written whole; a plotting failure is a line on stderr, not
    the end of the experiment, and a table with nothing to draw leaves no older table.png behind."""
    from .table_plot import plot_table

    path = os.path.join(out, "table.png")
    fd, tmp = tempfile.mkstemp(dir=out, prefix="table.", suffix=".tmp.png")
    os.close(fd)
    try:
        if rows and plot_table({m: [flat(r) for r in runs] for m, runs in rows.items()}, tmp, title):
            readable(tmp)
            os.replace(tmp, path)
        elif os.path.exists(path):
            os.remove(path)
    except Exception as e:  # the table itself is written; the picture is a convenience
        print(f"gfnlm experiment: table.png not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_table(spec: dict, name: str, out: str, plan, rows: dict, walls: dict, wall: float,
                selection: dict | None = None) -> list[str]:
    """table.md and table.json of the runs done so far (and the settings chosen on the validation
    split, with every candidate's score); the table's lines."""
    from gfnlm.rewards.lm_eval import TABLE_KEYS

    table = summarize({m: [flat(r) for r in runs] for m, runs in rows.items()})
    numbers = any("exact_kl" in r for r in table.values())  # random numbers: their own columns
    keys = [k for k in (NUMBER_KEYS if numbers else TABLE_KEYS) if any(k in r for r in table.values())]
    keys += sorted({k for r in table.values() for k in r if k.startswith("acc_")})  # answer tasks: accuracy per test set
    first = plan[0][2]
    sample = next(iter(rows.values()))[0] if rows else {}
    sets = [k[len("questions_"):] for k in sample if k.startswith("questions_")]
    from gfnlm.rewards.lm_eval import split_label

    evaluated = (f"{sample['records']} {split_label(first.eval.split)} records" if "records" in sample else
                 ("questions per test set " if first.eval.split == "test" else f"{split_label(first.eval.split)} questions ")
                 + ", ".join(f"{n}: {sample['questions_' + n]}" for n in sets) if sets else "")
    if "records" in sample or sets or not isinstance(sample.get("samples"), (int, float)):
        drawn = f"{first.eval.samples_per_record} samples per record and method"
    else:  # a task without records (random_number draws eval.num_samples per prompt): its rows say how many
        drawn = f"{int(sample['samples'])} samples per method"
    lines = [f"**{name}** ({spec.get('description', '').strip()})", "",
             "; ".join(part for part in [
                 f"seeds {spec['seeds']} (column n: the runs behind each row)", drawn, evaluated,
                 f"{first.learner.steps} steps of {first.batch.prompts_per_step} × {first.batch.samples_per_prompt} trajectories",
                 f"wall time {wall / 60:.1f} min on {os.cpu_count()} cores"] if part), "",
             "| method | n | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
    for method, cell in table.items():
        lines.append(f"| {method} | {len(rows[method])} | " + " | ".join(cell.get(k, "") for k in keys) + " |")
    for run, e in (selection or {}).items():
        if "chosen" not in e:
            continue
        counts = sorted({str(n) for n in e["records"].values()})
        lines += ["", f"{run}: {e['chosen']} chosen on the validation split (seed {spec['select_seed']}, "
                      f"{'/'.join(counts)} validation records; {e['goal']} {e['metric']}: "
                      + ", ".join(f"{c} {v:.4g}" for c, v in e["scores"].items()) + bounds_text(e) + ")"
                  + (f"; {e['reused']} is that selection run's training, evaluated on the test split" if e.get("reused") else "")]
    os.makedirs(out, exist_ok=True)
    write_atomically(os.path.join(out, "table.md"), "\n".join(lines) + "\n")
    write_atomically(os.path.join(out, "table.json"), json.dumps(
        {"experiment": name, "seeds": spec["seeds"], "rows": rows, "wall_seconds": walls, "selection": selection or {}}, indent=1))
    plot_table_png(out, rows, f"{name}: mean ± std over seeds; {evaluated or drawn}")
    return lines


@contextlib.contextmanager
def run_lock(folder: str):
    """Yields True while this process holds the run folder's lock (<out>/.../.locks/<run>.lock), False
    when another process holds it: no two processes sharing an --out train one run."""
    folder = folder.rstrip(os.sep)
    locks = os.path.join(os.path.dirname(folder) or ".", ".locks")
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, os.path.basename(folder) + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_or_reuse(cfg, methods: list[str], key: str, walls: dict, before: dict, log, mine: bool, setup=None):
    """One run's figures: reused where it finished with this config, else trained when it is this
    call's to train (`mine`), under its lock (`setup`: how a fresh folder may start, e.g.
    `reuse_selection`); None, with a line saying why, when it is not this call's or another process is
    training it. The wall time of a trained run is saved in its folder. Raises TrainingStopped."""
    from .runner import train_and_evaluate

    results = finished(cfg, methods)
    if results is None and not mine:
        log(f"gfnlm experiment: {key} has not finished in its folder (not in --runs): left out of this call")
        return None
    if results is None:
        with run_lock(cfg.run.output_dir) as held:
            if not held:
                log(f"gfnlm experiment: {key} is being trained by another process (its lock is held): left out of this call")
                return None
            results = finished(cfg, methods)  # it may have finished while this call looked
            if results is None:
                t0 = time.perf_counter()
                resume = prepare_folder(cfg, log)
                if not resume and setup is not None:
                    resume = setup()
                results = train_and_evaluate(cfg, cfg.run.output_dir, resume=resume, methods=methods)
                walls[key] = time.perf_counter() - t0
                save_wall(cfg.run.output_dir, walls[key])
                return results
    log(f"gfnlm experiment: {key} finished before with this config; its eval.json is reused")
    if stored_wall(cfg.run.output_dir, key, before) is not None:
        walls[key] = stored_wall(cfg.run.output_dir, key, before)
    return results


def main(args) -> int:
    from .runner import TrainingStopped

    spec = read_spec(args.name)
    name = os.path.splitext(os.path.basename(spec["path"]))[0]
    out = args.out or os.path.join("runs", "experiments", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if getattr(args, "seeds", None):
        try:
            spec["seeds"] = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers, e.g. --seeds 0,1,2") from None
    wanted = parse_runs(getattr(args, "runs", None), spec)

    def trains(run: str, cand: str | None = None) -> bool:
        return wanted is None or (run, None) in wanted or (cand is not None and (run, cand) in wanted)

    def log(m: str) -> None:
        print(m, file=sys.stderr)

    extra = list(args.override)
    selecting = selection_plan(spec, out, extra)
    plan = configs_of(spec, out, extra)  # every config checked before the first run trains
    if not plan:
        raise ConfigError(f"--seeds {','.join(map(str, spec['seeds']))}: no run of {spec['path']} has these seeds; "
                          f"the runs' own seeds: " + "; ".join(f"{r['name']} {r.get('seeds', 'all')}" for r in spec["runs"]))
    walls, before = {}, previous_walls(out)
    selection: dict[str, dict] = {}
    if selecting:
        log(f"gfnlm experiment {name}: {len(selecting)} selection runs on the validation split into {os.path.join(out, 'select')}")
    for run, cand, cfg in selecting:
        sel = next(r for r in spec["runs"] if r["name"] == run)["select"]
        key = f"select/{run}/{cand}-seed{spec['select_seed']}"
        entry = selection.setdefault(run, {"metric": sel["metric"], "goal": sel["goal"], "scores": {}, "records": {},
                                           "at_least": sel["at_least"], "at_most": sel["at_most"], "bounded": {},
                                           "within": []})
        try:
            results = train_or_reuse(cfg, ["trained"], key, walls, before, log, trains(run, cand))
        except TrainingStopped as e:
            log(f"gfnlm experiment {name}: stopped by {e} during {key}; no table yet")
            return 0
        if results is None:
            entry.setdefault("missing", []).append(cand)
            continue
        entry["scores"][cand] = figure(results, sel["metric"], key)
        entry["bounded"][cand] = {k: figure(results, k, key, f"select.{bound}.{k}")
                                  for bound in ("at_least", "at_most") for k in sel[bound]}
        if not missed(entry["bounded"][cand], sel):
            entry["within"].append(cand)
        trained = results["trained"]
        entry["records"][cand] = trained.get("records", trained.get("questions_validation"))
    for run, entry in selection.items():
        if entry.get("missing"):
            log(f"gfnlm experiment {name}: {run}: the candidates {', '.join(entry['missing'])} have not finished in {out}: "
                f"nothing chosen yet, so {run}'s table runs are left out of this call")
            continue
        entry["chosen"] = best(entry["scores"], entry["goal"], set(entry["within"]))
        log(f"gfnlm experiment {name}: {run}: {entry['chosen']} chosen on the validation split "
            f"({entry['metric']}: " + ", ".join(f"{c} {v:.3f}" for c, v in entry["scores"].items()) + bounds_text(entry) + ")")
    chosen = {run: e["chosen"] for run, e in selection.items() if "chosen" in e}
    every = configs_of(spec, out, extra, chosen)  # the table's header describes the preset's first run
    plan = [p for p in every if p[0] not in selection or p[0] in chosen]
    chosen_cfgs = {run: cfg for run, cand, cfg in selecting if cand == chosen.get(run)}
    mine = sum(trains(p[0]) for p in plan)
    log(f"gfnlm experiment {name}: {len(plan)} runs into {out}" + (f" ({mine} of them named by --runs)" if wanted else ""))
    rows: dict[str, list[dict]] = {}

    def add(run: str, results: dict, cfg) -> None:
        if run in selection and os.path.isfile(os.path.join(cfg.run.output_dir, TRAINED_IN)):
            selection[run]["reused"] = f"{run}-seed{cfg.learner.seed}"  # its training is the selection run's
        for method, figures in (results or {}).items():
            label = run if method == "trained" else spec.get("labels", {}).get(method, method)
            rows.setdefault(label, []).append(figures)

    for run, seed, cfg, methods in plan:
        key = f"{run}-seed{seed}"
        first = run in chosen_cfgs and seed == spec["select_seed"]  # trained once already: judge it on test
        try:
            results = train_or_reuse(cfg, methods, key, walls, before, log, trains(run),
                                     setup=(lambda: reuse_selection(cfg, chosen_cfgs[run], log)) if first else None)
        except TrainingStopped as e:
            log(f"gfnlm experiment {name}: stopped by {e} during {key}; {os.path.join(out, 'table.md')} "
                f"holds the runs that finished")
            return 0
        if results is not None:
            add(run, results, cfg)
            write_table(spec, name, out, every, rows, walls, sum(walls.values()), selection)  # after every run
    lines = write_table(spec, name, out, every, rows, walls, sum(walls.values()), selection)
    print("\n".join(lines))
    log(f"gfnlm: table in {os.path.join(out, 'table.md')}")
    return 0

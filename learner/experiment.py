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
seeds to a table without training the finished ones again, `--seeds 2` trains seed 2 alone and the
finished runs of the other seeds there join its table, and an experiment stopped midway resumes
the run it stopped in from its last checkpoint. A run folder that holds anything else is moved aside
(`<run>.replaced-<time>`) before the run trains there.

`--runs gflownet,sft` trains only those runs (and their selection candidates; `gflownet/floor250_t1.0`
names one candidate alone), so that several processes on one machine can share one --out, each
training its own part. Runs not named join that call's table where they finished there with the
same config, and are left out of it (with a line saying so) where not. In a run's overrides `{out}`
and `{seed}` stand for the experiment's folder and the run's seed, so that one run may start from an
earlier run's adapter (`lora.init={out}/sft-seed{seed}`; list it after that run). A run whose selection
candidates have not all finished has no candidate chosen yet, and its table runs are left out until
a later call; table.md lists the candidates that finished, with their scores and eval.md, and those
it waits for. A run trains under a lock (<out>/.locks/<run>-seed<k>.lock), so a call that meets a run
another process is training leaves it alone. Only a plain call once every part has finished writes
the complete table and its total wall time; each run keeps its own wall time in its folder
(`wall_seconds.txt`) for it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import tempfile

import yaml

from gfnlm.configs import ConfigError, load_config
from gfnlm.configs.load import resolve_path

from .experiment_runs import flat, previous_walls, readable, train_or_reuse, write_atomically
from .selection import (TRAINED_IN, best, bounds_text, check_select, figure, missed, reuse_selection, run_overrides,
                        selection_plan)


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
            ov = [*spec["overrides"], *run_overrides(run, out, seed), *picked, f"learner.seed={seed}",
                  "run.output_dir=" + os.path.join(out, f"{run['name']}-seed{seed}"),
                  f"eval.baselines=[{', '.join(baselines)}]", f"eval.include_base={'true' if baselines else 'false'}", *extra,
                  *pinned]
            plan.append((run["name"], seed, load_config(spec["config"], ov), methods))
    return plan


NUMBER_KEYS = ("valid_fraction", "kl", "tv", "exact_kl", "exact_tv", "exact_invalid_mass")
"""The columns of a random-number table (its evaluation nests the exact figures under 'exact')."""


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
    for prefix in ("acc_", "steps_"):  # answer tasks: accuracy per test set, then calculator steps per rationale
        keys += sorted({k for r in table.values() for k in r if k.startswith(prefix)})
    keys += [k for k in ("z_distinct", "z_top_share") if any(k in r for r in table.values())]  # latent Z: how varied
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
    if not table:
        lines[-2:] = ["No run of this table has finished yet."]
    for run, e in (selection or {}).items():
        if "chosen" not in e:  # candidates still to finish: what those that did scored, and where
            seed = spec["select_seed"]
            done = ", ".join(f"{c} {v:.4g} ({os.path.join('select', run, f'{c}-seed{seed}', 'eval.md')})"
                             for c, v in e["scores"].items())
            lines += ["", f"{run}: nothing chosen yet on the validation split (seed {seed}, {e['goal']} "
                          f"{e['metric']}); " + (f"finished: {done}; " if done else "")
                      + f"not finished: {', '.join(e.get('missing', []))}"]
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


def seeds_left_out(out: str, spec: dict) -> list[int]:
    """The seeds, outside this call's, of the finished runs (<run>-seed<k>/eval.json) that `out` holds:
    they join the table without training (those whose config is the call's)."""
    names = {r["name"] for r in spec["runs"]}
    found = set()
    for entry in os.listdir(out) if os.path.isdir(out) else []:
        run, sep, seed = entry.rpartition("-seed")
        if sep and run in names and seed.isdigit() and os.path.isfile(os.path.join(out, entry, "eval.json")):
            found.add(int(seed))
    return sorted(found - set(spec["seeds"]))


def main(args, reuse_only: bool = False) -> int:
    """Train the experiment's runs that are this call's (all, or --runs / --seeds), reuse the finished
    ones, and write table.md. `reuse_only`: train nothing, only assemble the table from what finished."""
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
    asked = list(spec["seeds"])
    joining = seeds_left_out(out, spec)
    if joining:  # finished runs of other seeds join the table as --runs' others do; only --seeds train
        spec["seeds"] = sorted({*asked, *joining})

    def trains(run: str, cand: str | None = None, seed: int | None = None) -> bool:
        named = wanted is None or (run, None) in wanted or (cand is not None and (run, cand) in wanted)
        return named and (seed is None or seed in asked) and not reuse_only

    left_out, trained_here = [], []  # runs not finished when this call looked at them; runs this call trained

    def log(m: str) -> None:
        print(m, file=sys.stderr)

    extra = list(args.override)
    if joining:
        log(f"gfnlm experiment {name}: {out} holds finished runs of seeds {joining} besides --seeds {','.join(map(str, asked))}: "
            f"they join the table where their config is this call's (nothing of them trains); another --out makes a table "
            f"of --seeds alone")
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
            results = train_or_reuse(cfg, ["trained"], key, walls, before, log, trains(run, cand), trained=trained_here)
        except TrainingStopped as e:
            log(f"gfnlm experiment {name}: stopped by {e} during {key}; no table yet")
            return 0
        if results is None:
            entry.setdefault("missing", []).append(cand)
            left_out.append(key)
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
    mine = sum(trains(p[0], seed=p[1]) for p in plan)
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
            results = train_or_reuse(cfg, methods, key, walls, before, log, trains(run, seed=seed),
                                     setup=(lambda: reuse_selection(cfg, chosen_cfgs[run], log)) if first else None,
                                     trained=trained_here)
        except TrainingStopped as e:
            log(f"gfnlm experiment {name}: stopped by {e} during {key}; {os.path.join(out, 'table.md')} "
                f"holds the runs that finished")
            return 0
        if results is not None:
            add(run, results, cfg)
            write_table(spec, name, out, every, rows, walls, sum(walls.values()), selection)  # after every run
        else:
            left_out.append(key)
    if left_out and trained_here and not reuse_only:  # another process sharing --out may have finished them meanwhile
        log(f"gfnlm experiment {name}: looking again at the runs other processes train ({', '.join(left_out)})")
        return main(args, reuse_only=True)
    lines = write_table(spec, name, out, every, rows, walls, sum(walls.values()), selection)
    print("\n".join(lines))
    log(f"gfnlm: table in {os.path.join(out, 'table.md')}")
    return 0

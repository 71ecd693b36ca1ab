"""The runs of an experiment (`gfnlm experiment`): whether a run folder holds a finished run of a
config (`finished`), how a folder is prepared to train or resume, each run's wall time in its
folder, and the lock under which one process at a time trains a run (`train_or_reuse`)."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time

from gfnlm.configs import ConfigError, load_config
from gfnlm.rewards.evaluation import methods_of

from .locks import file_lock


WALL_FILE = "wall_seconds.txt"
"""A run's wall time as the experiment measured it (training and evaluation), in its folder."""


def same_config(cfg) -> bool:
    """cfg.run.output_dir holds a run of this very config: its config.yaml as training saves it
    (fitted reward model in place, job named, fields added since then at their defaults). The folder
    it names is not compared: a run folder moved or copied elsewhere (with its name) is the same run."""
    try:
        saved = load_config(os.path.join(cfg.run.output_dir, "config.yaml")).model_dump(mode="json")
    except (OSError, ValueError, ConfigError):
        return False
    return without(saved, FOLDER) == without(saved_form(cfg), FOLDER)


FOLDER = (("run", "output_dir"),)
"""Where a run's folder sits in its config: where it happened to train, not what it trained."""


def without(form: dict, paths) -> dict:
    """A config's dumped form (a copy) without the fields at `paths` (tuples of keys)."""
    form = dict(form)
    for path in paths:
        node = form
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = node = dict(node[key])
        else:
            node.pop(path[-1], None)
    return form


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


def previous_walls(out: str) -> dict[str, float]:
    """The wall seconds of the runs an earlier table.json in `out` recorded (reused runs keep theirs)."""
    try:
        with open(os.path.join(out, "table.json")) as f:
            return dict(json.load(f).get("wall_seconds", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def flat(figures: dict) -> dict:
    """A method's figures with nested ones (random numbers' exact distribution) as exact_<name>."""
    out = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    for k, v in figures.items():
        if isinstance(v, dict):
            out.update({f"{k}_{name}": x for name, x in v.items() if isinstance(x, (int, float))})
    return out


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


def run_lock(folder: str):
    """A context yielding True while this process holds the run folder's lock (<out>/.locks/<run>.lock),
    False when another process holds it: no two processes sharing an --out train one run."""
    folder = folder.rstrip(os.sep)
    return file_lock(os.path.join(os.path.dirname(folder) or ".", ".locks", os.path.basename(folder) + ".lock"), wait=False)


def train_or_reuse(cfg, methods: list[str], key: str, walls: dict, before: dict, log, mine: bool, setup=None,
                   trained: list | None = None):
    """One run's figures: reused where it finished with this config, else trained when it is this
    call's to train (`mine`), under its lock (`setup`: how a fresh folder may start, e.g.
    `reuse_selection`); None, with a line saying why, when it is not this call's or another process is
    training it. The wall time of a trained run is saved in its folder, and its key appended to
    `trained`. Raises TrainingStopped."""
    from .runner import train_and_evaluate

    results = finished(cfg, methods)
    if results is None and not mine:
        log(f"gfnlm experiment: {key} has not finished in its folder with this config (not this call's to train: "
            f"not in --runs or --seeds): left out of this call")
        return None
    if results is None:
        with run_lock(cfg.run.output_dir) as held:
            if not held:
                log(f"gfnlm experiment: {key} is being trained by another process (its lock is held): left out of this call")
                return None
            results = finished(cfg, methods)  # it may have finished while this call looked
            if results is None:
                from .preflight import check_init

                check_init(cfg)  # e.g. the earlier run whose adapter this one starts from has finished
                t0 = time.perf_counter()
                resume = prepare_folder(cfg, log)
                if not resume and setup is not None:
                    resume = setup()
                results = train_and_evaluate(cfg, cfg.run.output_dir, resume=resume, methods=methods)
                walls[key] = time.perf_counter() - t0
                save_wall(cfg.run.output_dir, walls[key])
                if trained is not None:
                    trained.append(key)
                return results
    log(f"gfnlm experiment: {key} finished before with this config; its eval.json is reused")
    wall = stored_wall(cfg.run.output_dir, key, before)
    if wall is not None:
        walls[key] = wall
    return results

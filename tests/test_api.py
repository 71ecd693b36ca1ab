"""The Python API (gfnlm.train, resume, evaluate, sample, predict) as a user's script calls it, from a
folder that has its own `configs` package, against the command line on the same run."""

import json
import os
import subprocess
import sys

import pytest

import gfnlm
from gfnlm.learner.cli import main

from conftest import tiny_overrides

SCRIPT = '''
import json, sys
import configs                      # the user's own package, beside gfnlm's
import gfnlm

overrides = json.loads(sys.argv[1])
run = gfnlm.train("random_number", overrides, run_dir="run")
lines = gfnlm.sample("run", "Pick a number: ", n=4)
print(json.dumps({"mine": configs.MINE, "dir": run.dir, "results": run.results, "lines": lines}))
'''


def test_a_users_script_trains_and_samples_and_the_command_line_agrees(tiny_llama, tmp_path, capsys, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("MINE = 'the user owns this package'\n")
    (tmp_path / "script.py").write_text(SCRIPT)
    ov = [o for o in tiny_overrides(tiny_llama, "unused", **{"learner.steps": 2}) if not o.startswith("run.output_dir")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "script.py", json.dumps(ov)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["mine"] == "the user owns this package" and got["dir"] == "run"
    assert {"base", "trained"} <= set(got["results"]) and 0 <= got["results"]["trained"]["valid_fraction"] <= 1
    assert len(got["lines"]) == 4 and all(set(line) >= {"z", "tokens", "log_q", "log_r"} for line in got["lines"])

    # the command line on the same run: the same samples (the sampler is seeded by the run's seed)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert main(["sample", str(run), "--prompt", "Pick a number: ", "-n", "4"]) == 0
    cli_lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert cli_lines == got["lines"]
    assert gfnlm.sample(str(run), "Pick a number: ", n=4) == cli_lines

    # evaluation: the API's figures are the ones `gfnlm eval` writes
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "cli-eval")]) == 0
    figures = gfnlm.evaluate(str(run), out=str(tmp_path / "api-eval"), log=lambda m: None)
    cli = json.loads((tmp_path / "cli-eval" / "eval.json").read_text())
    def timeless(results):  # the figures without the seconds each method took
        return {m: {k: v for k, v in f.items() if k != "seconds"} for m, f in json.loads(json.dumps(results)).items()}

    assert timeless(figures) == timeless(cli) and cli["trained"]["samples"] == 20 and "seconds" in cli["trained"]

    # resume continues the run from its checkpoint to the new step count
    resumed = gfnlm.resume(str(run), ["learner.steps=3", "run.evaluate_at_end=false"])
    assert resumed.dir == str(run) and resumed.results is None and resumed.stopped is None
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_the_api_refuses_as_the_command_line_does(tmp_path):
    with pytest.raises(gfnlm.ConfigError, match="learner.stepz: unknown key; did you mean steps"):
        gfnlm.load_config({"base": "random_number", "learner": {"stepz": 3}})
    cfg = gfnlm.load_config({"base": "random_number", "learner": {"steps": 3}}, ["learner.lr=1e-4"])
    assert (cfg.task.type, cfg.learner.steps, cfg.learner.lr) == ("random_number", 3, 1e-4)
    assert gfnlm.load_config(cfg, ["learner.steps=4"]).learner.steps == 4  # a Config, with overrides on top
    with pytest.raises(gfnlm.ConfigError, match="resume: .*config.yaml not found"):
        gfnlm.resume(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        gfnlm.sample(str(tmp_path), "x")
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        gfnlm.trian

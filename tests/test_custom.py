"""Your own posterior: task custom with a reward function from the user's own folder (which has its
own `configs/` package, as ML repositories often do), trained end to end; a function that raises,
returns NaN or the wrong count, or cannot be imported is a one-line error."""

import json
import math

import pytest

from gfnlm.learner.cli import main

from conftest import tiny_overrides

REWARD = '''
def log_reward(texts, records):
    """Prefer Z of three characters that contain the record's letter."""
    return [-abs(len(t) - 3) + (2.0 if r["letter"] in t else 0.0) for t, r in zip(texts, records)]


def boom(texts, records):
    raise ValueError("the classifier is not loaded")


def not_a_number(texts, records):
    return [float("nan")] * len(texts)


def too_few(texts, records):
    return [0.0]
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's folder: their own `configs` and `rewards` packages (names gfnlm's layers have too), their
    reward module, their prompts, a config."""
    for name in ("configs", "rewards"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("SETTING = 'the user owns this package'\n")
    (tmp_path / "myreward.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {c}:", "letter": c}) + "\n"
                                                    for c in "abcd"))
    (tmp_path / "custom.yaml").write_text(
        'task: {type: custom, data: {train: prompts.jsonl}, prompt_template: "{prompt}", max_len: 6}\n'
        'reward: {function: "myreward:log_reward"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def flags(model_dir, run, *extra):
    ov = [o for o in tiny_overrides(model_dir, run) if not o.startswith("task.")]
    ov += ["runtime.mode=local", "batch.prompts_per_step=2", "batch.samples_per_prompt=4", "batch.on_policy=0.5",
           "batch.tempered=0.25", "batch.replay=0.25", "replay.seed_with_support=false",
           "eval.samples_per_record=3", "eval.baselines=[sample]", *extra]
    return sum([["-o", o] for o in ov], [])


def test_a_users_reward_function_trains_end_to_end_beside_their_own_configs_package(tiny_llama, project, capsys):
    assert main(["check", "custom.yaml"]) == 0
    assert "task custom: 3 train, 0 validation and 1 test records" in capsys.readouterr().err  # 10 % held out
    run = project / "run"
    assert main(["train", "custom.yaml", *flags(tiny_llama, run)]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    result = json.loads((run / "eval.json").read_text())
    assert result["split"] == "test" and result["records"] == [3] and {"trained", "sample"} <= set(result["methods"])
    assert all(math.isfinite(m["log_r_mean"]) for m in result["methods"].values())
    # log R of every prefix that can end is the user's value of that prefix's text, as a finished Z
    from gfnlm.configs import load_config
    from gfnlm.learner.loop import build
    from gfnlm.actors.trajectory import Trajectory
    import myreward

    c = build(load_config("custom.yaml", [a for a in flags(tiny_llama, project / "r2") if a != "-o"]))
    tok = c.task.tokenizer
    rid = next(r for r in c.task.train_ids if c.task.records[r].fields["letter"] == "b")
    t = Trajectory(rid, list(tok("xbyz", add_special_tokens=False).input_ids), terminated=True)
    c.task.score([t])
    for i in range(t.length + 1):
        text = tok.decode(t.tokens[:i])
        expected = myreward.log_reward([text], [{"prompt": "Say b:", "letter": "b"}])[0] if i >= 1 else c.task.floor
        assert t.log_r[i] == pytest.approx(expected)


@pytest.mark.parametrize("function, message", [
    ("myreward:boom", "reward.function myreward:boom raised ValueError: the classifier is not loaded (record "),
    ("myreward:not_a_number", "reward.function myreward:not_a_number: returned nan for "),
    ("myreward:too_few", "reward.function myreward:too_few: returned 1 values for "),
])
def test_a_reward_function_that_misbehaves_stops_the_run_with_one_line(tiny_llama, project, capsys, function, message):
    code = main(["train", "custom.yaml", *flags(tiny_llama, project / "run", f"reward.function={function}")])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert [line for line in err.splitlines() if line.startswith("gfnlm: reward.function")] == [
        next(line for line in err.splitlines() if message in line)]


@pytest.mark.parametrize("function, message", [
    ("nomodule:log_reward", "reward.function: cannot import 'nomodule': ModuleNotFoundError"),
    ("myreward:missing", "reward.function: 'myreward' has no 'missing'"),
    ("elsewhere/r.py:log_reward", "reward.function: no file 'elsewhere/r.py'"),
    ("log_reward", "reward.function: expected 'module:function' or 'file.py:function'"),
])
def test_check_refuses_a_reward_function_it_cannot_load(project, capsys, function, message):
    assert main(["check", "custom.yaml", "-o", f"reward.function={function}"]) == 2
    assert message in capsys.readouterr().err


def test_a_reward_function_given_by_file_path(tiny_llama, project, capsys):
    assert main(["check", "custom.yaml", "-o", "reward.function=./myreward.py:log_reward"]) == 0
    assert main(["check", "continuation.yaml", "-o", "reward.function=myreward:log_reward"]) == 2
    assert "only task custom takes a reward function" in capsys.readouterr().err


def test_a_users_reward_function_runs_in_the_ray_actors_that_score(tiny_llama, project):
    """On Ray the sampler actors score (the reward colocated with them): the user's module is imported
    there from the same folder, where Ray puts the working directory first on its workers' path, beside
    the user's own `configs` and `rewards` packages (gfnlm's are gfnlm.configs and gfnlm.rewards)."""
    run = project / "run"
    assert main(["train", "custom.yaml", *flags(tiny_llama, run, "runtime.mode=ray", "learner.steps=2",
                                                 "run.evaluate_at_end=false")]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_the_rationale_preset_trains_on_a_users_csv_without_python(tiny_llama, project, capsys):
    """configs/rationale.yaml: a latent rationale between the user's question and answer columns,
    the reward the frozen LM with the preset's templates; a missing CSV is one line naming it."""
    assert main(["check", "rationale"]) == 2
    assert "questions.csv: no such data file" in capsys.readouterr().err
    rows = [("How many legs does a cat have?", "4"), ("Is snow cold?", "yes"), ("What is 2 + 3?", "5"),
            ("What do cows drink?", "water"), ("Is the moon a planet?", "no"), ("What colour is grass?", "green")]
    (project / "questions.csv").write_text("question,answer\n" + "".join(f'"{q}",{a}\n' for q, a in rows))
    assert main(["check", "rationale"]) == 0
    assert "task infilling: 5 train, 0 validation and 1 test records (columns question, answer)" in capsys.readouterr().err
    run = project / "run"
    assert main(["train", "rationale", *flags(tiny_llama, run, "eval.baselines=[sample]", "task.max_len=4")]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    result = json.loads((run / "eval.json").read_text())
    assert result["records"] == [5] and {"trained", "sample"} <= set(result["methods"])
    assert all(math.isfinite(m["loglik_mean"]) for m in result["methods"].values())

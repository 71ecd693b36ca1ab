"""Training on a tiny random model: what changes, what must not, checkpoints, the CLI."""

import json
import os

import math
import re

import pytest
import torch

from gfnlm.configs import load_config
from gfnlm.learner.cli import main
from gfnlm.learner.loop import build, collect, train

from conftest import GPT2_TARGETS, tiny_overrides


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_moves_lora_only_and_lowers_the_loss(kind, tiny_llama, tiny_gpt2, tmp_path):
    model_dir, targets = (tiny_llama, None) if kind == "llama" else (tiny_gpt2, GPT2_TARGETS)
    ov = tiny_overrides(model_dir, tmp_path / "run", **({"lora.target_modules": "[" + ",".join(targets) + "]"} if targets else {}))
    cfg = load_config("random_number.yaml", ov + ["learner.steps=15"])
    c = build(cfg)
    named = dict(c.policy.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    _, fixed = collect(c, [0], 1.0)
    with torch.no_grad():
        loss0 = c.learner.loss(fixed, 1.0)[0].item()

    c = train(cfg, str(tmp_path / "run"))
    named = dict(c.policy.model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and len(lora) < len(named)
    assert all(not torch.equal(named[n], before[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(named[n], before[n]) for n in named if "lora_" not in n)
    with torch.no_grad():
        loss1 = c.learner.loss(fixed, 1.0)[0].item()
    assert loss1 < loss0


def test_resume_continues_exactly(tiny_llama, tmp_path):
    ov = tiny_overrides(tiny_llama, tmp_path / "a", **{"batch.tempered": 0.25, "batch.on_policy": 0.25})
    train(load_config("random_number.yaml", ov + ["learner.steps=4"]), str(tmp_path / "a"))
    ov_b = tiny_overrides(tiny_llama, tmp_path / "b", **{"batch.tempered": 0.25, "batch.on_policy": 0.25})
    train(load_config("random_number.yaml", ov_b + ["learner.steps=2"]), str(tmp_path / "b"))
    train(load_config("random_number.yaml", ov_b + ["learner.steps=4"]), str(tmp_path / "b"), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)


def test_cli_train_then_eval(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "random_number.yaml"]
    for o in tiny_overrides(tiny_llama, run):
        args += ["-o", o]
    assert main(args) == 0
    for f in ["config.yaml", "metrics.jsonl", "eval.json", "eval.png", "checkpoints/latest"]:
        assert (run / f).exists(), f
    figures = json.loads((run / "eval.json").read_text())
    assert set(figures) == {"base", "trained"} and figures["trained"]["samples"] == 20
    exact = figures["trained"]["exact"]  # the exact terminal distribution beside the sampled figures
    assert exact["valid_mass"] + exact["invalid_mass"] == pytest.approx(1.0) and exact["kl"] >= 0
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    # the adapter is a plain peft folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(ckpt / "adapter"))

    # eval of that adapter on its own, into another folder
    out = tmp_path / "eval"
    assert main(["eval", "--run", str(run), "--out", str(out), "-o", "eval.include_base=false"]) == 0
    assert set(json.loads((out / "eval.json").read_text())) == {"trained"}
    printed = capsys.readouterr()
    assert re.search(r"trained: exact: valid [0-9.]+%  KL\(target‖policy\) [0-9.]+  TV [0-9.]+  invalid mass [0-9.]+",
                     printed.out + printed.err)

    # running again into the same folder is refused, and nothing there is touched
    stamp = (run / "metrics.jsonl").read_text()
    assert main(args) == 2
    assert (run / "metrics.jsonl").read_text() == stamp
    # resume of a finished run with more steps continues it
    assert main(["train", "--resume", str(run), "-o", "learner.steps=4", "-o", "run.evaluate_at_end=false"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_cli_errors_are_one_line(tiny_llama, tmp_path, capsys):
    assert main(["train", "random_number.yaml", "-o", "learner.lr=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "learner.lr" in err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["eval", "random_number.yaml", "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_evaluation_sampler_has_the_configured_tools(tiny_llama, tmp_path):
    from gfnlm.learner.loop import eval_sampler

    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path / "run") + [
        "sampler.tools=[{kind: calculator, trigger: '='}]", "sampler.engine=transformers"])
    c = build(cfg, engine=False)
    assert eval_sampler(c).tools is not None and eval_sampler(c).tools.tools[0].trigger == "="


def test_valid_is_one_definition_for_training_and_evaluation(tiny_llama, tmp_path):
    from gfnlm.actors.trajectory import Trajectory
    from gfnlm.learner.loop import valid_counts

    c = build(load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path / "run")))
    tok = c.policy.tokenizer
    seven = tok.encode("7", add_special_tokens=False)
    fresh = [Trajectory(0, seven, terminated=True), Trajectory(0, seven, terminated=False),  # cut at max_len
             Trajectory(0, tok.encode("07", add_special_tokens=False)), Trajectory(0, seven, source="replay")]
    assert valid_counts(c.task, fresh) == (1, 3)
    assert [c.task.is_valid(t) for t in fresh[:3]] == [c.task.sample_value(t) is not None for t in fresh[:3]]


def test_every_run_draws_its_curves_and_gfnlm_plot_reads_a_run_in_progress(tiny_llama, tmp_path, capsys):
    from gfnlm.learner.curves import PANELS, read_metrics

    run = tmp_path / "run"
    train(load_config("random_number.yaml", tiny_overrides(tiny_llama, run) + ["eval.track_every=1"]), str(run))
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # mid-run: a line still being written is skipped, the figure is drawn from the whole ones
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    assert main(["plot", str(run), "--out", str(tmp_path / "mid.png")]) == 0
    assert (tmp_path / "mid.png").stat().st_size > 10_000
    keys = {k for _, series, _ in PANELS for k, _ in series}
    logged = set(json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    assert {"loss", "mean_log_r", "max_log_r", "valid_fraction", "lr", "reward_temperature",
            "samples_per_second", "replay_size", "exact_kl", "exact_tv", "invalid_mass"} <= keys & logged
    assert all(0 <= json.loads(line)["invalid_mass"] <= 1 for line in (run / "metrics.jsonl").read_text().splitlines()[:3])
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_learning_rate_schedules():
    from gfnlm.configs.schema import LearnerConfig
    from gfnlm.learner.trainer import lr_factor

    const = LearnerConfig(steps=100, warmup_steps=10)
    assert [lr_factor(s, const) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    cos = LearnerConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cos) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0) and f[99] == pytest.approx(0.1)
    assert f[10 + 89 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (89 // 2) / 89)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_lora_init_starts_from_an_earlier_runs_adapter_and_is_checked_first(tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from gfnlm.actors import engines
    from gfnlm.actors.engines import SamplerSpec
    from gfnlm.configs import ConfigError
    from gfnlm.learner import api

    first = tmp_path / "sft"
    train(load_config("random_number.yaml", tiny_overrides(tiny_llama, first, **{"learner.steps": 2})), str(first))
    with open(first / "checkpoints" / "latest") as f:
        saved = load_file(str(first / "checkpoints" / f.read().strip() / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: not the zero update

    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path / "next", **{"lora.init": str(first)}))
    state = build(cfg).policy.adapter_state()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)  # the run folder's latest adapter, in float32
    fresh = build(load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path / "zero"))).policy.adapter_state()
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_B" in k)

    # the vLLM engine holds its own weights: version 0 is the init adapter, not the bare base model
    loaded = []
    monkeypatch.setattr(engines, "resolve_engine", lambda *a: "vllm")
    monkeypatch.setattr("gfnlm.actors.vllm_engine.vllm_available", lambda: None)
    monkeypatch.setattr("gfnlm.actors.vllm_engine.build_llm", lambda *a, **k: object())
    monkeypatch.setattr("gfnlm.actors.vllm_engine.VLLMSampler.load_weights", lambda self, s, v: loaded.append((s, v)))
    engines.make_sampler(SamplerSpec.of(cfg), None, seed=0)
    assert len(loaded) == 1 and loaded[0][1] == 0 and all(torch.equal(loaded[0][0][k], saved[k]) for k in saved)
    monkeypatch.undo()

    # checked before anything starts, one line naming the field, nothing written
    for extra, says in [({"lora.init": str(tmp_path / "none")}, "lora.init: "),
                        ({"lora.init": str(first), "lora.r": 8}, "lora.r: the adapter in")]:
        out = tmp_path / f"refused{len(extra)}"
        with pytest.raises(ConfigError) as e:
            api.train("random_number.yaml", tiny_overrides(tiny_llama, out, **extra))
        assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)
        assert not out.exists()

    # a damaged newest checkpoint of that run is skipped, as when a run resumes: its intact one is the init
    import shutil

    from gfnlm.actors.models import init_adapter_dir
    from gfnlm.learner.preflight import check_init

    good = init_adapter_dir(str(first))
    shutil.copytree(os.path.dirname(good), first / "checkpoints" / "step_9999999")
    (first / "checkpoints" / "step_9999999" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 12)
    (first / "checkpoints" / "latest").write_text("step_9999999\n")
    assert init_adapter_dir(str(first)) == good
    check_init(cfg)

    # a run that started from it is evaluated and loaded from its own checkpoint, the init gone
    train(cfg, str(tmp_path / "next"))
    (tmp_path / "sft").rename(tmp_path / "moved")
    assert "trained" in api.evaluate(str(tmp_path / "next"), out=str(tmp_path / "eval"))
    from gfnlm.learner.amortized import load_run

    assert load_run(str(tmp_path / "next"))[0].lora.init is None

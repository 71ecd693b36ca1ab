"""Bad input refused before anything starts, in one line; checkpoints that cannot hurt (issue 11).

Each test reproduces one defect found by trying gfnlm as a new user would."""

import json
import os
import platform
import shutil
import socket

import pytest
import torch

from gfnlm.configs import ConfigError, load_config, validate
from gfnlm.learner.cli import main

from conftest import GPT2_TARGETS, tiny_overrides


def train_args(model, run, *extra, targets=None):
    args = ["train", "random_number.yaml"]
    ov = tiny_overrides(model, run, **({"targets": targets} if targets else {}))
    for o in [*ov, *extra]:
        args += ["-o", o]
    return args


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("gfnlm: ") or "Traceback" in ln]
    assert lines, err
    assert "Traceback" not in err, err
    return lines[-1]


# -- refused before anything starts ----------------------------------------------------------------


def test_too_many_samplers_for_a_private_ray_are_refused_at_once(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_llama, run, "runtime.mode=ray", "samplers.num_actors=1000")) == 2
    line = one_line(capsys)
    assert "samplers.num_actors" in line and "1000" in line and "CPUs" in line
    assert not run.exists()  # no folder, no Ray, no actor


def test_samplers_that_need_more_memory_than_the_machine_are_refused(tiny_llama, tmp_path):
    from gfnlm.learner.preflight import check_machine

    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path) + ["runtime.mode=ray", "samplers.num_actors=64",
                                                                                   "samplers.num_cpus=0.01"])
    with pytest.raises(ConfigError, match=r"samplers.num_actors: 64 samplers need about .* GiB"):
        check_machine(cfg, cores=2, memory=4 * 2**30)
    check_machine(cfg.model_copy(update={"samplers": cfg.samplers.model_copy(update={"num_actors": 2})}), cores=2,
                  memory=4 * 2**30)  # two fit


def test_bfloat16_weights_on_a_cpu_without_bfloat16_instructions_get_a_hint(tiny_llama, tmp_path):
    """bfloat16 weights are emulated on a CPU without AVX512-BF16 or AMX: slower than float32 there,
    so the run says so (and goes on); where the CPU has them, on CUDA, and in float32 it says nothing."""
    from gfnlm.learner.preflight import cpu_flags, dtype_note

    cfg = load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path) + ["model.dtype=bfloat16"])
    note = dtype_note(cfg, "cpu", flags={"avx2", "avx512f"})
    assert note.startswith("model.dtype: bfloat16 on a CPU without") and "model.dtype=float32" in note
    assert dtype_note(cfg, "cpu", flags={"avx512f", "avx512_bf16"}) is None
    assert dtype_note(cfg, "cpu", flags={"amx_bf16"}) is None
    assert dtype_note(cfg, "cuda", flags=set()) is None
    assert dtype_note(load_config("random_number.yaml", tiny_overrides(tiny_llama, tmp_path)), "cpu", flags=set()) is None
    if platform.system() == "Linux" and platform.machine() == "x86_64":  # read from /proc/cpuinfo's flags line
        assert "fpu" in cpu_flags()


def test_a_prompt_longer_than_the_context_stops_before_the_run_folder(tiny_gpt2, tmp_path, capsys):
    run = tmp_path / "run"
    long_prompt = "1 " * 200  # 400 characters: the tiny GPT-2 has 256 positions
    assert main(train_args(tiny_gpt2, run, f'task.prompts=["{long_prompt}"]', targets=GPT2_TARGETS)) == 2
    line = one_line(capsys)
    assert "task.max_len" in line and "256 positions" in line
    assert not run.exists()


def test_every_lora_target_must_match_a_layer(tiny_llama, tmp_path, capsys):
    assert main(train_args(tiny_llama, tmp_path / "run", "lora.target_modules=[q_prj, v_proj]")) == 2
    line = one_line(capsys)
    assert "lora.target_modules" in line and "'q_prj'" in line and "v_proj" in line
    assert not (tmp_path / "run").exists()


def test_resume_with_a_config_is_refused(tiny_llama, tmp_path, capsys):
    assert main(["train", "random_number.yaml", "--resume", str(tmp_path)]) == 2
    assert "not both" in one_line(capsys)


def test_defaults_validate_and_an_empty_file_has_its_own_message(tmp_path, capsys):
    cfg = validate({})
    assert cfg.replay.capacity_per_prompt >= 101  # holds the default task's support
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["check", str(empty)]) == 2
    assert "the file is empty" in one_line(capsys)


def test_any_trace_of_a_run_counts_and_nothing_is_overwritten(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: config\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(train_args(tiny_llama, run)) == 2
    assert "already holds a run (config.yaml, metrics.jsonl)" in one_line(capsys)
    assert (run / "config.yaml").read_text() == "old: config\n" and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_an_output_folder_under_a_file_is_refused(tiny_llama, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(train_args(tiny_llama, tmp_path / "afile" / "run")) == 2
    assert "run.output_dir" in one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_refused(tiny_llama, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(train_args(tiny_llama, locked / "run")) == 2
    assert "not writable" in one_line(capsys)


def test_config_paths_and_model_paths_say_what_they_are(tiny_llama, tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "is a directory" in one_line(capsys)
    (tmp_path / "bad.yaml").write_bytes(b"learner:\n  lr: \xff\n")
    assert main(["check", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: not UTF-8" in one_line(capsys)
    weights = os.path.join(tiny_llama, "config.json")
    assert main(train_args(tiny_llama, tmp_path / "run", f"model.path={weights}")) == 2
    assert "model.path" in (line := one_line(capsys)) and "is a file" in line and "-o model.path" in line


def test_an_override_error_names_the_override_not_the_file(tmp_path, capsys):
    assert main(["check", "random_number.yaml", "-o", "learner.lr=-1"]) == 2
    assert one_line(capsys).startswith("gfnlm: -o learner.lr=-1: learner.lr")
    with pytest.raises(ConfigError, match=r"^-o replay.capacity_per_prompt=3: replay.capacity_per_prompt \(3\)"):
        load_config("random_number.yaml", ["replay.capacity_per_prompt=3"])
    with pytest.raises(ConfigError, match=r"^-o batch.on_policy=0.9: batch: on_policy \+ tempered"):  # a section's check
        load_config("random_number.yaml", ["batch.on_policy=0.9"])
    own = tmp_path / "own.yaml"
    own.write_text("base: random_number.yaml\nreplay: {capacity_per_prompt: 3}\n")
    with pytest.raises(ConfigError, match=r"own.yaml: replay.capacity_per_prompt"):  # the file's own mistake
        load_config(str(own), ["learner.lr=1e-3"])


def test_a_busy_metrics_port_is_one_line(tiny_llama, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(train_args(tiny_llama, tmp_path / "run", f"metrics.port={port}", "metrics.port_range=1",
                               "metrics.host=127.0.0.1")) == 2
    assert "metrics.port: no free port" in one_line(capsys)


# -- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(tiny_llama, run, "learner.steps=4", "run.evaluate_at_end=false")) == 0
    return run


def copy_of(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_trainer_state_loads_with_weights_only(trained):
    ckpt = trained / "checkpoints" / "step_0000004"
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["learner"]["step"] == 4 and "numpy" in state["rng"]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    from gfnlm.learner.checkpoints import rng_state, set_rng_state

    g = torch.Generator().manual_seed(3)
    torch.save(rng_state(g), tmp_path / "rng.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g)))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), g)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g))) == want


@pytest.mark.parametrize("damaged", ["trainer.pt", "adapter/adapter_model.safetensors"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys, damaged):
    run = copy_of(trained, tmp_path)
    path = run / "checkpoints" / "step_0000004" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["train", "--resume", str(run), "-o", "run.evaluate_at_end=false"]) == 0
    out = capsys.readouterr()
    err = out.out + out.err
    assert f"step_0000004/{damaged}: cannot be read" in err and "resumed from" in err and "step_0000002 at step 2" in err
    assert sorted(json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()) == [1, 2, 3, 4]


def test_every_checkpoint_damaged_is_one_line(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / "trainer.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(run)]) == 2
    assert "no intact checkpoint" in one_line(capsys)


def test_resume_with_another_lora_rank_is_one_line(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    assert main(["train", "--resume", str(run), "-o", "lora.r=8"]) == 2
    assert "lora.r: the adapter in" in one_line(capsys)


def test_resume_of_a_run_without_checkpoint_says_so(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "configs", "random_number.yaml"), run / "config.yaml")
    assert main(["train", "--resume", str(run)]) == 2
    assert "has no checkpoint" in one_line(capsys)
    assert main(["eval", "--run", str(run)]) == 2
    assert "no checkpoint yet" in one_line(capsys)


def test_metrics_past_the_checkpoint_are_dropped_on_resume(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_0000004")  # as if killed after step 4's line, before its checkpoint
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    assert main(["train", "--resume", str(run), "-o", "run.evaluate_at_end=false"]) == 0
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_eval_uses_the_runs_own_config(trained, tmp_path, capsys):
    # the run was trained at rank 4; the preset says 16: the run's config.yaml decides
    assert main(["eval", "--run", str(trained), "--out", str(tmp_path), "-o", "eval.include_base=false"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["trained"]["samples"] == 20
    assert main(["eval", "random_number.yaml", "--run", str(trained)]) == 2
    assert "its own config.yaml" in one_line(capsys)

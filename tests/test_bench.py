"""`gfnlm bench` prints the figures the notes quote: each benchmark runs end to end on a tiny
model and its table adds up (no timing is asserted: speed lives in the printed figures)."""

import json
import re

import pytest

from gfnlm.learner.cli import main

from conftest import tiny_overrides


def tiny_bench(model_dir, tmp_path, config="infilling.yaml") -> list[str]:
    ov = tiny_overrides(model_dir, tmp_path / "run", targets=["q_proj", "v_proj"])
    if config == "infilling.yaml":  # short stories (the tiny model has 256 positions), short middles, the base model as the reward
        ov = [o for o in ov if not o.startswith("task.")]
        stories = tmp_path / "stories.jsonl"
        stories.write_text("".join(json.dumps({"beginning": f"Ann had {k} cats. They ran.", "middle": "One hid.",
                                               "ending": "She found it."}) + "\n" for k in range(6)))
        ov += [f"task.data={{train: {stories}, test_fraction: 0.3}}", "task.log_reward_floor=-500", "task.min_len=1",
               "task.max_len=6", "reward.fit=null"]
    return [a for o in ov for a in ("-o", o)]


def figure(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


def test_bench_learner_prints_the_prompt_sharing_speed_up(tiny_llama, tmp_path, capsys):
    assert main(["bench", "learner", "random_number.yaml", *tiny_bench(tiny_llama, tmp_path, "random_number.yaml"),
                 "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert figure(out, r"fp32 matmul 1024\^3: ([\d.]+) GFLOP/s") > 0
    shared = figure(out, r"prompt once per batch: .* in [\d.]+ s/update -> ([\d.]+) trajectories/s")
    repeated = figure(out, r"prompt repeated per sample: [\d.]+ s/update -> ([\d.]+) trajectories/s")
    assert figure(out, r"speed-up: x([\d.]+)") == pytest.approx(shared / repeated, rel=0.05)
    assert "many prompts, one row each: skipped" in out  # random numbers have no references


def test_bench_learner_times_sfts_many_prompts_both_ways(tiny_llama, tmp_path, capsys):
    """SFT's batch of references, one per story: a pass per prompt against the joined pass, and their ratio."""
    assert main(["bench", "learner", "infilling.yaml", *tiny_bench(tiny_llama, tmp_path), "-o", "runtime.mode=local",
                 "-o", "learner.objective=sft", "-o", "batch.prompts_per_step=4", "-o", "task.first_token=any", "-o", "task.max_len=12",
                 "--steps", "2"]) == 0  # the tiny tokenizer spells a space as a token; " One hid." is 9
    out = capsys.readouterr().out
    assert "many prompts, one row each (4 references, the sft update)" in out
    per_prompt = figure(out, r"a pass per prompt ([\d.]+) s/update")
    joined = figure(out, r"joined in one pass ([\d.]+) s/update")
    ratio = figure(out, r"joined in one pass [\d.]+ s/update -> x([\d.]+)")  # of the unrounded times
    assert (per_prompt - 5e-4) / (joined + 5e-4) - 0.01 <= ratio <= (per_prompt + 5e-4) / max(joined - 5e-4, 1e-9) + 0.01


def test_bench_training_accounts_for_every_stage_of_a_step(tiny_llama, tmp_path, capsys):
    assert main(["bench", "training", "infilling.yaml", *tiny_bench(tiny_llama, tmp_path), "-o", "runtime.mode=local",
                 "-o", "batch.prompts_per_step=2", "-o", "batch.samples_per_prompt=4", "--steps", "1",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): [float(x) for x in m.group(2, 3, 4)]
            for m in re.finditer(r"^  (\w+) +([\d.]+) +([\d.]+)% +(\d+) ", out, re.M)}
    assert set(rows) == {"sample", "score", "forward", "backward", "optimizer", "replay", "other"}
    assert sum(share for _, share, _ in rows.values()) == pytest.approx(100, abs=1)
    assert sum(s for s, _, _ in rows.values()) == pytest.approx(figure(out, r"step ([\d.]+) s;"), abs=0.05)
    assert rows["forward"][2] > 0 and rows["sample"][2] > 0 and rows["score"][2] > 0  # tokens each stage pushed
    steps = figure(out, r"1 steps of 2 records × 4 trajectories \((\d+) fresh")
    assert figure(out, r"trained trajectories/s ([\d.]+)") > 0 and steps > 0


def test_bench_scoring_matches_the_naive_reward(tiny_llama, tmp_path, capsys):
    assert main(["bench", "scoring", "infilling.yaml", *tiny_bench(tiny_llama, tmp_path), "--trajectories", "3",
                 "--length", "5", "--threads", "1", "--repeats", "1", "--naive-fraction", "1"]) == 0
    out = capsys.readouterr().out  # every trajectory also scored the naive way, one pass per prefix
    assert "(timed on 3 trajectories, scaled)" in out
    assert figure(out, r"largest difference ([\d.e+-]+) nats") < 1e-4


def test_bench_scoring_compares_bfloat16_with_float32(tiny_llama, tmp_path, capsys):
    assert main(["bench", "scoring", "infilling.yaml", *tiny_bench(tiny_llama, tmp_path), "--trajectories", "2",
                 "--length", "4", "--threads", "1", "--repeats", "1", "--bf16", "--records", "3",
                 "-o", "task.max_len=20"]) == 0  # the references whole
    out = capsys.readouterr().out
    assert figure(out, r"bfloat16, shared, every prefix +([\d.]+) s") > 0 and "of float32)" in out
    moved = re.search(r"on (\d+) training references \((\d+) scored prefixes\): log R moves by ([+-][\d.]+) ± ([\d.]+) "
                      r"nats \(largest ([\d.]+)\)", out)
    assert moved, out
    assert int(moved[1]) >= 2 and int(moved[2]) > int(moved[1])
    assert 0 < float(moved[5]) < 5, "bfloat16 rounds the rewards: they move, but by a few nats at most on a tiny model"

"""`gfnlm target`: the target R(Z)^(1/T) estimated by self-normalised importance sampling, checked
against exact means on a small discrete case, then end to end on a tiny model."""

import json
import math
import random

import pytest

from gfnlm.learner.cli import main
from gfnlm.rewards.target import ess, record_estimate, snis_weights

from conftest import tiny_overrides


def test_weights_are_the_target_over_the_proposal():
    """One draw of each of three Z (lengths 1, 2, 3) under a uniform proposal, R ∝ 1 : 2 : 3: the
    weights are R's shares, the target's mean length 14/6; at T = 0.5 the target is R² ∝ 1 : 4 : 9."""
    log_r, log_q = [math.log(1), math.log(2), math.log(3)], [math.log(1 / 3)] * 3
    assert snis_weights(log_r, log_q) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    f = record_estimate([1, 2, 3], log_r, log_q, 1.0)
    assert f["target_length"] == pytest.approx(14 / 6) and f["proposal_length"] == 2
    assert f["ess"] == pytest.approx(36 / 14) and f["target_log_r"] == pytest.approx((2 * math.log(2) + 3 * math.log(3)) / 6)
    assert record_estimate([1, 2, 3], log_r, log_q, 0.5)["target_length"] == pytest.approx((1 + 8 + 27) / 14)
    assert ess([1.0]) == 1 and ess([0.25] * 4) == pytest.approx(4) and snis_weights([], []) == []
    assert snis_weights([-1e4, -1e4 + 1], [0.0, 0.0]) == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)]), \
        "rewards far below zero (a floor of -1e4) do not underflow"


def test_draws_from_an_uneven_proposal_recover_the_targets_mean():
    """Draws from q = (0.5, 0.3, 0.2) over lengths 1, 2, 3, weighted towards R ∝ 1 : 2 : 3, give
    the target's mean length, not the proposal's (1.7)."""
    rng = random.Random(0)
    q, r = [0.5, 0.3, 0.2], [1.0, 2.0, 3.0]
    drawn = rng.choices([0, 1, 2], weights=q, k=20000)
    f = record_estimate([i + 1 for i in drawn], [math.log(r[i]) for i in drawn], [math.log(q[i]) for i in drawn], 1.0)
    assert f["target_length"] == pytest.approx(14 / 6, abs=0.03)
    assert f["proposal_length"] == pytest.approx(1.7, abs=0.03)
    assert 0.5 * 20000 < f["ess"] < 20000


def infilling_overrides(model_dir, tmp_path) -> list[str]:
    ov = [o for o in tiny_overrides(model_dir, tmp_path / "run", targets=["q_proj", "v_proj"]) if not o.startswith("task.")]
    stories = tmp_path / "stories.jsonl"
    stories.write_text("".join(json.dumps({"beginning": f"Ann had {k} cats. They ran.", "middle": "One hid.",
                                           "ending": "She found it."}) + "\n" for k in range(10)))
    return ov + [f"task.data={{train: {stories}, validation_fraction: 0.3}}", "task.log_reward_floor=-500",
                 "task.min_len=1", "task.max_len=20", "reward.fit=null"]  # a char-level model ends on "." about once in 100


def test_target_end_to_end_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "target.json"
    args = ["target", "infilling.yaml", *[a for o in infilling_overrides(tiny_llama, tmp_path) for a in ("-o", o)],
            "--draws", "24", "--records", "2", "--temperature", "1", "0.5", "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr()
    printed = said.out
    assert "gfnlm target: 1 of 2 records drawn and scored" in said.err, "a long estimate says how far it is"
    result = json.loads(out.read_text())
    assert result["proposal"] == "context", "auto: the reward LM's own context where the task has one"
    assert result["records"] >= 1 and result["records"] + len(result["records_without_an_ended_draw"]) == 2
    assert set(result["temperatures"]) == {"1", "0.5"}
    for est in result["temperatures"].values():
        for f in est["per_record"].values():
            assert 1 <= f["ess"] <= f["draws"] + 1e-9 and 1 <= f["draws"] <= 24, "only the draws that ended count"
            assert 1 <= f["target_length"] <= 20 and math.isfinite(f["target_log_r"])
    one, half = (result["temperatures"][t]["per_record"] for t in ("1", "0.5"))
    assert one.keys() == half.keys() and all(one[r]["proposal_length"] == half[r]["proposal_length"] for r in one), \
        "both temperatures weigh the same draws"
    assert all(half[r]["target_log_r"] >= one[r]["target_log_r"] - 1e-9 for r in one), "a lower T leans to higher R"
    assert printed.count("mean over records: target length") == 2 and "ESS mean" in printed


def test_a_proposal_the_task_cannot_give_is_one_line(tiny_llama, tmp_path, capsys):
    ov = tiny_overrides(tiny_llama, tmp_path / "run")
    assert main(["target", "random_number.yaml", *[a for o in ov for a in ("-o", o)], "--proposal", "context",
                 "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gfnlm: target: --proposal context: task random_number has no context")

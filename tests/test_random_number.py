"""The random-number task: targets, per-prefix rewards, seeds, and evaluation figures."""

import math

import pytest
from transformers import AutoTokenizer

from configs.tasks import RandomNumberTask as TaskCfg
from rewards import RandomNumberTask, log_target, number_metrics, parse_number


@pytest.mark.parametrize("target", [
    {"type": "uniform", "low": 3, "high": 9},
    {"type": "poisson", "rate": 4.0, "max_value": 30},
    {"type": "binomial", "n": 10, "p": 0.3},
    {"type": "geometric", "p": 0.2, "max_value": 50},
    {"type": "table", "weights": {1: 1.0, 5: 3.0}},
])
def test_targets_are_normalised(target):
    lp = log_target(TaskCfg(target=target).target)
    assert sum(math.exp(v) for v in lp.values()) == pytest.approx(1.0)


def test_target_values():
    lp = log_target(TaskCfg(target={"type": "binomial", "n": 2, "p": 0.5}).target)
    assert {v: round(math.exp(p), 6) for v, p in lp.items()} == {0: 0.25, 1: 0.5, 2: 0.25}
    lp = log_target(TaskCfg(target={"type": "table", "weights": {1: 1.0, 5: 3.0}}).target)
    assert math.exp(lp[5]) == pytest.approx(0.75)


def test_parse_number_is_canonical():
    assert parse_number("0") == 0 and parse_number("42") == 42
    for bad in ["", "07", " 7", "7 ", "4.2", "-1", "1e3", "x"]:
        assert parse_number(bad) is None


@pytest.fixture
def task(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return RandomNumberTask(TaskCfg(target={"type": "uniform", "low": 0, "high": 20}, max_len=2, log_reward_floor=-20), tok)


def test_every_prefix_is_scored(task):
    from actors.trajectory import Trajectory

    tok = task.tokenizer
    t = Trajectory(0, tok("15", add_special_tokens=False).input_ids)
    u = Trajectory(0, tok("x3", add_special_tokens=False).input_ids)
    v = Trajectory(0, tok("05", add_special_tokens=False).input_ids)
    task.score([t, u, v])
    uniform = -math.log(21)
    # "" is too short (min_len 1); "1" and "15" are in the support
    assert t.log_r == pytest.approx([-20, uniform, uniform])
    assert u.log_r == pytest.approx([-20, -20, -20])
    # "0" is a number, "05" is not canonical
    assert v.log_r == pytest.approx([-20, uniform, -20])


def test_support_seeds(task):
    seeds = task.seed_trajectories(0)
    assert sorted(task.value(t.tokens) for t in seeds) == list(range(21))
    assert all(t.source == "seed" and t.final_log_r == pytest.approx(-math.log(21)) for t in seeds)


def test_end_token_must_be_one_token(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="task.end_tokens"):
        RandomNumberTask(TaskCfg(end_tokens=[".\n"]), tok)


def test_metrics_on_a_hand_made_sample():
    # target uniform on {0, 1}; 6 samples: 0, 0, 0, 1, invalid, invalid
    log_p = {0: math.log(0.5), 1: math.log(0.5)}
    m = number_metrics([0, 0, 0, 1, None, None], log_p, smoothing=0.5)
    assert m["samples"] == 6 and m["valid"] == 4 and m["distinct"] == 2
    assert m["valid_fraction"] == pytest.approx(4 / 6)
    # empirical over valid: 3/4, 1/4 -> TV = 0.5 * (0.25 + 0.25) = 0.25
    assert m["tv"] == pytest.approx(0.25)
    # smoothed: (3 + 0.5) / (4 + 1) = 0.7, (1 + 0.5) / 5 = 0.3
    # KL = 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)
    assert m["kl"] == pytest.approx(0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    assert m["kl_unsmoothed"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))


def test_metrics_missing_values_and_all_invalid():
    log_p = {0: math.log(0.5), 1: math.log(0.5)}
    m = number_metrics([0, 0], log_p)
    assert m["never_drawn"] == 1 and m["kl_unsmoothed"] == math.inf and math.isfinite(m["kl"])
    m = number_metrics([None, None], log_p)
    assert m["valid_fraction"] == 0 and m["kl"] == math.inf and m["tv"] == 1.0


def test_a_floor_that_lets_invalid_strings_dominate_warns(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)  # 100 tokens
    # 100^3 = e^13.8 invalid strings at e^-5 each outweigh the valid mass of 1
    with pytest.warns(UserWarning, match="task.log_reward_floor=-5"):
        task = RandomNumberTask(TaskCfg(log_reward_floor=-5, max_len=3), tok)
    assert task.invalid_mass_fraction(len(tok)) > 0.99
    assert RandomNumberTask(TaskCfg(log_reward_floor=-50, max_len=3), tok).invalid_mass_fraction(len(tok)) < 1e-9

"""The random-number task: targets, per-prefix rewards, seeds, and evaluation figures."""

import math

import pytest
from transformers import AutoTokenizer

from gfnlm.configs.tasks import RandomNumberTask as TaskCfg
from gfnlm.rewards import RandomNumberTask, log_target, number_metrics, parse_number


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
    from gfnlm.actors.trajectory import Trajectory

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


# -- state flows and the exact terminal distribution --------------------------------------------


def _traj(tok, text):
    from gfnlm.actors.trajectory import Trajectory

    return Trajectory(0, tok(text, add_special_tokens=False).input_ids)


def test_prefix_flows_on_a_hand_worked_support(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)  # one token per character
    # R(10) = 1/4, R(12) = 1/4, R(25) = 1/2; the prefixes "1" and "2" are no members (floor -20)
    task = RandomNumberTask(TaskCfg(target={"type": "table", "weights": {10: 1, 12: 1, 25: 2}}, max_len=2,
                                    log_reward_floor=-20), tok)
    ids = {text: tuple(tok(text, add_special_tokens=False).input_ids) for text in ["1", "2", "10", "12", "25"]}
    flows = task.prefix_log_flows(1.0)
    assert set(flows) == {(), *ids.values()}
    assert flows[()] == pytest.approx(0.0)  # log (1/4 + 1/4 + 1/2)
    assert flows[ids["1"]] == pytest.approx(math.log(0.5)) and flows[ids["2"]] == pytest.approx(math.log(0.5))
    assert flows[ids["10"]] == pytest.approx(math.log(0.25)) and flows[ids["25"]] == pytest.approx(math.log(0.5))
    # tempered at T = 2: log Σ R^(1/2)
    assert task.prefix_log_flows(2.0)[()] == pytest.approx(math.log(2 * 0.5 + math.sqrt(0.5)))

    # per trajectory, relative to the empty prefix (whose flow the objective derives): known where
    # the prefix's own termination is (nearly) nothing of its flow — "2" (no member); derived from
    # the reward at "25" (its termination is its whole flow); "13" is off the support's prefixes
    for text, want in [("25", [None, math.log(0.5), None]), ("13", [None, math.log(0.5), None])]:
        t = _traj(tok, text)
        task.score([t])
        got = task.state_log_flows(t, 1.0)
        assert len(got) == 3
        for g, w in zip(got, want):
            assert math.isnan(g) if w is None else g == pytest.approx(w)
    # the rule is the share, not the floor: a member worth 1e-6 of its prefix's flow is still "known"
    peaked = RandomNumberTask(TaskCfg(target={"type": "table", "weights": {1: 1e-6, 10: 1, 12: 1}}, max_len=2,
                                      log_reward_floor=-20), tok)
    t = _traj(tok, "10")
    peaked.score([t])
    assert peaked.state_log_flows(t, 1.0)[1] == pytest.approx(math.log((2 + 1e-6) / (2 + 1e-6)))
    # state_flow: reward (the paper's modified SubTB) knows none
    plain = RandomNumberTask(TaskCfg(target={"type": "table", "weights": {10: 1, 12: 1, 25: 2}}, max_len=2,
                                     log_reward_floor=-20, state_flow="reward"), tok)
    assert plain.state_log_flows(t, 1.0) is None


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A tiny random Llama over digits, '.' and 'x', its logits scaled up so that it is peaked."""
    import torch
    from transformers import AutoModelForCausalLM

    from gfnlm.actors.tiny import build_model

    folder = str(tmp_path_factory.mktemp("digits"))
    build_model(folder, "llama", seed=4, chars=list("0123456789.x"))
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.lm_head.weight.mul_(10.0)
        model.save_pretrained(folder)
    return folder


def test_the_exact_distribution_is_the_sampled_histogram(digits_model):
    from collections import Counter

    from gfnlm.actors.policy import Policy
    from gfnlm.actors.sampler import TransformersSampler
    from gfnlm.configs.schema import LoraConfig, ModelConfig
    from gfnlm.rewards.random_number import exact_distribution, exact_figures

    tok = AutoTokenizer.from_pretrained(digits_model)
    # 10..30 in at most 2 tokens: "1", "2", "3" are prefixes but no members (⊤ there is early)
    task = RandomNumberTask(TaskCfg(prompts=["12"], target={"type": "uniform", "low": 10, "high": 30}, max_len=2,
                                    log_reward_floor=-20), tok)
    assert len(task.spellings) == 21
    policy = Policy(ModelConfig(path=digits_model), LoraConfig(r=2, target_modules=["q_proj"]))
    exact = exact_distribution(policy, task, 0)
    assert exact["early_mass"] > 0.01 and exact["valid_mass"] > 0.01
    assert exact["valid_mass"] + exact["invalid_mass"] == pytest.approx(1.0)

    n = 8000
    sampler = TransformersSampler(policy.model, "cpu", seed=0, pad_id=tok.pad_token_id)
    trajs = sampler.generate(0, task.prompt_ids(0), n, 1.0, task.min_len, task.max_len + 1, task.end_ids)
    prefixes = {tuple(tokens[:k]) for _, tokens in task.spellings for k in range(len(tokens))}

    def outcome(t):
        v = task.sample_value(t)
        if v is not None:
            return v
        return "early" if t.terminated and tuple(t.tokens) in prefixes else "other"

    counts = Counter(outcome(t) for t in trajs)
    probs = {**exact["p"], "early": exact["early_mass"], "other": exact["invalid_mass"] - exact["early_mass"]}
    # Pearson's chi-square over the cells expected at least 5 times (the rest pooled): far below
    # its 1e-6 tail for these degrees of freedom when the exact figures are the sampler's
    cells, rest_p, rest_c = [], 0.0, 0
    for k, p in probs.items():
        if n * p >= 5:
            cells.append((p, counts.get(k, 0)))
        else:
            rest_p, rest_c = rest_p + p, rest_c + counts.get(k, 0)
    cells.append((rest_p, rest_c))
    chi2 = sum((c - n * p) ** 2 / (n * p) for p, c in cells if p > 0)
    df = len(cells) - 1
    assert df >= 4, cells
    assert chi2 < df + 7 * math.sqrt(2 * df), (chi2, df, cells)
    assert sum(counts.values()) == n
    # the figures from it: KL over the valid mass, as the sampled KL is over valid samples
    fig = exact_figures(policy, task)
    assert fig["invalid_mass"] == pytest.approx(exact["invalid_mass"])
    cond = {v: exact["p"][v] / exact["valid_mass"] for v in task.log_p}
    assert fig["kl"] == pytest.approx(sum(math.exp(lp) * (lp - math.log(cond[v])) for v, lp in task.log_p.items()))

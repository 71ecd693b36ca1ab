"""Runs that learn the right thing: the exact terminal distribution reaches the (tempered) target,
TB's log Z trains and resumes, PPO raises the reward, and the learner's tensors equal hand-built ones.

The end-to-end checks use a tiny Llama over the characters "0123456789.: " (a 17-token vocabulary,
so invalid text cannot hide in a huge vocabulary) with the LoRA adapter on lm_head too: a randomly
initialised tiny model's output layer is so small (std 0.02) that an adapter on the blocks alone
cannot move its logits by more than ~0.6 nats, whatever it learns. The target is a skewed table over
0..9, far from both the model's start and the uniform distribution, so a run that ignores the
target or the temperature ends measurably elsewhere. Budgets (300 steps of 8 trajectories, ~9 s a
run) are the smallest at which the right and the wrong answer are separated by a factor ≥ 10
in KL (measured: KL(target ‖ q) 0.53 → 0.010 at T = 1 while KL(target² ‖ q) stays 0.21; at
T = 0.5, KL(target² ‖ q) 0.012 while KL(target ‖ q) is 0.33).
"""

import json
import math
import os

import pytest
import torch

from gfnlm.actors.tiny import build_model
from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs import ConfigError, load_config
from gfnlm.configs.schema import RewardTemperature
from gfnlm.learner.loop import build, collect, train
from gfnlm.learner.schedule import micro_batch
from gfnlm.learner.objectives import group_advantages
from gfnlm.learner.schedule import reward_temperature
from gfnlm.rewards.random_number import exact_distribution

from conftest import LLAMA_TARGETS, tiny_overrides

SKEWED = "{type: table, weights: {0: 16, 1: 8, 2: 4, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1}}"


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny-digits")), "llama", chars=list("0123456789.: "))


def digits_overrides(model, run_dir, *extra):
    return tiny_overrides(model, run_dir) + [
        'task.prompts=["5: "]', f"task.target={SKEWED}", "task.log_reward_floor=-20", "learner.lr=1e-3",
        "lora.target_modules=[" + ",".join(LLAMA_TARGETS + ["lm_head"]) + "]", "run.evaluate_at_end=false",
        "run.checkpoint_every=1000", *extra]


def tempered(log_p: dict[int, float], T: float) -> dict[int, float]:
    """log of target^(1/T), normalised."""
    w = {v: lp / T for v, lp in log_p.items()}
    z = math.log(sum(math.exp(x) for x in w.values()))
    return {v: x - z for v, x in w.items()}


def kl(log_target: dict[int, float], p: dict[int, float]) -> float:
    """KL(target ‖ policy restricted to the valid values)."""
    valid = sum(p.values())
    return sum(math.exp(lt) * (lt - math.log(p[v] / valid)) for v, lt in log_target.items())


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_a_run_reaches_its_tempered_target(T, tiny_digits, tmp_path):
    """q ∝ R^(1/T): at T = 1 the policy's exact distribution reaches the target, at T = 0.5 its
    square (normalised), each far closer to its own than to the other. The temperature comes from the
    schedule (1 → T over the first 50 of 300 steps), so the run also reads T from it every step."""
    run = str(tmp_path / "run")
    schedule = f"reward_temperature={{start: 1.0, end: {T}, horizon: 50}}"
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.steps=300", schedule))
    c = build(cfg)
    before = exact_distribution(c.policy, c.task, 0)
    c = train(cfg, run)
    after = exact_distribution(c.policy, c.task, 0)
    own, other = tempered(c.task.log_p, T), tempered(c.task.log_p, 1.5 - T)  # 1.5 - T: the other temperature
    assert kl(own, before["p"]) > 0.5 and before["invalid_mass"] > 0.9
    assert after["invalid_mass"] < 0.05, after
    assert kl(own, after["p"]) < 0.05, (kl(own, after["p"]), after["p"])
    assert kl(other, after["p"]) > 5 * kl(own, after["p"])
    sched = RewardTemperature(start=1.0, end=T, horizon=50)
    assert [r["reward_temperature"] for r in metrics(run)] == [reward_temperature(s - 1, sched) for s in range(1, 301)]


def test_reward_temperature_schedule():
    cfg = RewardTemperature(start=2.0, end=0.5, horizon=10)
    assert [reward_temperature(s, cfg) for s in (0, 5, 10, 20)] == [2.0, 1.25, 0.5, 0.5]
    assert reward_temperature(3, RewardTemperature()) == 1.0


def test_tb_trains_log_z_at_its_own_rate_and_resumes_it(tiny_digits, tmp_path):
    """TB: log Z moves by its own learning rate (Adam's first step moves a scalar by exactly lr), the
    run reaches the target, and a resumed run continues log Z and the losses exactly."""
    tb = "learner.objective={type: tb, log_z_lr: 0.05}"
    first = str(tmp_path / "first")
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, first, "learner.steps=1", tb)), first)
    assert abs(c.learner.objective.log_z.item()) == pytest.approx(0.05, rel=1e-3)
    groups = c.learner.optimizer.param_groups
    assert [g["lr"] for g in groups if any(p is c.learner.objective.log_z for p in g["params"])] == [0.05]

    full = str(tmp_path / "full")
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, full, "learner.steps=300", tb)), full)
    log_z = [r["log_z"] for r in metrics(full)]
    assert max(abs(z) for z in log_z) > 0.2  # it trained (0 is where it starts)
    after = exact_distribution(c.policy, c.task, 0)
    assert kl(c.task.log_p, after["p"]) < 0.2 and after["invalid_mass"] < 0.15, after

    part = str(tmp_path / "part")
    ov = ["run.checkpoint_every=5", tb]
    train(load_config("random_number.yaml", digits_overrides(tiny_digits, part, "learner.steps=10", *ov)), part)
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, part, "learner.steps=20", *ov)), part,
              resume=True)
    a = {r["step"]: r for r in metrics(full)}
    for r in metrics(part):
        assert r["loss"] == pytest.approx(a[r["step"]]["loss"], rel=1e-5, abs=1e-6), r["step"]
        assert r["log_z"] == pytest.approx(a[r["step"]]["log_z"], rel=1e-5, abs=1e-7), r["step"]


def test_tb_and_vargrad_keep_one_log_z_per_record(tiny_digits, tmp_path):
    """Two prompts: TB learns a table of two log Z (one per record, in metrics.jsonl with their spread),
    a shared scalar is refused before anything runs, and VarGrad (log Z from each record's samples in
    the batch) reaches the target with no parameter of its own."""
    two = 'task.prompts=["5: ", "7: "]'
    run = str(tmp_path / "tb")
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, run, two, "learner.steps=20",
                                                                  "learner.objective={type: tb, log_z_lr: 0.05}")), run)
    assert c.learner.objective.log_z.shape == (2,) and bool((c.learner.objective.log_z != 0).all())
    assert all("log_z" in r and "log_z_spread" in r for r in metrics(run))
    with pytest.raises(ConfigError, match="log_z: 'scalar' shares one log Z across the 2 training records"):
        build(load_config("random_number.yaml", digits_overrides(tiny_digits, run, two, "learner.objective={type: tb, log_z: scalar}")))
    run = str(tmp_path / "vargrad")
    # at lr 1e-3 or 5e-4 VarGrad reaches the target and then swings away again (invalid mass 0.12 -> 0.58 between
    # steps 200 and 600 at 5e-4, float noise deciding when); at 2.5e-4 it settles: KL 0.001 by step 700. Like TB
    # (the test above), it leaves ~12 % of the mass on invalid text here, where SubTB leaves ~1 %.
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.steps=700", "learner.lr=2.5e-4",
                                                                  "learner.objective=vargrad")), run)
    after = exact_distribution(c.policy, c.task, 0)
    assert kl(c.task.log_p, after["p"]) < 0.1 and after["invalid_mass"] < 0.15, after
    assert c.learner.objective.param_groups() == [] and "log_z" in metrics(run)[-1]


def test_tb_with_a_log_z_head_learns_one_per_prompt_and_resumes_exactly(tiny_digits, tmp_path):
    """log_z: head, a small MLP on the prompt's pooled hidden state under the frozen base: two prompts
    get two different log Z (their spread in metrics.jsonl), an unseen prompt gets one too, and a run
    resumed from a checkpoint continues the losses of the uninterrupted run."""
    two = 'task.prompts=["5: ", "7: "]'
    head = "learner.objective={type: tb, log_z: head, log_z_lr: 0.01}"
    both = "batch.prompts_per_step=2"  # both prompts in every batch: their spread is measured
    full = str(tmp_path / "full")
    c = train(load_config("random_number.yaml", digits_overrides(tiny_digits, full, two, head, both, "learner.steps=20")), full)
    rows = metrics(full)
    assert rows[-1]["log_z_spread"] > 0 and rows[-1]["log_z"] != 0
    obj = c.learner.objective
    with torch.no_grad():
        z = obj.head(c.learner.prompt_features(c.task, [0, 1]))
    assert z.shape == (2,) and abs(float(z[0] - z[1])) > 1e-4
    unseen = torch.stack([c.learner._features[next(iter(c.learner._features))] * 0 + 1.0])
    assert torch.isfinite(obj.head(unseen)).all()
    part = str(tmp_path / "part")
    ov = [two, head, both, "run.checkpoint_every=5"]
    train(load_config("random_number.yaml", digits_overrides(tiny_digits, part, "learner.steps=10", *ov)), part)
    train(load_config("random_number.yaml", digits_overrides(tiny_digits, part, "learner.steps=20", *ov)), part, resume=True)
    a = {r["step"]: r for r in metrics(full)}
    for r in metrics(part):
        assert r["loss"] == pytest.approx(a[r["step"]]["loss"], rel=1e-5, abs=1e-6), r["step"]
        assert r["log_z"] == pytest.approx(a[r["step"]]["log_z"], rel=1e-5, abs=1e-7), r["step"]


def test_ppo_raises_the_expected_reward(tiny_digits, tmp_path):
    """PPO maximises E[log R]: on the skewed target it leaves invalid text and piles onto one
    high-reward value (0 or 1 here, by the run's draws), unlike the GFlowNet's whole distribution."""
    run = str(tmp_path / "run")
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.steps=60", "learner.objective=ppo",
                                                             "batch.on_policy=1", "batch.replay=0"))

    def expected_log_r(c):
        d = exact_distribution(c.policy, c.task, 0)
        return sum(p * c.task.log_p[v] for v, p in d["p"].items()) + d["invalid_mass"] * c.task.floor, d

    before, _ = expected_log_r(build(cfg))
    after, d = expected_log_r(train(cfg, run))
    assert before < -15 and after > -3, (before, after, d)
    assert max(d["p"].values()) > 0.9  # a reward maximiser concentrates on a high-reward value


def test_ppo_advantages_see_the_reward_temperature(tiny_digits, tmp_path):
    run = str(tmp_path / "run")
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.objective={type: ppo, "
                                                             "normalize_advantages: false}", "batch.on_policy=1",
                                                             "batch.replay=0", "learner.steps=1"))
    c = build(cfg)
    _, batch = collect(c, [0], 1.0)
    for i, t in enumerate(batch):  # distinct final rewards in the record's group
        t.log_r = t.log_r[:-1] + [-1.5 * i]
    for T in (1.0, 0.25):
        c.learner.objective.plan([batch], c.policy, T)
        got = [c.learner.objective._rows[id(t)][0] for t in batch]
        want = group_advantages(torch.tensor([t.final_log_r / T for t in batch], dtype=torch.float64),
                                torch.tensor([t.record_id for t in batch]), normalize=False).tolist()
        assert got == pytest.approx(want, rel=1e-9)
        assert max(map(abs, got)) > 0


def test_learner_terms_equal_hand_built_tensors(tiny_digits, tmp_path):
    """`Learner.terms` groups a micro-batch by record (one prompt pass each), pads, divides log R by T
    and lays out the known state flows: compare with tensors built one trajectory at a time."""
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, tmp_path / "run", 'task.prompts=["5: ", "7: "]',
                                                             "task.target={type: uniform, low: 10, high: 30}"))
    c = build(cfg)
    tok = c.policy.tokenizer

    def traj(rid, text, tool=None):
        ids = [tok.convert_tokens_to_ids(ch) for ch in text]
        return Trajectory(rid, ids, tool_mask=tool or [])

    trajs = [traj(0, "12"), traj(1, "3"), traj(0, "25", [False, True]), traj(1, "")]
    c.task.score(trajs)
    T = 2.0
    terms = c.learner.terms(micro_batch(c.cfg, c.task, trajs), T)
    order = [trajs[0], trajs[2], trajs[1], trajs[3]]  # by record, in order of first appearance
    assert [id(t) for t in terms.trajectories] == [id(t) for t in order]
    width = max(t.length for t in trajs)
    assert terms.log_pf.shape == (4, width) and terms.log_pterm.shape == (4, width + 1)
    assert terms.lengths.tolist() == [2, 2, 1, 0]
    assert terms.tool_mask.tolist() == [[False, False], [False, True], [False, False], [False, False]]
    assert terms.terminated.tolist() == [True] * 4
    with torch.no_grad():
        for b, t in enumerate(order):
            pf, pt, _, _ = c.policy.logprobs(c.task.prompt_ids(t.record_id), [t], c.task.end_ids, c.task.banned_ids,
                                             c.task.ban_penalty)
            n = t.length
            torch.testing.assert_close(terms.log_pf[b, :n], pf[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(terms.log_pterm[b, : n + 1], pt[0], rtol=1e-5, atol=1e-5)
            # entries past a trajectory's end may hold anything (the objectives mask them): not checked
            want_r = torch.tensor(t.log_r, dtype=terms.log_r.dtype) / T
            torch.testing.assert_close(terms.log_r[b, : n + 1], want_r)
            assert terms.log_r[b, n + 1:].eq(0).all()
            flows = c.task.state_log_flows(t, T)
            got = terms.log_flow[b, : n + 1].tolist()
            assert [(math.isnan(x), None if math.isnan(x) else round(x, 5)) for x in got] == \
                [(math.isnan(x), None if math.isnan(x) else round(x, 5)) for x in flows]
            assert terms.log_flow[b, n + 1:].isnan().all()
    # "1" is no member of 10..30: its flow is known, log Σ R^(1/T) over 10..19 relative to the root's
    # over 10..30 (equal rewards: log 10/21 at any T)
    assert terms.log_flow[0, 1].item() == pytest.approx(math.log(10 / 21), abs=1e-5)
    # gradients reach the adapter through every row
    loss, _ = c.learner.objective.loss(c.learner.terms(micro_batch(c.cfg, c.task, trajs), T))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in c.policy.trainable_parameters())


def test_sft_is_the_references_nll_and_teaches_the_policy_to_write_them(tiny_llama, tmp_path):
    """SFT's loss is the mean negative log-likelihood per action of the records' reference Z and their ⊤
    (checked against plain full forward passes), and after training greedy decoding from each training
    record's prompt writes that record's own reference and ends it."""
    from gfnlm.actors.decoding import hf_generate
    from gfnlm.learner.loop import references

    rows = [{"beginning": "Ann had a dog.", "middle": "One day it ran.", "ending": "Ann was glad."},
            {"beginning": "Bo got a kite.", "middle": "At noon it blew.", "ending": "The kite flew."},
            {"beginning": "Cy baked bread.", "middle": "He used yeast.", "ending": "It rose."}]
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = [o for o in tiny_overrides(tiny_llama, tmp_path / "run") if not o.startswith("task.")]
    cfg = load_config("infilling.yaml", ov + [
        f"task={{type: infilling, data: {{train: {data}}}, min_len: 1, max_len: 24}}", "learner.objective=sft",
        "learner.steps=150", "batch.prompts_per_step=3", "run.evaluate_at_end=false", "run.checkpoint_every=1000",
        "lora.target_modules=[" + ",".join(LLAMA_TARGETS + ["lm_head"]) + "]", "learner.lr=1e-2"])
    c = build(cfg)
    assert c.replay.size() == 0  # the preset seeds replay with the references, but SFT never draws from it
    refs = references(c, c.task.train_ids)
    assert len(refs) == 3
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in refs:
            prompt = c.task.prompt_ids(t.record_id)
            logits = c.policy.model(input_ids=torch.tensor([prompt + t.tokens])).logits[0].float()
            logits[:, sorted(c.task.banned_ids)] = -float("inf")  # the policy's distribution has none of them
            for k in range(c.task.min_len):  # nor ⊤ before min_len: the samplers' q, renormalised
                logits[len(prompt) - 1 + k, c.task.end_ids] = -float("inf")
            logp = torch.log_softmax(logits, -1)[len(prompt) - 1:]  # the distributions of Z's tokens, then of ⊤
            nll -= sum(float(logp[k, tok]) for k, tok in enumerate(t.tokens))
            nll -= float(torch.logsumexp(logp[len(t.tokens), c.task.end_ids], 0))
            count += len(t.tokens) + 1
        assert c.learner.loss(refs, 1.0)[0].item() == pytest.approx(nll / count, rel=1e-5)

    c = train(cfg, str(tmp_path / "run"))
    tok = c.policy.tokenizer
    with torch.no_grad():
        for rid in c.task.train_ids:
            (z, ended), = hf_generate(c.policy.model, c.task.prompt_ids(rid), 1, 30, 1, c.task.end_ids,
                                      tok.pad_token_id, do_sample=False)
            assert (tok.decode(z), ended) == (c.task.reference_text(rid), True)
    from gfnlm.learner.reporting import SAMPLER_KEYS

    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 150 and "loss" in last and not set(SAMPLER_KEYS) & set(last), \
        "an SFT step has no samples, replay or reward: curves.png draws no empty panels for them"


def test_ppo_ratios_start_at_one_before_min_len(tiny_digits, tmp_path):
    """The samplers draw tokens before min_len from q with ⊤ taken out and renormalised; the learner's
    q there is the same one, so on fresh samples every action's ratio is exactly 1 (with the
    unmasked q it was 1 − q(⊤ | s) for each token before min_len: ~0.92 on this 13-token model)."""
    from gfnlm.learner.objective import behaviour_row
    from gfnlm.learner.objectives import action_logprobs

    run = str(tmp_path / "run")
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.objective=ppo", "batch.on_policy=1",
                                                             "batch.replay=0", "task.min_len=2", "task.max_len=3",
                                                             "task.target={type: uniform, low: 10, high: 99}"))
    c = build(cfg)
    fresh, _ = collect(c, [0], 1.0)
    with torch.no_grad():
        terms = c.learner.terms(micro_batch(c.cfg, c.task, fresh), 1.0)
        lp, actions = action_logprobs(terms.log_pf, terms.log_pterm, terms.lengths, terms.tool_mask, terms.terminated)
    for b, t in enumerate(terms.trajectories):
        n = int(actions[b].sum())
        assert lp[b, :n].tolist() == pytest.approx(behaviour_row(t)[:n], abs=1e-5), t


def test_subtb_states_can_end_wires_the_mask_and_the_batch_root(tiny_digits, tmp_path):
    """learner.objective {type: subtb, states: can_end}: the learner's terms take ⊤ out before min_len and
    mark those states, the loss is subtb_loss with the records as root groups, and it trains (finite)."""
    from gfnlm.learner.objectives import subtb_loss

    run = str(tmp_path / "run")
    cfg = load_config("random_number.yaml", digits_overrides(tiny_digits, run, "learner.objective={type: subtb, states: can_end}",
                                                             "task.min_len=2", "task.max_len=3", "learner.steps=3",
                                                             "task.target={type: uniform, low: 10, high: 40}"))
    c = build(cfg)
    _, batch = collect(c, [0], 1.0)
    terms = c.learner.terms(batch, 1.0)
    assert not terms.can_end[:, :2].any()
    assert all(terms.can_end[b, 2: t.length + 1].all() and not terms.can_end[b, t.length + 1:].any()
               for b, t in enumerate(terms.trajectories))
    assert torch.isinf(terms.log_pterm[:, :2]).all()
    loss, _ = c.learner.objective.loss(terms)
    want = subtb_loss(terms.log_pf, terms.log_pterm, terms.log_r, terms.lengths, tool_mask=terms.tool_mask,
                      log_flow=terms.log_flow, can_end=terms.can_end,
                      root_groups=torch.tensor([t.record_id for t in terms.trajectories]))
    assert loss.item() == pytest.approx(want.item()) and math.isfinite(loss.item())
    c = train(cfg, run)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in metrics(run))


def test_a_curves_panel_is_logarithmic_only_where_it_spans_a_decade():
    """Within less than a decade a log axis shows no labelled tick: such panels are drawn linear."""
    from gfnlm.learner.curves import axis_scale

    assert axis_scale("symlog", [2.8, 2.1, 1.3]) == "linear", "an SFT loss from 2.8 to 1.3"
    assert axis_scale("symlog", [120.0, 48.0, 9.0]) == "symlog"
    assert axis_scale("symlog", [3.0, -0.5]) == "symlog", "a loss that crosses zero keeps symlog"
    assert axis_scale("log", [0.3, 0.9]) == "linear" and axis_scale("log", [0.02, 1.0]) == "log"
    assert axis_scale("log", [0.0, 1.0]) == "linear" and axis_scale("linear", [1.0, 100.0]) == "linear"

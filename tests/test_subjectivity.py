"""Latent-rationale classification (SUBJ): records, the reward, the E/M alternation, evaluation."""

import json
import math

import pytest
import torch

from gfnlm.configs import load_config
from gfnlm.learner.cli import main

from conftest import tiny_overrides

REVIEWS = [
    {"text": "it was shot in 1990 .", "label": 0},
    {"text": "a dull , silly film .", "label": 1},
    {"text": "the story is set in rome .", "label": 0},
    {"text": "i loved every minute .", "label": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def subj_overrides(model_dir, tmp_path, **extra):
    train = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    test = write_jsonl(tmp_path / "test.jsonl", REVIEWS[:2])
    ov = [o for o in tiny_overrides(model_dir, tmp_path / "run") if not o.startswith("task.")]
    settings = {
        "task": "{type: subjectivity, data: {train: %s, test: %s}, prompt_template: 'Review: {text} It is', "
                "max_len: 4, seed_samples: 2, seed_prompt: null, prompting_shots: 2, em: {schedule: alternate, e_reward: m, e_steps: 2, m_steps: 2, m_lr: 0.05, m_samples: 2}}"
                % (train, test),
        "batch.prompts_per_step": 2, "batch.samples_per_prompt": 4, "batch.on_policy": 0.5, "batch.tempered": 0.25,
        "batch.replay": 0.25, "replay.capacity_per_prompt": 8, "replay.seed_with_support": "true",
        "eval.samples_per_record": 3, "eval.baselines": "[prompting]", **extra}
    return ov + [f"{k}={v}" for k, v in settings.items()]


def flags(ov):
    return sum([["-o", o] for o in ov], [])


def test_a_label_outside_zero_and_one_is_refused_before_anything_loads(tiny_llama, tmp_path, capsys):
    ov = subj_overrides(tiny_llama, tmp_path)
    write_jsonl(tmp_path / "train.jsonl", REVIEWS + [{"text": "odd", "label": 2}])
    assert main(["train", "subjectivity.yaml", *flags(ov)]) == 2
    assert "train.jsonl:5: field 'label': expected one of 0, 1, got '2'" in capsys.readouterr().err


def test_reward_is_the_true_labels_likelihood_with_the_wrong_label_penalty(tiny_llama, tmp_path):
    from gfnlm.learner.loop import build

    c = build(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em.e_steps": 0})))
    task = c.task
    seeds = task.seed_trajectories(1)
    assert len(seeds) == 2 and all(t.source == "seed" and t.log_r is not None for t in seeds)
    t = seeds[0]
    right = task.lm.score_naive(task.context_ids(1), [t], suffix_ids=task.label_suffix(1, 1))[0]
    wrong = task.lm.score_naive(task.context_ids(1), [t], suffix_ids=task.label_suffix(1, 0))[0]
    for i in range(task.min_len, t.length + 1):
        expected = right[i] + (task.cfg.wrong_label_penalty if wrong[i] > right[i] else 0.0)
        assert t.log_r[i] == pytest.approx(expected, abs=2e-4)
    assert task.is_valid(t) == (t.terminated and wrong[t.length] <= right[t.length])


def test_replay_seeds_are_the_base_models_rationales_for_the_true_label(tiny_llama, tmp_path, monkeypatch):
    """The authors' seeds: the base model continues X + " <label> because it is", cut before the first
    token that is not a word or a number; a continuation cut too short is left out."""
    import gfnlm.rewards.subjectivity as subj
    from gfnlm.learner.loop import build

    ov = subj_overrides(tiny_llama, tmp_path, **{"task.em.e_steps": 0, "task.seed_prompt": "' {label_word} because it is'"})
    c = build(load_config("subjectivity.yaml", ov))
    task, tok = c.task, c.task.tokenizer
    ids = lambda text: list(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    seen = []

    def fake_generate(model, prompt, n, max_new, min_new, end_ids, pad_id, **kw):
        seen.append(prompt)
        return [(ids("silly") + ids(".") + ids("more"), False), (ids("good"), False), (ids(".x"), True)]

    monkeypatch.setattr(subj, "hf_generate", fake_generate)
    for rid, word in ((0, " objective"), (1, " subjective")):
        seeds = task.seed_trajectories(rid)
        assert seen[-1] == task.prompt_ids(rid) + ids(word + " because it is")
        assert [(t.tokens, t.terminated) for t in seeds] == [(ids("silly"), True), (ids("good"), False)]
        assert all(t.log_r is not None and t.source == "seed" for t in seeds)


def test_em_alternation_trains_both_adapters_and_rescores_the_replay(tiny_llama, tmp_path):
    from gfnlm.learner.loop import LocalDriver

    cfg = load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path))
    d = LocalDriver(cfg)
    c = d.c
    named = dict(c.policy.model.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    e_keys = [k for k in named if ".default." in k]
    m_keys = [k for k in named if ".m." in k]
    assert e_keys and m_keys and c.task.lm.adapter == "m"
    stale = [t for rid in c.task.train_ids for t in c.replay.sample_many([(rid, 2)], 1.0)]
    assert stale and all(t.reward_version == 0 for t in stale)
    outs = [d.step(1.0)[1] for _ in range(2)]
    assert "m_loss" not in outs[0] and outs[1]["reward_version"] == 1 and math.isfinite(outs[1]["m_loss"])
    after = dict(c.policy.model.named_parameters())
    changed = lambda keys: any(not torch.equal(before[k], after[k]) for k in keys)  # noqa: E731
    assert changed(e_keys) and changed(m_keys)
    assert all(torch.equal(before[k], after[k]) for k in named if k not in e_keys and k not in m_keys)
    from gfnlm.learner.loop import collect

    fresh, mixed = collect(c, c.task.train_ids[:2], 1.0, d.serve)  # replayed ones were scored by version 0
    replayed = [t for t in mixed if not any(t is f for f in fresh)]
    assert replayed and all(t.reward_version == 1 for t in mixed)
    old = stale[0].log_r
    c.task.score([stale[0]])  # the reward has changed with the M adapter: so has log R
    assert stale[0].reward_version == 1 and stale[0].log_r != old
    state = c.em.state_dict()
    assert state["reward_version"] == 1 and state["weights"]


def test_label_logits_share_the_reviews_cache_and_equal_one_pass_per_pair(tiny_llama, tmp_path):
    """The M-step's log p(Y_c | X Z_b): X runs once and its cache serves every (Z, Y) row; values and
    the M adapter's gradients equal one full forward pass per pair."""
    from gfnlm.actors.policy import active_adapter
    from gfnlm.actors.trajectory import Trajectory
    from gfnlm.learner.em import label_logits
    from gfnlm.learner.loop import build

    c = build(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path)), engine=False)
    model, rid = c.policy.model, c.task.train_ids[0]
    ctx, ys = c.task.context_ids(rid), [c.task.label_suffix(rid, 0), c.task.label_suffix(rid, 1)]
    trajs = [Trajectory(rid, toks) for toks in ([5, 6, 7, 8], [], [9], [10, 11])]
    with active_adapter(model, "m"):
        params = [p for n, p in model.named_parameters() if ".m." in n]
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn_like(p))  # lora_B starts at 0: move it so that gradients reach lora_A too
        got = label_logits(model, ctx, trajs, ys, c.policy.tokenizer.pad_token_id)
        g_got = torch.autograd.grad(got.logsumexp(1).sum(), params)
        ref = []
        for t in trajs:
            for y in ys:
                seq = ctx + t.tokens + y
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
                start = len(ctx) + t.length
                ref.append(sum(logp[start + j - 1, tok] for j, tok in enumerate(y)))
        ref = torch.stack(ref).view(len(trajs), len(ys))
        g_ref = torch.autograd.grad(ref.logsumexp(1).sum(), params)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=1e-3)


def test_the_authors_em_a_frozen_base_reward_then_one_m_phase(tiny_llama, tmp_path):
    """em {schedule: after, e_reward: base} (the preset's): the E-steps' reward is the frozen base model
    and never changes, one M phase runs after the last E-step, and prediction classifies with base + M."""
    from gfnlm.learner.loop import LocalDriver

    em = "{schedule: after, e_reward: base, e_steps: 1, m_steps: 3, m_lr: 0.05, m_samples: 2}"
    d = LocalDriver(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em": em,
                                                                                             "learner.steps": 3})))
    c = d.c
    assert c.task.lm.adapter is None and c.task.classifier_adapter == "m"
    probe = [t for rid in c.task.train_ids for t in c.replay.sample_many([(rid, 1)], 1.0)][:2]
    before = [list(t.log_r) for t in probe]
    outs = [d.step(1.0)[1] for _ in range(3)]
    assert ["m_loss" in o for o in outs] == [False, False, True] and math.isfinite(outs[2]["m_loss"])
    assert c.task.reward_version == 0 and c.em.phases == 1
    for t, old in zip(probe, before):
        c.task.score([t])
        assert t.log_r == pytest.approx(old, abs=1e-5), "the E-step's reward is the frozen base"
    # prediction: the label the base + M adapter prefers after X Z
    from gfnlm.learner.em import label_logits
    from gfnlm.actors.policy import active_adapter

    t = probe[0]
    with torch.no_grad(), active_adapter(c.policy.model, "m"):
        logits = label_logits(c.policy.model, c.task.context_ids(t.record_id), [t],
                              [c.task.label_suffix(t.record_id, 0), c.task.label_suffix(t.record_id, 1)],
                              c.policy.tokenizer.pad_token_id)
    assert c.task.classify([t]) == [int(logits[0, 1] > logits[0, 0])]


def test_an_m_step_may_draw_a_few_training_records_instead_of_all(tiny_llama, tmp_path):
    """em.m_records: each M step samples Z for, and trains on, that many training records, a fresh
    seeded draw without replacement per step; 0 (or as many as there are) takes every record."""
    from gfnlm.learner.loop import LocalDriver

    em = "{schedule: after, e_reward: base, e_steps: 1, m_steps: 3, m_lr: 0.05, m_samples: 2, m_records: 2}"
    c = LocalDriver(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em": em}))).c
    asked = []

    class Spy:
        def __init__(self, inner):
            self.inner, self.generator = inner, inner.generator

        def generate_batch(self, reqs, *a, **k):
            asked.append(sorted(r.record_id for r in reqs))
            return self.inner.generate_batch(reqs, *a, **k)

    generator = c.em.generator.get_state()
    out = c.em.run(Spy(c.sampler))
    assert len(asked) == 3 and all(len(ids) == 2 and set(ids) <= set(c.task.train_ids) for ids in asked)
    assert math.isfinite(out["m_loss"])
    first, asked[:] = list(asked), []
    c.em.generator.set_state(generator)
    c.em.run(Spy(c.sampler))
    assert asked == first  # the draws come from the M phase's seeded generator
    draws = {tuple(c.em.records()) for _ in range(20)}
    assert len(draws) > 1  # fresh per step
    for k in (0, 4, 9):
        c.em.cfg = c.em.cfg.model_copy(update={"m_records": k})
        assert c.em.records() == list(c.task.train_ids)


def test_m_only_learns_from_the_base_models_z_and_predicts_with_it(tiny_llama, tmp_path, monkeypatch):
    """em.z_from base (the M-only ablation): the M phase's Z and prediction's Z come from the base
    model with every adapter off, however far the E adapter has moved."""
    from gfnlm.learner.loop import LocalDriver

    em = "{schedule: after, e_reward: base, e_steps: 1, m_steps: 1, m_lr: 0.05, m_samples: 2, z_from: base}"
    d = LocalDriver(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em": em,
                                                                                             "learner.steps": 1})))
    c = d.c
    with torch.no_grad():  # q far from the base model
        for name, p in c.policy.model.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.add_(0.5)
    probe = torch.tensor([c.task.prompt_ids(0)])
    with torch.no_grad(), c.policy.model.disable_adapter():
        base_logits = c.policy.model(input_ids=probe).logits
    with torch.no_grad():
        assert not torch.allclose(c.policy.model(input_ids=probe).logits, base_logits)
    seen = []
    real = c.sampler.generate_batch

    def watched(*a, **kw):
        with torch.no_grad():
            seen.append(torch.allclose(c.policy.model(input_ids=probe).logits, base_logits))
        return real(*a, **kw)

    monkeypatch.setattr(c.sampler, "generate_batch", watched)
    c.em.run(c.sampler)
    assert seen == [True]
    c.task.evaluate(c.policy, c.sampler, c.cfg.eval, str(tmp_path / "ev"), log=lambda *_: None, methods=["trained"])
    assert len(seen) > 1 and all(seen)


def test_the_classifier_baseline_is_the_policys_own_label_word(tiny_llama, tmp_path):
    """eval method classifier (the SFT baseline X -> Y): the label whose reference the policy (its
    adapter on) finds likelier right after X, against a full forward pass per label."""
    from gfnlm.learner.loop import build

    c = build(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em.e_steps": 0})))
    with torch.no_grad():
        for name, p in c.policy.model.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    task = c.task
    res = task.evaluate(c.policy, c.sampler, c.cfg.eval, str(tmp_path / "ev"), log=lambda *_: None,
                        methods=["classifier"])["classifier"]
    ids = [int(r) for r in json.loads((tmp_path / "ev" / "eval.json").read_text())["records"]]
    right = 0
    with torch.no_grad():
        for r in ids:
            x = task.prompt_ids(r)
            lp = []
            for y in (0, 1):
                ref = list(task.tokenizer(" " + task.cfg.label_words[y], add_special_tokens=False).input_ids)
                logp = torch.log_softmax(c.policy.model(input_ids=torch.tensor([x + ref])).logits[0].float(), -1)
                lp.append(sum(logp[len(x) - 1 + i, tok].item() for i, tok in enumerate(ref)))
            right += int(int(lp[1] > lp[0]) == task.label(r))
    assert res["acc_greedy"] == pytest.approx(right / len(ids)) and res["records"] == len(ids)


def test_short_subjectivity_run_then_sample_and_predict_with_both_adapters(tiny_llama, tmp_path, capsys):
    ov = subj_overrides(tiny_llama, tmp_path)
    assert main(["train", "subjectivity.yaml", *flags(ov + ["learner.steps=2"])]) == 0
    run = tmp_path / "run"
    result = json.loads((run / "eval.json").read_text())
    assert set(result["methods"]) == {"trained", "prompting"}
    for fig in result["methods"].values():
        assert 0 <= fig["acc_greedy"] <= 1 and 0 <= fig["acc_vote"] <= 1 and fig["records"] == 2
    # the trained row says how varied its Z are: distinct strings over every review's samples, the commonest's share
    trained, shown = result["methods"]["trained"], result["examples"]["trained"]
    assert 1 <= trained["z_distinct"] <= 2 * 3 and 0 < trained["z_top_share"] <= 1
    assert any(trained["z_top"] in e["z"] for e in shown)
    assert "distinct Z of 6" in capsys.readouterr().err
    md = (run / "eval.md").read_text().splitlines()
    assert "distinct Z of 6 (the commonest)" in md[2] and f"{trained['z_distinct']} ({trained['z_top']!r}" in md[4]
    assert main(["sample", str(run), "--prompt", "a dull film .", "--answer", "1", "-n", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(math.isfinite(x["log_r"]) and x["answer"] in (0, 1) for x in lines)
    assert main(["predict", str(run), "--question", "a dull film .", "-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prediction"] in (0, 1) and sum(out["distribution"].values()) == pytest.approx(1.0)
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0  # the run's own config
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["records"] == result["records"] and set(again["methods"]) == {"trained", "prompting"}
    # eval.seed: the run's own evaluation and a later one draw the same samples, whatever training drew
    assert again["examples"] == result["examples"]
    assert all({k: v for k, v in again["methods"][m].items() if k != "seconds"}
               == {k: v for k, v in result["methods"][m].items() if k != "seconds"} for m in again["methods"])


def test_z_spread_counts_distinct_rationales_and_the_commonest_share():
    from gfnlm.rewards.subjectivity import z_spread

    assert z_spread([" a", " b", " a", " a"]) == {"z_distinct": 2, "z_top_share": 0.75, "z_top": " a"}
    assert z_spread([]) == {}


def test_em_in_ray_mode_is_refused():
    from gfnlm.configs import ConfigError

    with pytest.raises(ConfigError, match="runs with runtime.mode=local"):
        load_config("subjectivity.yaml", ["runtime.mode=ray"])
    with pytest.raises(ConfigError, match="task.em.z_from: 'base' samples with the adapter switched off"):
        load_config("subjectivity.yaml", ["task.em.z_from=base", "sampler.engine=vllm"])


def test_after_an_m_phase_the_replay_buffer_keeps_the_rescored_rewards(tiny_llama, tmp_path):
    from gfnlm.learner.loop import LocalDriver, collect

    d = LocalDriver(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path)))
    c = d.c
    for _ in range(2):  # the second step ends with an M phase: the reward's version is 1
        d.step(1.0)
    assert c.task.reward_version == 1
    fresh, mixed = collect(c, c.task.train_ids[:2], 1.0, d.serve)
    replayed = [t for t in mixed if not any(t is f for f in fresh)]
    assert replayed
    for t in replayed:
        kept, = [u for u in c.replay.buffers[t.record_id] if u.tokens == t.tokens]
        assert kept.reward_version == 1 and kept.log_r == t.log_r
    for buf in c.replay.buffers.values():  # ordered by the rewards it holds
        assert [u.final_log_r for u in buf] == sorted((u.final_log_r for u in buf), reverse=True)


def test_the_label_verdict_cache_is_keyed_by_the_trajectory_not_its_id(tiny_llama, tmp_path):
    """is_valid reads the verdict the scoring pass left; a different Z (here: the same object with
    other tokens, as a new trajectory that Python gives a collected one's id) is classified anew."""
    from gfnlm.actors.trajectory import Trajectory
    from gfnlm.learner.loop import build

    c = build(load_config("subjectivity.yaml", subj_overrides(tiny_llama, tmp_path, **{"task.em.e_steps": 0})))
    task = c.task
    tok = c.policy.tokenizer
    t = Trajectory(0, tok.encode(" dull", add_special_tokens=False))
    task.score([t])
    calls = []
    real = task.classify
    task.classify = lambda ts, **kw: calls.append(len(ts)) or real(ts, **kw)
    task.is_valid(t)
    assert calls == []  # the scoring pass's verdict
    t.tokens = tok.encode(" odd", add_special_tokens=False)
    task.is_valid(t)
    assert calls == [1]  # another Z: classified, not the old verdict


def test_check_prints_the_label_balance_of_every_split(tmp_path, capsys):
    """What a downloaded copy of SUBJ should show (docs/tasks.md): counts and labels 0/1 per split."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"review {i} .", "label": int(i % 3 == 0)}) + "\n" for i in range(9)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": f"plot {i} .", "label": 0}) + "\n" for i in range(4)))
    assert main(["check", "subjectivity", "-o", f"task.data.train={train}", "-o", f"task.data.test={test}"]) == 0
    assert "9 train, 0 validation and 4 test records (columns text, label; labels 0/1: train 6/3, validation 0/0, " \
           "test 4/0)" in capsys.readouterr().err


def test_a_missing_copy_of_the_authors_data_says_where_it_comes_from(capsys):
    assert main(["check", "subjectivity", "-o", "task.data.train=../shared/data/subj/missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such data file" in err and "docs/tasks.md (\"Where the data comes from\")" in err

"""Latent chains of thought: arithmetic records and reward, the vote, PPO, sample and predict."""

import json
import math
import os

import pytest
import torch

from gfnlm.actors.tools import Calculator, ToolRunner, evaluate
from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs import ConfigError, load_config
from gfnlm.learner.cli import main
from gfnlm.learner.objectives import action_logprobs, group_advantages, ppo_loss
from gfnlm.rewards.arithmetic import answer_of, fill_rationale, generate_questions, steps_of
from gfnlm.rewards.base import vote
from gfnlm.rewards.records import RecordError, is_integer, one_of, read_rows

from conftest import tiny_overrides

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")

WORKED = [
    {"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3, "str_rationale": "1 + 2 ="},
    {"str_query": "Question: 4 - 1 = ? Answer:", "num_sol": 3, "str_rationale": "4 - 1 ="},
    {"str_query": "Question: 2 + 2 + 1 = ? Answer:", "num_sol": 5, "str_rationale": "2 + 2 =, 4 + 1 ="},
    {"str_query": "Question: 5 - 2 = ? Answer:", "num_sol": 3, "str_rationale": "5 - 2 ="},
]
TESTS = [{"str_query": "Question: 3 + 1 = ? Answer:", "num_sol": 4}, {"str_query": "Question: 2 + 5 = ? Answer:", "num_sol": 7}]


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=4))
    return str(path)


def arithmetic_overrides(model_dir, tmp_path, **extra):
    """A tiny arithmetic run: one shot in the reward's context, two labelled examples."""
    train = write_json(tmp_path / "worked.json", WORKED)
    test = write_json(tmp_path / "test.json", TESTS)
    ov = [o for o in tiny_overrides(model_dir, tmp_path / "run") if not o.startswith("task.")]
    settings = {
        "task": "{type: arithmetic, data: {train: %s}, test_sets: {a: %s, b: %s}, labelled: 2, shots: 1, "
                "generate: {count: 3, operands: [2], seed: 1}, min_len: 1, max_len: 12}" % (train, test, test),
        "sampler.tools": "[{kind: calculator}]",
        "batch.prompts_per_step": 2, "batch.samples_per_prompt": 4, "batch.on_policy": 0.5, "batch.tempered": 0.25,
        "batch.replay": 0.25, "replay.capacity_per_prompt": 8, "eval.samples_per_record": 3,
        "eval.baselines": "[prompt0, prompt1]", "run.evaluate_at_end": "true", **extra}
    return ov + [f"{k}={v}" for k, v in settings.items()]


def flags(ov):
    return sum([["-o", o] for o in ov], [])


# -- records ------------------------------------------------------------------------------------


def test_json_array_files_read_with_the_line_of_each_record(tmp_path):
    path = write_json(tmp_path / "w.json", WORKED)
    rows = read_rows(path, ["str_query", "num_sol"], {"num_sol": is_integer})
    assert [line for line, _ in rows] == [2, 7, 12, 17] and rows[2][1]["num_sol"] == "5"
    shared = os.path.join(SHARED, "arithmetic", "1digit_34_op+-_train_50.json")
    if os.path.isfile(shared):
        assert len(read_rows(shared, ["str_query", "num_sol", "str_rationale"], {"num_sol": is_integer})) == 50


@pytest.mark.parametrize("text, columns, checks, message", [
    ('[\n {"str_query": "Q", "num_sol": 3},\n {"str_query": "Q", "num_sol": "three"}\n]', ["str_query", "num_sol"],
     {"num_sol": is_integer}, "w.json:3: field 'num_sol': expected an integer, got 'three'"),
    ('[\n {"str_query": "Q", "num_sol": 3},\n {"str_query": "Q", "num_sol": 2.5}\n]', ["str_query", "num_sol"],
     {"num_sol": is_integer}, "w.json:3: field 'num_sol': expected an integer, got '2.5'"),
    ('[\n {"str_query": "Q", "num_sol": 3},\n {"str_query": "Q" "num_sol": 4}\n]', ["str_query", "num_sol"], {},
     "w.json:3: not valid JSON (Expecting ',' delimiter"),
    ('[\n {"str_query": "Q"}\n]', ["str_query", "num_sol"], {}, "w.json:2: field 'num_sol' missing"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n', ["text", "label"], {"label": one_of("0", "1")},
     "w.json:2: field 'label': expected one of 0, 1, got '2'"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', ["text", "label"], {}, "w.json:2: not valid JSON"),
])
def test_malformed_answer_label_or_json_is_refused_with_file_line_and_field(tmp_path, text, columns, checks, message):
    (tmp_path / "w.json").write_text(text)
    with pytest.raises(RecordError, match=None) as e:
        read_rows(str(tmp_path / "w.json"), columns, checks)
    assert message in str(e.value)


def test_check_names_a_bad_answer_before_anything_loads(tiny_llama, tmp_path, capsys):
    ov = arithmetic_overrides(tiny_llama, tmp_path)
    write_json(tmp_path / "test.json", TESTS + [{"str_query": "Question: 1 + 1 = ? Answer:", "num_sol": "two"}])
    assert main(["train", "arithmetic.yaml", *flags(ov)]) == 2
    assert "test.json:10: field 'num_sol': expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_generated_questions_are_seeded_and_their_answers_right():
    from gfnlm.configs.tasks import QuestionGenerator

    cfg = QuestionGenerator(count=50, operands=[3, 4], digits=2, operators="+-*", seed=3)
    qs = generate_questions(cfg)
    assert qs == generate_questions(cfg) and qs != generate_questions(cfg.model_copy(update={"seed": 4}))
    for q in qs:
        expr = q["str_query"].removeprefix("Question: ").removesuffix(" = ? Answer:")
        assert evaluate(expr) == int(q["num_sol"]) and len(expr.split()) in (5, 7)


def test_the_preset_runs_from_a_clone_on_generated_sets_of_the_papers_shape(tiny_llama, tmp_path, monkeypatch):
    """configs/arithmetic.yaml needs no ../shared/data: 50 generated worked examples whose
    left-to-right rationales the calculator completes to the answer, and 500-question test sets of
    3, 4 and 5 one-digit operands with + and -, none of them a training question; the authors'
    files are still read where a path names them."""
    from gfnlm.learner.loop import build

    monkeypatch.chdir(tmp_path)  # no ../shared here
    ov = [o for o in arithmetic_overrides(tiny_llama, tmp_path) if not o.startswith("task=")]
    ov.append("task.max_len=40")  # the tiny model's tokenizer spells a rationale in more tokens than SmolLM2's
    task = build(load_config("arithmetic", ov), engine=False).task
    assert len(task.test_sets) == 3 and all(len(ids) == 500 for ids in task.test_sets.values())
    for name, ids in task.test_sets.items():
        for rid in ids:
            expr = task.records[rid].fields["str_query"].removeprefix("Question: ").removesuffix(" = ? Answer:")
            assert len(expr.split()) == 2 * int(name) - 1 and set(expr) <= set("0123456789 +-")
            assert evaluate(expr) == int(task.records[rid].fields["num_sol"])
    train = {task.records[r].fields["str_query"] for r in task.train_ids}
    shots = {r.fields["str_query"] for r in task.shot_records}
    tests = [task.records[r].fields["str_query"] for ids in task.test_sets.values() for r in ids]
    assert not (train | shots) & set(tests) and len(set(tests)) == len(tests) == 1500
    assert len(task.train_ids) == 10 + 200 and task.records[0].where.startswith("generated:")
    for rid in task.train_ids[:10]:  # the labelled ones: the calculator completes each rationale to the answer
        ref = task.reference(rid)
        assert answer_of(task.tokenizer.decode(ref.tokens)) == task.answer(rid) and task.is_valid(ref)
    assert "The answer is" in task.shot_text and task.shot_text.count("Question:") == 3
    # a run that trains on other questions (SFT: none generated) is evaluated on the very same ones
    sft = build(load_config("arithmetic", [*ov, "task.generate.count=0"]), engine=False).task
    assert [sft.records[r].fields for ids in sft.test_sets.values() for r in ids] == \
        [task.records[r].fields for ids in task.test_sets.values() for r in ids]
    # a validation split for choosing settings: generated questions held out, never trained on
    val = build(load_config("arithmetic", [*ov, "task.data.validation_fraction=0.1"]), engine=False).task
    held = {val.records[r].fields["str_query"] for r in val.validation_ids}
    trained = {val.records[r].fields["str_query"] for r in val.train_ids}
    assert len(held) == len(val.validation_ids) == 20 and len(val.train_ids) == 10 + 180
    assert not held & trained and not held & set(tests) and held | trained == train
    for rid in val.validation_ids:  # questions with their right answers, as every generated one
        expr = val.records[rid].fields["str_query"].removeprefix("Question: ").removesuffix(" = ? Answer:")
        assert evaluate(expr) == val.answer(rid)
    # the authors' files where a path names them (the experiment's overrides)
    if os.path.isdir(os.path.join(SHARED, "arithmetic")):
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from gfnlm.learner.experiment import configs_of, read_spec

        cfg = configs_of(read_spec("arithmetic"), str(tmp_path / "x"), [])[0][2]
        cfg = load_config(cfg.model_dump(mode="json"), [o for o in ov if not o.startswith("run.output_dir")])
        authors = build(cfg, engine=False).task
        assert [len(ids) for ids in authors.test_sets.values()] == [500, 500, 500]
        assert authors.records[0].where.startswith("../shared/data/arithmetic/1digit_34_op+-_train_50.json:")


def test_generated_sets_refuse_what_they_cannot_make(capsys):
    from gfnlm.configs.tasks import QuestionGenerator

    # 1-digit a + b: 100 distinct questions; check refuses 150 as training does
    assert main(["check", "arithmetic", "-o", "task.test_sets={a: {count: 150, operands: [2], operators: '+'}}"]) == 2
    assert "only 100 distinct questions" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="test_sets.a.count: a generated test set needs at least one question"):
        load_config("arithmetic", ["task.test_sets={a: {count: 0}}"])
    with pytest.raises(ConfigError, match=r"eval_max_len \(3\) must not be below min_len \(5\)"):
        load_config("arithmetic", ["task.eval_max_len=3"])

    with pytest.raises(ConfigError, match=r"worked.operators: '\+-\*': a generated rationale works left to right"):
        load_config("arithmetic", ["task.worked={count: 50, operators: '+-*'}"])
    with pytest.raises(RecordError, match="only 100 distinct questions"):
        generate_questions(QuestionGenerator(count=150, operands=[2], operators="+", seed=0),
                           exclude=frozenset({"nothing"}))


# -- rationales, answers, the vote ------------------------------------------------------------


def test_worked_rationales_become_the_trajectories_the_sampler_would_make(tiny_llama):
    from gfnlm.actors.models import load_model

    _, tok = load_model(tiny_llama, "cpu")
    tools = ToolRunner.for_tokenizer([Calculator()], tok)
    tokens, mask = fill_rationale("9 + 4 =, 13 - 8 =", tok, tools)
    assert tok.decode(tokens) == " 9 + 4 = 13, 13 - 8 = 5"
    assert tok.decode([t for t, m in zip(tokens, mask) if m]) == " 13 5"
    assert answer_of(" 9 + 4 = 13, 13 - 8 = 5") == 5 and answer_of(" 7 - 9 = -2") == -2
    assert answer_of(" 12, 7") == 7 and answer_of(" ,.") is None
    # steps: "=" signs the calculator answered; a rationale cut off before the answer has one step fewer
    assert steps_of(" 9 + 4 = 13, 13 - 8 = 5") == 2 and steps_of(" 9 + 4 = 13, 13 - 8 =") == 1 and steps_of(" 12") == 0


def test_the_vote_takes_the_most_frequent_answer_and_ignores_missing_ones():
    assert vote([3, 5, 3, None, 5, 3]) == (3, {3: 3, 5: 2})
    assert vote([None, 4, 6]) == (4, {4: 1, 6: 1})  # a tie: the answer seen first
    assert vote([None, None]) == (None, {})


def test_reward_with_the_few_shot_context_equals_brute_force(tiny_llama, tmp_path):
    from gfnlm.learner.loop import build

    cfg = load_config("arithmetic.yaml", arithmetic_overrides(tiny_llama, tmp_path))
    c = build(cfg)
    task = c.task
    assert task.shot_ids and task.context_ids(0)[: len(task.shot_ids)] == task.shot_ids
    assert "The answer is" in task.shot_text and task.shot_text.count("Question:") == 1
    ref = task.reference(0)
    sampled = task.sample_records(c.sampler, [1, task.train_ids[-1]], 2, 1.0)
    trajs = [ref] + [t for ts in sampled.values() for t in ts]
    for _ in range(2):  # the second pass reuses the cached shot KV
        for t in trajs:
            t.log_r = None
        task.score(trajs)
        for t in trajs:
            naive = task.lm.score_naive(task.context_ids(t.record_id), [t], suffix_ids=task.suffix_ids(t.record_id))[0]
            for i in range(t.length + 1):
                if i >= task.min_len and not any(x in task.disallowed for x in t.tokens[:i]) and not (
                        i < t.length and t.tool_mask and t.tool_mask[i]):
                    assert t.log_r[i] == pytest.approx(naive[i], abs=2e-4)
    assert ref.tool_mask and any(ref.tool_mask) and task.is_valid(ref)
    banned_text = [task.tokenizer.decode([i]) for i in task.banned_ids]
    assert "a" in banned_text and "7" not in banned_text and "=" not in banned_text


def test_a_rationale_ends_only_after_a_completed_step(tiny_llama, tmp_path):
    """The preset's calculator with end_only_after: the states that can end are those right after a
    result; only they (and the whole Z) are scored, equal to brute force, the rest get the floor;
    samples the policy ended stop right after a result; and a short run trains on them (finite)."""
    import json as _json

    from gfnlm.learner.loop import build, collect

    ov = arithmetic_overrides(tiny_llama, tmp_path, **{"sampler.tools": "[{kind: calculator, end_only_after: true}]",
                                                     "task.min_len": 3, "task.labelled": 3, "task.max_len": 40})
    c = build(load_config("arithmetic.yaml", ov))
    task = c.task
    refs = [r for r in map(task.reference, task.train_ids) if r is not None]
    ref = max(refs, key=lambda r: sum(r.tool_mask))  # " 2 + 2 = 4, 4 + 1 = 5"
    ends = task.can_end(ref)
    after_result = [k for k in range(1, ref.length + 1) if ref.tool_mask[k - 1] and (k == ref.length or not ref.tool_mask[k])]
    assert [k for k, e in enumerate(ends) if e] == after_result and len(after_result) == 2
    task.score([ref])
    naive = task.lm.score_naive(task.context_ids(ref.record_id), [ref], suffix_ids=task.suffix_ids(ref.record_id))[0]
    for k in range(ref.length + 1):
        assert ref.log_r[k] == (pytest.approx(naive[k], abs=2e-4) if ends[k] else task.floor)
    _, batch = collect(c, task.train_ids[:2], 1.0)
    for t in batch:
        if t.terminated:
            assert task.can_end(t)[-1], task.tokenizer.decode(t.tokens)
    # a dead end (cut before a completed step): its last state cannot end, so it is worth the floor,
    # where the learner ends it by force (`forced_cap_ends`), not the reward of a rationale cut short
    before = ref.tool_mask.index(True) - 1  # " 2 + 2", the "=" not yet written
    cut = Trajectory(ref.record_id, ref.tokens[:before], terminated=False)
    task.score([cut])
    assert not any(task.can_end(cut)) and cut.log_r == [task.floor] * (cut.length + 1)
    assert main(["train", "arithmetic.yaml", *flags(ov + ["learner.steps=2", "run.evaluate_at_end=false"])]) == 0
    rows = [_json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)


# -- PPO ------------------------------------------------------------------------------------------


def test_group_advantages_leave_one_out():
    r = torch.tensor([1.0, 3.0, 5.0, 2.0, 7.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 9])
    adv = group_advantages(r, g, normalize=False)
    assert adv.tolist() == pytest.approx([1 - 4, 3 - 3, 5 - 2, 0.0, 0.0])
    norm = group_advantages(r, g, normalize=True)
    std = math.sqrt(((1 - 3) ** 2 + 0 + (5 - 3) ** 2) / 3)
    assert norm[:3].tolist() == pytest.approx([-3 / std, 0.0, 3 / std], rel=1e-5) and norm[3:].tolist() == [0.0, 0.0]


def test_ppo_loss_against_a_hand_computed_case():
    log_p = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.2), 0.0]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.9)], [math.log(0.4), 0.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.6)], [math.log(0.1), 0.0]])
    actions = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([2.0, -1.0])
    loss, info = ppo_loss(log_p, old, ref, actions, adv, clip=0.2, kl_coef=0.1)
    # ratios 1.25 (clipped to 1.2, A > 0: min(2.5, 2.4) = 2.4), 1.0 (2.0), 0.5 (A < 0: min(-0.5, -0.8) = -0.8)
    surrogate = [2.4, 2.0, -0.8]
    deltas = [0.0, math.log(0.6 / 0.9), math.log(0.1 / 0.2)]
    kl = [math.exp(d) - d - 1 for d in deltas]
    expected = sum(-s + 0.1 * k for s, k in zip(surrogate, kl)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert info["clip_fraction"] == pytest.approx(2 / 3) and info["kl"] == pytest.approx(sum(kl) / 3, rel=1e-6)
    loss.backward()
    # the clipped token (ratio 1.25 > 1.2 with A > 0) passes no policy gradient, only the KL term's (0 at delta 0)
    assert log_p.grad[0, 0].item() == pytest.approx(0.0, abs=1e-7)


def test_action_rows_hold_tokens_then_the_end():
    log_pf = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]])
    log_pterm = torch.tensor([[-9.0, -9.0, -9.0, -0.5], [-9.0, -9.0, -0.7, -9.0]])
    tool = torch.tensor([[False, True, False], [False, False, False]])
    lp, mask = action_logprobs(log_pf, log_pterm, torch.tensor([3, 2]), tool, torch.tensor([True, False]))
    assert lp[0].tolist() == [-1.0, 0.0, -3.0, -0.5] and mask[0].tolist() == [True, False, True, True]
    assert mask[1].tolist() == [True, True, False, False]


def test_ppo_config_is_on_policy_only(tiny_llama, tmp_path):
    ov = arithmetic_overrides(tiny_llama, tmp_path)
    with pytest.raises(ConfigError, match="ppo learns from on-policy samples only"):
        load_config("arithmetic.yaml", ov + ["learner.objective=ppo"])
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config("arithmetic.yaml", ov + ["learner.objective=ppo", "batch.on_policy=1", "batch.tempered=0",
                                             "batch.replay=0", "runtime.mode=ray", "runtime.max_staleness=2"])


def test_ppo_first_ratio_is_one_and_training_moves_the_adapter_only(tiny_llama, tmp_path):
    from gfnlm.learner.loop import LocalDriver

    ov = arithmetic_overrides(tiny_llama, tmp_path, **{"learner.objective": "{type: ppo, epochs: 2, minibatches: 2}",
                                                        "batch.on_policy": 1, "batch.tempered": 0, "batch.replay": 0})
    cfg = load_config("arithmetic.yaml", ov)
    d = LocalDriver(cfg)
    base = {k: v.clone() for k, v in d.c.policy.model.named_parameters() if not v.requires_grad}
    lora = {k: v.clone() for k, v in d.c.policy.model.named_parameters() if v.requires_grad}
    rids = d.c.scheduler.next()
    from gfnlm.learner.loop import collect

    fresh, mixed = collect(d.c, rids, 1.0, d.serve)
    steps = d.c.learner.objective.plan([mixed], d.c.policy, 1.0)
    assert len(steps) == 4 and sorted(id(t) for s in steps[:2] for t in s[0]) == sorted(id(t) for t in mixed)
    d.c.policy.model.train()
    _, info = d.c.learner.loss(mixed, 1.0)
    assert info["clip_fraction"] == 0.0 and info["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh samples, zero adapter
    out = d.c.learner.update([mixed], 1.0)
    assert math.isfinite(out["loss"]) and "kl" in out
    changed = [k for k, v in d.c.policy.model.named_parameters() if v.requires_grad and not torch.equal(v, lora[k])]
    assert changed and all(torch.equal(v, base[k]) for k, v in d.c.policy.model.named_parameters() if not v.requires_grad)


def test_ppo_reference_init_holds_the_run_near_the_adapter_it_started_from(tiny_llama, tmp_path):
    """`reference: init`: PPO's KL penalty is to the frozen adapter lora.init names (zero on the first
    step of a run started from it), `base` to the base model (not zero then); the frozen copy is left
    out of checkpoints; `init` without lora.init is a one-line error from `gfnlm check`."""
    from gfnlm.actors.policy import Policy
    from gfnlm.learner import api
    from gfnlm.learner.checkpoints import save_checkpoint
    from gfnlm.learner.loop import LocalDriver, collect

    ppo = {"batch.on_policy": 1, "batch.tempered": 0, "batch.replay": 0}
    first = load_config("arithmetic.yaml", arithmetic_overrides(tiny_llama, tmp_path))
    start = Policy(first.model, first.lora)
    torch.manual_seed(0)
    for n, p in start.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0.0, 0.05)
    start.model.save_pretrained(str(tmp_path / "sft"))
    kl = {}
    for reference in ("init", "base"):
        (tmp_path / reference).mkdir()
        ov = arithmetic_overrides(tiny_llama, tmp_path / reference, **ppo, **{
            "learner.objective": f"{{type: ppo, reference: {reference}}}", "lora.init": str(tmp_path / "sft")})
        d = LocalDriver(load_config("arithmetic.yaml", ov))
        torch.manual_seed(1)
        _, mixed = collect(d.c, d.c.scheduler.next(), 1.0, d.serve)
        d.c.learner.objective.plan([mixed], d.c.policy, 1.0)
        d.c.policy.model.train()
        kl[reference] = d.c.learner.loss(mixed, 1.0)[1]["kl"]
        if reference == "init":
            assert "init" in d.c.policy.model.peft_config and d.c.policy.saved_adapters() == ["default"]
            assert all(not p.requires_grad for n, p in d.c.policy.model.named_parameters() if ".init." in n)
            trained = {id(p) for p in d.c.policy.trainable_parameters()}
            assert not any(id(p) in trained for n, p in d.c.policy.model.named_parameters() if ".init." in n)
            saved = save_checkpoint(str(tmp_path / "ckpt"), 1, d.c.policy, {}, keep=1)
            held = os.listdir(os.path.join(saved, "adapter"))
            assert "adapter_model.safetensors" in held and "init" not in held, held
    assert kl["init"] == pytest.approx(0.0, abs=1e-6) and abs(kl["base"]) > 1e-4, kl
    with pytest.raises(ConfigError) as e:
        api.check("arithmetic.yaml", arithmetic_overrides(tiny_llama, tmp_path, **ppo, **{
            "learner.objective": "{type: ppo, reference: init}"}))
    assert str(e.value).startswith("learner.objective.reference: 'init'") and "\n" not in str(e.value)


# -- runs, sample and predict ---------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["{type: subtb, states: can_end}", "ppo", "sft"])
def test_short_arithmetic_run_evaluates_every_test_set(objective, tiny_llama, tmp_path):
    extra = {"learner.objective": objective}
    if objective == "ppo":
        extra.update({"batch.on_policy": 1, "batch.tempered": 0, "batch.replay": 0})
    ov = arithmetic_overrides(tiny_llama, tmp_path, **extra)
    assert main(["train", "arithmetic.yaml", *flags(ov + ["learner.steps=2"])]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(result["methods"]) == {"trained", "prompt0", "prompt1"}
    for m, figures in result["methods"].items():
        assert 0.0 <= figures["acc_a"] <= 1.0 and figures["questions_a"] == 2 and figures["questions_b"] == 2
        shown = result["examples"][m]
        assert [e["set"] for e in shown] == ["a", "a", "b", "b"]  # the first three questions of each set (2 here)
        # steps per rationale: the mean over every vote of the set (3 votes, all of them shown here)
        votes = [steps_of(z) for e in shown if e["set"] == "b" for z in e["samples"]]
        assert figures["votes"] == 3 and len(votes) == 6 and figures["steps_b"] == pytest.approx(sum(votes) / 6)
    assert (tmp_path / "run" / "eval.md").read_text().startswith("| method | a (2 q.) | b (2 q.) | steps a | steps b |")


def test_settings_are_chosen_on_held_out_training_questions(tiny_llama, tmp_path, capsys):
    """eval.split=validation evaluates the generated questions that task.data.validation_fraction
    held out, as one set, and never the test sets; a fraction that holds out none is refused, and
    so, before training, is evaluating a validation split that does not exist."""
    ov = arithmetic_overrides(tiny_llama, tmp_path, **{"task.generate.count": 6, "task.data.validation_fraction": 0.5,
                                                       "eval.split": "validation", "eval.baselines": "[prompt0]"})
    assert main(["train", "arithmetic.yaml", *flags(ov + ["learner.steps=1"])]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    for figures in result["methods"].values():
        assert figures["questions_validation"] == 3 and "acc_a" not in figures
    assert (tmp_path / "run" / "eval.md").read_text().startswith("| method | validation (3 q.) |")
    from gfnlm.learner.loop import build

    with pytest.raises(ConfigError, match="task.data.validation_fraction 0.01 of the 6 generated questions .* holds out 0"):
        build(load_config("arithmetic.yaml", ov + ["task.data.validation_fraction=0.01"]), engine=False)
    # no validation split to evaluate: refused by the check before training, nothing written
    run = tmp_path / "run2"
    ov = [o for o in ov if not o.startswith(("task.data.validation_fraction", "run.output_dir"))]
    assert main(["train", "arithmetic.yaml", *flags(ov + [f"run.output_dir={run}"])]) == 2
    assert "eval.split: task arithmetic has no validation records" in capsys.readouterr().err and not run.exists()


def test_labelled_share_draws_the_labelled_questions_in_that_share(tiny_llama, tmp_path):
    """task.labelled_share: the scheduler draws the labelled questions (the first `labelled`
    records) in that share of the draws, the generated ones in the rest; unset, every question
    equally often."""
    from gfnlm.learner.loop import build
    from gfnlm.learner.schedule import GroupScheduler, RecordScheduler

    ov = arithmetic_overrides(tiny_llama, tmp_path, **{"task.generate.count": 8})
    c = build(load_config("arithmetic.yaml", ov + ["task.labelled_share=0.25"]), engine=False)
    assert c.task.draw_groups() == [([0, 1], 0.25), (list(range(2, 10)), 0.75)]
    assert isinstance(c.scheduler, GroupScheduler)
    drawn = [r for _ in range(400) for r in c.scheduler.next()]
    assert 0.2 < sum(r < 2 for r in drawn) / len(drawn) < 0.3
    plain = build(load_config("arithmetic.yaml", ov), engine=False)
    assert plain.task.draw_groups() is None and isinstance(plain.scheduler, RecordScheduler)


def test_sample_and_predict_on_a_trained_run(tiny_llama, tmp_path, capsys):
    ov = arithmetic_overrides(tiny_llama, tmp_path, **{"run.evaluate_at_end": "false"})
    assert main(["train", "arithmetic.yaml", *flags(ov + ["learner.steps=2"])]) == 0
    capsys.readouterr()
    run = str(tmp_path / "run")
    assert main(["sample", run, "--prompt", "2 + 3", "--answer", "5", "-n", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(set(x) >= {"z", "log_q", "log_r", "answer"} for x in lines)
    assert all(x["log_q"] <= 0 and math.isfinite(x["log_r"]) for x in lines)
    adapter = os.path.join(run, "checkpoints", "step_0000002", "adapter")
    assert main(["predict", adapter, "--question", "Question: 2 + 3 = ? Answer:", "-k", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 6 and len(out["samples"]) == 6
    assert sum(out["distribution"].values()) == pytest.approx(1.0) or out["no_answer"] == 6
    assert main(["sample", run, "--prompt", "2 + 3", "--answer", "five"]) == 2
    assert "--answer: expected an integer" in capsys.readouterr().err


@pytest.mark.vllm
def test_sample_with_the_vllm_engine(tiny_llama_vllm, tmp_path, capsys):
    from gfnlm.actors.vllm_engine import vllm_available

    if vllm_available():
        pytest.skip(vllm_available())
    ov = arithmetic_overrides(tiny_llama_vllm, tmp_path, **{"run.evaluate_at_end": "false"})
    assert main(["train", "arithmetic.yaml", *flags(ov + ["learner.steps=1"])]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--engine", "vllm", "--prompt", "2 + 3", "--answer", "5", "-n", "3",
                 "-o", "sampler.vllm.max_model_len=256"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(x["log_q"] <= 0 and math.isfinite(x["log_r"]) for x in lines)

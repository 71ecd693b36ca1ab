"""Tasks over records: data files, the scheduler, rewards against brute force, metrics, short runs."""

import json
import math
import re

import pytest
import torch

from gfnlm.actors.models import load_model
from gfnlm.actors.scoring import PrefixScorer
from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs import load_config
from gfnlm.learner.cli import main
from gfnlm.learner.schedule import RecordScheduler, batch_mix
from gfnlm.rewards import make_task
from gfnlm.rewards.records import RecordError, load_records, read_rows
from gfnlm.rewards.scorer import attach_scorer

from conftest import tiny_overrides

STORIES = [
    {"beginning": "Ann had a dog. It was old. It liked naps.", "middle": "One day it ran.", "ending": "Ann was glad."},
    {"beginning": "Bo got a kite. The wind was weak. He waited.", "middle": "At noon it blew.", "ending": "The kite flew."},
    {"beginning": "Cy baked bread. It was flat. He tried again.", "middle": "He used more yeast.", "ending": "It rose."},
    {"beginning": "Di lost a key. She looked. It was gone.", "middle": "Her cat had it.", "ending": "She laughed."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def stories(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", STORIES[:3]), write_jsonl(tmp_path / "test.jsonl", STORIES[3:])


def task_overrides(model_dir, run_dir, kind: str, data: str, **extra):
    """A tiny run of an LM-reward task (character-level tokenizer: '.' is one token). The whole
    task section is set first, then any `task.*` key of `extra` on top of it."""
    ov = [o for o in tiny_overrides(model_dir, run_dir) if not o.startswith("task.")]
    settings = {
        "task": extra.pop("task", "{type: %s, data: {train: %s}, min_len: 1, max_len: 6}" % (kind, data)),
        "batch.prompts_per_step": 2, "batch.samples_per_prompt": 4, "batch.on_policy": 0.5,
        "batch.tempered": 0.25, "batch.replay": 0.25, "replay.seed_with_support": "false",
        "eval.max_records": 2, "eval.samples_per_record": 3, "eval.baselines": "[sample, greedy, beam, diverse_beam]",
        "eval.split": "train",  # four stories: evaluated on the training records, which every table then says
        **extra}
    return ov + [f"{k}={v}" for k, v in settings.items()]


# -- records ----------------------------------------------------------------------------------


def test_jsonl_and_csv_records_with_splits_and_subsets(tmp_path, stories):
    train, test = stories
    cfg = load_config("infilling.yaml", [f"task.data={{train: {train}, test: {test}}}"])
    rs = load_records(cfg.task.data, ["beginning", "middle", "ending"])
    assert rs.train_ids == [0, 1, 2] and rs.test_ids == [3]
    assert rs[3].fields["middle"] == "Her cat had it." and rs[3].where.endswith("test.jsonl:1")
    csv = tmp_path / "p.csv"
    csv.write_text("text,extra\n" + "".join(f"prompt {i},x\n" for i in range(10)))
    cfg = load_config("continuation.yaml", [f"task.data={{train: {csv}, test_fraction: 0.3, subset: 4, seed: 1}}"])
    rs = load_records(cfg.task.data, ["text"])
    assert len(rs.train_ids) == 4 and len(rs.test_ids) == 3
    assert not {rs[i].fields["text"] for i in rs.train_ids} & {rs[i].fields["text"] for i in rs.test_ids}
    again = load_records(cfg.task.data, ["text"])
    assert [r.fields for r in again.records] == [r.fields for r in rs.records], "seeded split and subset"
    cfg = load_config("continuation.yaml", [f"task.data={{train: {csv}, test_fraction: 0.3, validation_fraction: 0.3}}"])
    rs = load_records(cfg.task.data, ["text"])
    assert (len(rs.train_ids), len(rs.validation_ids), len(rs.test_ids)) == (5, 2, 3)
    texts = lambda ids: {rs[i].fields["text"] for i in ids}  # noqa: E731
    assert len(texts(rs.train_ids) | texts(rs.validation_ids) | texts(rs.test_ids)) == 10
    assert {rs[i].split for i in rs.validation_ids} == {"validation"}


def test_a_subset_larger_than_the_training_records_is_refused(tmp_path, stories, capsys):
    train, test = stories
    code = main(["check", "infilling.yaml", "-o", f"task.data={{train: {train}, test: {test}, subset: 100000}}"])
    assert code == 2
    assert "train.jsonl: task.data.subset 100000 is more than its 3 training records; use at most 3" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n{"txt": "b"}\n', "bad.jsonl:2: field 'text' missing"),
    ('{"text": "a"}\n["b"]\n', "bad.jsonl:2: expected a JSON object"),
    ('{"text": ""}\n', "bad.jsonl:1: field 'text' is empty"),
    ('{"text": ["a"]}\n', "bad.jsonl:1: field 'text': expected text or a number"),
    ('', "bad.jsonl: holds no records"),
])
def test_malformed_files_are_refused_with_file_line_and_field(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(RecordError, match=message.replace("[", r"\[")):
        read_rows(str(p), ["text"])


def test_csv_without_the_column_and_non_utf8(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt\nhello\n")
    with pytest.raises(RecordError, match=r"p.csv:1: no column 'text' in the header \(prompt\)"):
        read_rows(str(p), ["text"])
    q = tmp_path / "q.jsonl"
    q.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(RecordError, match="q.jsonl: not UTF-8"):
        read_rows(str(q), ["text"])


def test_disallowed_fragments_and_whole_tokens():
    """`disallowed` bans every token containing a fragment; `disallowed_tokens` only the tokens that
    are exactly the text ("A" the abbreviation's capital, not " A" the article)."""
    from gfnlm.rewards.lm_task import disallowed_token_ids

    class Vocab:
        pieces = ["A", " A", "AB", "..", ".", "Mr", " Mr", "x...y"]

        def __len__(self):
            return len(self.pieces)

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

        def convert_tokens_to_string(self, toks):
            return "".join(toks)

    assert disallowed_token_ids(Vocab(), [".."], ["A", "Mr"]) == {0, 3, 5, 7}
    assert disallowed_token_ids(Vocab(), [], []) == frozenset()
    cfg = load_config("continuation.yaml")
    assert cfg.task.first_token == "word" and cfg.task.max_len == 30
    assert {"A", "Z", "Mr", "US"} <= set(cfg.task.disallowed_tokens) and "http" in cfg.task.disallowed


def test_first_token_word_gives_the_floor_to_a_z_glued_onto_the_prompt(tiny_llama, tmp_path):
    """first_token: word: a Z that does not begin with a space and a visible character ("years" +
    "com.", or a lone "\x0b") gets the floor at every prefix; one that starts a word keeps the LM's
    log-likelihood."""
    from gfnlm.learner.loop import build

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}"} for i in range(3)])
    task = "{type: continuation, data: {train: %s}, min_len: 1, max_len: 6, first_token: word}" % data
    c = build(load_config("continuation.yaml", task_overrides(tiny_llama, tmp_path / "run", "continuation", data, task=task)))
    tok = c.task.tokenizer
    glued = Trajectory(0, list(tok("com", add_special_tokens=False).input_ids), terminated=True)
    spaced = Trajectory(0, list(tok(" com", add_special_tokens=False).input_ids), terminated=True)
    blank = Trajectory(0, list(tok("\x0b", add_special_tokens=False).input_ids), terminated=True)
    c.task.score([glued, spaced, blank])
    assert glued.log_r[1:] == [c.task.floor] * glued.length and not c.task.is_valid(glued)
    assert blank.log_r[1:] == [c.task.floor] * blank.length and not c.task.is_valid(blank)
    # this tokenizer keeps the space apart: " " alone is no word yet, " c" onwards is
    assert spaced.log_r[1] == c.task.floor and all(x > c.task.floor for x in spaced.log_r[2:]) and c.task.is_valid(spaced)


def test_check_rejects_a_missing_column_before_anything_loads(tmp_path, stories, capsys):
    train, test = stories
    code = main(["check", "infilling.yaml", "-o", f"task.data={{train: {train}}}", "-o", "task.suffix_template=. {endng}"])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl:1: field 'endng' missing" in err
    # no test records: evaluating on the training records must be asked for, and is said
    assert main(["check", "infilling.yaml", "-o", f"task.data={{train: {train}}}"]) == 2
    assert ("eval.split: task infilling has no test records to evaluate on; set task.data.test (a file) or "
            "task.data.test_fraction, or eval.split=train") in capsys.readouterr().err
    assert main(["check", "infilling.yaml", "-o", f"task.data={{train: {train}}}", "-o", "eval.split=train"]) == 0
    err = capsys.readouterr().err
    assert "3 train, 0 validation and 0 test records" in err and "evaluates on 3 of the 3 TRAINING records" in err
    assert main(["check", "infilling.yaml", "-o", f"task.data={{train: {train}, test: {test}}}"]) == 0
    assert "evaluates on 1 of the 1 test records" in capsys.readouterr().err
    # train refuses the same before writing a run folder
    run = tmp_path / "run"
    assert main(["train", "infilling.yaml", "-o", f"task.data={{train: {train}}}", "-o", "task.context_template={nope}",
                 "-o", f"run.output_dir={run}"]) == 2
    assert not run.exists()


def test_shipped_presets_and_data_check():
    for name in ("random_number.yaml", "continuation.yaml", "infilling.yaml", "constrained.yaml", "cluster.yaml",
                 "arithmetic.yaml", "subjectivity.yaml"):  # the last two read ../shared/data
        assert main(["check", name]) == 0


def test_every_experiment_preset_plans_valid_runs(tmp_path):
    import glob
    import os

    from gfnlm.learner.experiment import configs_of, read_spec
    from gfnlm.learner.selection import selection_plan

    names = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "experiments", "*.yaml")))
    assert len(names) >= 5
    selecting = set()
    for name in names:
        spec = read_spec(name)
        plan = configs_of(spec, str(tmp_path), [])
        assert {run for run, _, _, _ in plan} == {r["name"] for r in spec["runs"]}, name
        # every selection candidate builds, its overrides applied, and is judged on a validation split
        for run, cand, cfg in selection_plan(spec, str(tmp_path), []):
            assert cfg.eval.split == "validation", (name, cand)
            selecting.add(os.path.basename(name))
    assert {"continuation.yaml", "infilling.yaml", "constrained.yaml"} <= selecting
    # {out} and {seed} in a run's overrides: the arithmetic run that starts from the same seed's SFT adapter
    spec = read_spec("arithmetic")
    inits = {(run, seed): cfg.lora.init for run, seed, cfg, _ in configs_of(spec, str(tmp_path), [])}
    assert inits[("sft-then-gflownet", 1)] == os.path.join(str(tmp_path), "sft-seed1")
    assert inits[("gflownet", 1)] is None and inits[("sft", 0)] is None


# -- scheduler and batch mix -------------------------------------------------------------------


def test_record_scheduler_is_seeded_covers_every_record_and_resumes_exactly():
    s = RecordScheduler(list(range(10)), per_step=3, seed=4)
    first = [s.next() for _ in range(10)]
    epoch0 = [r for step in first for r in step][:10]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    same = RecordScheduler(list(range(10)), 3, seed=4)
    assert [same.next() for _ in range(2)] == first[:2]
    s2 = RecordScheduler(list(range(10)), per_step=3, seed=4)
    for _ in range(4):
        s2.next()
    state = s2.state_dict()
    s3 = RecordScheduler(list(range(10)), per_step=3, seed=4)
    s3.load_state_dict(state)
    assert [s3.next() for _ in range(6)] == first[4:]


def test_group_scheduler_draws_each_group_in_its_share_and_resumes_exactly():
    """Labelled questions 5 % of the draws however few the unlabelled are: each slot picks a group
    by a seeded draw, each group gives every record once per epoch, and a restored state continues
    with the very records the uninterrupted scheduler gives."""
    from gfnlm.learner.schedule import GroupScheduler, scheduler_for

    groups = [([0, 1], 0.05), (list(range(2, 22)), 0.95)]
    s = GroupScheduler(groups, per_step=4, seed=3)
    steps = [s.next() for _ in range(1000)]
    drawn = [r for step in steps for r in step]
    assert 0.04 < sum(r < 2 for r in drawn) / len(drawn) < 0.06
    rest = [r for r in drawn if r >= 2]
    assert all(sorted(rest[k:k + 20]) == list(range(2, 22)) for k in range(0, 200, 20)), "each epoch covers every record"
    again = GroupScheduler(groups, 4, seed=3)
    for _ in range(7):
        again.next()
    resumed = GroupScheduler(groups, 4, seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next() for _ in range(20)] == steps[7:27]
    assert isinstance(scheduler_for([0, 1, 2], None, 2, 0), RecordScheduler)
    only = scheduler_for([2, 3], groups, 2, 0)  # SFT trains on the labelled ones alone: the other group is empty
    assert {r for _ in range(5) for r in only.next()} == {2, 3}


def test_batch_mix_caps_replay_by_what_the_buffer_holds():
    cfg = load_config("random_number.yaml", ["batch.samples_per_prompt=8", "batch.on_policy=0.5", "batch.tempered=0.25",
                                             "batch.replay=0.25"]).batch
    assert batch_mix(cfg, 0) == (6, 2, 0)
    assert batch_mix(cfg, 1) == (5, 2, 1)
    assert batch_mix(cfg, 50) == (4, 2, 2)


# -- rewards against brute force ------------------------------------------------------------------


def brute_force(model, context, tokens, end_ids=None, suffix=None) -> list[float]:
    """Each prefix's log R from an independent forward pass."""
    out = []
    for i in range(len(tokens) + 1):
        seq = context + tokens[:i] + (suffix or [])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        C = len(context)
        v = sum(float(logp[C + k - 1, tokens[k]]) for k in range(i))
        if suffix:
            v += sum(float(logp[C + i + k - 1, suffix[k]]) for k in range(len(suffix)))
        else:
            v += float(torch.logsumexp(logp[C + i - 1, end_ids], 0))
        out.append(v)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_scorer_with_and_without_a_suffix_equals_brute_force(kind, tiny_llama, tiny_gpt2):
    model, tok = load_model(tiny_llama if kind == "llama" else tiny_gpt2)
    scorer = PrefixScorer(model, tok.pad_token_id)
    ctx = tok("The cat").input_ids
    trajs = [Trajectory(0, tok.encode(" sat on", add_special_tokens=False)), Trajectory(0, []),
             Trajectory(0, tok.encode(" ran", add_special_tokens=False), tool_mask=[False, True, False, False])]
    suffix = tok.encode(". It slept.", add_special_tokens=False)
    end = [tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("!")]
    cases = [(G, rows, dict(suffix_ids=suffix)) for G in (1, 2, 4, 8) for rows in (3, 1024)]
    for G, rows, kw in [(4, 1024, dict(end_ids=end)), (4, 1024, dict(suffix_ids=suffix[:1]))] + cases:
        # prefixes per sequence: one, groups of several sizes, one group; one group per pass or many
        scorer.prefixes_per_row, scorer.max_rows = G, rows
        got = scorer.score(ctx, trajs, **kw)
        final = scorer.score(ctx, trajs, prefixes="final", **kw)
        for t, g, f in zip(trajs, got, final):
            ref = brute_force(model, ctx, t.tokens, kw.get("end_ids"), kw.get("suffix_ids"))
            if t.tool_mask:  # a tool token adds no log p: compare with the naive scorer that skips it
                ref = scorer.score_naive(ctx, [t], **kw)[0]
            assert g == pytest.approx(ref, abs=1e-4)
            assert f[-1] == pytest.approx(ref[-1], abs=1e-4) and all(math.isnan(x) for x in f[:-1])


@pytest.mark.parametrize("shared", [0, 9])
def test_the_scorer_of_a_sliding_window_model_equals_brute_force_past_the_window(shared, tmp_path):
    """A Mistral whose window (6) is shorter than context + Z + Y: the cached context (shared or
    not) keeps every position and the model's own mask applies the window; the suffix pass takes one
    pass per prefix length instead of the tree mask, which would see past the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from gfnlm.actors.tiny import build_tokenizer

    tok = build_tokenizer(str(tmp_path), None)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             sliding_window=6, pad_token_id=tok.pad_token_id)).eval()
    scorer = PrefixScorer(model, tok.pad_token_id, max_rows=4)
    ctx = list(range(5, 17))
    trajs = [Trajectory(0, [30, 31, 32, 33, 34]), Trajectory(0, []), Trajectory(0, [40, 41, 42], tool_mask=[False, True, False])]
    suffix, end = [50, 51, 52, 53], [3, 4]
    for kw in (dict(suffix_ids=suffix), dict(end_ids=end)):
        got = scorer.score(ctx, trajs, shared=shared, **kw)
        for t, g in zip(trajs, got):
            ref = scorer.score_naive(ctx, [t], **kw)[0]
            assert g == pytest.approx(ref, abs=1e-4)
            if not t.tool_mask:
                assert g == pytest.approx(brute_force(model, ctx, t.tokens, kw.get("end_ids"), kw.get("suffix_ids")), abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_scorer_scores_only_the_states_that_can_end(kind, tiny_llama, tiny_gpt2):
    """With `can_end` the suffix pass skips the states that cannot end (NaN there) and scores the others,
    and the whole Z, as the plain scorer does."""
    from gfnlm.actors.trajectory import can_end_states

    model, tok = load_model(tiny_llama if kind == "llama" else tiny_gpt2)
    scorer = PrefixScorer(model, tok.pad_token_id)
    ctx = tok("The cat").input_ids
    trajs = [Trajectory(0, list(range(10, 17)), tool_mask=[False, False, True, True, False, True, False]),
             Trajectory(0, list(range(20, 24)))]
    suffix = tok.encode(". It slept.", add_special_tokens=False)
    ends = lambda t: can_end_states(t.length, t.tool_mask, 1, end_only_after_tool=True)  # noqa: E731
    every = scorer.score(ctx, trajs, suffix_ids=suffix, first=1, terminable_only=True)
    some = scorer.score(ctx, trajs, suffix_ids=suffix, first=1, terminable_only=True, can_end=ends)
    assert ends(trajs[0]) == [False, False, False, False, True, False, True, False]
    for t, e, g in zip(trajs, every, some):
        wanted = [i for i, ok in enumerate(ends(t)) if ok or i == t.length]
        assert [i for i, x in enumerate(g) if not math.isnan(x)] == wanted
        assert [g[i] for i in wanted] == pytest.approx([e[i] for i in wanted], abs=1e-5)


def lm_task(model_dir, tmp_path, task, data, **extra):
    cfg = load_config(f"{task}.yaml", task_overrides(model_dir, tmp_path / "run", task, data, **extra))
    model, tok = load_model(model_dir)
    t = make_task(cfg, tok)
    attach_scorer(t, cfg, model)
    return t, model, tok


def test_continuation_reward_is_the_lm_likelihood_with_floors(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": "The dog"}, {"text": "A cat"}])
    task, model, tok = lm_task(tiny_llama, tmp_path, "continuation", data, **{"task.min_len": 2, "task.disallowed": '["\\n"]'})
    nl = tok.convert_tokens_to_ids("\n")
    assert nl in task.banned_ids and task.end_ids[0] not in task.banned_ids
    good = Trajectory(1, tok.encode(" ran", add_special_tokens=False))
    bad = Trajectory(0, tok.encode(" a", add_special_tokens=False) + [nl] + tok.encode("b", add_special_tokens=False))
    task.score([good, bad])
    ref = brute_force(model, task.context_ids(1), good.tokens, task.end_ids)
    assert good.log_r[:2] == [task.floor] * 2, "shorter than min_len"
    assert good.log_r[2:] == pytest.approx(ref[2:], abs=1e-4)
    ref_bad = brute_force(model, task.context_ids(0), bad.tokens, task.end_ids)
    assert bad.log_r[2] == pytest.approx(ref_bad[2], abs=1e-4) and bad.log_r[3:] == [task.floor] * 2
    assert task.is_valid(good) and not task.is_valid(bad)


def test_infilling_reward_scores_z_between_beginning_and_ending(tiny_llama, tmp_path, stories):
    train, _ = stories
    task, model, tok = lm_task(tiny_llama, tmp_path, "infilling", train, **{"task.max_len": 20})
    t = Trajectory(2, tok.encode(" He ate", add_special_tokens=False))
    task.score([t])
    ctx = tok(STORIES[2]["beginning"]).input_ids
    suffix = tok.encode(". " + STORIES[2]["ending"], add_special_tokens=False)
    ref = brute_force(model, ctx, t.tokens, suffix=suffix)
    assert t.log_r[1:] == pytest.approx(ref[1:], abs=1e-4) and t.log_r[0] == task.floor
    assert task.prompt_text(2).startswith("Beginning: Cy baked bread.") and task.prompt_text(2).endswith("Middle:")
    ref_z = task.reference(2)
    assert tok.decode(ref_z.tokens) == " He used more yeast"  # the end token's "." is dropped
    seeds = task.seed_trajectories(2)
    assert seeds and seeds[0].log_r is not None and len(seeds[0].log_r) == seeds[0].length + 1


def test_constrained_reward_puts_unsatisfied_prefixes_at_the_floor(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "The dog", "words": "cat"}])
    task, model, tok = lm_task(tiny_llama, tmp_path, "constrained", data,
                               **{"task.constraint": "{include_column: words, exclude: [dog]}", "task.max_len": 12})
    t = Trajectory(0, tok.encode(" a cat sat", add_special_tokens=False))
    task.score([t])
    ref = brute_force(model, task.context_ids(0), t.tokens, task.end_ids)
    text_ok = [task.constraint_ok(0, tok.decode(t.tokens[:i])) for i in range(t.length + 1)]
    assert text_ok.index(True) == len(" a cat")
    for i, ok in enumerate(text_ok):
        assert t.log_r[i] == (pytest.approx(ref[i], abs=1e-4) if ok else task.floor)
    u = Trajectory(0, tok.encode(" a cat dog", add_special_tokens=False))
    task.score([u])
    assert u.log_r[-1] == task.floor, "an excluded word"


# -- metrics on hand-made samples --------------------------------------------------------------


def test_metrics_on_hand_made_samples():
    from gfnlm.rewards.constrained import satisfies
    from gfnlm.rewards.lm_eval import bleu_gleu, distinct_n, pairwise_diversity

    # distinct-1: "a b a" + "a c" -> grams a,b,a,a,c: 3 unique of 5
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "a c"], 2) == pytest.approx(3 / 3)
    # two identical and one orthogonal unit vectors: similarities 1, 0, 0 -> diversity 1 - 1/3
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert pairwise_diversity(e) == pytest.approx(2 / 3)
    assert pairwise_diversity(e[:1]) is None
    bleu, gleu = bleu_gleu("the cat sat on the mat", "the cat sat on the mat")
    assert bleu == pytest.approx(1.0) and gleu == pytest.approx(1.0)
    bleu, gleu = bleu_gleu("dogs bark", "the cat sat on the mat")
    assert bleu < 0.05 and gleu == 0.0
    bleu, gleu = bleu_gleu("The cat sat on the mat", "the cat sat on the mat")  # case kept, as the authors'
    assert bleu < 1.0 and gleu < 1.0
    assert satisfies("A Cat sat.", ["cat"], []) and not satisfies("A cat sat.", ["dog"], [])
    assert not satisfies("A cat sat.", [], ["sat"]) and not satisfies("one two three", [], [], max_words=2)


# -- short training runs, one per task ------------------------------------------------------------


@pytest.mark.parametrize("task", ["continuation", "infilling", "constrained", "sft"])
def test_short_training_run_per_task(task, tiny_llama, tmp_path, stories, capsys):
    train, test = stories
    if task in ("infilling", "sft"):
        data, name = f"{train}, test: {test}", "infilling"
        extra = {"task": "{type: infilling, data: {train: %s, test: %s}, min_len: 1, max_len: 20}" % (train, test),
                 "replay.seed_with_support": "true", "eval.split": "test"}
    else:
        data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}", "words": "a"} for i in range(5)])
        name, extra = task, {}
        if task == "constrained":
            extra["task"] = "{type: constrained, data: {train: %s}, min_len: 1, max_len: 6, constraint: {include_column: words}}" % data
    if task == "sft":
        extra["learner.objective"] = "sft"
    ov = task_overrides(tiny_llama, tmp_path / "run", name, data, **extra)
    run = tmp_path / "run"
    assert main(["train", f"{name}.yaml", *sum([["-o", o] for o in ov + ["learner.steps=4"]], [])]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in lines)
    if task != "sft":
        assert all(r["trained"] == 8 for r in lines), "2 records x 4 samples per step"
    result = json.loads((run / "eval.json").read_text())
    assert "trained" in result["methods"] and result["methods"]["trained"]["records"] >= 1
    if name == "infilling":
        assert "bleu4" in result["methods"]["trained"] and result["records"] == [3]
    said = capsys.readouterr()
    said = said.out + said.err
    assert "gfnlm: loading the policy" in said, "the set-up says what it is doing before the run folder exists"
    if task == "infilling":  # the buffer's seeds are scored before the first step: minutes on a CPU, so it says so
        assert re.search(r"replay: scoring the seeds of \d+ training records", said)
        assert re.search(r"replay: [1-9]\d* seed trajectories in the buffer", said)
    assert (run / "eval.md").read_text().startswith("**") and (run / "eval.png").stat().st_size > 1000
    held_out = name == "infilling"  # the others have no test split: evaluated on their training records, and say so
    assert result["split"] == ("test" if held_out else "train")
    assert ("TRAINING (not held out)" in (run / "eval.md").read_text()) is not held_out


def test_the_reward_lm_is_fitted_on_the_training_stories_once_per_content(tiny_llama, tmp_path, stories, monkeypatch):
    """reward.fit: a LoRA SFT of the base model on the training stories, merged and saved once under
    $GFNLM_HOME/fitted/<hash>; the run's config then names the fitted model (the policy starts there
    and the reward shares it), the texts' NLL is lower under it, and the same content is not fitted again."""
    import gfnlm.learner.reward_fit as rf
    from gfnlm.configs import ConfigError

    monkeypatch.setenv("GFNLM_HOME", str(tmp_path / "home"))
    train, test = stories
    fit = "{template: '{beginning} {middle} {ending}', steps: 40, batch_size: 3, lr: 0.02, r: 4}"
    ov = task_overrides(tiny_llama, tmp_path / "run", "infilling", train, **{
        "task": "{type: infilling, data: {train: %s, test: %s}, min_len: 1, max_len: 8}" % (train, test),
        "reward.fit": fit, "eval.split": "test"})
    cfg = load_config("infilling.yaml", ov)
    done = rf.fitted_config(cfg, log=lambda *_: None)
    folder = done.model.path
    assert done.reward.fit is None and done.reward.model is None and folder.startswith(str(tmp_path / "home" / "fitted"))
    info = json.loads(open(f"{folder}/gfnlm_fit.json").read())
    assert info["texts"] == 3 and info["last_loss"] < info["first_loss"]

    def nll(path):
        model, tok = load_model(path)
        total = 0.0
        with torch.no_grad():
            for text in rf.fit_texts(cfg):
                ids = torch.tensor([list(tok(text).input_ids) + [tok.eos_token_id]])
                total += model(input_ids=ids, labels=ids).loss.item()
        return total

    assert nll(folder) < nll(tiny_llama) - 0.5  # summed over the 3 stories
    monkeypatch.setattr(rf, "fit", lambda *a, **k: pytest.fail("fitted again"))
    assert rf.fitted_config(cfg, log=lambda *_: None).model.path == folder  # the same content: reused
    other = load_config("infilling.yaml", ov + ["reward.fit.steps=41"])
    assert rf.fit_key(other, rf.fit_texts(other)) != rf.fit_key(cfg, rf.fit_texts(cfg))
    beside = rf.fitted_config(load_config("infilling.yaml", ov + ["reward.fit.policy_starts_here=false"]),
                              log=lambda *_: None)  # the same fit, placed beside the plain base policy
    assert beside.model.path == tiny_llama and beside.reward.model == folder
    assert main(["train", "infilling.yaml", *sum([["-o", o] for o in ov + ["learner.steps=2"]], [])]) == 0
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert saved.model.path == folder and saved.reward.fit is None
    with pytest.raises(ConfigError, match="reward.fit: fits the reward LM from the base model itself"):
        load_config("infilling.yaml", ov + [f"reward.adapter={tmp_path}"])


def test_a_reward_fit_with_keep_best_keeps_the_lora_of_the_lowest_validation_nll(tiny_llama, tmp_path, stories, monkeypatch):
    """reward.fit.keep_best (early stopping): the validation records' NLL is measured every
    `validation_every` steps; the fit stops `patience` measurements after the lowest and the merged
    model is the base plus the LoRA of that lowest measurement, not of the last step. Without a
    validation split it is a one-line error."""
    import gfnlm.learner.reward_fit as rf
    from gfnlm.configs import ConfigError

    monkeypatch.setenv("GFNLM_HOME", str(tmp_path / "home"))
    train, test = stories
    fit = "{template: '{beginning} {middle} {ending}', steps: 40, batch_size: 2, lr: 0.02, r: 4, " \
          "validation_every: 5, keep_best: true, patience: 2}"
    ov = task_overrides(tiny_llama, tmp_path / "run", "infilling", train, **{
        "task": "{type: infilling, data: {train: %s, test: %s, validation_fraction: 0.34}, min_len: 1, max_len: 8}"
                % (train, test), "reward.fit": fit, "eval.split": "test"})
    cfg = load_config("infilling.yaml", ov)
    assert len(rf.fit_texts(cfg, "validation")) == 1 and len(rf.fit_texts(cfg)) == 2
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.6, 2.0])  # steps 0, 5, 10 (lowest), 15, 20 (stop); 25 never measured
    seen = []

    def fake_nll(model, encoded, pad, batch_size=16):
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        seen.append((q.base_layer.weight + q.get_delta_weight("default")).detach().clone())
        return next(scripted)

    monkeypatch.setattr(rf, "mean_nll", fake_nll)
    logs = []
    folder = rf.fitted_config(cfg, log=logs.append).model.path
    info = json.loads(open(f"{folder}/gfnlm_fit.json").read())
    assert info["validation_nll"] == [[0, 5.0], [5, 4.0], [10, 3.0], [15, 3.5], [20, 3.6]]
    assert info["kept_step"] == 10 and info["steps_run"] == 20 and info["validation_texts"] == 1
    assert any("stopped at step 20" in m and "(step 10)" in m for m in logs)
    saved, _ = load_model(folder)
    kept = saved.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(kept, seen[2], atol=1e-5) and not torch.allclose(kept, seen[4], atol=1e-5)
    plain = load_config("infilling.yaml", ov + ["reward.fit.keep_best=false"])
    assert rf.fit_key(plain, rf.fit_texts(plain)) == rf.fit_key(
        load_config("infilling.yaml", ov + ["reward.fit.keep_best=false", "reward.fit.validation_every=7"]),
        rf.fit_texts(plain))  # without keep_best the measurement changes only the log, not the fitted model
    with pytest.raises(ConfigError, match="reward.fit.keep_best: .*no validation split; set task.data.validation_fraction"):
        load_config("infilling.yaml", ov + ["task.data.validation_fraction=0"])


def test_two_processes_needing_one_reward_fit_fit_it_once(tiny_llama, tmp_path, stories, monkeypatch):
    """Runs of one experiment split across processes (`--runs`) need the same fit at once: the
    second waits for the first's (a lock beside the folder) and reuses it, never fitting it twice or
    writing into the folder the first is writing."""
    import os
    import threading
    import time

    import gfnlm.learner.reward_fit as rf

    monkeypatch.setenv("GFNLM_HOME", str(tmp_path / "home"))
    train, test = stories
    ov = task_overrides(tiny_llama, tmp_path / "run", "infilling", train, **{
        "task": "{type: infilling, data: {train: %s, test: %s}, min_len: 1, max_len: 8}" % (train, test),
        "reward.fit": "{template: '{beginning} {middle} {ending}', steps: 2, r: 4}", "eval.split": "test"})
    cfg = load_config("infilling.yaml", ov)
    fits, logs = [], []

    def slow_fit(cfg, texts, folder, log=print, validation=None):
        fits.append(folder)
        time.sleep(1.0)  # long enough that the other thread asks while this one fits
        os.makedirs(folder)
        open(os.path.join(folder, "gfnlm_fit.json"), "w").write("{}")
        return {"first_loss": 1.0, "last_loss": 0.5, "seconds": 1.0}

    monkeypatch.setattr(rf, "fit", slow_fit)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(rf.fitted_config(cfg, log=logs.append).model.path))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(fits) == 1 and paths == [fits[0]] * 2
    assert any("another process is fitting" in m for m in logs) and any("reusing" in m for m in logs)


def test_constrained_replay_seeds_are_rejection_samples_that_satisfy_c(tiny_llama, tmp_path):
    """seed_tries: the base model's continuations of the reward's context, kept when they end and
    satisfy c, each once, scored; the same record gives the same seeds."""
    from gfnlm.learner.loop import build

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}", "words": "a"} for i in range(3)])
    task = ("{type: constrained, data: {train: %s}, min_len: 1, max_len: 6, seed_tries: 40, "
            "constraint: {exclude: [b], max_words: 2}}" % data)
    c = build(load_config("constrained.yaml", task_overrides(tiny_llama, tmp_path / "run", "constrained", data, task=task)))
    seeds = c.task.seed_trajectories(0)
    assert 0 < len(seeds) <= 40 and len({tuple(t.tokens) for t in seeds}) == len(seeds)
    for t in seeds:
        text = c.task.tokenizer.decode(t.tokens)
        assert t.terminated and c.task.constraint_ok(0, text) and t.log_r[-1] > c.task.floor
    assert [t.tokens for t in c.task.seed_trajectories(0)] == [t.tokens for t in seeds]


def test_every_record_task_samples_from_its_trained_adapter(tiny_llama, tmp_path, stories, capsys):
    """gfnlm sample on a continuation run (--prompt fills its one column) and an infilling run
    (--prompt is a JSON object of its fields; plain text is refused with the fields to give)."""
    train_file, test_file = stories
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}"} for i in range(3)])
    runs = {"continuation": (data, None), "infilling": (train_file, test_file)}
    for kind, (train, test) in runs.items():
        task = "{type: %s, data: {train: %s%s}, min_len: 1, max_len: 6}" % (kind, train, f", test: {test}" if test else "")
        ov = task_overrides(tiny_llama, tmp_path / kind, kind, train, task=task, **{"run.evaluate_at_end": "false"})
        assert main(["train", f"{kind}.yaml", *sum([["-o", o] for o in ov + ["learner.steps=2"]], [])]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "continuation"), "--prompt", "Once upon a time.", "-n", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(math.isfinite(x["log_q"]) and math.isfinite(x["log_r"]) for x in lines)
    story = json.dumps({"beginning": "Ann had a dog. It was old. It liked naps.", "ending": "Ann was glad."})
    assert main(["sample", str(tmp_path / "infilling"), "--prompt", story, "-n", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(math.isfinite(x["log_r"]) for x in lines)
    assert main(["sample", str(tmp_path / "infilling"), "--prompt", "Ann had a dog.", "-n", "2"]) == 2
    assert "--prompt: task infilling uses the fields beginning, ending" in capsys.readouterr().err


def test_sft_lowers_the_loss_of_the_references(tiny_llama, tmp_path, stories):
    from gfnlm.learner.loop import build, references, train

    train_file, test_file = stories
    ov = task_overrides(tiny_llama, tmp_path / "run", "infilling", train_file, **{
        "task": "{type: infilling, data: {train: %s, test: %s}, min_len: 1, max_len: 20}" % (train_file, test_file),
        "learner.objective": "sft", "learner.steps": 30, "batch.prompts_per_step": 3, "run.evaluate_at_end": "false"})
    cfg = load_config("infilling.yaml", ov)
    c = build(cfg)
    refs = references(c, c.task.train_ids)
    with torch.no_grad():
        before = c.learner.loss(refs, 1.0)[0].item()
    c = train(cfg, str(tmp_path / "run"))
    with torch.no_grad():
        after = c.learner.loss(refs, 1.0)[0].item()
    assert after < before - 0.3


def test_resume_of_an_lm_task_continues_exactly(tiny_llama, tmp_path):
    from gfnlm.learner.loop import train

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}"} for i in range(5)])

    def run(folder, steps, resume=False):
        ov = task_overrides(tiny_llama, folder, "continuation", data, **{"run.evaluate_at_end": "false"})
        train(load_config("continuation.yaml", ov + [f"learner.steps={steps}"]), str(folder), resume=resume)
        return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]

    a = run(tmp_path / "a", 5)
    run(tmp_path / "b", 3)
    b = run(tmp_path / "b", 5, resume=True)
    assert b == pytest.approx(a, rel=1e-5)


def test_bertscore_with_a_local_model_folder(tiny_llama):
    from gfnlm.rewards.lm_eval import BertScore

    bs = BertScore(tiny_llama)
    assert bs.f1("the cat sat", "the cat sat") == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < bs.f1("zzz qqq", "the cat sat") < 1.0 and bs.f1("", "the cat sat") == 0.0


def test_reward_adapter_is_merged_into_the_frozen_reward_model(tiny_llama, tmp_path):
    """reward.adapter: the reward LM is the base plus that (e.g. SFT-fitted) adapter, merged."""
    from gfnlm.actors.policy import Policy

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": "The dog"}])
    cfg0 = load_config("continuation.yaml", task_overrides(tiny_llama, tmp_path / "run", "continuation", data))
    policy = Policy(cfg0.model, cfg0.lora)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    policy.model.save_pretrained(str(tmp_path / "adapter"))
    cfg = load_config("continuation.yaml", task_overrides(tiny_llama, tmp_path / "run", "continuation", data,
                                                          **{"reward.adapter": str(tmp_path / "adapter")}))
    plain, tuned = make_task(cfg0, policy.tokenizer), make_task(cfg, policy.tokenizer)
    attach_scorer(plain, cfg0, None)
    attach_scorer(tuned, cfg, None)
    t1, t2 = Trajectory(0, [40, 41]), Trajectory(0, [40, 41])
    plain.score([t1])
    tuned.score([t2])
    base_model, _ = load_model(tiny_llama)
    ref_plain = brute_force(base_model, plain.context_ids(0), t1.tokens, plain.end_ids)
    ref_tuned = brute_force(policy.model, tuned.context_ids(0), t2.tokens, tuned.end_ids)  # adapter on
    assert t1.log_r[1:] == pytest.approx(ref_plain[1:], abs=1e-4)
    assert t2.log_r[1:] == pytest.approx(ref_tuned[1:], abs=1e-4)
    assert abs(t2.log_r[-1] - t1.log_r[-1]) > 1e-2


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    from gfnlm.actors.models import ModelError
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": "The dog"}])
    cfg = load_config("continuation.yaml", task_overrides(tiny_llama, tmp_path / "run", "continuation", data,
                                                          **{"reward.model": tiny_gpt2}))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<extra>"])
    task = make_task(cfg, tok)
    with pytest.raises(ModelError, match="reward.model: .* another tokenizer"):
        attach_scorer(task, cfg, None)


def test_eval_png_of_a_task_with_its_own_figure_plots_it_against_likelihood(tmp_path, monkeypatch):
    """Constrained generation's eval.png carries its own trade-off, satisfaction against mean
    log-likelihood, and infilling's BLEU-4, beside the diversity panel every LM task draws; other
    tasks keep one panel."""
    import matplotlib.figure
    import matplotlib.image

    from gfnlm.rewards.lm_eval import plot_methods

    figures = {"trained": {"satisfied": 0.97, "loglik_mean": -30.0, "loglik_max": -20.0, "diversity": 0.3},
               "sample": {"satisfied": 0.03, "loglik_mean": -54.0, "loglik_max": -30.0, "diversity": 0.6}}
    assert plot_methods(figures, str(tmp_path / "c.png"), "constrained") == [("satisfied", 2), ("diversity", 2)]
    assert plot_methods({m: {k: v for k, v in f.items() if k != "satisfied"} for m, f in figures.items()},
                        str(tmp_path / "n.png"), "continuation") == [("diversity", 2)]
    infilling = {m: {"bleu4": b, "gleu4": 2 * b, "loglik_mean": f["loglik_mean"], "loglik_max": f["loglik_max"],
                     "diversity": f["diversity"]} for (m, f), b in zip(figures.items(), (1.3, 1.5))}
    saved = []
    real_save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_save(fig, *a, **k)))
    assert plot_methods(infilling, str(tmp_path / "i.png"), "infilling") == [("bleu4", 2), ("diversity", 2)]
    bleu, diversity = saved[-1].axes
    assert bleu.get_ylim()[0] == 0 and bleu.get_ylim()[1] > 1.5 and "BLEU-4" in bleu.get_title()
    assert diversity.get_ylim() == (-0.02, 1.02), "diversity on its whole 0-1 range, not blown up"
    unscored = {m: {**f, "bleu4": float("nan")} for m, f in infilling.items()}
    assert plot_methods(unscored, str(tmp_path / "u.png"), "infilling") == [("bleu4", 0), ("diversity", 2)]
    assert saved[-1].axes[0].get_ylim()[1] > 0
    wide, narrow, infill = (matplotlib.image.imread(tmp_path / n).shape for n in ("c.png", "n.png", "i.png"))
    assert wide[0] == narrow[0] == 500 and (wide[1], narrow[1]) == (1300, 700), "two panels against one"
    assert infill[:2] == wide[:2]

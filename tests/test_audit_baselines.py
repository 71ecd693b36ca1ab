"""Audit of the baselines and user commands: diverse beam search against a plain-Python reference,
transformers' beam search and brute force, the `gfnlm experiment` table, and the log q that
`gfnlm sample` reports."""

import argparse
import itertools
import json
import math
import os
import pathlib

import pytest
import torch
import yaml

from gfnlm.actors.decoding import group_beam_search, hf_generate
from gfnlm.configs import ConfigError
from gfnlm.actors.tiny import build_model

from conftest import tiny_overrides

NEG_INF = -float("inf")

# -- diverse beam search: reference, transformers, brute force ----------------------------------


def load_peaked(path: str, scale: float):
    """A tiny random model with its output layer scaled: a random init gives near-uniform next-token
    distributions, whose near-ties would make any comparison of rankings fragile."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


@torch.no_grad()
def next_logprobs(model, prompt: list[int], seqs: list[list[int]], banned=()) -> list[list[float]]:
    """log q(· | prompt + seq) for prefixes of one length: full forward passes, no KV cache. Banned
    tokens are taken out before the softmax (the rest renormalised)."""
    ids = torch.tensor([prompt + s for s in seqs])
    logits = model(input_ids=ids).logits[:, -1, :].float()
    if banned:
        logits[:, list(banned)] = NEG_INF
    return torch.log_softmax(logits, -1).tolist()


def brute_group_beam_search(model, prompt, num_beams, num_groups, max_new, min_new, end_ids, penalty, banned=(),
                            stops=None):
    """Group beam search, each group run as transformers' beam search (length_penalty 1.0,
    early_stopping False), in plain Python over lists with full forward passes.

    G groups of P = B / G beams, each starting from the empty prefix (score 0). At step k = 0, 1, ...
    every live prefix z of a group still searching gets log q(t | z) for every token t (banned
    tokens taken out before the softmax; ends get -inf while k < min_new, without renormalising).
    Groups go in order; group g ranks its finite candidates (z, t) by score(z) + log q(t | z) -
    penalty × (times t was chosen for a live beam at this step by groups < g) and walks the best
    max(2, 1 + |ends|) · P: an end token at rank < P offers z, terminated, at value
    (score(z) + log q(t | z)) / (|z| + 1); the first P other tokens become the live beams z + t,
    scored by the unpenalised sum, and count as chosen. At the last step (k = max_new - 1) those
    live beams are offered too, cut, at value score / max_new. The group holds its best P offers by
    value. It stops when it has no live beam, or holds P hypotheses and its best live score /
    (k + 1) is at most the worst value held. Returned: each group's hypotheses best first, group
    after group, as (z, terminated). `stops`, a list, gets per group the step after which it stopped."""
    per = num_beams // num_groups
    ends = set(end_ids)
    walk = max(2, 1 + len(end_ids)) * per
    live = [[(0.0, [])] for _ in range(num_groups)]  # (score, z) per group
    held = [[] for _ in range(num_groups)]  # (value, z, terminated)
    stopped = [None] * num_groups
    for step in range(max_new):
        last = step == max_new - 1
        searching = [g for g in range(num_groups) if stopped[g] is None]
        prefixes = [z for g in searching for _, z in live[g]]
        table = iter(next_logprobs(model, prompt, prefixes, banned) if prefixes else [])
        logp = {g: [next(table) for _ in live[g]] for g in searching}
        used: dict[int, int] = {}
        for g in searching:
            cands = []
            for (score, z), lp in zip(live[g], logp[g]):
                for t, x in enumerate(lp):
                    if step < min_new and t in ends:
                        x = NEG_INF
                    if x != NEG_INF:
                        cands.append((score + x - penalty * used.get(t, 0), score + x, z, t))
            cands.sort(key=lambda c: -c[0])
            chosen, offers = [], []
            for rank, (_, raw, z, t) in enumerate(cands[:walk]):
                if t in ends:
                    if rank < per:
                        offers.append((raw / (len(z) + 1), z, True))
                elif len(chosen) < per:
                    chosen.append((raw, z + [t]))
                    used[t] = used.get(t, 0) + 1
            if last:
                offers += [(raw / max_new, z, False) for raw, z in chosen]
            held[g] = sorted(held[g] + offers, key=lambda h: -h[0])[:per]
            live[g] = chosen
            if not last and (not chosen or len(held[g]) == per and
                             max(raw for raw, _ in chosen) / (step + 1) <= held[g][-1][0]):
                stopped[g] = step
    if stops is not None:
        stops += [max_new - 1 if s is None else s for s in stopped]
    return [(z, term) for g in range(num_groups) for _, z, term in held[g]]


def char_ids(text: str) -> list[int]:
    """Token ids of tests/conftest's character-level tokenizer (4 specials, then chr 32..126)."""
    return [4 + ord(c) - 32 for c in text]


# a third of the characters end a sequence, with </s>: hypotheses both finish and run to max_new
ENDS = list(range(5, 100, 3)) + [2]
PROMPTS = ["ab", "The cat", "x=1;", "Q: 7 + 2 ="]


@pytest.fixture(scope="module")
def peaked(tiny_llama, tiny_gpt2):
    return {"llama": load_peaked(tiny_llama, 40.0), "gpt2": load_peaked(tiny_gpt2, 40.0)}


def hypotheses_terminate_and_run_out(results) -> bool:
    flags = {term for res in results for _, term in res}
    return flags == {True, False}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_group_without_penalty_is_plain_beam_search(kind, peaked):
    """num_groups=1, diversity_penalty=0: the reference's beam search, in order, for several widths,
    min_new and bans; the cases cover hypotheses that end and that are cut, and (Llama) groups that
    stop early (finished set full, no live beam able to beat it) and that run to max_new."""
    model, ends = peaked[kind], ENDS
    seen, stops = [], []
    for prompt, (beams, max_new, min_new, banned) in itertools.product(
            PROMPTS, [(1, 6, 0, ()), (3, 5, 0, ()), (4, 6, 2, ()), (5, 4, 1, (2, 4 + ord("e") - 32)), (3, 12, 0, ())]):
        ids = char_ids(prompt)
        got = group_beam_search(model, ids, beams, 1, max_new, min_new, ends, diversity_penalty=0.0, banned_ids=banned)
        want = brute_group_beam_search(model, ids, beams, 1, max_new, min_new, ends, 0.0, banned, stops)
        assert got == want, (prompt, beams, max_new, min_new, banned)
        assert len(got) == beams and all(len(z) >= min_new and not set(z) & set(banned) for z, _ in got)
        seen.append(got)
        stops[-1] = stops[-1] < max_new - 1
    assert hypotheses_terminate_and_run_out(seen), "the cases must cover finished and cut hypotheses"
    if kind == "llama":  # the peaked GPT-2 mostly repeats one token and rarely ends: it runs to max_new
        assert set(stops) == {True, False}, "the cases must cover early stops and searches that run to max_new"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_group_without_penalty_equals_transformers_beam_search(kind, peaked):
    """num_groups=1, diversity_penalty=0 gives the hypotheses of transformers' own beam search
    (`generate(num_beams=B, num_return_sequences=B)`, the `beam` baseline), in its order. No bans
    here: transformers' suppress_tokens does not renormalise, group_beam_search's banned_ids does.
    pad = </s>, an end token, so that hf_generate strips no trailing token of a cut hypothesis."""
    model, ends, pad = peaked[kind], ENDS, 2
    for prompt, (beams, max_new, min_new) in itertools.product(
            PROMPTS, [(4, 6, 0), (1, 6, 0), (3, 5, 0), (4, 6, 2), (5, 4, 1), (6, 8, 0), (2, 12, 0)]):
        ids = char_ids(prompt)
        got = group_beam_search(model, ids, beams, 1, max_new, min_new, ends, diversity_penalty=0.0)
        want = hf_generate(model, ids, beams, max_new, min_new, ends, pad, num_beams=beams, do_sample=False)
        assert got == want, (prompt, beams, max_new, min_new)
    if kind == "llama":  # the audit's repro: the old search kept its first 4 finished hypotheses, [] ended 4 ways
        got = group_beam_search(model, char_ids("ab"), 4, 1, 6, 0, ends, diversity_penalty=0.0)
        assert got == [([], True), ([70], True), ([70, 70], True), ([70, 70, 70], True)], got


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A tiny Llama over 3 characters (7 tokens with the specials): few enough sequences to enumerate."""
    folder = build_model(str(tmp_path_factory.mktemp("tiny-abc")), "llama", seed=3, chars=list("ab."))
    return load_peaked(folder, 30.0)


@pytest.mark.parametrize("min_new, banned", [(0, ()), (1, ()), (0, (0, 1, 3)), (2, (0, 3))])
def test_a_beam_wider_than_all_sequences_ranks_them_exactly(small_vocab_model, min_new, banned):
    """With more beams than sequences nothing is pruned: the hypotheses are every sequence of at
    most max_new tokens, ranked by (log q(z) + log q(end | z)) / (|z| + 1) for z that ends and by
    log q(z) / |z| for z cut at max_new. Enumerated here by brute force; the top one is the argmax."""
    model, max_new = small_vocab_model, 3
    dot, eos = 6, 2  # '.' and </s>
    ends = [dot, eos]
    prompt = [1, 4, 5]  # <s> a b
    vocab = 7
    allowed = [t for t in range(vocab) if t not in banned]
    scored = []  # (value, z, terminated), one per (z, end token) for those that end
    for n in range(max_new + 1):
        for z in itertools.product([t for t in allowed if t not in ends], repeat=n):
            z = list(z)
            lp = 0.0
            for k in range(n):
                lp += next_logprobs(model, prompt, [z[:k]], banned)[0][z[k]]
            if n == max_new:
                scored.append((lp / max(1, n), z, False))
                continue
            if n >= min_new:
                last = next_logprobs(model, prompt, [z], banned)[0]
                scored += [((lp + last[e]) / (n + 1), z, True) for e in ends]
    scored.sort(key=lambda h: -h[0])
    width = len(scored) + 5
    got = group_beam_search(model, prompt, width, 1, max_new, min_new, ends, diversity_penalty=0.0, banned_ids=banned)
    assert got[0] == (scored[0][1], scored[0][2])  # the argmax of log-prob / length
    assert got == [(z, term) for _, z, term in scored]
    assert {term for _, term in got} == {True, False}


class ScriptedLM:
    """A stand-in causal LM whose next-token logits are `script(tokens after the prompt)`, with a
    cache whose rows are the token sequences (group_beam_search reorders it and extends it in place)."""

    device = torch.device("cpu")

    class Rows:
        def __init__(self, rows):
            self.rows = rows

        def reorder_cache(self, index):
            self.rows = [self.rows[i] for i in index.tolist()]

    def __init__(self, prompt_len: int, script):
        self.prompt_len, self.script = prompt_len, script

    def __call__(self, input_ids, past_key_values=None, use_cache=False):
        rows = input_ids.tolist()
        if past_key_values is not None:
            past_key_values.rows = rows = [old + new for old, new in zip(past_key_values.rows, rows)]
        logits = torch.tensor([self.script(r[self.prompt_len:]) for r in rows])[:, None, :]
        return argparse.Namespace(logits=logits, past_key_values=past_key_values or self.Rows(rows))


def test_an_end_token_ranked_below_the_width_does_not_finish():
    """Width 2, end tokens 4 and 5. First step: token 0 (0.4), end 4 (0.25), end 5 (0.2), token 1
    (0.1): the 2 live beams are tokens 0 and 1 and only the end at rank 1 finishes ([] ended by 4);
    [] ended by 5, at rank 2, is no hypothesis although it comes before the second live beam. Then
    every step is near-uniform over 20 tokens, the last one likeliest: nothing better ends, and at
    max_new the best cut beam, 0 19 19, joins the end at rank 1."""
    vocab, ends = 20, [4, 5]
    first = [math.log(p) for p in [0.4, 0.1, 0.05 / 16, 0.05 / 16, 0.25, 0.2] + [0.05 / 16] * 14]
    later = [0.5 * t / (vocab - 1) for t in range(vocab)]
    model = ScriptedLM(2, lambda z: first if not z else later)
    got = group_beam_search(model, [1, 3], 2, 1, 3, 0, ends, diversity_penalty=0.0)
    assert got == brute_group_beam_search(model, [1, 3], 2, 1, 3, 0, ends, 0.0)
    assert got == [([], True), ([0, 19, 19], False)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_groups_with_a_diversity_penalty_follow_the_hamming_rule(kind, peaked):
    """Several groups and a penalty: group g's candidates are lowered by penalty × the times their
    token was chosen at this step by groups < g; the output equals the reference's, and
    with a large penalty the groups' first tokens differ where the unpenalised search repeats them."""
    model, ends = peaked[kind], ENDS
    seen = []
    for prompt, (beams, groups, penalty, max_new, min_new) in itertools.product(
            PROMPTS, [(2, 2, 0.7, 5, 0), (4, 2, 1.5, 5, 1), (6, 3, 3.0, 4, 0), (4, 4, 100.0, 4, 0)]):
        ids = char_ids(prompt)
        got = group_beam_search(model, ids, beams, groups, max_new, min_new, ends, diversity_penalty=penalty)
        want = brute_group_beam_search(model, ids, beams, groups, max_new, min_new, ends, penalty)
        assert got == want, (prompt, beams, groups, penalty)
        seen.append(got)
        if penalty == 100.0:  # one beam per group: each group's first token is one no earlier group chose
            firsts = [z[0] for z, _ in got if z]
            assert len(firsts) == len(set(firsts)), got
            plain = group_beam_search(model, ids, beams, groups, max_new, min_new, ends, diversity_penalty=0.0)
            assert len({tuple(z) for z, _ in plain}) == 1, "without a penalty every group repeats group 0"
    assert hypotheses_terminate_and_run_out(seen)


# -- gfnlm experiment: the table -------------------------------------------------------------------


def test_summarize_is_mean_and_sample_std_over_the_numeric_figures():
    from gfnlm.learner.experiment import summarize

    rows = {
        "gfn": [{"kl": 1.0, "valid": 2, "name": "x", "tv": math.nan, "exact": {"kl": 0.5}},
                {"kl": 2.0, "valid": 4, "name": "y", "tv": 0.25},
                {"kl": 4.0, "only": 5.0}],
        "solo": [{"kl": 0.5, "tv": math.nan}],
        "words": [{"name": "z"}],
    }
    # kl: mean 7/3, sample variance ((4/3)² + (1/3)² + (5/3)²) / 2 = 7/3 (population: 14/9)
    assert summarize(rows) == {
        "gfn": {"kl": "2.333 ± 1.528", "valid": "3.000 ± 1.414", "tv": "0.250", "only": "5.000"},
        "solo": {"kl": "0.500"},  # one run: no ±; a NaN figure is no figure
        "words": {},
    }


def test_summarize_survives_an_infinite_figure():
    """An infinite value (random_number's kl_unsmoothed when a target value was never drawn) is
    left out of the mean and std and counted in the cell; a figure infinite in every run says inf."""
    from gfnlm.learner.experiment import summarize

    table = summarize({"gfn": [{"kl": math.inf, "tv": 0.5, "all": math.inf, "low": -math.inf},
                               {"kl": 1.0, "tv": 0.7, "all": math.inf, "low": 2.0},
                               {"kl": 1.2, "tv": math.nan, "all": math.inf, "low": 4.0}],
                       "one": [{"kl": math.inf, "tv": 0.25}, {"kl": -math.inf}]})
    assert table == {
        "gfn": {"kl": "1.100 ± 0.141 (1 of 3 inf)", "tv": "0.600 ± 0.141", "all": "inf", "low": "3.000 ± 1.414 (1 of 3 -inf)"},
        "one": {"kl": "±inf", "tv": "0.250"},
    }


def experiment_spec(tmp_path, model_dir, seeds=(0, 1)) -> str:
    """A tiny experiment over the random-number preset: a run that also evaluates the base model
    (labelled), and a trajectory-balance run."""
    ov = [o for o in tiny_overrides(model_dir, tmp_path / "unused") if not o.startswith("run.output_dir=")]
    spec = {"description": "audit", "config": "random_number.yaml", "overrides": ov + ["learner.steps=2"],
            "seeds": list(seeds), "labels": {"base": "base model"},
            "runs": [{"name": "gfn", "methods": ["trained", "base"]},
                     {"name": "tb", "overrides": ["learner.objective=tb"]}]}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def read_table_md(path) -> dict[str, list[str]]:
    """{method: [n, cells...]} and the header under key '|header|'."""
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    cells = [c for c in cells if c[0] != "---"]
    return {"|header|": cells[0][1:], **{c[0]: c[1:] for c in cells[1:]}}


def writes_finished_runs(trained: list, figures: dict):
    """A stand-in for train_and_evaluate that leaves a finished run's folder (its config.yaml as
    training saves it, and eval.json with `figures` per method) and records the run's name in `trained`."""

    def fake(cfg, run_dir, resume=False, methods=None):
        from gfnlm.learner.experiment_runs import saved_form

        trained.append(os.path.basename(run_dir))
        os.makedirs(run_dir, exist_ok=True)
        pathlib.Path(run_dir, "config.yaml").write_text(yaml.safe_dump(saved_form(cfg), sort_keys=False))
        results = {m: dict(figures) for m in methods}
        pathlib.Path(run_dir, "eval.json").write_text(json.dumps(results))
        return results

    return fake


def test_experiment_labels_rows_counts_runs_and_keeps_a_partial_table(tiny_llama, tmp_path, monkeypatch):
    """main with stand-in training: the base model's row takes its label from spec['labels'], the
    trained policy's its run's name; n counts the runs behind a row; a run stopped by a signal
    leaves the table of the runs before it."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    calls = []

    def fake(cfg, run_dir, resume=False, methods=None):
        calls.append((run_dir, cfg.learner.seed, cfg.learner.objective.type, cfg.eval.include_base))
        if len(calls) == 4:
            raise runner.TrainingStopped("SIGTERM")
        k = len(calls)
        out = {"trained": {"valid": 0.1 * k, "loglik_mean": -k, "note": "text"}}
        if "base" in methods:
            out["base"] = {"valid": 0.5 + 0.1 * k, "loglik_mean": -10.0 * k}
        return out

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    out = tmp_path / "out"
    assert main(argparse.Namespace(name=experiment_spec(tmp_path, tiny_llama, seeds=(0, 1)), out=str(out), override=[])) == 0
    assert [(os.path.basename(r), s, o, b) for r, s, o, b in calls] == [
        ("gfn-seed0", 0, "subtb", True), ("tb-seed0", 0, "tb", False), ("gfn-seed1", 1, "subtb", True),
        ("tb-seed1", 1, "tb", False)]
    table = read_table_md(out / "table.md")
    assert table["|header|"] == ["n", "valid", "loglik_mean"]
    # calls 1 and 3 are gfn (trained 0.1, 0.3; base 0.6, 0.8), call 2 is tb; the 4th stopped
    assert table["gfn"] == ["2", "0.200 ± 0.141", "-2.000 ± 1.414"]
    assert table["base model"] == ["2", "0.700 ± 0.141", "-20.000 ± 14.142"]
    assert table["tb"] == ["1", "0.200", "-2.000"]
    assert set(table) == {"|header|", "gfn", "base model", "tb"}
    saved = json.loads((out / "table.json").read_text())
    assert saved["experiment"] == "audit" and saved["seeds"] == [0, 1]
    assert saved["rows"]["base model"] == [{"valid": 0.6, "loglik_mean": -10.0}, {"valid": 0.8, "loglik_mean": -30.0}]
    assert set(saved["wall_seconds"]) == {"gfn-seed0", "tb-seed0", "gfn-seed1"}
    assert (out / "table.png").stat().st_size > 1000 and not list(out.glob("*.tmp.png"))


def test_finished_runs_of_other_seeds_join_a_call_with_fewer_seeds(tiny_llama, tmp_path, monkeypatch, capsys):
    """A call with fewer --seeds than --out holds trains only its own seeds; the finished runs of the
    others join its table (a latent task's Z spread among its columns), with a line saying so. Unfinished runs,
    other folders and other runs' names do not count, and a finished run of another config is left out."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main, seeds_left_out

    trained = []
    figures = {"valid": 1.0, "z_distinct": 3, "z_top_share": 0.5, "z_top": " so"}
    monkeypatch.setattr(runner, "train_and_evaluate", writes_finished_runs(trained, figures))
    out = tmp_path / "out"
    spec = experiment_spec(tmp_path, tiny_llama, seeds=(0, 1, 2))
    assert main(argparse.Namespace(name=spec, out=str(out), override=[])) == 0
    (out / "gfn-seed7").mkdir()  # started, never finished
    (out / "other-seed5").mkdir()
    (out / "other-seed5" / "eval.json").write_text("{}")
    (out / "tb-seed1" / "eval.json").unlink()  # tb's seed 1 is unfinished: it does not train, not being asked
    capsys.readouterr()
    trained.clear()
    assert main(argparse.Namespace(name=spec, out=str(out), override=[], seeds="0")) == 0
    err = capsys.readouterr().err
    assert trained == []
    assert "holds finished runs of seeds [1, 2] besides --seeds 0: they join the table" in err
    assert "tb-seed1 has not finished in its folder with this config" in err
    table = read_table_md(out / "table.md")
    assert table["gfn"][0] == "3" and table["tb"][0] == "2"
    assert table["|header|"] == ["n", "valid", "z_distinct", "z_top_share"]  # a latent task's Z spread; text left out
    assert json.loads((out / "table.json").read_text())["seeds"] == [0, 1, 2]
    assert seeds_left_out(str(out), {"seeds": [0, 1, 2], "runs": [{"name": "gfn"}]}) == []
    assert seeds_left_out(str(tmp_path / "absent"), {"seeds": [0], "runs": [{"name": "gfn"}]}) == []
    # another config (more steps): seed 0 trains again; the finished seeds, of the old config, stay out
    assert main(argparse.Namespace(name=spec, out=str(out), override=["learner.steps=3"], seeds="0")) == 0
    assert trained == ["gfn-seed0", "tb-seed0"]
    table = read_table_md(out / "table.md")
    assert table["gfn"][0] == "1" and table["tb"][0] == "1"


def test_an_experiment_folder_copied_elsewhere_is_reused_not_trained_again(tiny_llama, tmp_path, monkeypatch):
    """Each run's config.yaml names the folder it trained in; a copy of the whole --out elsewhere
    still holds the same finished runs (the folder is not part of the config compared), while a
    changed setting still trains again."""
    import shutil

    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    trained = []
    monkeypatch.setattr(runner, "train_and_evaluate", writes_finished_runs(trained, {"valid": 1.0}))
    spec = experiment_spec(tmp_path, tiny_llama, seeds=(0,))
    assert main(argparse.Namespace(name=spec, out=str(tmp_path / "out"), override=[])) == 0
    assert trained == ["gfn-seed0", "tb-seed0"]
    shutil.copytree(tmp_path / "out", tmp_path / "moved" / "out")
    saved = yaml.safe_load((tmp_path / "moved" / "out" / "gfn-seed0" / "config.yaml").read_text())
    assert saved["run"]["output_dir"] == str(tmp_path / "out" / "gfn-seed0")  # the copy still names the old folder
    trained.clear()
    assert main(argparse.Namespace(name=spec, out=str(tmp_path / "moved" / "out"), override=[])) == 0
    assert trained == []
    assert read_table_md(tmp_path / "moved" / "out" / "table.md")["gfn"][0] == "1"
    assert main(argparse.Namespace(name=spec, out=str(tmp_path / "moved" / "out"), override=["learner.lr=3e-4"])) == 0
    assert trained == ["gfn-seed0", "tb-seed0"]


def test_table_png_shows_each_tasks_headline_figures():
    """table.png's panels: accuracy per test set for an answer task, else the first four of the
    task's headline figures present (satisfaction first for constrained generation, BLEU/GLEU for
    infilling); text and NaN-only figures are not drawn."""
    from gfnlm.learner.table_plot import headline_keys

    assert headline_keys({"gfn": [{"acc_4": 1.0, "acc_3": 2.0, "valid": 1.0}]}) == ["acc_3", "acc_4"]
    constrained = {"gfn": [{"satisfied": 0.9, "loglik_mean": -30.0, "loglik_max": -20.0, "diversity": 0.3, "valid": 1.0,
                            "note": "text"}], "prompting": [{"satisfied": 0.03}]}
    assert headline_keys(constrained) == ["satisfied", "loglik_max", "diversity", "loglik_mean"]
    infilling = {"gfn": [{"bleu4": 1.6, "gleu4": 3.0, "loglik_max": -63.0, "diversity": 0.38, "valid": 1.0}]}
    assert headline_keys(infilling) == ["bleu4", "gleu4", "loglik_max", "diversity"]
    assert headline_keys({"gfn": [{"note": "text", "bleu4": float("nan")}]}) == []


def test_table_png_draws_every_test_sets_accuracy_on_one_scale(tmp_path, monkeypatch):
    """An answer task's accuracy panels all run from 0 to 1: a test set with low accuracies does not
    get bars as long as one with high ones."""
    import matplotlib.figure

    from gfnlm.learner.table_plot import plot_table

    saved = []
    real_save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_save(fig, *a, **k)))
    rows = {"sft": [{"acc_3": 0.8, "acc_5": 0.06}, {"acc_3": 0.78, "acc_5": 0.06}], "gfn": [{"acc_3": 0.2, "acc_5": 0.04}]}
    assert plot_table(rows, str(tmp_path / "t.png"), "arithmetic") == ["acc_3", "acc_5"]
    assert [ax.get_xlim() for ax in saved[-1].axes] == [(0.0, 1.0), (0.0, 1.0)]
    # each value is written past a short bar's error bar (not on its cap), inside a long bar by the zero line
    written = {t.get_text(): t.xy for t in saved[-1].axes[1].texts}
    assert written["0.06"] == (0.06, 0) and written["0.04"] == (0.04, 1)
    assert {t.get_text(): t.xy for t in saved[-1].axes[0].texts}["0.79"] == (0.0, 0)
    from gfnlm.learner.table_plot import value_anchor

    assert value_anchor(-5.0, 1.0, (-90.0, 0.0), 2) == (-6.0, 2) and value_anchor(-80.0, 1.0, (-90.0, 0.0)) == (0.0, 0)
    # an error bar that passes 1 widens its accuracy panel instead of being cut at 1
    from gfnlm.learner.table_plot import accuracy_xlim

    assert accuracy_xlim([0.97, 0.5, math.nan], [0.042, 0.1, 0.0]) == (0.0, 0.97 + 0.042 + 0.02)
    assert accuracy_xlim([0.8], [0.05]) == (0.0, 1.0)


def split_prompts_overrides(model_dir, tmp_path, max_len: int = 6, **extra) -> list[str]:
    """An experiment's overrides for a tiny continuation task over 20 prompts with validation and test
    splits (what `select` needs); each run's folder and split are the experiment's to set."""
    from test_tasks import task_overrides, write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}."} for i in range(20)])
    task = ("{type: continuation, data: {train: %s, validation_fraction: 0.1, test_fraction: 0.2}, min_len: 1, max_len: %d}"
            % (data, max_len))
    return [o for o in task_overrides(model_dir, tmp_path / "unused", "continuation", data, task=task, **extra)
            if not o.startswith(("run.output_dir=", "eval.split="))]


def test_experiment_selects_a_runs_settings_on_the_validation_split_before_the_test_runs(tiny_llama, tmp_path,
                                                                                         monkeypatch):
    """A run's `select`: each candidate trains with the first seed and is evaluated on the
    validation split only; the best by the metric (here the lower learning rate, which the stand-in
    scores higher on validation and lower on test) trains every seed for the table on the test
    split; the choice and every score are in table.md and table.json. A malformed select is a
    one-line error before anything trains."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    calls = []

    def fake(cfg, run_dir, resume=False, methods=None):
        calls.append((os.path.relpath(run_dir, out), cfg.eval.split, cfg.learner.lr, cfg.learner.seed, list(methods)))
        score = -cfg.learner.lr if cfg.eval.split == "validation" else cfg.learner.lr
        os.makedirs(run_dir, exist_ok=True)
        return {"trained": {"loglik_max": score, "records": 2}, **({"sample": {"loglik_max": -5.0}} if "sample" in methods else {})}

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    ov = split_prompts_overrides(tiny_llama, tmp_path)
    spec = {"config": "continuation.yaml", "overrides": ov, "seeds": [0, 1],
            "runs": [{"name": "gfn", "methods": ["trained", "sample"],
                      "select": {"metric": "loglik_max", "goal": "max",
                                 "candidates": {"fast": ["learner.lr=0.01"], "slow": ["learner.lr=0.001"]}}}]}
    path = tmp_path / "sel.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    # (an override that asks for the validation split cannot turn the test table into another validation one)
    assert main(argparse.Namespace(name=str(path), out=str(out), override=["eval.split=validation"])) == 0
    assert calls == [("select/gfn/fast-seed0", "validation", 0.01, 0, ["trained"]),
                     ("select/gfn/slow-seed0", "validation", 0.001, 0, ["trained"]),
                     ("gfn-seed0", "test", 0.001, 0, ["trained", "sample"]),
                     ("gfn-seed1", "test", 0.001, 1, ["trained", "sample"])]
    text = (out / "table.md").read_text()
    assert "gfn: slow chosen on the validation split (seed 0, 2 validation records; max loglik_max: fast -0.01, slow -0.001)" in text
    saved = json.loads((out / "table.json").read_text())
    assert saved["selection"]["gfn"]["chosen"] == "slow" and saved["rows"]["gfn"] == [{"loglik_max": 0.001, "records": 2}] * 2
    bad = dict(spec, runs=[dict(spec["runs"][0], select={"metric": "loglik_max", "candidates": {"only": []}})])
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"runs\[0\].select.candidates: expected at least two named lists"):
        main(argparse.Namespace(name=str(path), out=str(tmp_path / "out2"), override=[]))
    peeks = dict(spec, runs=[dict(spec["runs"][0], select={"metric": "loglik_max", "candidates": {
        "a": ["learner.lr=0.1"], "b": ["eval.split=test"]}})])
    path.write_text(yaml.safe_dump(peeks))
    with pytest.raises(ConfigError, match=r"candidates.b: 'eval.split=test': a candidate may not set eval."):
        main(argparse.Namespace(name=str(path), out=str(tmp_path / "out2"), override=[]))
    no_validation = dict(spec, overrides=[o if not o.startswith("task=") else o.replace("validation_fraction: 0.1, ", "")
                                          for o in ov])
    path.write_text(yaml.safe_dump(no_validation))
    n = len(calls)
    with pytest.raises(ConfigError, match="no validation records"):
        main(argparse.Namespace(name=str(path), out=str(tmp_path / "out3"), override=[]))
    assert len(calls) == n, "refused before anything trained"


def test_experiment_select_chooses_only_among_candidates_within_bounds(tiny_llama, tmp_path, monkeypatch):
    """select.at_least / at_most: a candidate whose other figures miss a bound is not chosen however
    good its metric (the best satisfaction bought with one sentence per record); the table names the
    bound and who missed it. When none keeps within, the metric alone chooses, and the table says so."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    def fake(cfg, run_dir, resume=False, methods=None):
        os.makedirs(run_dir, exist_ok=True)
        return {"trained": {"valid": -cfg.learner.lr, "distinct_2": 100 * cfg.learner.lr, "records": 2}}

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    ov = split_prompts_overrides(tiny_llama, tmp_path)

    def chosen(bounds: dict, out: str) -> tuple[str, str]:
        sel = {"metric": "valid", "goal": "max", **bounds,
               "candidates": {"fast": ["learner.lr=0.01"], "mid": ["learner.lr=0.005"], "slow": ["learner.lr=0.001"]}}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({"config": "continuation.yaml", "overrides": ov, "seeds": [0],
                                        "runs": [{"name": "gfn", "select": sel}]}))
        assert main(argparse.Namespace(name=str(path), out=str(tmp_path / out), override=[])) == 0
        saved = json.loads((tmp_path / out / "table.json").read_text())
        return saved["selection"]["gfn"]["chosen"], (tmp_path / out / "table.md").read_text()

    assert chosen({}, "free")[0] == "slow", "without bounds: the best valid"
    pick, text = chosen({"at_least": {"distinct_2": 0.4}}, "bounded")
    assert pick == "mid", "slow's distinct_2 (0.1) is below the bound: the best of the rest"
    assert "only candidates with distinct_2 ≥ 0.4 could be chosen (slow: distinct_2 0.1 < 0.4)" in text
    pick, text = chosen({"at_most": {"valid": -0.002}}, "upper")
    assert pick == "mid" and "(slow: valid -0.001 > -0.002)" in text, "at_most alone takes the metric's best out"
    pick, text = chosen({"at_least": {"distinct_2": 0.2}, "at_most": {"distinct_2": 0.6}}, "both")
    assert pick == "mid" and "(fast: distinct_2 1 > 0.6; slow: distinct_2 0.1 < 0.2)" in text
    pick, text = chosen({"at_least": {"distinct_2": 5}}, "none")
    assert pick == "slow" and "bounds distinct_2 ≥ 5: none kept within (fast: distinct_2 1 < 5; " in text
    assert "so the metric alone chose" in text
    with pytest.raises(ConfigError, match=r"select.at_least: expected a mapping of figure to a finite number"):
        chosen({"at_least": {"distinct_2": "high"}}, "bad")
    with pytest.raises(ConfigError, match=r"at_least.distinct_2 \(0.8\) is above at_most.distinct_2 \(0.5\)"):
        chosen({"at_least": {"distinct_2": 0.8}, "at_most": {"distinct_2": 0.5}}, "crossed")
    with pytest.raises(ConfigError, match=r"select.at_most.nope: the evaluation has no numeric figure 'nope'"):
        chosen({"at_most": {"nope": 1}}, "unknown")


def test_experiment_takes_the_chosen_candidates_first_seed_from_its_selection_run(tiny_llama, tmp_path, monkeypatch):
    """The chosen candidate's first seed trained once already, in its selection run: the table run
    copies that training (the same adapter, metrics and config but for how it is judged) and only
    evaluates, on the test split; the other seeds train; table.md says which run was taken, also
    when the experiment runs again and reuses the finished table."""
    import torch
    from safetensors.torch import load_file

    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    real, calls = runner.train_and_evaluate, []

    def spy(cfg, run_dir, resume=False, methods=None):
        calls.append((os.path.relpath(run_dir, out), cfg.eval.split, resume))
        return real(cfg, run_dir, resume=resume, methods=methods)

    monkeypatch.setattr(runner, "train_and_evaluate", spy)
    ov = split_prompts_overrides(tiny_llama, tmp_path, max_len=4, **{
        "eval.baselines": "[]", "eval.max_records": 1, "eval.samples_per_record": 2}) + ["learner.steps=2", "run.checkpoint_every=1"]
    spec = {"config": "continuation.yaml", "overrides": ov, "seeds": [0, 1],
            "runs": [{"name": "gfn", "methods": ["trained"],
                      "select": {"metric": "valid", "goal": "max",
                                 "candidates": {"a": ["learner.lr=0.001"], "b": ["learner.lr=0.002"]}}}]}
    path = tmp_path / "sel.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    (out / "gfn-seed0").mkdir(parents=True)
    (out / "gfn-seed0" / "metrics.jsonl").write_text('{"step": 1}\n')  # a run of another config: moved aside first
    assert main(argparse.Namespace(name=str(path), out=str(out), override=[])) == 0
    assert [p.name.split(".replaced-")[0] for p in out.glob("gfn-seed0.replaced-*")] == ["gfn-seed0"]
    saved = json.loads((out / "table.json").read_text())
    chosen = saved["selection"]["gfn"]["chosen"]
    sel = out / "select" / "gfn" / f"{chosen}-seed0"
    assert calls[:2] == [("select/gfn/a-seed0", "validation", False), ("select/gfn/b-seed0", "validation", False)]
    assert calls[2:] == [("gfn-seed0", "test", True), ("gfn-seed1", "test", False)], "seed 0 resumes the copy, seed 1 trains"
    adapter = "checkpoints/step_0000002/adapter/adapter_model.safetensors"
    taken, trained = load_file(out / "gfn-seed0" / adapter), load_file(sel / adapter)
    assert all(torch.equal(taken[k], trained[k]) for k in trained), "the table's seed 0 is the selection run's adapter"
    assert [json.loads(x)["step"] for x in (out / "gfn-seed0" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "gfn-seed0" / "trained_in.txt").read_text().strip() == str(sel)
    assert json.loads((out / "gfn-seed0" / "eval.json").read_text())["split"] == "test"
    note = "gfn-seed0 is that selection run's training, evaluated on the test split"
    assert note in (out / "table.md").read_text()
    calls.clear()
    assert main(argparse.Namespace(name=str(path), out=str(out), override=[])) == 0
    assert calls == [] and note in (out / "table.md").read_text(), "run again: every run reused, the note kept"


def test_experiment_runs_split_across_processes_sharing_one_out(tiny_llama, tmp_path, monkeypatch):
    """--runs: each call trains only the runs (or selection candidates) it names; a run whose
    candidates have not all finished is not chosen for and waits; runs not named join the table where
    they finished and are left out where not; a run another process is training (its lock held) is
    left alone. A plain call at the end trains nothing and writes the
    whole table, every part's wall time included (each run keeps its own)."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main
    from gfnlm.learner.experiment_runs import run_lock, saved_form

    calls = []

    def fake(cfg, run_dir, resume=False, methods=None):  # writes what a finished run leaves: config.yaml, eval.json
        calls.append(os.path.relpath(run_dir, out))
        os.makedirs(run_dir, exist_ok=True)
        (pathlib.Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(saved_form(cfg), sort_keys=False))
        score = -cfg.learner.lr if cfg.eval.split == "validation" else cfg.learner.lr
        results = {"trained": {"loglik_max": score, "records": 2}}
        (pathlib.Path(run_dir) / "eval.json").write_text(json.dumps({"split": cfg.eval.split, "methods": results}))
        return results

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    ov = split_prompts_overrides(tiny_llama, tmp_path)
    spec = {"config": "continuation.yaml", "overrides": ov, "seeds": [0, 1],
            "runs": [{"name": "gfn", "select": {"metric": "loglik_max", "goal": "max",
                                                "candidates": {"fast": ["learner.lr=0.01"], "slow": ["learner.lr=0.001"]}}},
                     {"name": "tb", "overrides": ["learner.objective=tb"]}]}
    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"

    def call(runs):
        calls.clear()
        assert main(argparse.Namespace(name=str(path), out=str(out), override=[], runs=runs)) == 0
        return list(calls)

    assert call("gfn/fast") == ["select/gfn/fast-seed0"]
    text = (out / "table.md").read_text()
    assert "chosen on the validation split" not in text, "one candidate of two: nothing chosen yet"
    assert "No run of this table has finished yet." in text and "| method |" not in text
    waiting = next(line for line in text.splitlines() if line.startswith("gfn: "))
    assert "finished: fast -0.01 (select/gfn/fast-seed0/eval.md)" in waiting and waiting.endswith("not finished: slow"), \
        "a selection half done says what finished, its score and folder, and what it waits for"
    with run_lock(str(out / "tb-seed0")) as held:  # as if another process were training tb-seed0 now
        assert held
        assert call("gfn/slow,tb") == ["select/gfn/slow-seed0", "tb-seed1"], "a run whose lock is held is left alone"
    table = read_table_md(out / "table.md")
    assert set(table) == {"|header|", "tb"}, "gfn's table runs wait for a process that names gfn"
    assert call("gfn,tb") == ["gfn-seed0", "tb-seed0", "gfn-seed1"], "its candidates are reused, its seeds train"
    (out / "table.json").unlink()  # the wall times come from the runs' folders, not from an earlier table
    assert call(None) == [], "every part finished: the plain call only writes the table"
    table = read_table_md(out / "table.md")
    assert table["gfn"][:2] == ["2", "0.001 ± 0.000"] and table["tb"][0] == "2"
    text = (out / "table.md").read_text()
    assert "gfn: slow chosen on the validation split" in text
    walls = json.loads((out / "table.json").read_text())["wall_seconds"]
    assert set(walls) == {"select/gfn/fast-seed0", "select/gfn/slow-seed0", "tb-seed0", "tb-seed1", "gfn-seed0",
                          "gfn-seed1"}, "the parts' wall times, though each call wrote table.json over the last"
    assert not list(out.rglob("*.tmp*")) and (out / "table.png").stat().st_size > 1000
    for bad, message in (("nope", r"--runs: 'nope' is not a run of .*; expected one of gfn, tb"),
                         ("", r"--runs: '' names an empty run"), ("tb,", r"--runs: 'tb,' names an empty run"),
                         ("gfn/zzz", r"--runs: 'gfn/zzz': gfn has the selection candidates fast, slow"),
                         ("tb/x", r"--runs: 'tb/x': tb has no selection candidates")):
        with pytest.raises(ConfigError, match=message):
            call(bad)


def test_a_part_another_process_finishes_meanwhile_joins_the_table_written_last(tiny_llama, tmp_path, monkeypatch, capsys):
    """Two processes share --out: B looks at A's candidate before A has finished it, then trains its
    own, and A finishes meanwhile. B writes table.md last, so it looks again once it has trained:
    the table has both candidates and the choice, not B's stale "not finished"."""
    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main
    from gfnlm.learner.experiment_runs import saved_form

    out, calls = tmp_path / "out", []

    def call(runs):
        return main(argparse.Namespace(name=str(path), out=str(out), override=[], runs=runs))

    def fake(cfg, run_dir, resume=False, methods=None):
        if run_dir.endswith("slow-seed0") and not calls:
            assert call("gfn/fast") == 0  # process A finishes its candidate while B trains
        calls.append(os.path.relpath(run_dir, out))
        os.makedirs(run_dir, exist_ok=True)
        (pathlib.Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(saved_form(cfg), sort_keys=False))
        results = {"trained": {"loglik_max": -cfg.learner.lr, "records": 2}}
        (pathlib.Path(run_dir) / "eval.json").write_text(json.dumps({"split": cfg.eval.split, "methods": results}))
        return results

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    spec = {"config": "continuation.yaml", "overrides": split_prompts_overrides(tiny_llama, tmp_path), "seeds": [0],
            "runs": [{"name": "gfn", "select": {"metric": "loglik_max", "goal": "max",
                                                "candidates": {"fast": ["learner.lr=0.01"], "slow": ["learner.lr=0.001"]}}}]}
    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert call("gfn/slow") == 0
    assert calls == ["select/gfn/fast-seed0", "select/gfn/slow-seed0"], "B trained only its own candidate"
    text = (out / "table.md").read_text()
    assert "gfn: slow chosen on the validation split" in text and "not finished" not in text, text
    assert "looking again at the runs other processes train (select/gfn/fast-seed0)" in capsys.readouterr().err


def same_figures(table_row: dict, eval_row: dict) -> bool:
    """A table.json row against eval.json's, NaN equal to NaN; infinite figures are kept as they are."""
    if set(table_row) != set(eval_row):
        return False
    for k, v in eval_row.items():
        w = table_row[k]
        if isinstance(v, float) and math.isnan(v):
            if not (isinstance(w, float) and math.isnan(w)):
                return False
        elif w != v:
            return False
    return True


def test_experiment_end_to_end_on_a_tiny_budget(tiny_llama, tmp_path, monkeypatch):
    """`gfnlm experiment` trains and evaluates 2 runs × 2 seeds of the random-number preset (whose
    kl_unsmoothed is infinite: 20 samples of 21 values); the table has a row per method (the
    labelled base model, each run) over 2 runs with mean ± std, its header gives the samples each
    method drew, and table.json holds the very figures of each run's eval.json. Run again into the
    same folder, the finished runs are reused (nothing trains, the same table); with another config
    or a new seed only those runs train."""
    import statistics

    from gfnlm.learner import runner
    from gfnlm.learner.experiment import main

    out = tmp_path / "out"
    assert main(argparse.Namespace(name=experiment_spec(tmp_path, tiny_llama), out=str(out), override=[])) == 0
    evals = {f"{run}-seed{s}": json.loads((out / f"{run}-seed{s}" / "eval.json").read_text())
             for run in ("gfn", "tb") for s in (0, 1)}
    assert set(evals["gfn-seed0"]) == {"base", "trained"} and set(evals["tb-seed0"]) == {"trained"}
    saved = json.loads((out / "table.json").read_text())["rows"]
    expect = {"base model": [evals["gfn-seed0"]["base"], evals["gfn-seed1"]["base"]],
              "gfn": [evals["gfn-seed0"]["trained"], evals["gfn-seed1"]["trained"]],
              "tb": [evals["tb-seed0"]["trained"], evals["tb-seed1"]["trained"]]}
    assert set(saved) == set(expect)
    for label, runs in expect.items():
        assert len(saved[label]) == 2 and all(same_figures(a, b) for a, b in zip(saved[label], runs)), label
    assert any(isinstance(v, float) and math.isinf(v) for runs in expect.values() for r in runs for v in r.values())
    table = read_table_md(out / "table.md")
    # random numbers' own columns: the sampled and the exact distribution's figures
    assert table["|header|"] == ["n", "valid_fraction", "kl", "tv", "exact_kl", "exact_tv", "exact_invalid_mass"]
    drawn = {r["samples"] for runs in expect.values() for r in runs}
    assert len(drawn) == 1 and f"; {drawn.pop()} samples per method; " in (out / "table.md").read_text()
    for label, runs in expect.items():
        for column, key in ((1, "valid_fraction"), (4, "exact_kl")):
            xs = [r[key] if key in r else r["exact"][key[len("exact_"):]] for r in runs]
            assert table[label][column] == f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}", (label, key)

    first = (out / "table.md").read_text()
    trained = []

    def fake(cfg, run_dir, resume=False, methods=None):
        trained.append((os.path.basename(run_dir), cfg.learner.steps) + (("resumed",) if resume else ()))
        return {m: {"valid_fraction": 0.5} for m in methods}

    monkeypatch.setattr(runner, "train_and_evaluate", fake)
    spec = experiment_spec(tmp_path, tiny_llama)
    assert main(argparse.Namespace(name=spec, out=str(out), override=[], seeds=None)) == 0
    assert trained == [] and (out / "table.md").read_text() == first  # walls kept from table.json
    # a run stopped before its evaluation resumes from its checkpoint; a folder of another run moves aside
    evaluated = (out / "tb-seed1" / "eval.json").read_text()
    (out / "tb-seed1" / "eval.json").unlink()
    assert main(argparse.Namespace(name=spec, out=str(out), override=[], seeds="1")) == 0
    assert trained == [("tb-seed1", 2, "resumed")]
    (out / "tb-seed1" / "eval.json").write_text(evaluated)  # what the resumed run's evaluation would write
    trained.clear()
    assert main(argparse.Namespace(name=spec, out=str(out), override=[], seeds="1,2")) == 0
    assert trained == [("gfn-seed2", 2), ("tb-seed2", 2)]
    assert json.loads((out / "table.json").read_text())["seeds"] == [0, 1, 2]  # seed 0 finished: it joins
    assert main(argparse.Namespace(name=spec, out=str(out), override=["learner.steps=3"], seeds="0")) == 0
    assert trained[2:] == [("gfn-seed0", 3), ("tb-seed0", 3)]
    aside = [p.name for p in out.iterdir() if ".replaced-" in p.name]
    assert sorted(n.split(".replaced-")[0] for n in aside) == ["gfn-seed0", "tb-seed0"]
    assert all((out / n / "eval.json").exists() for n in aside)  # nothing written is lost
    with pytest.raises(ConfigError, match="--seeds: 'a,b'"):
        main(argparse.Namespace(name=spec, out=str(out), override=[], seeds="a,b"))


# -- gfnlm sample: log q is the trained adapter's ----------------------------------------------------

REVIEWS = [
    {"text": "it was shot in 1990 .", "label": 0},
    {"text": "a dull , silly film .", "label": 1},
    {"text": "the story is set in rome .", "label": 0},
    {"text": "i loved every minute .", "label": 1},
]


def subjectivity_run_overrides(model_dir, tmp_path) -> list[str]:
    """A tiny subjectivity run (gfnlm sample builds its record from --prompt; random_number has none)."""
    for name, rows in (("train.jsonl", REVIEWS), ("test.jsonl", REVIEWS[:2])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = [o for o in tiny_overrides(model_dir, tmp_path / "run") if not o.startswith("task.")]
    settings = {
        "task": "{type: subjectivity, data: {train: %s, test: %s}, prompt_template: 'Review: {text} It is', max_len: 4, "
                "seed_samples: 2, seed_prompt: null, prompting_shots: 2, em: {e_steps: 2, m_steps: 2, m_lr: 0.05, m_samples: 2}}"
                % (tmp_path / "train.jsonl", tmp_path / "test.jsonl"),
        "batch.prompts_per_step": 2, "batch.samples_per_prompt": 4, "batch.on_policy": 0.5, "batch.tempered": 0.25,
        "batch.replay": 0.25, "replay.capacity_per_prompt": 8, "learner.steps": 2, "learner.lr": 0.05,
        "run.evaluate_at_end": "false"}
    return ov + [f"{k}={v}" for k, v in settings.items()]


@torch.no_grad()
def teacher_forced_log_q(model, task, prompt_ids: list[int], tokens: list[int], terminated: bool) -> float:
    """log q(Z | X) of the task's sampling rule, one full forward pass: banned tokens taken out, the
    end tokens too before min_len (both renormalised, as the sampler draws), ⊤ counted if it ended."""
    from gfnlm.actors.policy import penalize

    ids = torch.tensor([prompt_ids + tokens])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:, :].float()  # the T + 1 next-token rows
    logits = penalize(logits, sorted(task.banned_ids), task.ban_penalty)
    logits[: task.min_len, task.end_ids] = NEG_INF
    logp = torch.log_softmax(logits, -1)
    total = sum(float(logp[k, t]) for k, t in enumerate(tokens))
    if terminated:
        assert len(task.end_ids) == 1, "the printed line does not say which end token closed Z"
        total += float(logp[len(tokens), task.end_ids[0]])
    return total


def test_sample_reports_log_q_under_the_runs_trained_adapter(tiny_llama, tmp_path, capsys):
    """`gfnlm sample RUN`: every line's log_q is the teacher-forced log-prob of its Z under the
    run's trained adapter (loaded here without load_run), not under the base model."""
    import glob

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from gfnlm.actors.policy import Policy
    from gfnlm.configs import load_config
    from gfnlm.learner.cli import main
    from gfnlm.rewards import make_task

    ov = subjectivity_run_overrides(tiny_llama, tmp_path)
    assert main(["train", "subjectivity.yaml", *sum([["-o", o] for o in ov], [])]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    prompt = "a dull film ."
    # longer Z than the run's 4 tokens, so that some samples end (with a log q(⊤ | Z) term) and some are cut
    assert main(["sample", str(run), "--prompt", prompt, "-n", "30", "-o", "task.max_len=16"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 30 and {x["terminated"] for x in lines} == {True, False}

    cfg = load_config(str(run / "config.yaml"), ["runtime.mode=local"])
    policy = Policy(cfg.model, cfg.lora)
    adapter = sorted(glob.glob(str(run / "checkpoints" / "step_*" / "adapter")))[-1]
    assert adapter.endswith("step_0000002/adapter")
    set_peft_model_state_dict(policy.model, load_file(os.path.join(adapter, "adapter_model.safetensors")))
    policy.model.eval()
    task = make_task(cfg, policy.tokenizer)
    prompt_ids = task.prompt_ids(task.adhoc_record(prompt, None))
    gaps = []
    for line in lines:
        tokens = policy.tokenizer(line["z"], add_special_tokens=False).input_ids
        assert len(tokens) == line["tokens"], line
        trained = teacher_forced_log_q(policy.model, task, prompt_ids, tokens, line["terminated"])
        with policy.model.disable_adapter():
            base = teacher_forced_log_q(policy.model, task, prompt_ids, tokens, line["terminated"])
        assert line["log_q"] == pytest.approx(trained, abs=1e-3), (line, trained, base)
        gaps.append(abs(trained - base))
    # every line matched the trained adapter within 1e-3; most must also be far from the base model,
    # or the check could not tell the two apart (a Z the adapter barely moved proves nothing alone)
    assert sum(g > 1e-2 for g in gaps) >= 2 * len(gaps) // 3, f"the adapter has not moved enough to tell it from the base model: {gaps}"

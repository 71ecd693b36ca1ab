"""A mask on Z's first token (`task.first_token: word`): the samplers take the tokens that start no
word out of s_0 alone, the learner's teacher-forced pass and PPO read the same q, and evaluation's
baselines get the same mask, so no sample reaches the Z that the reward's rule gives the floor."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from gfnlm.actors.decoding import group_beam_search, hf_generate
from gfnlm.actors.policy import Policy
from gfnlm.actors.sampler import TransformersSampler
from gfnlm.actors.sampler import RequestServer
from gfnlm.actors.tiny import CHARS, build_model
from gfnlm.actors.trajectory import MicroBatch, PromptRequest, Trajectory, by_record
from gfnlm.configs import ConfigError, load_config
from gfnlm.configs.schema import LoraConfig, ModelConfig
from gfnlm.learner.cli import main
from conftest import LLAMA_TARGETS
from test_tasks import task_overrides, write_jsonl

PROMPT = "The number is "


@pytest.fixture(scope="module")
def setup(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    policy = Policy(ModelConfig(path=tiny_llama), LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS))
    torch.manual_seed(0)
    for p in policy.trainable_parameters():  # an adapter that changes q, so the pass runs through it
        p.data.normal_(0, 0.05)
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    end = [tok.convert_tokens_to_ids(".")]
    letters = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    first = sorted(set(range(len(tok))) - letters - set(end))  # Z starts with a lower-case letter
    return tok, policy, prompt, end, letters, first


@pytest.mark.parametrize("banned_most", [False, True], ids=["full head", "allowed columns"])
def test_the_samplers_first_token_mask_is_the_learners(setup, banned_most):
    """Every sample starts with an allowed token, later tokens are free, and the behaviour log-probs
    equal the learner's teacher-forced ones under the same mask: at s_0 they differ from the
    unmasked q, after it they do not. Both the full LM head and the allowed-columns head (most of
    the vocabulary banned outright) are checked."""
    tok, policy, prompt, end, letters, first = setup
    digits = {tok.convert_tokens_to_ids(c) for c in "0123456789 "}
    banned = sorted(set(range(len(tok))) - letters - digits - set(end)) if banned_most else []
    engine = TransformersSampler(policy.model, seed=3, pad_id=tok.pad_token_id or 0)
    trajs = engine.generate_batch([PromptRequest(0, prompt, 24)], 1, 8, end, banned, first_banned_ids=first)
    assert all(t.tokens and t.tokens[0] in letters for t in trajs)
    assert any(tok.decode([x]) not in "abcdefghijklmnopqrstuvwxyz" for t in trajs for x in t.tokens[1:]), \
        "the mask holds at the first token only"
    plain_trajs = engine.generate(0, prompt, 24, 1.0, 1, 8, end, banned_ids=banned)
    assert any(t.tokens[0] not in letters for t in plain_trajs), "without the mask, other first tokens come"
    with torch.no_grad():
        log_pf, log_pterm, _, _ = policy.logprobs(prompt, trajs, end, banned, min_len=1, first_banned_ids=first)
        plain, _, _, _ = policy.logprobs(prompt, trajs, end, banned, min_len=1)
    for b, t in enumerate(trajs):
        got = torch.tensor(t.logprobs)
        assert torch.allclose(got, log_pf[b, : t.length], atol=1e-4), tok.decode(t.tokens)
        assert float(plain[b, 0]) < got[0] - 1e-3, "at s_0 the mask renormalises q"
        assert torch.allclose(got[1:], plain[b, 1: t.length], atol=1e-4)
        if t.terminated:
            assert math.isclose(t.end_logprob, float(log_pterm[b, t.length]), abs_tol=1e-4)


def test_the_baselines_decode_under_the_same_first_token_mask(setup):
    tok, policy, prompt, end, letters, first = setup
    model, pad = policy.model, tok.pad_token_id or 0
    with torch.no_grad(), model.disable_adapter():
        outs = (hf_generate(model, prompt, 6, 6, 1, end, pad, do_sample=True, top_p=0.95, top_k=0, begin_suppress_tokens=first)
                + hf_generate(model, prompt, 4, 6, 1, end, pad, do_sample=False, num_beams=4, begin_suppress_tokens=first)
                + group_beam_search(model, prompt, 4, 4, 6, 1, end, first_banned_ids=first))
        free = group_beam_search(model, prompt, 4, 4, 6, 1, end)
    assert all(z and z[0] in letters for z, _ in outs)
    assert any(z[0] not in letters for z, _ in free), "without the mask the beams start elsewhere"


def test_a_continuation_run_with_first_token_word_never_samples_a_z_glued_onto_the_prompt(tiny_llama, tmp_path):
    """The task masks every token but the lone space out of Z's first token (this character-level
    tokenizer keeps the space apart from the word), the request carries that mask, every trajectory
    a short run samples and every evaluation sample starts with it."""
    from gfnlm.learner.loop import build, eval_sampler
    from gfnlm.learner.schedule import plan_request
    from gfnlm.rewards.lm_eval import _generate

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}."} for i in range(4)])
    task = "{type: continuation, data: {train: %s}, min_len: 1, max_len: 6, first_token: word}" % data
    ov = task_overrides(tiny_llama, tmp_path / "run", "continuation", data, task=task,  # (⊤ out before min_len in q)
                        **{"eval.baselines": "[sample, nucleus, beam, diverse_beam]",
                           "learner.objective": "{type: subtb, states: can_end}", "reward.prefixes": "can_end"})
    c = build(load_config("continuation.yaml", ov))
    space = c.task.tokenizer.convert_tokens_to_ids(" ")
    assert set(range(len(c.task.tokenizer))) - c.task.first_banned_ids == {space} | set(c.task.end_ids)
    req, _ = plan_request(c.cfg, c.task, [0, 1], [0, 0], torch.Generator().manual_seed(0))
    assert set(req.first_banned_ids) == c.task.first_banned_ids
    # what the training loop samples (on-policy and tempered rows) starts with the space, and the
    # learner's teacher-forced pass reads the very log-probs the sampler drew on-policy
    trajs = RequestServer(c.sampler, c.task.tokenizer)(req)
    assert {t.source for t in trajs} == {"on_policy", "tempered"} and all(t.tokens[:1] == [space] for t in trajs)
    c.task.score(trajs)
    terms = c.learner.terms(MicroBatch(req, trajs), 1.0)
    ordered = [t for ts in by_record(trajs).values() for t in ts]
    for b, t in enumerate(ordered):
        if t.source == "on_policy":
            assert torch.allclose(terms.log_pf[b, : t.length].detach(), torch.tensor(t.logprobs), atol=1e-4)
    for method in ("trained", "sample", "nucleus", "beam", "diverse_beam"):
        outs = _generate(method, c.task, c.policy, eval_sampler(c), 0, 4, c.cfg.eval)
        assert all(z[:1] == [space] for z, _ in outs if z), method
    run = tmp_path / "run"
    assert main(["train", "continuation.yaml", *sum([["-o", o] for o in ov + ["learner.steps=3"]], [])]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
    shown = [z for ex in json.loads((run / "eval.json").read_text())["examples"]["trained"] for z in ex["samples"]]
    assert shown and all(z.startswith(" ") for z in shown if z)


def test_word_tokens_start_z_the_lone_space_does_not_and_what_the_policy_cannot_write_stays_out(tmp_path):
    """A tokenizer with word tokens (" the", " cat"): they are Z's only first tokens, the lone space
    is masked out (a Z " 5..." cannot be written, and gets the floor), a seed or SFT reference that
    starts so is left out rather than given log q = −inf, and a mask that leaves no first token at
    all is a one-line error."""
    from gfnlm.learner.loop import build

    model = build_model(str(tmp_path / "m"), "llama", chars=CHARS + [" the", " cat"])
    tok = AutoTokenizer.from_pretrained(model)
    ids = {s: tok.convert_tokens_to_ids(s) for s in (" the", " cat", " ", "5", "c")}
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}."} for i in range(4)])
    task = "{type: continuation, data: {train: %s}, min_len: 1, max_len: 6, first_token: word}" % data
    c = build(load_config("continuation.yaml", task_overrides(model, tmp_path / "run", "continuation", data, task=task)))
    assert c.task.word_starts == {ids[" the"], ids[" cat"]}
    assert ids[" "] in c.task.first_banned_ids and ids["c"] in c.task.first_banned_ids
    digit = Trajectory(0, [ids[" "], ids["5"]], terminated=True)
    word = Trajectory(0, [ids[" the"], ids[" cat"]], terminated=True)
    c.task.score([digit, word])
    assert digit.log_r[1:] == [c.task.floor] * 2 and all(x > c.task.floor for x in word.log_r[1:])
    assert not c.task.reachable(digit.tokens) and c.task.reachable(word.tokens) and c.task.reachable([])
    with pytest.raises(ConfigError, match="task.first_token: word: every token that could start Z's first word is disallowed"):
        build(load_config("continuation.yaml", task_overrides(model, tmp_path / "run2", "continuation", data,
                                                              task=task[:-1] + ", disallowed: [' ']}")))

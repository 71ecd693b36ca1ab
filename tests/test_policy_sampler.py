"""The teacher-forced pass, the sampler and the reward model agree with plain forward passes."""

import math

import pytest
import torch
from torch.testing import assert_close

from gfnlm.actors.scoring import PrefixScorer
from gfnlm.actors.sampler import TransformersSampler
from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs.schema import LoraConfig, ModelConfig
from gfnlm.actors.policy import Policy

from conftest import GPT2_TARGETS, LLAMA_TARGETS

PROMPT = "Pick a number: "


def make_policy(model_dir, kind):
    policy = Policy(ModelConfig(path=model_dir), LoraConfig(r=4, target_modules=LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS))
    # Give the adapter non-zero weights so that it changes the output (B starts at 0).
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, 0.3)
    return policy


def naive_logprobs(model, prompt_ids, seqs, end_ids):
    """Each sequence run on its own, prompt included: the definition."""
    pf, pt = [], []
    for seq in seqs:
        ids = torch.tensor([prompt_ids + seq])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(prompt_ids) - 1 :]
        pf.append(torch.stack([logp[k, tok] for k, tok in enumerate(seq)]) if seq else torch.zeros(0))
        pt.append(torch.logsumexp(logp[:, end_ids], -1))
    return pf, pt


@pytest.fixture(params=["llama", "gpt2"])
def policy(request, tiny_llama, tiny_gpt2):
    return make_policy(tiny_llama if request.param == "llama" else tiny_gpt2, request.param)


def trajs(seqs):
    return [Trajectory(0, s) for s in seqs]


def test_shared_prompt_pass_equals_separate_passes(policy):
    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    end = tok(".", add_special_tokens=False).input_ids
    seqs = [tok(s, add_special_tokens=False).input_ids for s in ["42", "7", "", "100"]]
    log_pf, log_pterm, lengths, _ = policy.logprobs(prompt, trajs(seqs), end)
    ref_pf, ref_pt = naive_logprobs(policy.model, prompt, seqs, end)
    for b, s in enumerate(seqs):
        assert_close(log_pf[b, : len(s)], ref_pf[b], atol=1e-5, rtol=1e-5)
        assert_close(log_pterm[b, : len(s) + 1], ref_pt[b], atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_shared_prompt(policy):
    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    end = tok(".", add_special_tokens=False).input_ids
    seqs = [tok(s, add_special_tokens=False).input_ids for s in ["42", "7", "13"]]
    params = policy.trainable_parameters()

    log_pf, log_pterm, lengths, _ = policy.logprobs(prompt, trajs(seqs), end)
    total = sum(log_pf[b, :n].sum() + log_pterm[b, : n + 1].sum() for b, n in enumerate(lengths.tolist()))
    shared = torch.autograd.grad(total, params)
    ref_pf, ref_pt = naive_logprobs(policy.model, prompt, seqs, end)
    naive = torch.autograd.grad(sum(x.sum() for x in ref_pf) + sum(x.sum() for x in ref_pt), params)
    for a, b in zip(shared, naive):
        assert_close(a, b, atol=1e-4, rtol=1e-3)
    # gradients reach only the adapter: the base weights do not even require them
    assert all(not p.requires_grad for n, p in policy.model.named_parameters() if "lora_" not in n)


def test_length_buckets_pad_each_group_to_its_own_longest_row():
    from gfnlm.actors.policy import length_buckets

    groups = length_buckets([30, 2, 3, 2, 29, 1, 2, 2])
    assert sorted(b for g in groups for b in g) == list(range(8))
    assert sorted(map(sorted, groups)) == [[0, 4], [1, 2, 3, 5, 6, 7]]
    assert length_buckets([5, 4, 5]) == [[0, 2, 1]]  # one more pass costs more than the padding it saves
    assert length_buckets([]) == []


@pytest.mark.parametrize("head", ["full", "allowed"])
def test_the_pass_in_length_buckets_equals_the_definition(policy, head):
    """Rows of very different lengths run in several buckets (each padded to its own longest row,
    the prompt's cache shared by all): log-probs and gradients equal one full pass per sequence."""
    from gfnlm.actors.policy import length_buckets, penalize

    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    digits = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    end = [tok.convert_tokens_to_ids(".")]
    banned = sorted(set(range(len(tok))) - set(digits + end)) if head == "allowed" else ()
    seqs = [[digits[(3 * b + k) % 10] for k in range(n)] for b, n in enumerate([24, 2, 1, 23, 3, 0, 2, 20])]
    assert len(length_buckets([len(s) for s in seqs])) >= 2
    params = policy.trainable_parameters()
    log_pf, log_pterm, lengths, _ = policy.logprobs(prompt, trajs(seqs), end, banned)
    got = torch.autograd.grad(sum(log_pf[b, :n].sum() + log_pterm[b, : n + 1].sum()
                                  for b, n in enumerate(lengths.tolist())), params)
    total = 0.0
    for b, seq in enumerate(seqs):
        logits = policy.model(input_ids=torch.tensor([prompt + seq])).logits[0].float()
        logp = torch.log_softmax(penalize(logits, banned), -1)[len(prompt) - 1:]
        pf = torch.stack([logp[k, t] for k, t in enumerate(seq)]) if seq else torch.zeros(0)
        pt = torch.logsumexp(logp[:, end], -1)
        assert_close(log_pf[b, : len(seq)], pf, atol=1e-5, rtol=1e-5)
        assert_close(log_pterm[b, : len(seq) + 1], pt, atol=1e-5, rtol=1e-5)
        total = total + pf.sum() + pt.sum()
    for g, w in zip(got, torch.autograd.grad(total, params)):
        assert_close(g, w, atol=1e-5 * float(w.abs().max()), rtol=1e-3)  # float sums over ~80 terms


def test_a_sliding_window_model_runs_in_buckets_over_a_cache_that_keeps_every_position(tmp_path):
    """A sliding-window model's own cache keeps only its window; the prompt's cache is a full one
    (`actors.kv.full_cache`), shared by the length buckets under the model's own (windowed) mask, and
    the pass equals one full pass per sequence, with a prompt longer than the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from gfnlm.actors.policy import length_buckets, sequence_logprobs
    from gfnlm.actors.tiny import build_tokenizer

    tok = build_tokenizer(str(tmp_path), None)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             sliding_window=6, pad_token_id=tok.pad_token_id)).eval()
    prompt = list(range(5, 20))
    seqs = [[30 + (k % 7) for k in range(n)] for n in [40, 1, 2, 38, 1, 2, 3, 2]]
    tokens = torch.zeros((len(seqs), 40), dtype=torch.long)
    for b, seq in enumerate(seqs):
        tokens[b, : len(seq)] = torch.tensor(seq)
    assert len(length_buckets([len(s) for s in seqs])) >= 2
    with torch.no_grad():
        log_pf, _ = sequence_logprobs(model, prompt, tokens, [3], lengths=[len(s) for s in seqs])
        for b, seq in enumerate(seqs):
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + seq])).logits[0].float(), -1)[len(prompt) - 1:]
            assert_close(log_pf[b, : len(seq)], torch.stack([logp[k, t] for k, t in enumerate(seq)]), atol=1e-5, rtol=1e-5)


def test_sampler_logprobs_match_teacher_forcing_at_t1(policy):
    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    end = tok(".", add_special_tokens=False).input_ids
    sampler = TransformersSampler(policy.model, seed=3)
    # min_new_tokens=0: nothing is masked, so the sampling distribution is q itself
    out = sampler.generate(0, prompt, 12, 1.0, min_new_tokens=0, max_new_tokens=4, end_ids=end)
    assert len(out) == 12 and all(t.length <= 4 for t in out)
    log_pf, log_pterm, _, _ = policy.logprobs(prompt, out, end)
    for b, t in enumerate(out):
        assert_close(torch.tensor(t.logprobs), log_pf[b, : t.length].detach(), atol=1e-4, rtol=1e-4)
        if t.terminated:
            # a single end token here, so log q(⊤) is its log-prob
            assert t.end_logprob == pytest.approx(log_pterm[b, t.length].item(), abs=1e-4)
        else:
            assert t.length == 4 and t.end_logprob is None


def test_sampler_respects_min_len_temperature_and_version(policy):
    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    # make the end token overwhelmingly likely: min_new_tokens must still hold it back
    end = [tok.convert_tokens_to_ids("a")]
    sampler = TransformersSampler(policy.model, seed=0)
    sampler.load_weights(None, version=7)
    out = sampler.generate(0, prompt, 16, [0.5] * 8 + [2.0] * 8, min_new_tokens=2, max_new_tokens=5, end_ids=end)
    assert all(t.length >= 2 for t in out)
    assert all(end[0] not in t.tokens for t in out)
    assert [t.temperature for t in out] == [0.5] * 8 + [2.0] * 8
    assert {t.version for t in out} == {7}
    # behaviour log-probs are those of the sampling distribution: tempered, ⊤ masked before min_len
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    for t in (out[0], out[8]):
        scaled = logits / t.temperature
        scaled[end] = -float("inf")
        assert t.logprobs[0] == pytest.approx(torch.log_softmax(scaled, -1)[t.tokens[0]].item(), abs=1e-4)



def test_reward_model_scores_every_prefix_with_frozen_weights(policy):
    tok = policy.tokenizer
    prompt = tok(PROMPT).input_ids
    end = tok(".", add_special_tokens=False).input_ids
    seqs = [tok(s, add_special_tokens=False).input_ids for s in ["42", "", "9"]]
    rm = PrefixScorer(policy.model, tok.pad_token_id)
    got = rm.score(prompt, trajs(seqs), end_ids=end)
    with torch.no_grad(), policy.model.disable_adapter():
        ref_pf, ref_pt = naive_logprobs(policy.model, prompt, seqs, end)
    for b, s in enumerate(seqs):
        expected = [sum(ref_pf[b][:i].tolist()) + ref_pt[b][i].item() for i in range(len(s) + 1)]
        assert got[b] == pytest.approx(expected, abs=1e-4)
    # the adapter (non-zero here) is not what scores: the policy's own log-probs differ
    with torch.no_grad():
        own_pf, own_pt = naive_logprobs(policy.model, prompt, seqs[:1], end)
    assert not math.isclose(own_pt[0][0].item(), ref_pt[0][0].item(), abs_tol=1e-3)


def test_sampler_is_seeded(tiny_llama):
    policy = make_policy(tiny_llama, "llama")
    prompt = policy.tokenizer(PROMPT).input_ids
    runs = [TransformersSampler(policy.model, seed=5).generate(0, prompt, 8, 1.0, 1, 3, [18]) for _ in range(2)]
    assert [t.tokens for t in runs[0]] == [t.tokens for t in runs[1]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_mostly_banned_vocabulary_samples_through_the_allowed_head_columns(kind, tiny_llama, tiny_gpt2):
    """With most of the vocabulary banned outright (arithmetic's digits and ",.=+-"), the engine computes
    the LM head's allowed columns only: the same distribution, so its log-probs are the teacher-forced
    ones with those tokens banned, and no banned token is ever drawn; prompts of several lengths."""
    policy = make_policy(tiny_llama if kind == "llama" else tiny_gpt2, kind)
    tok = policy.tokenizer
    allowed = [tok.convert_tokens_to_ids(c) for c in "01234."]
    end = [tok.convert_tokens_to_ids(".")]
    banned = sorted(set(range(len(tok))) - set(allowed))
    engine = TransformersSampler(policy.model, seed=3, pad_id=tok.pad_token_id)
    from gfnlm.actors.policy import allowed_head

    assert allowed_head(engine.model, banned, math.inf) is not None and allowed_head(engine.model, banned[:3], math.inf) is None
    assert allowed_head(engine.model, banned, 5.0) is None  # a finite penalty keeps every token possible
    from gfnlm.actors.trajectory import PromptRequest

    prompts = [tok.encode(PROMPT), tok.encode("x: ")]
    trajs = engine.generate_batch([PromptRequest(0, prompts[0], 12, [1.0, 1.0]), PromptRequest(1, prompts[1], 10)],
                                  1, 6, end, banned)
    assert len(trajs) == 24 and all(set(t.tokens) <= set(allowed) - set(end) for t in trajs)
    assert any(t.terminated for t in trajs) and any(t.length > 1 for t in trajs)
    for rid, p in enumerate(prompts):
        ts = [t for t in trajs if t.record_id == rid]
        with torch.no_grad():
            log_pf, log_pterm, _, _ = policy.logprobs(p, ts, end, banned)
        for b, t in enumerate(ts):
            want = log_pf[b, : t.length].clone()
            want[0] -= math.log1p(-math.exp(float(log_pterm[b, 0])))  # ⊤ masked before min_len = 1
            assert_close(torch.tensor(t.logprobs), want, atol=1e-5, rtol=0)
            if t.terminated:
                assert t.end_logprob == pytest.approx(float(log_pterm[b, t.length]), abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_teacher_forcing_through_the_allowed_head_columns_equals_the_masked_full_softmax(kind, tiny_llama, tiny_gpt2):
    """The learner's pass with most of the vocabulary banned (the head's allowed columns only) gives the
    log-probs and the gradients of the full softmax with the banned tokens masked; a banned token in a
    trajectory is impossible (-inf), as before."""
    from gfnlm.actors.policy import allowed_head, penalize

    policy = make_policy(tiny_llama if kind == "llama" else tiny_gpt2, kind)
    tok = policy.tokenizer
    allowed = [tok.convert_tokens_to_ids(c) for c in "0123456789.=+- "]
    end = [tok.convert_tokens_to_ids(".")]
    banned = sorted(set(range(len(tok))) - set(allowed))
    assert allowed_head(policy.model, banned) is not None
    prompt = tok.encode(PROMPT)
    seqs = [[tok.convert_tokens_to_ids(c) for c in s] for s in ["1+2=3", "40", "", "9-9 = 0"]]
    trajs = [Trajectory(0, s) for s in seqs]
    params = policy.trainable_parameters()
    log_pf, log_pterm, lengths, _ = policy.logprobs(prompt, trajs, end, banned)
    mask = torch.arange(log_pf.shape[1])[None, :] < lengths[:, None]
    states = torch.arange(log_pterm.shape[1])[None, :] <= lengths[:, None]
    got = torch.autograd.grad((torch.where(mask, log_pf, 0).sum() + torch.where(states, log_pterm, 0).sum()), params)
    want_pf, want_pt, want_total = [], [], 0.0
    for seq in seqs:  # the definition: the whole sequence, every banned logit at -inf, full softmax
        ids = torch.tensor([prompt + seq])
        logp = torch.log_softmax(penalize(policy.model(input_ids=ids).logits[0].float(), banned), -1)[len(prompt) - 1:]
        pf = torch.stack([logp[k, t] for k, t in enumerate(seq)]) if seq else torch.zeros(0)
        pt = torch.logsumexp(logp[:, end], -1)
        want_pf.append(pf)
        want_pt.append(pt)
        want_total = want_total + pf.sum() + pt.sum()
    want = torch.autograd.grad(want_total, params)
    for b, seq in enumerate(seqs):
        assert_close(log_pf[b, : len(seq)], want_pf[b], atol=1e-5, rtol=1e-5)
        assert_close(log_pterm[b, : len(seq) + 1], want_pt[b], atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-4)
    bad, _, _, _ = policy.logprobs(prompt, [Trajectory(0, [tok.convert_tokens_to_ids("a")])], end, banned)
    assert bad[0, 0].item() == -float("inf")

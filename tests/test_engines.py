"""The sampler contract, run against both engines (the vLLM ones skip where vLLM is absent).

Each engine's behaviour log-probs must be the learner's teacher-forced log-probs of the same model
and adapter; a LoRA swap must serve the new weights under a new id; tool insertions appear in the
text, carry no log-prob and are masked in the loss; prefix scoring on vLLM equals the
transformers forward pass.
"""

import os

import pytest
import torch
from transformers import AutoTokenizer

from gfnlm.actors.scoring import PrefixScorer
from gfnlm.actors.sampler import TransformersSampler
from gfnlm.actors.tools import ToolRunner
from gfnlm.actors.trajectory import Trajectory
from gfnlm.actors.vllm_engine import vllm_available
from gfnlm.configs.schema import LoraConfig, ModelConfig
from gfnlm.learner.objectives import subtb_loss
from gfnlm.actors.policy import Policy
from conftest import LLAMA_TARGETS, tiny_overrides

VLLM_MISSING = vllm_available()
ENGINES = ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm,
                                                        pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))])]
PROMPT = "The number is "


def make_policy(model_dir: str, seed: int) -> Policy:
    policy = Policy(ModelConfig(path=model_dir), LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.model.named_parameters():
        if "lora_" in name:  # a visible adapter: B = 0 would make it the base model
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return policy


class Echo:
    """A test tool that fires often on a random model: any lower-case vowel inserts '[v]'."""

    def __init__(self, trigger: str):
        self.trigger = trigger

    def __call__(self, text: str) -> str:
        return "[v]"


@pytest.fixture(scope="module")
def llm(tiny_llama_vllm):
    if VLLM_MISSING:
        pytest.skip(VLLM_MISSING)
    from gfnlm.actors.vllm_engine import build_llm
    from gfnlm.configs.schema import VLLMConfig

    llm = build_llm(tiny_llama_vllm, VLLMConfig(), "float32", max_model_len=128, seed=0, max_lora_rank=8)
    yield llm
    del llm


@pytest.fixture(scope="module")
def reward_llm(tiny_llama_vllm):
    """The frozen reward model's engine: no LoRA (vLLM 0.32 fails prompt_logprobs with LoRA on)."""
    if VLLM_MISSING:
        pytest.skip(VLLM_MISSING)
    from gfnlm.actors.vllm_engine import build_llm
    from gfnlm.configs.schema import VLLMConfig

    yield build_llm(tiny_llama_vllm, VLLMConfig(), "float32", max_model_len=128, seed=0, enable_lora=False)


@pytest.fixture(scope="module")
def setup(tiny_llama_vllm):
    tok = AutoTokenizer.from_pretrained(tiny_llama_vllm)
    return tok, tok.encode(PROMPT, add_special_tokens=False), [tok.convert_tokens_to_ids(".")]


def engine_for(kind, policy, request, tools=None, seed=0):
    if kind == "transformers":
        return TransformersSampler(policy.model, policy.device, seed=seed, tools=tools, pad_id=policy.tokenizer.pad_token_id)
    from gfnlm.actors.vllm_engine import VLLMSampler, peft_config_dict

    engine = VLLMSampler(request.getfixturevalue("llm"), peft_config_dict("tiny", LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS)),
                         seed=seed, tools=tools)
    engine.load_weights(policy.adapter_state(), 1)
    request.addfinalizer(engine.close)
    return engine


def teacher_forced(policy, prompt, trajs, end_ids):
    with torch.no_grad():
        log_pf, log_pterm, lengths, tool = policy.logprobs(prompt, trajs, end_ids)
    return log_pf, log_pterm


@pytest.mark.parametrize("kind", ENGINES)
def test_distinct_prompts_in_one_call_and_the_token_mask(kind, tiny_llama_vllm, setup, request):
    """Prompts of different lengths in one call (left padding in the transformers engine): each
    sample's log-probs are its own prompt's teacher-forced ones, with banned tokens out of the
    distribution (renormalised), and banned tokens are never drawn."""
    from gfnlm.actors.trajectory import PromptRequest

    tok, _, end = setup
    policy = make_policy(tiny_llama_vllm, seed=2)
    engine = engine_for(kind, policy, request)
    prompts = {7: tok.encode("a", add_special_tokens=False), 3: tok.encode("The number is ", add_special_tokens=False),
               5: tok.encode("xyz 12 + ", add_special_tokens=False)}
    banned = [tok.convert_tokens_to_ids(c) for c in "eatoin "]
    reqs = [PromptRequest(rid, ids, 4, [0.7, 1.6]) for rid, ids in prompts.items()]
    trajs = engine.generate_batch(reqs, 0, 6, end, banned_ids=banned)
    assert [t.record_id for t in trajs] == [7] * 6 + [3] * 6 + [5] * 6
    assert [t.source for t in trajs[:6]] == ["on_policy"] * 4 + ["tempered"] * 2
    assert not any(tok_id in banned for t in trajs for tok_id in t.tokens)
    for rid, ids in prompts.items():
        mine = [t for t in trajs if t.record_id == rid and t.source == "on_policy"]
        with torch.no_grad():
            log_pf, _, _, _ = policy.logprobs(ids, mine, end, banned)
        for b, t in enumerate(mine):
            assert torch.allclose(torch.tensor(t.logprobs), log_pf[b, : t.length], atol=1e-3), (rid, t.logprobs)


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("min_new", [0, 1])
def test_the_first_token_mask_in_both_engines_is_the_learners(kind, min_new, tiny_llama_vllm, setup, request):
    """`first_banned_ids` (task.first_token: word) hold at Z's first token only: every sample starts
    with an allowed token (or ends at once, where min_new is 0), later tokens are free, and the
    engine's log-probs, ⊤ included, are the learner's teacher-forced ones under the same mask."""
    from gfnlm.actors.trajectory import PromptRequest

    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=2)
    engine = engine_for(kind, policy, request)
    letters = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    first = sorted(set(range(len(tok))) - letters - set(end))
    trajs = engine.generate_batch([PromptRequest(0, prompt, 24, [0.7])], min_new, 6, end, first_banned_ids=first)
    assert all(t.tokens[0] in letters for t in trajs if t.tokens)
    assert any(x not in letters for t in trajs for x in t.tokens[1:]), "later tokens are free"
    mine = [t for t in trajs if t.source == "on_policy"]
    with torch.no_grad():
        log_pf, log_pterm, _, _ = policy.logprobs(prompt, mine, end, min_len=min_new, first_banned_ids=first)
    for b, t in enumerate(mine):
        assert torch.allclose(torch.tensor(t.logprobs), log_pf[b, : t.length], atol=1e-3), t.logprobs
        if t.terminated:
            assert abs(t.end_logprob - float(log_pterm[b, t.length])) < 1e-3


@pytest.mark.parametrize("kind", ENGINES)
def test_a_finite_token_penalty_is_in_the_sampled_and_the_teacher_forced_logprobs(kind, tiny_llama_vllm, setup, request):
    """A log-probability penalty (arithmetic's `disallowed_penalty`) lowers the penalised tokens'
    logits before the temperature: the engine's log-probs at T = 1 are the learner's with the same
    penalty, and penalised tokens, still possible, are rarer than without it."""
    from gfnlm.actors.trajectory import PromptRequest

    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=2)
    engine = engine_for(kind, policy, request)
    penalised = [tok.convert_tokens_to_ids(c) for c in "eatoin s"]
    trajs = engine.generate_batch([PromptRequest(0, prompt, 24)], 0, 6, end, banned_ids=penalised, ban_penalty=3.0)
    with torch.no_grad():
        log_pf, _, _, _ = policy.logprobs(prompt, trajs, end, penalised, 3.0)
        plain, _, _, _ = policy.logprobs(prompt, trajs, end)
    for b, t in enumerate(trajs):
        assert torch.allclose(torch.tensor(t.logprobs), log_pf[b, : t.length], atol=1e-3)
    hit = [(b, k) for b, t in enumerate(trajs) for k, x in enumerate(t.tokens) if x in penalised]
    assert all(log_pf[b, k] < plain[b, k] - 2.0 for b, k in hit)  # ~3 nats lower, renormalised


@pytest.mark.parametrize("kind", ENGINES)
def test_logprobs_are_the_teacher_forced_logprobs(kind, tiny_llama_vllm, setup, request):
    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=1)
    engine = engine_for(kind, policy, request)
    trajs = engine.generate(0, prompt, 12, 1.0, 0, 8, end)
    assert len(trajs) == 12 and all(t.version == engine.version for t in trajs)
    assert all(len(t.logprobs) == t.length <= 8 for t in trajs)
    log_pf, log_pterm = teacher_forced(policy, prompt, trajs, end)
    for b, t in enumerate(trajs):
        ref = log_pf[b, : t.length]
        assert torch.allclose(torch.tensor(t.logprobs), ref, atol=1e-3), (t.logprobs, ref)
        # the sequence log-prob is the sum of the per-token ones (and ⊤'s, when sampled)
        seq = sum(t.logprobs) + (t.end_logprob or 0.0)
        ref_seq = float(ref.sum() + (log_pterm[b, t.length] if t.terminated else 0.0))
        assert seq == pytest.approx(ref_seq, abs=1e-3 * (t.length + 1))
        assert t.terminated == (t.end_logprob is not None)
    assert any(t.terminated for t in trajs) or all(t.length == 8 for t in trajs)


@pytest.mark.parametrize("kind", ENGINES)
def test_temperature_min_and_max_tokens(kind, tiny_llama_vllm, setup, request):
    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=2)
    engine = engine_for(kind, policy, request)
    temps = [0.5, 2.0, 2.0, 0.5]
    trajs = engine.generate(0, prompt, 4, temps, 3, 6, end, source="tempered")
    assert [t.temperature for t in trajs] == temps and {t.source for t in trajs} == {"tempered"}
    assert all(3 <= t.length <= 6 and (t.terminated or t.length == 6) for t in trajs)
    # behaviour log-probs are those of the tempered distribution actually sampled
    with torch.no_grad():
        for t in trajs:
            ids = torch.tensor([prompt + t.tokens])
            logits = policy.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            logits[:3, end] = -float("inf")  # the min-tokens mask
            lp = torch.log_softmax(logits / t.temperature, -1).gather(1, torch.tensor(t.tokens)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(t.logprobs), lp, atol=1e-3)


@pytest.mark.parametrize("kind", ENGINES)
def test_seeded_engines_repeat_themselves(kind, tiny_llama_vllm, setup, request):
    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=3)
    a = engine_for(kind, policy, request, seed=7).generate(0, prompt, 6, 1.0, 0, 6, end)
    b = engine_for(kind, policy, request, seed=7).generate(0, prompt, 6, 1.0, 0, 6, end)
    assert [t.tokens for t in a] == [t.tokens for t in b]


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
def test_lora_swap_serves_the_new_adapter_under_a_new_id(tiny_llama_vllm, setup, request):
    tok, prompt, end = setup
    first, second = make_policy(tiny_llama_vllm, seed=4), make_policy(tiny_llama_vllm, seed=5)
    engine = engine_for("vllm", first, request)
    old_id = engine.lora.lora_int_id
    engine.load_weights(second.adapter_state(), 2)
    assert engine.version == 2 and engine.lora.lora_int_id != old_id
    assert engine.loaded_lora_ids() == {engine.lora.lora_int_id}, "the old version is removed"
    assert not os.path.exists(os.path.join(engine._dir, f"v1-{old_id}"))
    trajs = engine.generate(0, prompt, 8, 1.0, 0, 6, end)
    assert {t.version for t in trajs} == {2}
    new_pf, _ = teacher_forced(second, prompt, trajs, end)
    old_pf, _ = teacher_forced(first, prompt, trajs, end)
    got = torch.cat([torch.tensor(t.logprobs) for t in trajs])
    want_new = torch.cat([new_pf[b, : t.length] for b, t in enumerate(trajs)])
    want_old = torch.cat([old_pf[b, : t.length] for b, t in enumerate(trajs)])
    assert torch.allclose(got, want_new, atol=1e-3)
    assert not torch.allclose(got, want_old, atol=1e-2), "the old weights must not be served"
    # and back to the first adapter as version 3: a third id, the first adapter's log-probs
    engine.load_weights(first.adapter_state(), 3)
    trajs = engine.generate(0, prompt, 8, 1.0, 0, 6, end)
    pf, _ = teacher_forced(first, prompt, trajs, end)
    assert torch.allclose(torch.cat([torch.tensor(t.logprobs) for t in trajs]),
                          torch.cat([pf[b, : t.length] for b, t in enumerate(trajs)]), atol=1e-3)


def echo_engine(kind, model_dir, setup, request):
    """(policy, engine, the insertion's tokens) of an engine whose tool inserts '[v]' after every letter."""
    tok, _, _ = setup
    policy = make_policy(model_dir, seed=6)
    runner = ToolRunner.for_tokenizer([Echo(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"], tok)
    return policy, engine_for(kind, policy, request, tools=runner), tok.encode("[v]", add_special_tokens=False)


@pytest.mark.parametrize("kind", ENGINES)
def test_tool_insertions_are_environment_tokens(kind, tiny_llama_vllm, setup, request):
    tok, prompt, end = setup
    policy, engine, insert = echo_engine(kind, tiny_llama_vllm, setup, request)
    trajs = engine.generate(0, prompt, 16, 1.0, 2, 14, end)
    with_tool = [t for t in trajs if t.tool_mask]
    assert len(with_tool) >= 8, "letters are a third of the vocabulary: most samples call the tool"
    for t in with_tool:
        assert len(t.tool_mask) == t.length == len(t.logprobs)
        for k, (m, lp) in enumerate(zip(t.tool_mask, t.logprobs)):
            if m:
                assert lp == 0.0
        # every sampled letter is followed by its whole insertion
        for k, tk in enumerate(t.tokens):
            if not t.tool_mask[k] and tok.decode([tk]).isalpha() and tok.decode([tk]).isascii():
                follow = t.tokens[k + 1 : k + 1 + len(insert)]
                assert follow == insert[: len(follow)] and all(t.tool_mask[k + 1 : k + 1 + len(follow)])
        assert "[v]" in tok.decode(t.tokens)
    # sampled tokens still follow the policy, conditioned on the inserted text (past the first
    # two, where the end token is masked by min_new_tokens)
    log_pf, log_pterm = teacher_forced(policy, prompt, trajs, end)
    for b, t in enumerate(trajs):
        assert t.length >= 2
        sampled = [k for k in range(2, t.length) if not (t.tool_mask and t.tool_mask[k])]
        assert torch.allclose(torch.tensor([t.logprobs[k] for k in sampled]), log_pf[b, sampled], atol=1e-3)
    # the loss ignores tool tokens: changing their log q changes neither value nor gradient
    _, _, lengths, tool = policy.logprobs(prompt, trajs, end)
    log_r = torch.zeros(log_pterm.shape)
    pf = log_pf.clone().requires_grad_(True)
    loss = subtb_loss(pf, log_pterm, log_r, lengths, tool_mask=tool)
    loss.backward()
    assert tool.any() and torch.all(pf.grad[tool] == 0)
    noisy = torch.where(tool, log_pf + 5.0, log_pf)
    assert subtb_loss(noisy, log_pterm, log_r, lengths, tool_mask=tool) == pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("kind", ENGINES)
def test_max_tokens_count_the_policys_tokens_only(kind, tiny_llama_vllm, setup, request):
    """task.max_len counts the tokens the policy chooses: a tool's insertions come whole on top, so a
    sample that stops unended holds exactly max_new chosen tokens, and no insertion is cut short."""
    tok, prompt, end = setup
    _, engine, insert = echo_engine(kind, tiny_llama_vllm, setup, request)
    trajs = engine.generate(0, prompt, 24, 1.0, 1, 6, end)
    chosen = [t.tool_mask.count(False) if t.tool_mask else t.length for t in trajs]
    assert all(n <= 6 for n in chosen)
    unended = [(t, n) for t, n in zip(trajs, chosen) if not t.terminated]
    assert unended and all(n == 6 for _, n in unended)
    assert any(t.length > 6 for t, _ in unended), "insertions add to the chosen tokens"
    for t in trajs:  # every insertion whole, the last one included
        k = 0
        while k < t.length:
            if t.tool_mask and t.tool_mask[k]:
                assert t.tokens[k: k + len(insert)] == insert and all(t.tool_mask[k: k + len(insert)])
                k += len(insert)
            else:
                k += 1


@pytest.mark.parametrize("kind", ENGINES)
def test_a_tool_that_ends_steps_is_the_only_place_to_end(kind, tiny_llama_vllm, setup, request):
    """With `end_only_after` the policy may end only right after a tool's insertion: every sample the
    policy ended stops right after one, and the behaviour log-probs (every sampled token, and ⊤) are
    the learner's teacher-forced ones with ⊤ taken out of every other state (`can_end_states`)."""
    from gfnlm.actors.trajectory import can_end_states

    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=6)
    end = [tok.convert_tokens_to_ids(c) for c in ".,;:!?0123456789"]  # ⊤ likely enough on a random model
    runner = ToolRunner.for_tokenizer([Echo(c) for c in "abcdefghijklmnopqrstuvwxyz"], tok, end_only_after=True)
    engine = engine_for(kind, policy, request, tools=runner)
    trajs = engine.generate(0, prompt, 64, 1.0, 2, 24, end)
    ended = [t for t in trajs if t.terminated]
    assert len(ended) >= 3, "after '[v]' the end token is likely enough on this model"
    for t in ended:
        assert t.tool_mask and t.tool_mask[-1], tok.decode(t.tokens)
    with torch.no_grad():
        log_pf, log_pterm, _, _ = policy.logprobs(prompt, trajs, end, can_end=lambda t: can_end_states(
            t.length, t.tool_mask, 2, end_only_after_tool=True))
        plain, _, _, _ = policy.logprobs(prompt, trajs, end)
    differs = 0
    for b, t in enumerate(trajs):
        sampled = [k for k in range(t.length) if not (t.tool_mask and t.tool_mask[k])]
        got = torch.tensor([t.logprobs[k] for k in sampled])
        assert torch.allclose(got, log_pf[b, sampled], atol=1e-3), tok.decode(t.tokens)
        differs += int(not torch.allclose(got, plain[b, sampled], atol=1e-3))
        if t.terminated:  # ⊤ is a set of tokens: the one drawn is one of them, at the state where it ended
            with torch.no_grad():
                logq = torch.log_softmax(policy.model(input_ids=torch.tensor([prompt + t.tokens])).logits[0, -1].float(), -1)
            assert min(abs(float(logq[e]) - t.end_logprob) for e in end) < 1e-3
            assert t.end_logprob <= float(log_pterm[b, t.length]) + 1e-3
    assert differs, "the mask changes q where ⊤ is out"


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
def test_vllm_prefix_scores_equal_the_transformers_forward(tiny_llama_vllm, setup, reward_llm):
    from gfnlm.actors.vllm_engine import VLLMRewardModel

    tok, prompt, end = setup
    end2 = end + [tok.convert_tokens_to_ids("!")]
    policy = make_policy(tiny_llama_vllm, seed=8)  # the reward is the frozen base: the adapter is off
    trajs = [Trajectory(0, tok.encode(s, add_special_tokens=False)) for s in ["42", "7", "", "hello there"]]
    trajs[3].tool_mask = [False, False, True, True, False, False, False, False, False, False, False]
    ref_scorer, vllm_scorer = PrefixScorer(policy.model, tok.pad_token_id), VLLMRewardModel(reward_llm)
    suffix = tok.encode(" and so on.", add_special_tokens=False)
    for kw in (dict(end_ids=end2), dict(suffix_ids=suffix), dict(suffix_ids=suffix[:1])):
        ref = ref_scorer.score(prompt, trajs, **kw)
        got = vllm_scorer.score(prompt, trajs, **kw)
        for r, g, t in zip(ref, got, trajs):
            assert len(g) == t.length + 1
            assert torch.allclose(torch.tensor(g), torch.tensor(r), atol=1e-3), kw


def vllm_overrides(model_dir, run_dir, **extra):
    return tiny_overrides(model_dir, run_dir, **{"sampler.engine": "vllm", "lora.r": 8, "task.max_len": 3, **extra})


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
def test_training_on_the_vllm_engine_follows_the_learner(tiny_llama_vllm, tmp_path):
    from gfnlm.actors.vllm_engine import VLLMSampler
    from gfnlm.configs import load_config
    from gfnlm.learner.loop import train

    cfg = load_config("random_number.yaml", vllm_overrides(tiny_llama_vllm, tmp_path / "run", **{"learner.steps": 4}))
    c = train(cfg, str(tmp_path / "run"))
    assert isinstance(c.sampler, VLLMSampler)
    assert c.sampler.version == c.learner.step == 4
    assert c.sampler.loaded_lora_ids() == {c.sampler.lora.lora_int_id}, "one adapter version loaded at a time"
    import json

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in records)
    # what the engine serves now is the learner's adapter: its log-probs are the learner's
    prompt = c.task.prompt_ids(0)
    trajs = c.sampler.generate(0, prompt, 6, 1.0, 0, 3, c.task.end_ids)
    log_pf, _ = teacher_forced(c.policy, prompt, trajs, c.task.end_ids)
    assert torch.allclose(torch.cat([torch.tensor(t.logprobs) for t in trajs]),
                          torch.cat([log_pf[b, : t.length] for b, t in enumerate(trajs)]), atol=1e-3)


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
def test_sampler_worker_on_vllm_tags_batches_with_the_version(tiny_llama_vllm, tmp_path):
    from gfnlm.actors.trajectory import PromptRequest
    import functools

    from gfnlm.actors.engines import SamplerSpec
    from gfnlm.actors.workers import SampleRequest, SamplerWorker
    from gfnlm.configs import load_config
    from gfnlm.rewards.scorer import colocated_scorer

    cfg = load_config("random_number.yaml", vllm_overrides(tiny_llama_vllm, tmp_path / "run"))
    worker = SamplerWorker(SamplerSpec.of(cfg), "sampler-0", seed=3, scorer_factory=functools.partial(colocated_scorer, cfg))
    policy = make_policy(tiny_llama_vllm, seed=9)
    assert worker.set_weights(policy.adapter_state(), 5) >= 0 and worker.version == 5
    prompts = [PromptRequest(0, policy.tokenizer.encode("7 + 5 ="), 4, [1.5, 2.0]),
               PromptRequest(3, policy.tokenizer.encode("a b"), 2)]
    batch = worker.sample(SampleRequest(prompts, 1, 3, [policy.tokenizer.convert_tokens_to_ids(".")]))
    assert batch.version == 5 and len(batch.trajectories) == 8
    assert [t.source for t in batch.trajectories] == ["on_policy"] * 4 + ["tempered"] * 2 + ["on_policy"] * 2
    assert [t.record_id for t in batch.trajectories] == [0] * 6 + [3] * 2
    assert all(t.log_r is not None and len(t.log_r) == t.length + 1 for t in batch.trajectories)

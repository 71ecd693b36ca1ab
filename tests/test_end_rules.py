"""Text end rules (`actors.end_rules`): a Z may end only where its text satisfies a rule the prompt
carries (constrained generation's `constraint.end_when_satisfied`). The sampler applies it, stamps
its verdicts on the trajectory, and the learner's teacher-forced pass, the scorer and the loss read
the same verdicts."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from gfnlm.actors.end_rules import WordRule, rule_states
from gfnlm.actors.policy import Policy
from gfnlm.actors.sampler import TransformersSampler
from gfnlm.actors.trajectory import can_end_states
from gfnlm.configs import ConfigError, load_config
from gfnlm.configs.schema import LoraConfig, ModelConfig
from gfnlm.learner.cli import main
from conftest import LLAMA_TARGETS
from test_tasks import task_overrides, write_jsonl

PROMPT = "The number is "


def test_word_rule_reads_whole_words_case_and_count():
    rule = WordRule(include=("cat",), exclude=("dog",), min_words=2, max_words=4)
    assert rule.allows("A Cat sat.") and not rule.allows("Cat") and not rule.allows("A cats sat")
    assert not rule.allows("a cat and dog") and not rule.allows("a cat sat on mats")
    assert WordRule.of(rule.as_dict()) == rule and WordRule.of(None) is None
    assert rule_states(rule, [1, 2, 3], lambda ids: ["", "a", "a cat", "a cat!"][len(ids)]) == [False, False, True, True]


def test_the_sampler_ends_only_where_the_rule_allows_and_its_logprobs_are_the_learners(tiny_llama):
    """Every sample the policy ended satisfies the rule; the verdicts it stamps are the rule's on each
    prefix; its behaviour log-probs are the learner's teacher-forced ones with ⊤ taken out where the
    verdicts say no (`can_end_states`), and differ from the unmasked ones."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    policy = Policy(ModelConfig(path=tiny_llama), LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS))
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    end = [tok.convert_tokens_to_ids(c) for c in ".,;:!?0123456789"]  # ⊤ likely enough on a random model
    rule = WordRule(min_words=3)
    engine = TransformersSampler(policy.model, seed=1, pad_id=tok.pad_token_id or 0, decode=tok.decode)
    trajs = engine.generate(0, prompt, 32, 1.0, 1, 12, end, end_rule=rule.as_dict())
    ended = [t for t in trajs if t.terminated]
    assert len(ended) >= 4 and len(ended) < len(trajs), "some end, some are cut before three words"
    for t in trajs:
        assert t.end_allowed == rule_states(rule, t.tokens, tok.decode)
        if t.terminated:
            assert rule.allows(tok.decode(t.tokens)), tok.decode(t.tokens)
    plain = engine.generate(0, prompt, 32, 1.0, 1, 12, end)
    assert all(t.end_allowed is None for t in plain)
    assert any(t.terminated and not rule.allows(tok.decode(t.tokens)) for t in plain), "the rule changes something"
    with torch.no_grad():
        log_pf, log_pterm, _, _ = policy.logprobs(prompt, trajs, end, can_end=lambda t: can_end_states(
            t.length, t.tool_mask, 1, end_allowed=t.end_allowed))
        unmasked, _, _, _ = policy.logprobs(prompt, trajs, end, min_len=1)
    differs = 0
    for b, t in enumerate(trajs):
        got = torch.tensor(t.logprobs)
        assert torch.allclose(got, log_pf[b, : t.length], atol=1e-3), tok.decode(t.tokens)
        differs += int(not torch.allclose(got, unmasked[b, : t.length], atol=1e-3))
        if t.terminated:
            assert t.end_logprob <= float(log_pterm[b, t.length]) + 1e-3
    assert differs, "the rule's mask changes q where ⊤ is out"


def test_the_vllm_engine_refuses_a_text_rule_and_the_config_says_so_first(tiny_llama, tmp_path):
    from gfnlm.actors.vllm_engine import VLLMSampler

    with pytest.raises(NotImplementedError, match="sampler.engine=transformers"):
        VLLMSampler._sample(object(), [[1]], [(0, 0, 1.0, "on_policy")], 1, 4, [2], end_rules=[{"min_words": 1}])
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}", "words": "a"} for i in range(3)])
    task = ("{type: constrained, data: {train: %s}, min_len: 1, max_len: 6, "
            "constraint: {include_column: words, end_when_satisfied: true}}" % data)
    ov = task_overrides(tiny_llama, tmp_path / "run", "constrained", data, task=task)
    with pytest.raises(ConfigError, match="learner.objective.states: .*set learner.objective.states: can_end"):
        load_config("constrained.yaml", ov + ["learner.objective={type: subtb, states: every}", "reward.prefixes=every"])
    with pytest.raises(ConfigError, match="sampler.engine: vllm does not apply"):
        load_config("constrained.yaml", ov + ["learner.objective={type: subtb, states: can_end}", "sampler.engine=vllm"])
    from gfnlm.actors.engines import SamplerSpec, resolve_engine

    cfg = load_config("constrained.yaml", ov + ["learner.objective={type: subtb, states: can_end}"])
    spec = SamplerSpec.of(cfg)
    assert spec.transformers_only and resolve_engine("auto", 64, spec.transformers_only) == "transformers"


def test_a_constrained_run_with_the_rule_samples_seeds_scores_and_trains_on_it(tiny_llama, tmp_path):
    """end_when_satisfied: the task gives each prompt its rule; the rejection-sampled seeds carry
    the rule's verdicts; the learner's terms take ⊤ out exactly there, and the dead ends (cut without
    the words) end by force at the floor; a short run trains, and its evaluation adds the base model
    sampled under the same rule (sample_rule) beside plain prompting."""
    from gfnlm.learner.loop import build
    from gfnlm.learner.schedule import micro_batch, plan_request

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": f"Prompt {i}"} for i in range(5)])
    task = ("{type: constrained, data: {train: %s}, min_len: 1, max_len: 12, seed_tries: 64, end_tokens: ['.', '!'], "
            "constraint: {min_words: 2, end_when_satisfied: true}}" % data)
    ov = task_overrides(tiny_llama, tmp_path / "run", "constrained", data, task=task, **{
        "learner.objective": "{type: subtb, states: can_end}", "reward.prefixes": "can_end",
        "eval.baselines": "[sample, sample_rule]"})
    c = build(load_config("constrained.yaml", ov))
    rule = WordRule.of(c.task.end_rule(0))
    assert rule == WordRule(min_words=2)
    req, _ = plan_request(c.cfg, c.task, [0, 1], [0, 0], torch.Generator().manual_seed(0))
    assert all(p.end_rule == rule.as_dict() for p in req.prompts)
    seeds = c.task.seed_trajectories(0)
    assert seeds and all(t.end_allowed == rule_states(rule, t.tokens, c.task.tokenizer.decode) for t in seeds)
    for t in seeds:
        assert c.task.can_end(t) == [k >= 1 and ok for k, ok in enumerate(t.end_allowed)]
        assert all((r > c.task.floor) == ok for r, ok in zip(t.log_r, c.task.can_end(t))), "R where it may end, else the floor"
    # a dead end: one word, cut at max length
    dead = seeds[0].__class__(0, c.task.tokenizer.encode("abcdefghijkl", add_special_tokens=False),
                              terminated=False, end_allowed=[False] * 13)
    c.task.score([dead])
    batch = micro_batch(c.cfg, c.task, [seeds[0], dead])
    terms = c.learner.terms(batch, 1.0)
    n0 = seeds[0].length
    assert terms.can_end[0, : n0 + 1].tolist() == c.task.can_end(seeds[0])
    assert not terms.can_end[1, :12].any() and terms.can_end[1, 12] and terms.log_pterm[1, 12] == 0
    assert terms.log_r[1, 12] == c.task.floor
    # a replayed trajectory written before the rule was on has no verdicts: the learner stamps the rule's
    bare = seeds[0].__class__(0, list(seeds[0].tokens), log_r=list(seeds[0].log_r))
    c.learner.terms(micro_batch(c.cfg, c.task, [bare]), 1.0)
    assert bare.end_allowed == seeds[0].end_allowed
    # evaluation samples the trained policy under the rule: every Z it ended satisfies c
    from gfnlm.learner.loop import eval_sampler
    from gfnlm.rewards.lm_eval import _generate

    for method in ("trained", "sample_rule"):
        outs = _generate(method, c.task, c.policy, eval_sampler(c), 0, 64, c.cfg.eval)
        assert any(ended for _, ended in outs) and all(rule.allows(c.task.tokenizer.decode(z)) for z, ended in outs if ended)
    run = tmp_path / "run"
    assert main(["train", "constrained.yaml", *sum([["-o", o] for o in ov + ["learner.steps=3"]], [])]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
    methods = json.loads((run / "eval.json").read_text())["methods"]
    assert set(methods) >= {"trained", "sample", "sample_rule"}

"""Audit: the seeds decide the samples. A request's seed (`SampleRequest.seed`, which reseeds the
engine's generator) and an engine's own seed must each give the same samples when repeated and
different samples when changed; an engine, or a run, that ignored its seed would repeat itself too,
so repeating is checked together with differing.

Collisions: the tiny random models spread their next-token probability over about 100 tokens
(about -4.6 nats a token), so a batch of N samples of L tokens repeats by chance with a probability
of about exp(-4.6 N L). Each test asserts that the log-probability of a batch it drew is below
LOG_P_MAX = ln(1e-30), i.e. that "different seeds, different samples" cannot fail by a chance
collision either (the batches here sit near exp(-150) or below).
"""

import json
import math

import pytest

from gfnlm.actors.sampler import RequestServer, TransformersSampler
from gfnlm.actors.trajectory import PromptRequest, SampleRequest
from gfnlm.configs import load_config
from gfnlm.learner.loop import train

from conftest import tiny_overrides
from test_engines import PROMPT, VLLM_MISSING, engine_for, llm, make_policy, setup  # noqa: F401  (fixtures)

N, L = 16, 8  # samples per request, tokens per sample (min_len = max_len: every sample has L tokens)
LOG_P_MAX = math.log(1e-30)


def request(prompt, end, seed):
    return SampleRequest([PromptRequest(0, list(prompt), N, [])], min_len=L, max_len=L, end_ids=end, seed=seed)


def tokens(trajs):
    return [tuple(t.tokens) for t in trajs]


def log_p(trajs) -> float:
    """Log-probability of the whole batch under the sampler (its behaviour log-probs)."""
    return sum(sum(t.logprobs) + (t.end_logprob or 0.0) for t in trajs)


def check_request_seeds(make_engine, tok, prompt, end):
    """Request seeds 5 and 6 on one engine, 5 again on it, 5 on a second engine with another seed of
    its own: the request seed alone decides the samples."""
    first = RequestServer(make_engine(11), tok)
    a5 = first(request(prompt, end, 5))
    a6 = first(request(prompt, end, 6))
    a5_again = first(request(prompt, end, 5))
    b5 = RequestServer(make_engine(99), tok)(request(prompt, end, 5))
    assert all(len(t.tokens) == L for t in a5 + a6) and len(a5) == len(a6) == N
    assert log_p(a5) < LOG_P_MAX and log_p(a6) < LOG_P_MAX, (log_p(a5), log_p(a6))
    assert tokens(a5) == tokens(a5_again) == tokens(b5)
    assert tokens(a5) != tokens(a6)


def check_engine_seeds(make_engine, tok, prompt, end):
    """Requests without a seed: the engine's own seed decides its samples."""
    runs = {s: RequestServer(make_engine(s), tok)(request(prompt, end, None)) for s in (7, 8)}
    again = RequestServer(make_engine(7), tok)(request(prompt, end, None))
    assert log_p(runs[7]) < LOG_P_MAX and log_p(runs[8]) < LOG_P_MAX
    assert tokens(runs[7]) == tokens(again)
    assert tokens(runs[7]) != tokens(runs[8])


# ---------------------------------------------------------------------------------------------
# the transformers engine, on the tiny Llama


@pytest.fixture(scope="module")
def tiny_policy(tiny_llama):
    policy = make_policy(tiny_llama, seed=3)
    tok = policy.tokenizer
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    return policy, tok, prompt, [tok.convert_tokens_to_ids(".")]


def transformers_engine(policy):
    return lambda seed: TransformersSampler(policy.model, policy.device, seed=seed, pad_id=policy.tokenizer.pad_token_id)


def test_transformers_request_seed_decides_the_samples(tiny_policy):
    policy, tok, prompt, end = tiny_policy
    check_request_seeds(transformers_engine(policy), tok, prompt, end)


def test_transformers_engine_seed_decides_unseeded_requests(tiny_policy):
    policy, tok, prompt, end = tiny_policy
    check_engine_seeds(transformers_engine(policy), tok, prompt, end)


# ---------------------------------------------------------------------------------------------
# the vLLM engine, built as tests/test_engines.py builds it (its `llm` and `setup` fixtures)


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
@pytest.mark.parametrize("check", [check_request_seeds, check_engine_seeds], ids=["request_seed", "engine_seed"])
def test_vllm_seeds_decide_the_samples(check, tiny_llama_vllm, setup, request):  # noqa: F811
    """The request's seed, and for unseeded requests the engine's own, decide vLLM's samples."""
    tok, prompt, end = setup
    policy = make_policy(tiny_llama_vllm, seed=3)
    check(lambda seed: engine_for("vllm", policy, request, seed=seed), tok, prompt, end)


# ---------------------------------------------------------------------------------------------
# end to end: learner.seed decides a local run


def local_run(model, run_dir, seed: int, monkeypatch) -> tuple[list, list[float]]:
    """A 2-step local run: (every request served, as (request seed, its samples), the losses)."""
    served = []
    serve = RequestServer.__call__

    def spy(self, req):
        out = serve(self, req)
        served.append((req.seed, [(t.source, tuple(t.tokens), t.terminated) for t in out], log_p(out)))
        return out

    with monkeypatch.context() as m:
        m.setattr(RequestServer, "__call__", spy)
        cfg = load_config("random_number.yaml", tiny_overrides(model, run_dir) + [
            "learner.steps=2", f"learner.seed={seed}", "batch.samples_per_prompt=32", "run.evaluate_at_end=false"])
        train(cfg, str(run_dir))
    with open(run_dir / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 2 and len(served) == 2 and all(math.isfinite(x) for x in losses)
    return served, losses


def test_learner_seed_decides_a_local_run(tiny_llama, tmp_path, monkeypatch):
    a, loss_a = local_run(tiny_llama, tmp_path / "seed0-a", 0, monkeypatch)
    b, loss_b = local_run(tiny_llama, tmp_path / "seed0-b", 0, monkeypatch)
    c, loss_c = local_run(tiny_llama, tmp_path / "seed1", 1, monkeypatch)
    # 16 on-policy samples of up to 2 tokens in each request: its samples sit near exp(-150)
    assert all(lp < LOG_P_MAX for _, _, lp in a + c), [lp for _, _, lp in a + c]
    assert loss_a == loss_b
    assert [(s, t) for s, t, _ in a] == [(s, t) for s, t, _ in b]
    assert loss_a != loss_c
    assert [s for s, _, _ in a] != [s for s, _, _ in c]  # the request seeds come from learner.seed
    # the first step's policy is the same under both seeds (LoRA's B starts at 0): its samples differ
    # only if the request seed reaches the engine
    assert a[0][1] != c[0][1]

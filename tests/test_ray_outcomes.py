"""On Ray, the samplers serve the learner's current adapter, and the Ray driver trains on the very
batches the one-process driver does.

The silent failure of asynchronous RL systems is a rollout worker that keeps sampling from the initial
(or a zeroed) adapter while every counter looks healthy. Here the sampler actor itself is asked, after
a publish, for the log-probs of what it samples; they must be the learner's teacher-forced log-probs
under the version just published, and not those of the version before.
"""

import json
import os
import sys

import pytest
import torch
from peft import set_peft_model_state_dict

from gfnlm.actors.trajectory import PromptRequest, SampleRequest
from gfnlm.actors.vllm_engine import vllm_available
from gfnlm.actors.workers import SamplerWorker
from gfnlm.configs import load_config
from gfnlm.learner.loop import train
from gfnlm.rewards.base import eval_mode

from conftest import tiny_overrides

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StaleSampler travels to the actor by value

VLLM_MISSING = vllm_available()


def learner_logprobs(policy, prompt, trajs, end_ids, state=None):
    """Teacher-forced [(token log-probs, end log-prob)] under the learner's adapter, or under `state`."""
    current = policy.adapter_state() if state is not None else None
    try:
        if state is not None:
            set_peft_model_state_dict(policy.model, state)
        with torch.no_grad(), eval_mode(policy.model):
            log_pf, log_pterm, _, _ = policy.logprobs(prompt, trajs, end_ids)
    finally:
        if current is not None:
            set_peft_model_state_dict(policy.model, current)
    return [(log_pf[b, : t.length].tolist(), float(log_pterm[b, t.length])) for b, t in enumerate(trajs)]


def gap(trajs, expected) -> float:
    """Largest difference between the sampler's behaviour log-probs and `expected`."""
    worst = 0.0
    for t, (pf, pt) in zip(trajs, expected):
        worst = max([worst] + [abs(a - b) for a, b in zip(t.logprobs, pf)])
        if t.terminated:
            worst = max(worst, abs(t.end_logprob - pt))
    return worst


class Probe:
    """An on_step hook: after steps 2 and 4, sampler-0 samples a fixed request; its log-probs are
    compared with the learner's under the version published at that step and under the one before."""

    def __init__(self, steps=(2, 4)):
        self.steps, self.previous, self.seen = steps, None, {}

    def __call__(self, step, driver):
        c = driver.c
        if step in self.steps:
            prompt = c.task.prompt_ids(0)
            # min_len 0: no end-token masking, so the sampled log-probs are the policy's own
            req = SampleRequest([PromptRequest(0, prompt, 8)], 0, 4, c.task.end_ids, seed=1234 + step)
            batch = ray.get(driver.samplers[0].sample.remote(req), timeout=300)
            now = learner_logprobs(c.policy, prompt, batch.trajectories, c.task.end_ids)
            before = learner_logprobs(c.policy, prompt, batch.trajectories, c.task.end_ids, state=self.previous)
            self.seen[step] = {"version": batch.version, "current": gap(batch.trajectories, now),
                               "previous": gap(batch.trajectories, before),
                               "tokens": sum(t.length for t in batch.trajectories)}
        self.previous = c.policy.adapter_state()


def probe_run(model, run, worker_cls=SamplerWorker, *extra):
    cfg = load_config("random_number.yaml", tiny_overrides(model, run) + [
        "runtime.mode=ray", "learner.steps=4", "runtime.max_staleness=0", "run.evaluate_at_end=false", *extra])
    probe = Probe()
    c = train(cfg, run, on_step=probe, worker_cls=worker_cls)
    assert c.learner.step == 4
    return probe.seen


def test_ray_sampler_serves_the_published_adapter(tiny_llama, tmp_path):
    seen = probe_run(tiny_llama, str(tmp_path / "run"))
    for step, s in seen.items():
        assert s["version"] == step and s["tokens"] > 0, seen
        assert s["current"] < 1e-4, seen  # the same weights, the same arithmetic: equal to float precision
        assert s["previous"] > 1e-2, seen  # and the previous version is visibly another distribution


class StaleSampler(SamplerWorker):
    """The failure this file guards against: takes the version number, keeps its initial adapter."""

    def set_weights(self, state, version):
        self.engine.version = version
        return 0.0


def test_the_probe_catches_a_sampler_that_keeps_its_initial_adapter(tiny_llama, tmp_path):
    seen = probe_run(tiny_llama, str(tmp_path / "run"), StaleSampler)
    assert all(s["version"] == step for step, s in seen.items())  # every counter looks healthy ...
    assert all(s["current"] > 1e-2 for s in seen.values()), seen  # ... but the log-probs are not the learner's


@pytest.mark.vllm
@pytest.mark.skipif(VLLM_MISSING is not None, reason=str(VLLM_MISSING))
def test_ray_vllm_sampler_serves_the_published_adapter(tiny_llama_vllm, tmp_path):
    seen = probe_run(tiny_llama_vllm, str(tmp_path / "run"), SamplerWorker, "sampler.engine=vllm", "lora.r=8",
                     "task.max_len=3")
    for step, s in seen.items():
        assert s["version"] == step and s["tokens"] > 0, seen
        assert s["current"] < 1e-3, seen  # vLLM's kernels: the engine contract's tolerance
        assert s["previous"] > 1e-2, seen


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_ray_and_local_drivers_train_on_the_same_batches(tiny_llama, tmp_path):
    """One sampler, staleness 0, one request in flight, the same seed: both drivers plan the same
    requests (records, tempered temperatures, seeds) from the same generator, a request's seed fixes its
    samples, the replay buffer is seeded alike, and the learner runs in the driver's process either way;
    so the sampled batches, their rewards and the losses are the same. The only difference is where the
    samples are drawn (the learner's own model object, or an actor's copy with the published weights), so
    the losses agree to float32 rounding (measured: bit-identical on this machine); 1e-5 relative leaves
    room for another CPU's kernels, far below the change of one step (≥ 1e-2 here)."""
    common = ["learner.steps=5", "runtime.max_staleness=0", "samplers.in_flight=1", "samplers.num_actors=1",
              "batch.tempered=0.25", "batch.on_policy=0.25", "run.evaluate_at_end=false"]
    local, distributed = str(tmp_path / "local"), str(tmp_path / "ray")
    train(load_config("random_number.yaml", tiny_overrides(tiny_llama, local) + common + ["runtime.mode=local"]), local)
    train(load_config("random_number.yaml", tiny_overrides(tiny_llama, distributed) + common + ["runtime.mode=ray"]),
          distributed)
    a, b = metrics(local), metrics(distributed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in ("mean_log_r", "max_log_r", "valid_fraction", "trained"):
            assert ra[key] == rb[key], (key, ra, rb)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra["step"], ra["loss"], rb["loss"])
    assert len({r["loss"] for r in a}) == len(a)  # the losses move from step to step: the match means something

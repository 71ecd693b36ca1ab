"""A trained run, found and loaded for amortized inference (`gfnlm sample` and `gfnlm predict`,
gfnlm.open_run in the Python API).

`sample` draws latent Z for a prompt from the trained adapter (either engine), each with its
log q(Z | X) (the sampler's own log-probs, ⊤ included) and, when an answer is given, its
log R(Z) = log p_LM(Z Y | C X). `predict` is the posterior predictive of a task with answers:
K samples of Z, the answer each derives, and the vote distribution over answers. Both load the
run's own saved config (config.yaml) and its latest checkpoint's adapter, or the adapter folder
given.
"""

from __future__ import annotations

import os
import sys

from gfnlm.configs import load_config


def locate(path: str, need_run: bool = True) -> tuple[str | None, str]:
    """(run folder holding config.yaml, adapter folder) of a run folder or an adapter folder in one.
    A run's adapter is its newest intact checkpoint's. With need_run=False an adapter outside any
    run gives (None, adapter)."""
    from .checkpoints import intact_checkpoint

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run or adapter folder")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        run = path
        while run != os.path.dirname(run) and not os.path.isfile(os.path.join(run, "config.yaml")):
            run = os.path.dirname(run)
        if not os.path.isfile(os.path.join(run, "config.yaml")):
            if not need_run:
                return None, path
            raise FileNotFoundError(f"{path}: an adapter outside any run folder (no config.yaml above it)")
        return run, path
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise FileNotFoundError(f"{path}: not a run folder (no config.yaml) nor an adapter folder (no adapter_config.json)")
    ckpt = intact_checkpoint(path, log=lambda m: print(m, file=sys.stderr))
    if ckpt is None:
        raise FileNotFoundError(f"{path}: the run has no checkpoint yet (it stopped before run.checkpoint_every steps)")
    return path, os.path.join(ckpt, "adapter")


def load_run(path: str, engine: str | None = None, overrides: list[str] = ()):
    """(config, policy with the adapter, task with its reward, sampler) of a trained run."""
    from gfnlm.actors.engines import SamplerSpec, context_length, make_sampler
    from gfnlm.actors.policy import Policy
    from gfnlm.rewards import make_task
    from gfnlm.rewards.scorer import attach_scorer

    from .em import load_m_adapter
    from .loop import setup_torch
    from .checkpoints import load_adapter_weights

    run, adapter = locate(path)
    # the checkpoint's adapter replaces the one training started from, which need not exist any more
    ov = ["runtime.mode=local", "lora.init=null", *([f"sampler.engine={engine}"] if engine else []), *overrides]
    cfg = load_config(os.path.join(run, "config.yaml"), ov)
    setup_torch(cfg)
    policy = Policy(cfg.model, cfg.lora)
    load_adapter_weights(policy, adapter)
    task = make_task(cfg, policy.tokenizer)
    attach_scorer(task, cfg, policy.model, policy.device)
    load_m_adapter(policy, adapter, cfg.lora, task)  # the M-step's adapter, part of the reward, where there is one
    sampler = make_sampler(SamplerSpec.of(cfg), policy.tokenizer, seed=cfg.learner.seed, policy=policy,
                           max_model_len=context_length(cfg, task.max_prompt_len(), task.max_len))
    if getattr(sampler, "model", None) is not policy.model:
        sampler.load_weights(policy.adapter_state(), 1)
    return cfg, policy, task, sampler

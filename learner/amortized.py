"""Amortized inference for users: `gfnlm sample` and `gfnlm predict` on a trained run.

`sample` draws latent Z for a prompt from the trained adapter (either engine), each with its
log q(Z | X) (the sampler's own log-probs, ⊤ included) and, when an answer is given, its
log R(Z) = log p_LM(Z Y | C X). `predict` is the posterior predictive of a task with answers:
K samples of Z, the answer each derives, and the vote distribution over answers. Both load the
run's own saved config (config.yaml) and its latest checkpoint's adapter, or the adapter folder
given.
"""

from __future__ import annotations

import json
import os
import sys

from configs import ConfigError, load_config


def locate(path: str, need_run: bool = True) -> tuple[str | None, str]:
    """(run folder holding config.yaml, adapter folder) of a run folder or an adapter folder in one.
    A run's adapter is its newest intact checkpoint's. With need_run=False an adapter outside any
    run gives (None, adapter)."""
    from .trainer import intact_checkpoint

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
    from actors.engines import context_length, make_sampler
    from actors.policy import Policy
    from rewards import make_task
    from rewards.scorer import attach_scorer

    from .em import load_m_adapter
    from .loop import setup_torch
    from .trainer import load_adapter_weights

    run, adapter = locate(path)
    ov = ["runtime.mode=local", *([f"sampler.engine={engine}"] if engine else []), *overrides]
    cfg = load_config(os.path.join(run, "config.yaml"), ov)
    setup_torch(cfg)
    policy = Policy(cfg.model, cfg.lora)
    load_adapter_weights(policy, adapter)
    task = make_task(cfg, policy.tokenizer)
    attach_scorer(task, cfg, policy.model, policy.device)
    load_m_adapter(policy, adapter, cfg.lora, task)  # the M-step's adapter, part of the reward, where there is one
    sampler = make_sampler(cfg, policy.tokenizer, seed=cfg.learner.seed, policy=policy,
                           max_model_len=context_length(cfg, task.max_prompt_len(), task.max_len))
    if getattr(sampler, "model", None) is not policy.model:
        sampler.load_weights(policy.adapter_state(), 1)
    return cfg, policy, task, sampler


def draw(task, sampler, record_id: int, n: int, temperature: float):
    return task.sample_records(sampler, [record_id], n, temperature)[record_id]


def cmd_sample(args) -> int:
    cfg, policy, task, sampler = load_run(args.run, args.engine, args.override)
    rid = adhoc(task, args.prompt, args.answer)
    sampler.tools = getattr(task, "tools", None) or getattr(sampler, "tools", None)
    trajs = draw(task, sampler, rid, args.n, 1.0 if args.temperature is None else args.temperature)
    if args.answer is not None or not hasattr(task, "answers"):  # a task without answers scores Z as it is
        task.score(trajs)
    answers = task.answers(trajs) if hasattr(task, "answers") else [None] * len(trajs)
    for t, a in zip(trajs, answers):
        line = {"z": policy.tokenizer.decode(t.tokens), "tokens": t.length, "terminated": t.terminated,
                "log_q": sum(t.logprobs) + (t.end_logprob or 0.0),
                "log_r": t.final_log_r if t.log_r is not None else None}
        if a is not None or hasattr(task, "answers"):
            line["answer"] = a
        print(json.dumps(line))
    return 0


def cmd_predict(args) -> int:
    from rewards.arithmetic import vote

    cfg, policy, task, sampler = load_run(args.run, args.engine, args.override)
    if not hasattr(task, "answers"):
        raise ConfigError(f"gfnlm predict: task {task.name} has no answers to vote on (arithmetic and subjectivity do)")
    rid = adhoc(task, args.question, None)
    sampler.tools = getattr(task, "tools", None) or getattr(sampler, "tools", None)
    temperature = args.temperature if args.temperature is not None else cfg.eval.vote_temperature
    trajs = draw(task, sampler, rid, args.k, temperature)
    answers = task.answers(trajs)
    winner, counts = vote(answers)
    total = sum(counts.values())
    out = {"question": task.prompt_text(rid), "k": args.k, "temperature": temperature, "prediction": winner,
           "distribution": {str(a): c / total for a, c in sorted(counts.items(), key=lambda x: -x[1])},
           "no_answer": len(answers) - total,
           "samples": [policy.tokenizer.decode(t.tokens) for t in trajs]}
    print(json.dumps(out))
    return 0


def adhoc(task, prompt: str, answer: str | None) -> int:
    """A record made from the command line's prompt (and answer); its id."""
    make = getattr(task, "adhoc_record", None)
    if make is None:
        raise ConfigError(f"task {task.name}: building a record from --prompt is not supported")
    return make(prompt, answer)


def add_parsers(sub) -> None:
    def common(sp):
        sp.add_argument("run", metavar="RUN_OR_ADAPTER", help="a run folder (its latest checkpoint) or an adapter folder in one")
        sp.add_argument("--engine", choices=["transformers", "vllm"], help="sampler engine (default: the run's)")
        sp.add_argument("--temperature", type=float, help="sampling temperature")
        sp.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the run's config")

    s = sub.add_parser("sample", help="draw latent Z from a trained adapter, with log q and log R, as JSON lines")
    common(s)
    s.add_argument("--prompt", required=True, help="X: the text of the prompt's one column (a question, a sentence, a "
                   "review), or a JSON object of the record's fields when the task uses several (infilling: "
                   "beginning, ending)")
    s.add_argument("--answer", help="the answer Y; with it each line carries log R(Z)")
    s.add_argument("-n", type=int, default=8, help="samples")
    s.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="posterior predictive: sample Z, derive answers, vote")
    common(p)
    p.add_argument("--question", required=True, help="the question X")
    p.add_argument("-k", type=int, default=10, help="samples of Z voted on")
    p.set_defaults(func=cmd_predict)


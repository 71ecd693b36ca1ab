"""The `gfnlm` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gfnlm.configs import ConfigError, load_config

from .runner import TrainingStopped, train_and_evaluate, written  # noqa: F401 (re-exported)


def _config(args) -> "Config":  # noqa: F821
    if not args.config and getattr(args, "func", None) is cmd_train:
        raise ConfigError("train: give CONFIG, a preset name such as random_number or a YAML file (gfnlm presets "
                          "lists them), or --resume RUN")
    return load_config(args.config, args.override)


def _check_resume(args) -> None:
    """The command line's refusals of --resume, in its own words, before the run is read."""
    if args.config:
        raise ConfigError(f"train: give CONFIG or --resume RUN, not both; a resumed run keeps {args.resume}/config.yaml "
                          f"(change one of its values with -o KEY=VALUE)")
    if not os.path.isdir(args.resume):
        raise ConfigError(f"--resume: {args.resume} is not a folder; expected the folder of an earlier run")
    if not os.path.isfile(os.path.join(args.resume, "config.yaml")):
        raise ConfigError(f"--resume: {os.path.join(args.resume, 'config.yaml')} not found; expected the folder of an "
                          f"earlier run")


def cmd_train(args) -> int:
    from . import api

    if args.address:
        args.override = [*args.override, "runtime.mode=ray", f"runtime.address={args.address}"]
    if getattr(args, "resume", None):
        _check_resume(args)
        api.resume(args.resume, args.override)
    else:
        api.train(_config(args))
    return 0  # a stopped run has written its checkpoint and the line saying how to resume: a clean exit


def cmd_check(args) -> int:
    import time

    import yaml

    t0 = time.perf_counter()
    from .api import check

    cfg = load_config(args.config, args.override)
    data = check(cfg)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    for warning in task_warnings(cfg):
        print(f"gfnlm check: warning: {warning}", file=sys.stderr)
    print(f"gfnlm check: {args.config or 'defaults'} is valid; task {cfg.task.type}: {data} "
          f"({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def task_warnings(cfg) -> list[str]:
    """What the task says when it is built with the model's tokenizer (e.g. a reward floor that
    leaves invalid text most of the reward's mass); none before the embedded model is converted."""
    import warnings

    from gfnlm.actors.models import EMBEDDED_MODEL, embedded_model_dir
    from gfnlm.rewards import make_task

    folder = embedded_model_dir() if cfg.model.path == EMBEDDED_MODEL else cfg.model.path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_task(cfg, tokenizer)
    return [str(w.message) for w in caught if w.filename.startswith(os.path.dirname(os.path.dirname(__file__)))
            or "task." in str(w.message)]


def cmd_presets(args) -> int:
    """The shipped configs (for train / check / submit) and experiments, one line each."""
    from gfnlm.configs.load import PRESET_DIR, preset_names

    def first_line(path: str, key: str | None = None) -> str:
        import yaml

        with open(path) as f:
            text = f.read()
        if key:
            return " ".join(str((yaml.safe_load(text) or {}).get(key, "")).split())[:100]
        line = next((ln for ln in text.splitlines() if ln.startswith("#")), "# ")
        return line.lstrip("# ").strip()

    print(f"configs ({PRESET_DIR}): gfnlm train|check NAME")
    for name in preset_names():
        print(f"  {name:<16} {first_line(os.path.join(PRESET_DIR, name + '.yaml'))}")
    folder = os.path.join(PRESET_DIR, "experiments")
    print(f"experiments ({folder}): gfnlm experiment NAME")
    for name in sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".yaml")):
        print(f"  {name:<16} {first_line(os.path.join(folder, name + '.yaml'), 'description')}")
    return 0


def cmd_experiment(args) -> int:
    from gfnlm.learner import experiment

    return experiment.main(args)


def cmd_eval(args) -> int:
    """Evaluate a run's checkpoint with the run's own config.yaml (-o adjusts it), or a stand-alone
    adapter folder with CONFIG."""
    from .amortized import locate
    from .api import evaluate_located

    if not args.adapter and not args.run:
        raise ConfigError("eval: name the trained run with --run RUN_DIR (or an adapter folder with --adapter DIR)")
    run, adapter = locate(args.run or args.adapter, need_run=False)
    out_dir = args.out or os.path.dirname(os.path.abspath(adapter))
    evaluate_located(run, adapter, args.override, out_dir, args.config)
    print(f"gfnlm: evaluation in {written(out_dir)}", file=sys.stderr)
    return 0


def cmd_target(args) -> int:
    """The target's mean length and log R under self-normalised importance sampling, per record."""
    from .api import target

    result = target(args.config, args.override, args.draws, args.temperature, args.proposal, args.split, args.records,
                    log=lambda m: print(m, file=sys.stderr))
    print(f"gfnlm target: {result['records']} {args.split} records, {args.draws} draws each from the "
          f"{result['proposal']} proposal; weighted to R^(1/T)")
    for T, est in result["temperatures"].items():
        m = est["mean"]
        print(f"T = {T}")
        for rid, f in est["per_record"].items():
            print(f"  record {rid:>5}: target length {f['target_length']:5.1f}  log R {f['target_log_r']:8.2f}  (proposal "
                  f"{f['proposal_length']:5.1f}, {f['proposal_log_r']:8.2f})  ESS {f['ess']:5.1f} of {f['draws']}")
        if m:
            print(f"  mean over records: target length {m['target_length']:.2f}, log R {m['target_log_r']:.2f}; proposal "
                  f"length {m['proposal_length']:.2f}, log R {m['proposal_log_r']:.2f}; ESS mean {m['ess']:.1f}, "
                  f"median {m['ess_median']:.1f}")
    if result["records_without_an_ended_draw"]:
        print(f"records with no draw that ended (left out): {result['records_without_an_ended_draw']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"gfnlm: estimate in {args.out}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from gfnlm.learner.curves import cmd_plot as plot

    return plot(args)


def cmd_models(args) -> int:
    from gfnlm.actors.models import main_prepare

    return main_prepare(force=args.force)


def cmd_bench(args) -> int:
    from gfnlm.learner import bench

    if args.bench_command == "scoring":
        from gfnlm.learner import bench_scoring

        return bench_scoring.main(args)
    if args.bench_command == "engines":
        from gfnlm.learner import bench_engines

        return bench_engines.main(args)
    if args.bench_command == "training":
        return bench.stages(args)
    return bench.orchestration(args) if args.bench_command == "orchestration" else bench.main(args)


def cmd_submit(args) -> int:
    from gfnlm.cluster.submit import SubmitError, submit, wait

    from .api import check

    check(args.config, args.override)  # the data too, before anything is uploaded
    try:
        job_id = submit(args.config, args.address, args.override, args.working_dir, not args.no_resource_check,
                        args.submission_id, log=print)
    except SubmitError as e:
        print(f"gfnlm: error: {e}", file=sys.stderr)
        return 2
    if args.wait:
        status = wait(args.address, job_id)
        print(f"gfnlm: {job_id} {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_sample(args) -> int:
    from .api import sample

    for line in sample(args.run, args.prompt, args.n, args.answer, args.temperature, args.engine, args.override):
        print(json.dumps(line))
    return 0


def cmd_predict(args) -> int:
    from .api import predict

    print(json.dumps(predict(args.run, args.question, args.k, args.temperature, args.engine, args.override)))
    return 0


def add_amortized_parsers(sub) -> None:
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gfnlm")
    except PackageNotFoundError:
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfnlm", description="GFlowNet fine-tuning of language models.",
                                epilog="examples: gfnlm presets; gfnlm check continuation; gfnlm train random_number "
                                       "-o learner.steps=20; gfnlm sample runs/RUN --prompt '...' -n 8")
    p.add_argument("--version", action="version", version=f"gfnlm {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config(sp, required=False):
        sp.add_argument("config", nargs=None if required else "?", help="YAML preset (see configs/)")
        sp.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. -o learner.lr=1e-4 (repeatable)")

    t = sub.add_parser("train", help="train a policy")
    add_config(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    t.add_argument("--address", help="Ray cluster to run on (sets runtime.mode=ray and runtime.address)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's adapter (--run), or an adapter folder with CONFIG, with the "
                                    "task's own figures and baselines")
    add_config(e)
    e.add_argument("--adapter", help="peft adapter folder (inside a run: evaluated with the run's config)")
    e.add_argument("--run", help="run folder: its latest intact checkpoint, with the run's own config.yaml")
    e.add_argument("--out", help="where the evaluation files go (default: beside the adapter)")
    e.set_defaults(func=cmd_eval)

    ck = sub.add_parser("check", help="validate a config and its data files, print the resolved tree (no model, no Ray)")
    add_config(ck, required=True)
    ck.set_defaults(func=cmd_check)

    ex = sub.add_parser("experiment", help="train and evaluate the runs of an experiment preset, write its table")
    ex.add_argument("name", help="a preset in configs/experiments/ (e.g. continuation) or a YAML file")
    ex.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override applied to every run, e.g. -o learner.steps=20")
    ex.add_argument("--out", help="folder of the experiment (default: runs/experiments/NAME-TIME); runs that "
                    "finished there with the same config are reused")
    ex.add_argument("--seeds", help="comma-separated seeds in place of the preset's, e.g. 0,1,2")
    ex.add_argument("--runs", help="train only these runs (RUN, or RUN/CANDIDATE for one selection candidate), e.g. "
                    "gflownet,sft: several processes can share one --out, each training its part; the others' "
                    "finished runs join the table")
    ex.set_defaults(func=cmd_experiment)

    sb = sub.add_parser("submit", help="validate a config, then submit it as a job to a Ray cluster")
    add_config(sb, required=True)
    sb.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    sb.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: here); holds CONFIG")
    sb.add_argument("--no-resource-check", action="store_true", help="submit even if the cluster is short now (autoscaling)")
    sb.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    sb.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    sb.set_defaults(func=cmd_submit)


    add_amortized_parsers(sub)

    tg = sub.add_parser("target", help="what R(Z)^(1/T) looks like before training: its mean length and log R per "
                                       "record, by importance sampling")
    add_config(tg, required=True)
    tg.add_argument("--draws", type=int, default=64, help="proposal draws per record")
    tg.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                    help="the reward temperature T of the target (several: each from the same draws)")
    tg.add_argument("--proposal", choices=["auto", "prompt", "context"], default="auto",
                    help="draws from the starting policy given its prompt, or the reward LM given the context alone "
                         "(auto: context where the task has one)")
    tg.add_argument("--split", choices=["validation", "train", "test"], default="validation", help="records estimated on")
    tg.add_argument("--records", type=int, help="at most this many records (a seeded choice)")
    tg.add_argument("--out", help="write the per-record estimate as JSON here")
    tg.set_defaults(func=cmd_target)
    ps = sub.add_parser("presets", help="list the shipped configs and experiments, each with its first comment line")
    ps.set_defaults(func=cmd_presets)

    pl = sub.add_parser("plot", help="draw a run's curves.png from its metrics.jsonl (also while it trains)")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--out", help="image to write (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into $GFNLM_HOME once")
    prep.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    prep.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bl = bsub.add_parser("learner", help="learner throughput (forward + backward) against the machine's matmul FLOP/s")
    add_config(bl)
    bl.add_argument("--steps", type=int, default=5, help="timed updates")
    bl.set_defaults(func=cmd_bench)
    bt = bsub.add_parser("training", help="one local training step per stage: sampling (with tools), scoring, replay, update")
    add_config(bt)
    bt.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    bt.add_argument("--threads", type=int, default=1, help="torch threads")
    bt.set_defaults(func=cmd_bench)
    bo = bsub.add_parser("orchestration", help="Ray driver throughput with simulated samplers (no model)")
    bo.add_argument("--samplers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="sampler counts to try")
    bo.add_argument("--latency", type=float, default=0.5, help="seconds per simulated batch")
    bo.add_argument("--batch", type=int, default=16, help="trajectories per simulated batch")
    bo.add_argument("--steps", type=int, default=40, help="timed learner steps per sampler count (at least 4 × samplers)")
    bo.add_argument("--pipeline-actors", type=int, default=4, help="samplers and scorers of the scorer-pool comparison")
    bo.set_defaults(func=cmd_bench)
    bs = bsub.add_parser("scoring", help="prefix rewards with a suffix: shared KV cache against one pass per prefix")
    add_config(bs)
    bs.add_argument("--trajectories", type=int, default=16, help="trajectories in the batch")
    bs.add_argument("--length", type=int, default=20, help="tokens of each Z")
    bs.add_argument("--threads", type=int, default=1, help="torch threads")
    bs.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    bs.add_argument("--naive-fraction", type=int, default=4, help="time the naive way on 1/N of the batch, then scale")
    bs.add_argument("--bf16", action="store_true", help="also time bfloat16 weights and compare their rewards with "
                    "float32 on the training references")
    bs.add_argument("--records", type=int, default=32, help="training references --bf16 compares on")
    bs.set_defaults(func=cmd_bench)
    be = bsub.add_parser("engines", help="sampling tokens/s of hf generate, the transformers engine and vLLM, with LoRA")
    add_config(be)
    be.add_argument("--engines", nargs="+", default=["hf-generate", "transformers", "vllm"],
                    choices=["hf-generate", "transformers", "vllm"], help="engines to measure")
    be.add_argument("--tokens", type=int, default=5, help="new tokens per sample")
    be.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the transformers engines")
    be.add_argument("--repeats", type=int, default=3, help="timed repeats per workload (best is kept)")
    be.add_argument("--base-too", action="store_true", help="also time vLLM without a LoRA adapter")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    # vLLM logs to stdout by default; `gfnlm sample` and `predict` print JSON there
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = parser().parse_args(argv)
    from gfnlm.configs import UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"gfnlm: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # a path the user named (an output folder, a data file): its name and what is wrong with it
        print(f"gfnlm: {_os_error(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "ActorFailed":  # a Ray actor raised: its name and error, no Ray trace
            raise
        print(f"gfnlm: {e}", file=sys.stderr)
        return 1


def _os_error(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    what = {PermissionError: "permission denied", IsADirectoryError: "is a directory; expected a file",
            NotADirectoryError: "a part of the path is a file, not a folder"}.get(type(e), e.strerror or str(e))
    return f"{e.filename}: {what}"

if __name__ == "__main__":
    sys.exit(main())

"""The one evaluation runner: methods x records -> the task's figures -> eval.json, eval.md, eval.png.

A task says what its evaluation is (`Task.evaluation` returns an `Evaluation`: the methods, how one
method's figures are computed, how they read in the log, in a table and in a plot); `run_evaluation`
runs the methods in order, times each one, logs a line per method and writes the files. Every task
evaluates through it, so eval.json has one shape: the evaluation's header (task, split, records ...),
`methods` (name -> figures) and `examples` (name -> a few samples to read).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Evaluation:
    """A task's evaluation, declared: what `run_evaluation` runs and writes."""

    methods: list[str]
    """The methods to run, in order, checked before the first one starts."""
    figures: Callable[[str], tuple[dict, list]]
    """One method -> (its figures, a few examples to read)."""
    line: Callable[[str, dict], str]
    """One method's log line(s) from its figures (which hold `seconds`); each line is logged apart."""
    table: Callable[[dict], str]
    """eval.md, a Markdown table, from every method's figures."""
    header: dict = field(default_factory=dict)
    """eval.json's other keys: the task, the split, the records, samples per record ..."""
    plot: Callable[[dict, str], None] | None = None
    """Draws eval.png from every method's figures (path given); None: no plot."""
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Entered around all the methods (eval mode, evaluation lengths, the task's tools)."""
    flat: bool = False
    """eval.json holds the methods at its top level and nothing else: the random-number task's layout
    since its first version, kept so that scripts reading eval.json["trained"] go on working."""


def method_seed(seed: int, method: str) -> int:
    """The seed a method's evaluation starts from: `eval.seed` mixed with the method's name (stable
    across processes, unlike hash())."""
    return (seed * 1_000_003 + zlib.crc32(method.encode())) % 2**31


def reseeder(sampler, seed: int) -> Callable[[str], None]:
    """Before each method: torch's global generator and the sampler's own from `method_seed`."""
    import torch

    def reseed(method: str) -> None:
        s = method_seed(seed, method)
        torch.manual_seed(s)
        generator = getattr(sampler, "generator", None)
        if generator is not None:
            generator.manual_seed(s)

    return reseed


def run_evaluation(ev: Evaluation, out_dir: str, log=print, reseed: Callable[[str], None] | None = None) -> dict:
    """Run every method of `ev` (each after `reseed(method)`), log a line each, write eval.json,
    eval.md (and eval.png); the figures."""
    results, examples = {}, {}
    with ev.context():
        for method in ev.methods:
            if reseed is not None:
                reseed(method)
            t0 = time.perf_counter()
            figures, shown = ev.figures(method)
            figures["seconds"] = time.perf_counter() - t0
            results[method] = figures
            if shown:
                examples[method] = shown
            for text in ev.line(method, figures).splitlines():
                log(text)
    payload = results if ev.flat else {**ev.header, "methods": results, "examples": examples}
    save_evaluation(out_dir, payload, ev.table(results))
    if ev.plot is not None:
        ev.plot(results, os.path.join(out_dir, "eval.png"))
    return results


def save_evaluation(out_dir: str, payload: dict, table: str | None = None) -> None:
    """The one place an evaluation is written: eval.json (the payload) and eval.md (the table, a
    Markdown text), each written beside and renamed, so a reader never sees half a file."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("eval.json", json.dumps(payload, indent=2)), ("eval.md", table)):
        if text is None:
            continue
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text if text.endswith("\n") or name == "eval.json" else text + "\n")
        os.replace(path + ".tmp", path)


def methods_of(evaluated) -> dict | None:
    """name -> figures of an eval.json's content: its `methods`, or the whole of it in the flat
    layout the random-number task writes (`Evaluation.flat`); None for anything else."""
    if not isinstance(evaluated, dict):
        return None
    inner = evaluated.get("methods")
    return inner if isinstance(inner, dict) else evaluated

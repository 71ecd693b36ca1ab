"""Evaluation of tasks whose reward is a language model: the trained policy against decoding
baselines on the base model, per test record, as JSON, a Markdown table and a PNG.

Methods. `trained` is the policy (adapter on) sampled at T = 1. The baselines run on the base
model (adapter off) from the task's baseline prompt (continuation: X itself; infilling: the same
"Beginning/Ending/Middle" prompt, i.e. prompting; constrained: an instruction naming the words):
sample (T = 1), tempered, nucleus (p = 0.95), greedy, beam / beam5 (n / 5n beams, best n kept),
diverse_beam / diverse_beam5 (n / 5n beams in n groups), sample5 (5n samples: 5× the compute), and
for constrained generation rejection5 (up to 5 samples of p_LM(Z | C) per output, the first that
satisfies c; 5× the compute) and, where the task has a text end rule
(`constraint.end_when_satisfied`), sample_rule (sample with the trained policy's rule: ⊤ only where
Z's text satisfies c, what the rule alone does for the base model).

Figures, averaged over records: valid (the task's own definition), log-likelihood under the reward
LM (log p(Z ⊤ | C), or log p(Z Y | C) with a suffix) as the mean and the max over a record's
samples, diversity = 1 − mean pairwise cosine similarity of sentence embeddings (mean-pooled last
hidden states of the base LM, or `eval.embedding_model`), distinct-1/2 (unique word n-grams over
all n-grams of a record's samples); infilling adds BLEU-4 (nltk, smoothing method 1) and GLEU-4
against the reference middle, and BERTScore F1 when `eval.bertscore_model` names a model folder;
constrained generation adds the satisfaction rate of c.
"""

from __future__ import annotations

import contextlib
import math
import random

import torch

from gfnlm.actors.decoding import group_beam_search, hf_generate
from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs import ConfigError

from .base import eval_mode
from .evaluation import Evaluation

BASELINES = ("sample", "tempered", "nucleus", "greedy", "beam", "beam5", "diverse_beam", "diverse_beam5", "sample5",
             "rejection5", "sample_rule")


def eval_records(task, eval_cfg, seed: int = 0, ids: list[int] | None = None) -> list[int]:
    """The records evaluated: `ids`, else the split `eval.split` names (an empty one is an error),
    at most eval.max_records of them (a seeded choice)."""
    if ids is None:
        ids = task.split_ids(eval_cfg.split)
        if not ids:
            raise ConfigError(empty_split(task.name, eval_cfg.split))
    ids = list(ids)
    if eval_cfg.max_records and eval_cfg.max_records < len(ids):
        ids = sorted(random.Random(seed).sample(ids, eval_cfg.max_records))
    return ids


def empty_split(task_name: str, split: str) -> str:
    """The one-line error for an evaluation split without records."""
    how = {"test": "set task.data.test (a file) or task.data.test_fraction",
           "validation": "set task.data.validation_fraction",
           "train": "give task.data.train records"}[split]
    return (f"eval.split: task {task_name} has no {split} records to evaluate on; {how}, or eval.split=train to "
            f"evaluate on the training records (labelled so)")


def split_label(split: str) -> str:
    """How a table names the records it was measured on."""
    return {"test": "test", "validation": "validation", "train": "TRAINING (not held out)"}[split]


def _generate(method: str, task, policy, sampler, rid: int, n: int, eval_cfg) -> list[tuple[list[int], bool]]:
    """(Z tokens, ended by ⊤) of one method on one record."""
    model, tok = policy.model, policy.tokenizer
    lo, hi, end = task.min_len, task.max_len, task.end_ids
    banned = sorted(task.banned_ids)  # the baselines get the policy's token masks too
    first = sorted(task.first_banned_ids)  # (out of Z's first token alone)
    hf = {"suppress_tokens": banned} if banned else {}
    if first:
        hf["begin_suppress_tokens"] = first
    if method == "trained":  # the policy as trained: with the task's text end rule, where it has one
        trajs = sampler.generate(rid, task.prompt_ids(rid), n, 1.0, lo, hi, end, source="eval", banned_ids=banned,
                                 end_rule=task.end_rule(rid), first_banned_ids=first)
        return [(t.tokens, t.terminated) for t in trajs]
    prompt = task.baseline_prompt_ids(rid)
    pad = tok.pad_token_id
    with model.disable_adapter():
        if method in ("sample", "tempered", "sample5", "sample_rule"):
            k = 5 * n if method == "sample5" else n
            temp = eval_cfg.tempered_temperature if method == "tempered" else 1.0
            rule = task.end_rule(rid) if method == "sample_rule" else None
            trajs = sampler.generate(rid, prompt, k, temp, lo, hi, end, source="eval", banned_ids=banned, end_rule=rule,
                                     first_banned_ids=first)
            return [(t.tokens, t.terminated) for t in trajs]
        if method == "rejection5":
            # proposals from the reward's own prior p_LM(Z | C): accepted ones are posterior samples
            trajs = sampler.generate(rid, task.context_ids(rid), 5 * n, 1.0, lo, hi, end, source="eval", banned_ids=banned,
                                     first_banned_ids=first)
            out = []
            for i in range(n):
                tries = trajs[5 * i: 5 * i + 5]
                ok = [t for t in tries if task.is_valid(t)]
                best = ok[0] if ok else tries[-1]
                out.append((best.tokens, best.terminated))
            return out
        if method == "nucleus":
            return hf_generate(model, prompt, n, hi, lo, end, pad, do_sample=True, top_p=0.95, top_k=0, **hf)
        if method == "greedy":
            return hf_generate(model, prompt, 1, hi, lo, end, pad, do_sample=False, **hf)
        if method in ("beam", "beam5"):
            beams = n * (5 if method == "beam5" else 1)
            return hf_generate(model, prompt, beams, hi, lo, end, pad, do_sample=False, num_beams=beams, **hf)[:n]
        if method in ("diverse_beam", "diverse_beam5"):
            beams = n * (5 if method == "diverse_beam5" else 1)
            return group_beam_search(model, prompt, beams, n, hi, lo, end, diversity_penalty=1.0,
                                     banned_ids=banned, first_banned_ids=first)[:: beams // n][:n]
    raise ConfigError(f"eval.baselines: unknown method {method!r}; expected one of {', '.join(BASELINES)}")


# -- figures ------------------------------------------------------------------------------------


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(ws[i: i + n]) for ws in (t.lower().split() for t in texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pairwise_diversity(embeddings: torch.Tensor) -> float | None:
    """1 − mean pairwise cosine similarity (None with fewer than two)."""
    if embeddings.shape[0] < 2:
        return None
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    k = e.shape[0]
    return float(1.0 - (sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))


class Embedder:
    """Sentence embeddings: mean-pooled last hidden states of a model (adapter off)."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        out = []
        with ctx:
            for text in texts:
                ids = self.tokenizer(text or " ", add_special_tokens=False).input_ids or [self.tokenizer.eos_token_id]
                h = self.model(input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True).hidden_states[-1]
                out.append(h[0].mean(0).float().cpu())
        return torch.stack(out)


def bleu_gleu(hypothesis: str, reference: str) -> tuple[float, float]:
    """Sentence BLEU-4 (nltk, smoothing method 1) and GLEU-4 of a hypothesis against one reference,
    as the authors' eval_infill.py calls them: whitespace tokens, case kept (not lowercased)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu

    h, r = hypothesis.split(), reference.split()
    if not h:
        return 0.0, 0.0
    return (sentence_bleu([r], h, smoothing_function=SmoothingFunction().method1),
            sentence_gleu([r], h, min_len=1, max_len=4))


class BertScore:
    """BERTScore F1 (greedy cosine matching of contextual token embeddings, no idf weighting)
    with a local model folder."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device = device

    @torch.no_grad()
    def _emb(self, text: str) -> torch.Tensor:
        ids = self.tok(text, return_tensors="pt", truncation=True).to(self.device)
        return torch.nn.functional.normalize(self.model(**ids).last_hidden_state[0].float(), dim=-1)

    def f1(self, hypothesis: str, reference: str) -> float:
        if not hypothesis.strip():
            return 0.0
        h, r = self._emb(hypothesis), self._emb(reference)
        sim = h @ r.T
        p, rc = sim.max(1).values.mean(), sim.max(0).values.mean()
        return float(2 * p * rc / (p + rc))


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def record_figures(task, rid: int, outputs: list[tuple[list[int], bool]], embed, bertscore=None) -> dict:
    trajs = [Trajectory(rid, list(z), terminated=ended) for z, ended in outputs]
    texts = [task.tokenizer.decode(t.tokens) for t in trajs]
    ll = task.log_likelihood(rid, trajs)
    fig = {
        "samples": len(trajs),
        "valid": _mean([float(task.is_valid(t)) for t in trajs]),
        "loglik_mean": _mean(ll),
        "loglik_max": max(ll) if ll else float("nan"),
        "diversity": pairwise_diversity(embed(texts)) if len(texts) > 1 else None,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length": _mean([float(t.length) for t in trajs]),
    }
    ref = task.reference_text(rid) if hasattr(task, "reference_text") else None
    if ref is not None:
        scores = [bleu_gleu(x, ref) for x in texts]
        fig["bleu4"] = 100 * _mean([s[0] for s in scores])
        fig["gleu4"] = 100 * _mean([s[1] for s in scores])
        if bertscore is not None:
            fig["bertscore_f1"] = 100 * _mean([bertscore.f1(x, ref) for x in texts])
    if hasattr(task, "constraint_ok"):
        fig["satisfied"] = _mean([float(task.constraint_ok(rid, x)) for x in texts])
    if hasattr(task, "final_log_r"):  # a user's reward: its log R of each whole Z
        log_r = task.final_log_r(rid, trajs)
        fig["log_r_mean"], fig["log_r_max"] = _mean(log_r), max(log_r) if log_r else float("nan")
    return fig


def lm_evaluation(task, policy, sampler, eval_cfg, methods=None, seed: int = 0) -> Evaluation:
    """Every method on the evaluation records, `samples_per_record` Z each: the LM tasks' evaluation."""
    rids = eval_records(task, eval_cfg, seed)
    n = eval_cfg.samples_per_record
    if methods is None:
        methods = ["trained"] + (list(eval_cfg.baselines) if eval_cfg.include_base else [])
    if task.name != "constrained":
        methods = [m for m in methods if m != "rejection5"]
    if task.end_rule(rids[0]) is None:  # no text end rule: sample_rule would be sample again
        methods = [m for m in methods if m != "sample_rule"]
    unknown = [m for m in methods if m != "trained" and m not in BASELINES]
    if unknown:
        raise ConfigError(f"eval.baselines: unknown method {unknown[0]!r}; expected one of {', '.join(BASELINES)}")
    if eval_cfg.embedding_model:
        from gfnlm.actors.models import load_model

        emb_model, emb_tok = load_model(eval_cfg.embedding_model, policy.device)
        embed = Embedder(emb_model, emb_tok, policy.device)
    else:
        embed = Embedder(policy.model, policy.tokenizer, policy.device)
    bertscore = BertScore(eval_cfg.bertscore_model, policy.device) if eval_cfg.bertscore_model and hasattr(task, "reference_text") else None

    def figures(m: str) -> tuple[dict, list]:
        per_record, shown = [], []
        for rid in rids:
            outputs = _generate(m, task, policy, sampler, rid, n, eval_cfg)
            per_record.append(record_figures(task, rid, outputs, embed, bertscore))
            if len(shown) < 3:
                shown.append({"record": rid, "prompt": task.prompt_text(rid),
                              "samples": [task.tokenizer.decode(z) for z, _ in outputs[:3]]})
        keys = sorted({k for f in per_record for k in f})
        return {**{k: _mean([f.get(k) for f in per_record]) for k in keys}, "records": len(rids)}, shown

    def line(m: str, fig: dict) -> str:
        return (f"gfnlm eval {m:>14}: " + "  ".join(f"{k} {fig[k]:.3f}" for k in TABLE_KEYS if k in fig)
                + f"  ({len(rids)} records, {fig['seconds']:.0f} s)")

    title = f"{task.name}: {len(rids)} {split_label(eval_cfg.split)} records, {n} samples per record and method"
    return Evaluation(methods, figures, line, lambda results: markdown_table(results, title),
                      header={"task": task.name, "split": eval_cfg.split, "records": rids, "samples_per_record": n},
                      plot=lambda results, path: plot_methods(results, path, task.name),
                      context=lambda: eval_mode(policy.model))


TABLE_KEYS = ("valid", "log_r_mean", "log_r_max", "loglik_mean", "loglik_max", "diversity", "distinct_1", "distinct_2",
              "bleu4", "gleu4", "bertscore_f1", "satisfied", "length")


def markdown_table(results: dict, title: str) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r for r in results.values())]
    lines = [f"**{title}**", "", "| method | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for m, r in results.items():
        lines.append(f"| {m} | " + " | ".join("" if r.get(k) is None or math.isnan(r.get(k, float('nan'))) else f"{r[k]:.3f}"
                                            for k in keys) + " |")
    return "\n".join(lines)


# A task's own trade-off, drawn as a first panel against mean log-likelihood where its figure is
# there: (figure, its name in the title, y label, y limits; None for the top fits the points). No
# task has two of them (the first present would be drawn).
TASK_PANELS = (("satisfied", "satisfaction", "share of samples that satisfy the constraint", (-0.05, 1.05)),
               ("bleu4", "BLEU-4", "BLEU-4 against the reference (nltk, 0-100)", (0.0, None)))


def plot_methods(results: dict, path: str, title: str) -> list[tuple[str, int]]:
    """Diversity against max log-likelihood, one point per method (the paper's trade-off plot), on
    a 0-1 axis so that small differences are not blown up; a task with its own figure (constrained
    generation's `satisfied`, infilling's `bleu4`) gets a first panel of that figure against mean
    log-likelihood. Returns (y figure, methods drawn) per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []

    def points(ax, xkeys: tuple[str, ...], ykey: str) -> None:
        drawn.append((ykey, 0))
        for m, r in results.items():
            x, y = next((r[k] for k in xkeys if k in r), None), r.get(ykey)
            if x is None or y is None or math.isnan(x) or math.isnan(y):
                continue
            ax.scatter([x], [y], s=60, marker="*" if m == "trained" else "o")
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 5))
            drawn[-1] = (ykey, drawn[-1][1] + 1)

    panel = next((p for p in TASK_PANELS if any(p[0] in r for r in results.values())), None)
    fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(13 if panel else 7, 5), squeeze=False)
    if panel:
        key, name, label, (low, high) = panel
        ax = axes[0][0]
        points(ax, ("loglik_mean",), key)
        ax.set_xlabel("mean log-likelihood of a sample (reward LM)")
        ax.set_ylabel(label)
        top = ax.get_ylim()[1] * 1.1 if high is None else high  # room for the labels
        ax.set_ylim(low, top if top > low else low + 1)
        ax.set_title(f"{title}: {name} against likelihood")
    ax = axes[0][-1]
    scored = any("log_r_max" in r for r in results.values())
    points(ax, ("log_r_max", "loglik_max"), "diversity")
    ax.set_ylim(-0.02, max(1.02, ax.get_ylim()[1]))
    ax.set_xlabel("max log R per record (your reward)" if scored else "max log-likelihood per record (reward LM)")
    ax.set_ylabel("diversity (1 − mean pairwise cosine similarity)")
    ax.set_title(f"{title}: diversity against likelihood" if panel else title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


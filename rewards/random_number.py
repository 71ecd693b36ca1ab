"""Random numbers from any target distribution over integers (Hu et al. 2024, section 4.1).

Z is the text of a number after the prompt, ended by ⊤ (one of the configured end tokens).
log R(Z ⊤) = log target(v) when Z is the canonical decimal form of an integer v of the support
("7", never "07" or " 7"), and a configured floor for anything else. Every prefix of a trajectory
is scored: the prefix "2" of "25" is itself the number 2.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

from gfnlm.actors.trajectory import Trajectory
from gfnlm.configs.tasks import (
    BinomialTarget,
    GeometricTarget,
    PoissonTarget,
    RandomNumberTask as RandomNumberConfig,
    TableTarget,
    UniformTarget,
)

from .base import Task, eval_mode
from .evaluation import Evaluation
from .records import inline_records

_CANONICAL = re.compile(r"0|[1-9][0-9]*")


def log_target(target) -> dict[int, float]:
    """Normalised log-probabilities of the target over its (finite) support."""
    if isinstance(target, UniformTarget):
        weights = {v: 0.0 for v in range(target.low, target.high + 1)}
    elif isinstance(target, PoissonTarget):
        weights = {v: v * math.log(target.rate) - math.lgamma(v + 1) for v in range(target.max_value + 1)}
    elif isinstance(target, BinomialTarget):
        n, p = target.n, target.p
        weights = {
            v: math.lgamma(n + 1) - math.lgamma(v + 1) - math.lgamma(n - v + 1) + v * math.log(p) + (n - v) * math.log1p(-p)
            for v in range(n + 1)
        }
    elif isinstance(target, GeometricTarget):
        q = 1.0 - target.p
        weights = {v: (v * math.log(q) if q > 0 else (0.0 if v == 0 else -math.inf)) for v in range(target.max_value + 1)}
        weights = {v: w for v, w in weights.items() if w > -math.inf}
    elif isinstance(target, TableTarget):
        weights = {v: math.log(w) for v, w in target.weights.items()}
    else:  # pragma: no cover - the config union lists every type
        raise TypeError(f"unknown target {target!r}")
    log_norm = math.log(sum(math.exp(w) for w in weights.values()))
    return {v: w - log_norm for v, w in sorted(weights.items())}


def parse_number(text: str) -> int | None:
    """The integer a string denotes in canonical decimal form, else None."""
    return int(text) if _CANONICAL.fullmatch(text) else None


class RandomNumberTask(Task):
    """Prompts, per-prefix rewards, seeds for the replay, and evaluation of sampled numbers."""

    name = "random_number"

    def __init__(self, cfg: RandomNumberConfig, tokenizer):
        super().__init__(cfg, tokenizer, inline_records(cfg.prompts))
        self.log_p = log_target(cfg.target)
        self.warn_if_the_floor_dominates(len(tokenizer), valid_log_mass=0.0)
        self.spellings = support_spellings(self)
        """Every token sequence the reward takes for a support member: (value, tokens)."""
        self._flows: dict[float, dict[tuple[int, ...], float]] = {}

    def prompt_text(self, record_id: int) -> str:
        return self.records[record_id].fields["text"]

    def adhoc_record(self, prompt: str, answer: str | None) -> int:
        """A prompt typed on the command line (the target stays the config's)."""
        from .records import Record

        rid = len(self.records)
        self.records.records.append(Record(rid, {"text": prompt}, "adhoc", "command line"))
        return rid

    # -- reward ------------------------------------------------------------------------------

    def value(self, tokens: list[int]) -> int | None:
        """The support member a token sequence spells, or None."""
        v = parse_number(self.tokenizer.decode(tokens))
        return v if v in self.log_p else None

    def log_reward(self, tokens: list[int]) -> float:
        if len(tokens) < self.min_len:
            return self.floor
        v = self.value(tokens)
        return self.log_p[v] if v is not None else self.floor

    def score(self, trajectories: list[Trajectory]) -> None:
        """Fill each trajectory's untempered log R for every prefix, in place."""
        for t in trajectories:
            t.log_r = [self.log_reward(t.tokens[:k]) for k in range(len(t.tokens) + 1)]

    # -- state flows ---------------------------------------------------------------------------

    def prefix_log_flows(self, temperature: float = 1.0) -> dict[tuple[int, ...], float]:
        """log F(s) = log Σ R(x)^(1/T) over the spellings x that extend the token prefix s (s
        itself included), for every prefix of a spelling. Invalid strings' floor rewards are left
        out: by the floor's rule (warn_if_the_floor_dominates) their share is negligible."""
        if temperature not in self._flows:
            terms: dict[tuple[int, ...], list[float]] = {}
            for v, tokens in self.spellings:
                for k in range(len(tokens) + 1):
                    terms.setdefault(tuple(tokens[:k]), []).append(self.log_p[v] / temperature)
            self._flows = {temperature: {s: _logsumexp(ts) for s, ts in terms.items()}}  # one temperature kept
        return self._flows[temperature]

    def state_log_flows(self, t: Trajectory, temperature: float) -> list[float] | None:
        """log F(s_k) − log F(s_0) of each prefix s_k ≠ s_0 of t whose own termination holds under
        FLOW_SHARE of its flow (NaN elsewhere: the objective derives log R(s⊤) − log q(⊤|s) there);
        None with task.state_flow = 'reward'. Tempered like the reward (R^(1/T)).

        Relative to the empty prefix: the objective adds the root's own derived flow, so the
        known flows fix the ratios F(s)/F(s_0) and leave the scale to the policy, as modified SubTB
        does (anchored absolutely, the ~e^floor flows of invalid text give residuals of tens of
        nats from the first step, and the run learned valid numbers 4× later; docs/results.md, levers)."""
        if self.cfg.state_flow != "exact":
            return None
        flows = self.prefix_log_flows(temperature)
        root = flows[()]
        out = [math.nan]
        for k in range(1, len(t.tokens) + 1):
            f = flows.get(tuple(t.tokens[:k]))
            own = t.log_r[k] / temperature if t.log_r is not None else self.log_reward(t.tokens[:k]) / temperature
            out.append(f - root if f is not None and own - f < math.log(FLOW_SHARE) else math.nan)
        return out

    # -- known-good trajectories ---------------------------------------------------------------

    def seed_trajectories(self, record_id: int) -> list[Trajectory]:
        """One trajectory per member of the support (that fits in max_len tokens)."""
        out = []
        for v in self.log_p:
            tokens = list(self.tokenizer(str(v), add_special_tokens=False).input_ids)
            if self.min_len <= len(tokens) <= self.max_len and self.value(tokens) == v:
                out.append(Trajectory(record_id, tokens, terminated=True, temperature=float("nan"), version=-1, source="seed"))
        self.score(out)
        return out

    # -- evaluation ----------------------------------------------------------------------------

    def sample_value(self, t: Trajectory) -> int | None:
        """The number a sample spells; valid only if the policy itself ended it with ⊤ after at
        least min_len tokens."""
        return self.value(t.tokens) if t.terminated and len(t.tokens) >= self.min_len else None

    def is_valid(self, t: Trajectory) -> bool:
        return self.sample_value(t) is not None

    def evaluation(self, policy, sampler, eval_cfg, methods=None) -> Evaluation:
        """The base model and the trained policy against the target (`methods` does not apply:
        this task has no decoding baselines)."""
        return number_evaluation(policy, self, sampler, eval_cfg)

    def track(self, policy) -> dict:
        """Cheap exact figures for metrics.jsonl while training (one teacher-forced pass)."""
        ex = exact_figures(policy, self)
        return {"exact_kl": ex["kl"], "exact_tv": ex["tv"], "invalid_mass": ex["invalid_mass"]}


FLOW_SHARE = 1e-3
"""state_flow 'exact': a prefix whose own termination holds less than this share of its flow takes
the known flow (its reward says nothing usable about F(s) through q(⊤|s))."""


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def support_spellings(task) -> list[tuple[int, list[int]]]:
    """Every token sequence of min_len..max_len tokens that the reward takes for a member of the
    support: the member's decimal text cut into pieces that are single tokens (a digit-per-token
    tokenizer has one spelling per member; one with multi-digit tokens has several)."""
    tok = task.tokenizer
    pieces: dict[str, int] = {}
    for i in range(len(tok)):
        text = tok.decode([i])
        if text and text.isascii() and text.isdigit() and tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(i)) == i:
            pieces.setdefault(text, i)

    def splits(text: str) -> list[list[int]]:
        if not text:
            return [[]]
        return [[pieces[text[:n]]] + rest for n in range(1, len(text) + 1) if text[:n] in pieces
                for rest in splits(text[n:])]

    out = []
    for v in task.log_p:
        for tokens in splits(str(v)):
            if task.min_len <= len(tokens) <= task.max_len and task.value(tokens) == v:
                out.append((v, tokens))
    return out


@torch.no_grad()
def exact_distribution(policy, task, record_id: int) -> dict:
    """The policy's exact terminal distribution for one prompt, as evaluation samples it
    (temperature 1, ⊤ masked before min_len, a value valid only when the policy ends it): one
    teacher-forced pass over every spelling of the support.

    Returns {"p": {value: probability}, "valid_mass", "early_mass" (⊤ chosen at a prefix of a
    spelling that is no member), "invalid_mass" = 1 − valid_mass (early, off the support's
    prefixes, or past max_len)}."""
    spellings = task.spellings
    if not spellings:
        return {"p": {}, "valid_mass": 0.0, "early_mass": 0.0, "invalid_mass": 1.0}
    trajs = [Trajectory(record_id, tokens) for _, tokens in spellings]
    with eval_mode(policy.model):
        log_pf, log_pterm, _, _ = policy.logprobs(task.prompt_ids(record_id), trajs, task.end_ids,
                                                  task.banned_ids, task.ban_penalty, task.min_len)
    log_pf, log_pterm = log_pf.double().cpu(), log_pterm.double().cpu()
    p: dict[int, float] = {}
    reach: dict[tuple[int, ...], float] = {}
    members = {tuple(tokens) for _, tokens in spellings}
    for b, (v, tokens) in enumerate(spellings):
        logp = 0.0
        for k in range(len(tokens) + 1):
            reach.setdefault(tuple(tokens[:k]), (logp, float(log_pterm[b, k])))
            if k < len(tokens):
                logp += float(log_pf[b, k])  # before min_len: q with ⊤ taken out, as the sampler draws
        p[v] = p.get(v, 0.0) + math.exp(logp + float(log_pterm[b, len(tokens)]))
    early = sum(math.exp(lr + lt) for s, (lr, lt) in reach.items() if s not in members and len(s) >= task.min_len)
    valid = sum(p.values())
    return {"p": p, "valid_mass": valid, "early_mass": early, "invalid_mass": max(0.0, 1.0 - valid)}


def exact_figures(policy, task, record_ids=None) -> dict:
    """Exact KL(target ‖ policy | valid), TV and invalid mass, the prompts' distributions averaged
    (evaluation draws the same number of samples per prompt)."""
    ids = list(task.test_ids if record_ids is None else record_ids)
    dists = [exact_distribution(policy, task, r) for r in ids]
    p = {v: sum(d["p"].get(v, 0.0) for d in dists) / len(ids) for v in task.log_p}
    valid = sum(p.values())
    figures = {"valid_mass": valid, "invalid_mass": max(0.0, 1.0 - valid),
               "early_mass": sum(d["early_mass"] for d in dists) / len(ids)}
    if valid <= 0:
        return {**figures, "kl": math.inf, "tv": 1.0}
    kl = sum(math.exp(lp) * (lp - math.log(p[v] / valid)) if p[v] > 0 else math.inf for v, lp in task.log_p.items())
    tv = 0.5 * sum(abs(math.exp(lp) - p[v] / valid) for v, lp in task.log_p.items())
    return {**figures, "kl": kl, "tv": tv}


def number_metrics(values: list[int | None], log_p: dict[int, float], smoothing: float = 0.5) -> dict:
    """Figures of a list of sampled values (None = invalid) against the target.

    KL(target ‖ empirical) is over the support, on the valid samples, with add-`smoothing`
    counts so that a value never drawn does not make it infinite; `kl_unsmoothed` is the plain
    estimate (inf when a support value was never drawn). TV is 0.5 Σ |target − empirical|.
    """
    n = len(values)
    valid = [v for v in values if v is not None]
    counts: dict[int, int] = {}
    for v in valid:
        counts[v] = counts.get(v, 0) + 1
    k = len(log_p)
    figures = {
        "samples": n,
        "valid": len(valid),
        "valid_fraction": len(valid) / n if n else 0.0,
        "distinct": len(counts),
        "support_size": k,
        "never_drawn": sum(1 for v in log_p if v not in counts),
        "smoothing": smoothing,
    }
    if not valid:
        figures.update(kl=math.inf, kl_unsmoothed=math.inf, tv=1.0)
        return figures
    m = len(valid)
    kl = kl_raw = tv = 0.0
    for v, lp in log_p.items():
        p = math.exp(lp)
        c = counts.get(v, 0)
        q = (c + smoothing) / (m + smoothing * k)
        kl += p * (lp - math.log(q))
        kl_raw = kl_raw + (p * (lp - math.log(c / m)) if c else math.inf)
        tv += abs(p - c / m)
    figures.update(kl=kl, kl_unsmoothed=kl_raw, tv=0.5 * tv)
    return figures


# -- evaluation -------------------------------------------------------------------------------


def sample_values(sampler, task, n: int, batch_size: int) -> list[int | None]:
    """n samples per prompt at temperature 1; a sample is valid only if the policy ended it."""
    values: list[int | None] = []
    for pid in task.test_ids:
        prompt = task.prompt_ids(pid)
        left = n
        while left > 0:
            k = min(batch_size, left)
            # one token past max_len: a number must be ended by ⊤ chosen by the policy itself
            trajs = sampler.generate(pid, prompt, k, 1.0, task.min_len, task.max_len + 1, task.end_ids, source="eval")
            values += [task.sample_value(t) for t in trajs]
            left -= k
    return values


def number_evaluation(policy, task, sampler, eval_cfg) -> Evaluation:
    """Samples of the base model and the trained policy against the target, and each one's exact
    terminal distribution: figures, eval.json (its methods at the top level), eval.md, eval.png."""
    variants = {"trained": contextlib.nullcontext}
    if eval_cfg.include_base:
        variants = {"base": policy.model.disable_adapter, **variants}
    histograms = {}

    def figures(name: str) -> tuple[dict, list]:
        with variants[name]():
            values = sample_values(sampler, task, eval_cfg.num_samples, eval_cfg.batch_size)
            exact = exact_figures(policy, task)
        histograms[name] = values
        return {**number_metrics(values, task.log_p), "exact": exact}, []

    def line(name: str, fig: dict) -> str:
        exact = fig["exact"]
        return (f"gfnlm eval {name:>7}: valid {100 * fig['valid_fraction']:.1f}%  KL(target‖empirical) {fig['kl']:.4f}  "
                f"TV {fig['tv']:.3f}  distinct {fig['distinct']}/{fig['support_size']}  "
                f"({fig['samples']} samples, {fig['seconds']:.0f} s)\n"
                f"gfnlm eval {name:>7}: exact: valid {100 * exact['valid_mass']:.2f}%  KL(target‖policy) {exact['kl']:.4f}  "
                f"TV {exact['tv']:.3f}  invalid mass {exact['invalid_mass']:.4f} (⊤ early {exact['early_mass']:.4f})")

    def table(results: dict) -> str:
        n = eval_cfg.num_samples
        rows = "".join(f"| {m} | {100 * r['valid_fraction']:.1f} | {r['kl']:.4f} | {r['tv']:.3f} | "
                       f"{r['exact']['kl']:.4f} | {r['exact']['tv']:.3f} | {r['exact']['invalid_mass']:.4f} |\n"
                       for m, r in results.items())
        return (f"**{task.name}: {n} samples per method, and the exact distribution**\n\n"
                "| method | valid % | KL (sampled) | TV | exact KL | exact TV | exact invalid mass |\n"
                "| --- | --- | --- | --- | --- | --- | --- |\n" + rows)

    return Evaluation(list(variants), figures, line, table,
                      plot=lambda results, path: plot_histogram(histograms, task.log_p, path), flat=True)


def plot_histogram(samples: dict[str, list], log_p: dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = sorted(log_p)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(samples), 1)
    for i, (name, values) in enumerate(samples.items()):
        n = len(values)
        counts = {v: 0 for v in support}
        for v in values:
            if v is not None:
                counts[v] += 1
        invalid = sum(v is None for v in values)
        xs = [x + (i - (len(samples) - 1) / 2) * width for x in support]
        ax.bar(xs, [counts[v] / n for v in support], width=width, alpha=0.7,
               label=f"{name} (invalid {100 * invalid / n:.1f}% of {n})")
    ax.step(support, [math.exp(log_p[v]) for v in support], where="mid", color="black", label="target")
    ax.set_xlabel("value")
    ax.set_ylabel("fraction of all samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

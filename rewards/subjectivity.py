"""Classification with a latent rationale (paper §4.4): SUBJ with E- and M-steps.

X is a review inside an instruction ('Classify this movie review as objective or subjective:
"<text>" This review is'), Z 1–5 tokens, Y ", so it is objective." or ", so it is subjective.".
E-step: q(Z | X) ∝ p(Z Y | X) for the record's true Y, every prefix scored with the suffix
(`actors.scoring`), plus `wrong_label_penalty` on prefixes after which the reward LM prefers the
other label. M-step (`learner/em.py`): a second adapter "m" learns p(Y | X Z) on sampled Z (a
two-way cross-entropy over the label words), once after the E-steps (the authors') or alternating
with them. The E-step's reward is the frozen base model (the authors'), or the base with the M
adapter (`em.e_reward: m`: every M phase then bumps `reward_version`, and replayed trajectories
scored by an older one are scored again). The replay starts from the base model's own continuations.

Prediction: Z from q (greedy, or several sampled and voted), then the label whose Y the classifier
(base + M) finds likelier after X Z.
"""

from __future__ import annotations

from gfnlm.configs import ConfigError
import contextlib

import torch

from gfnlm.actors.decoding import hf_generate
from gfnlm.actors.scoring import PrefixScorer
from gfnlm.actors.trajectory import Trajectory, by_record

from .base import columns_of, eval_mode, vote
from .evaluation import Evaluation
from .infilling import InfillingTask
from .records import Record, RecordError, load_records, one_of


def z_spread(texts: list[str]) -> dict:
    """How varied the sampled Z are, over every review's samples: z_distinct (distinct strings),
    z_top_share (the share of the most frequent one) and z_top (that string). Rationales vary with
    the review; a collapsed E-step writes one phrase for all of them."""
    import collections

    if not texts:
        return {}
    top, count = collections.Counter(texts).most_common(1)[0]
    return {"z_distinct": len(set(texts)), "z_top_share": count / len(texts), "z_top": top}


class SubjectivityTask(InfillingTask):
    name = "subjectivity"

    def __init__(self, cfg, tokenizer, prefixes: str = "every"):
        super().__init__(cfg, tokenizer, prefixes)
        self.reward_version = 0
        self.classifier_adapter: str | None = None
        """The adapter that predicts Y from X Z (the M-step's), once there is one; None: the base LM."""
        self._prefers_true: dict[tuple, bool] = {}
        """(record, tokens, reward version) -> whether the reward LM preferred the true label after
        that Z when it was scored (what `is_valid` reads instead of classifying again). Keyed by
        content: Python reuses the id() of a collected trajectory for a new one."""

    @staticmethod
    def columns(cfg) -> list[str]:
        cols = columns_of(cfg.prompt_template, cfg.context_template)
        return [c for c in cols if c != "label_word"] + [cfg.label_column]

    def load_records(self, cfg):
        records = load_records(cfg.data, self.columns(cfg), {cfg.label_column: one_of("0", "1")})
        for r in records.records:
            r.fields["label_word"] = cfg.label_words[int(r.fields[cfg.label_column])]
        return records

    def label(self, record_id: int) -> int:
        return int(self.records[record_id].fields[self.cfg.label_column])

    def adhoc_record(self, prompt: str, answer: str | None) -> int:
        """A record for a review typed by a user (its label, when given, picks Y)."""
        if answer is not None and answer.strip() not in ("0", "1", *self.cfg.label_words):
            raise RecordError(f"--answer: expected 0, 1 or one of {', '.join(self.cfg.label_words)}, got {answer!r}")
        label = 0 if answer is None else (self.cfg.label_words.index(answer.strip()) if answer.strip() in
                                          self.cfg.label_words else int(answer))
        rid = len(self.records)
        fields = {"text": prompt.strip(), self.cfg.label_column: str(label), "label_word": self.cfg.label_words[label]}
        self.records.records.append(Record(rid, fields, "adhoc", "command line"))
        return rid

    # -- reward --------------------------------------------------------------------------------

    def label_suffix(self, record_id: int, label: int) -> list[int]:
        fields = {**self.records[record_id].fields, "label_word": self.cfg.label_words[label]}
        return list(self.tokenizer(self.cfg.suffix_template.format(**fields), add_special_tokens=False).input_ids)

    def score(self, trajectories: list[Trajectory]) -> None:
        """log p(z_1:i Y | X) for the true Y, plus the penalty where the other Y is likelier."""
        if self.lm is None:
            raise RuntimeError("task subjectivity: its reward is a language model, but no scorer is attached")
        groups = by_record(trajectories)
        for rid, ts in groups.items():
            y = self.label(rid)
            kw = dict(prefixes=self.prefixes, first=self.min_len, terminable_only=True, can_end=self.scored_states())
            right = self.lm.score(self.context_ids(rid), ts, suffix_ids=self.label_suffix(rid, y), **kw)
            wrong = self.lm.score(self.context_ids(rid), ts, suffix_ids=self.label_suffix(rid, 1 - y), **kw)
            for t, r, w in zip(ts, right, wrong):
                first = t.length if self.prefixes == "final" else 0
                out = []
                for i in range(t.length + 1):
                    if i < first:
                        out.append(r[i])
                    elif not self.prefix_ok(rid, t, i) or r[i] != r[i]:
                        out.append(self.floor)
                    else:
                        out.append(r[i] + (self.cfg.wrong_label_penalty if w[i] > r[i] else 0.0))
                t.log_r = out
                t.reward_version = self.reward_version
                if len(self._prefers_true) > 100_000:
                    self._prefers_true.clear()
                self._prefers_true[self._verdict_key(t)] = not w[t.length] > r[t.length]

    def _verdict_key(self, t: Trajectory) -> tuple:
        return t.record_id, tuple(t.tokens), self.reward_version

    def seed_trajectories(self, record_id: int) -> list[Trajectory]:
        """Rationales by the base model (adapter off): after X + `seed_prompt` for the record's label
        (cut before the first token that is not a word or a number), or plain continuations of X."""
        n = self.cfg.seed_samples
        if n == 0 or self.lm is None:
            return []
        model, prompt = self.lm.model, self.prompt_ids(record_id)
        wish = self.cfg.seed_prompt
        if wish is not None:
            fields = self.records[record_id].fields
            prompt = prompt + list(self.tokenizer(wish.format(**fields), add_special_tokens=False).input_ids)
        with torch.random.fork_rng():
            torch.manual_seed(record_id)
            with model.disable_adapter():
                outs = hf_generate(model, prompt, n, self.max_len, 0 if wish is not None else self.min_len,
                                   self.end_ids, self.tokenizer.pad_token_id, do_sample=True, top_k=0,
                                   suppress_tokens=sorted(self.banned_ids) or None)
        if wish is not None:
            outs = [self.cut_at_symbol(z) for z, _ in outs]
        seeds = [Trajectory(record_id, list(z), terminated=done, temperature=float("nan"), version=-1, source="seed")
                 for z, done in outs if len(z) >= self.min_len]
        self.score(seeds)
        return seeds

    def cut_at_symbol(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The tokens before the first one that is not a word or a number (then Z ends there)."""
        for i, tok in enumerate(tokens):
            if not self.tokenizer.decode([tok]).strip().isalnum():
                return tokens[:i], True
        return tokens, False

    # -- prediction ----------------------------------------------------------------------------

    def classify(self, trajectories: list[Trajectory], by_reward: bool = False) -> list[int]:
        """The label whose Y the classifier (base + M, or the base LM before any M-step) finds likelier
        after X Z, per trajectory; `by_reward`: the E-step's reward LM instead."""
        out = {}
        groups = by_record(trajectories)
        reward_adapter = self.lm.adapter
        self.lm.adapter = reward_adapter if by_reward else self.classifier_adapter
        try:
            for rid, ts in groups.items():
                scores = [self.lm.score(self.context_ids(rid), ts, suffix_ids=self.label_suffix(rid, y), prefixes="final")
                          for y in (0, 1)]
                for t, s0, s1 in zip(ts, *scores):
                    out[id(t)] = int(s1[-1] > s0[-1])
        finally:
            self.lm.adapter = reward_adapter
        return [out[id(t)] for t in trajectories]

    def answers(self, trajectories: list[Trajectory]) -> list[int]:
        return self.classify(trajectories)

    def is_valid(self, t: Trajectory) -> bool:
        """Ended by the policy, allowed tokens, and the reward LM then prefers the true label."""
        if not super().is_valid(t):
            return False
        known = self._prefers_true.get(self._verdict_key(t))
        return known if known is not None else self.classify([t], by_reward=True)[0] == self.label(t.record_id)

    def few_shot_prompt(self, record_id: int, k: int) -> list[int]:
        """k labelled training examples ("<X> <label word>.") and then X."""
        shots = [self.prompt_text(r) + " " + self.records[r].fields["label_word"] + ".\n" for r in self.train_ids[:k]]
        return list(self.tokenizer("".join(shots) + self.prompt_text(record_id)).input_ids)

    def evaluation(self, policy, sampler, eval_cfg, methods=None) -> Evaluation:
        """Test accuracy: the policy's greedy Z and a vote over sampled Z, each classified by the
        reward LM (base + M); 'prompting': few-shot prompting of the base model (no Z);
        'classifier': the policy's own label word after X (the SFT baseline)."""
        if methods is None:
            methods = ["trained"] + (["prompting"] if eval_cfg.include_base and "prompting" in eval_cfg.baselines else [])
        for m in methods:
            if m not in ("trained", "classifier", "prompting"):
                raise ConfigError(f"eval.baselines: {m!r} is not a method of the subjectivity task; "
                                  "use prompting or classifier")
        from .lm_eval import eval_records, split_label

        ids = eval_records(self, eval_cfg)
        k, temp = eval_cfg.samples_per_record, eval_cfg.vote_temperature

        def figures(m: str) -> tuple[dict, list]:
            shown = []
            if m == "trained":
                with z_policy(policy.model, self.cfg.em):
                    greedy = self.sample_records(sampler, ids, 1, 1e-4)
                    sampled = self.sample_records(sampler, ids, k, temp)
                g = self.classify([greedy[r][0] for r in ids])
                correct_g = sum(int(p == self.label(r)) for p, r in zip(g, ids))
                correct_v = 0
                for r in ids:
                    winner, _ = vote(self.classify(sampled[r]))
                    correct_v += int(winner == self.label(r))
                fig = {"acc_greedy": correct_g / len(ids), "acc_vote": correct_v / len(ids),
                       **z_spread([self.tokenizer.decode(t.tokens) for r in ids for t in sampled[r]])}
                shown = [{"text": self.records[r].fields["text"][:120], "label": self.label(r),
                          "z": [self.tokenizer.decode(t.tokens) for t in sampled[r][:4]]} for r in ids[:3]]
            elif m == "classifier":  # X -> Y: the policy's own label word, no Z (the SFT baseline)
                correct = 0
                scorer = PrefixScorer(policy.model, self.tokenizer.pad_token_id, policy.device)
                scorer.adapter = "default"  # the policy's adapter
                for r in ids:
                    empty = Trajectory(r, [], terminated=True)
                    s = [scorer.score(self.prompt_ids(r), [empty], suffix_ids=self._written_label(r, y),
                                      prefixes="final")[0][-1] for y in (0, 1)]
                    correct += int(int(s[1] > s[0]) == self.label(r))
                fig = {"acc_greedy": correct / len(ids), "acc_vote": correct / len(ids)}
            else:  # prompting
                correct = 0
                adapter, self.lm.adapter = self.lm.adapter, None  # the base model alone
                try:
                    for r in ids:
                        prompt = self.few_shot_prompt(r, self.cfg.prompting_shots)
                        empty = Trajectory(r, [], terminated=True)
                        s = [self.lm.score(prompt, [empty], suffix_ids=self._word(y), prefixes="final")[0][-1]
                             for y in (0, 1)]
                        correct += int(int(s[1] > s[0]) == self.label(r))
                finally:
                    self.lm.adapter = adapter
                fig = {"acc_greedy": correct / len(ids), "acc_vote": correct / len(ids)}
            return {**fig, "records": len(ids), "votes": k}, shown

        def line(m: str, fig: dict) -> str:
            spread = (f"; {fig['z_distinct']} distinct Z of {len(ids) * k}, the commonest {fig['z_top']!r} "
                      f"{100 * fig['z_top_share']:.0f} %" if "z_distinct" in fig else "")
            return (f"gfnlm eval {m:>10}: accuracy greedy {fig['acc_greedy']:.3f}  vote {fig['acc_vote']:.3f}  "
                    f"({len(ids)} test reviews, vote of {k} at T={temp:g}, {fig['seconds']:.0f} s{spread})")

        def table(results: dict) -> str:
            return (f"**{self.name}: {len(ids)} {split_label(eval_cfg.split)} reviews**\n\n"
                    f"| method | accuracy, greedy Z | accuracy, vote of {k} | distinct Z of {len(ids) * k} (the commonest) |\n"
                    "| --- | --- | --- | --- |\n"
                    + "".join(f"| {m} | {100 * fig['acc_greedy']:.1f} | {100 * fig['acc_vote']:.1f} | "
                              + (f"{fig['z_distinct']} ({fig['z_top']!r} {100 * fig['z_top_share']:.0f} %)"
                                 if "z_distinct" in fig else "") + " |\n"
                              for m, fig in results.items()))

        return Evaluation(methods, figures, line, table, header={"task": self.name, "split": eval_cfg.split, "records": ids},
                          context=lambda: eval_mode(policy.model))

    def _written_label(self, record_id: int, label: int) -> list[int]:
        """The policy's written label (`reference_template`, what SFT teaches) for label `label`."""
        fields = {**self.records[record_id].fields, "label_word": self.cfg.label_words[label]}
        return list(self.tokenizer(self.cfg.reference_template.format(**fields), add_special_tokens=False).input_ids)

    def _word(self, label: int) -> list[int]:
        return list(self.tokenizer(" " + self.cfg.label_words[label] + ".", add_special_tokens=False).input_ids)


def z_policy(model, em_cfg):
    """The context in which Z is sampled: q as it is, or the base model with every adapter off
    (`em.z_from: base`, the M-only ablation)."""
    return model.disable_adapter() if em_cfg.z_from == "base" else contextlib.nullcontext()

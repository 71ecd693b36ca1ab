"""Arithmetic with a latent chain of thought and a calculator (paper §4.5).

X is a question ("Question: 9 + 4 - 8 = ? Answer:"), Z a rationale (" 9 + 4 = 13, 13 - 8 = 5") in
which the model writes only the expressions and the calculator (`sampler.tools`) inserts every
result, Y the answer (". The answer is 5."). The reward is the frozen LM's likelihood of Z and Y
after `shots` worked examples and X: R(Z) = p_LM(Z Y | shots X), every prefix scored
(`actors.scoring`); the shots' KV cache is computed once. Tokens made of other characters than
`allowed_chars` get a penalty in the policy (taken out by default) and the floor in the reward.

Records: the worked examples file gives `labelled` training questions whose rationales (the
calculator filling in results, as in sampling) seed the replay and are what SFT trains on, and
`shots` others for the reward's context; `generate` adds seeded unlabelled questions. The test
sets are named (3, 4, 5 operands) and evaluated separately: the answer of a sample is the last
result its rationale derives, and a question's prediction is the majority vote over
`eval.samples_per_record` samples at `eval.vote_temperature`.
"""

from __future__ import annotations

from gfnlm.configs import ConfigError
import contextlib
import random
import re

from gfnlm.actors.tools import ToolRunner, tool_runner
from gfnlm.actors.trajectory import Trajectory

from .base import columns_of, eval_mode, vote
from .evaluation import Evaluation
from .infilling import InfillingTask
from .records import Record, RecordError, RecordSet, is_integer, read_rows

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def generate_questions(cfg, query_column: str = "str_query", answer_column: str = "num_sol",
                       rationale_column: str | None = None, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """`cfg.count` seeded distinct questions in the data sets' format ({query, answer} as text), none
    of whose queries is in `exclude`; with `rationale_column`, each with its left-to-right rationale
    ("9 + 4 =, 13 - 8 =", whose results the calculator fills in; + and - only)."""
    rng = random.Random(cfg.seed)
    out, seen = [], set(exclude)
    for _ in range(200 * cfg.count + 1000):
        if len(out) == cfg.count:
            break
        n = rng.choice(cfg.operands)
        nums = [rng.randrange(10 ** cfg.digits) for _ in range(n)]
        ops = [rng.choice(cfg.operators) for _ in range(n - 1)]
        expr = " ".join([str(nums[0])] + [f"{o} {x}" for o, x in zip(ops, nums[1:])])
        query = f"Question: {expr} = ? Answer:"
        if query in seen:
            continue
        seen.add(query)
        row = {query_column: query, answer_column: str(_evaluate(nums, ops))}
        if rationale_column:
            steps, acc = [], nums[0]
            for o, x in zip(ops, nums[1:]):
                steps.append(f"{acc} {o} {x} =")
                acc = _OPS[o](acc, x)
            row[rationale_column] = ", ".join(steps)
        out.append(row)
    if len(out) < cfg.count:
        raise RecordError(f"generate: only {len(out)} distinct questions of {cfg.operands} operands of {cfg.digits} "
                          f"digit(s) besides those already taken; ask for fewer than {cfg.count}")
    return out


def _evaluate(nums: list[int], ops: list[str]) -> int:
    """Value with the usual precedence (* before + and -)."""
    terms, signs, cur = [], [], nums[0]
    for o, x in zip(ops, nums[1:]):
        if o == "*":
            cur *= x
        else:
            terms.append(cur)
            signs.append(o)
            cur = x
    terms.append(cur)
    total = terms[0]
    for o, t in zip(signs, terms[1:]):
        total = _OPS[o](total, t)
    return total


def fill_rationale(rationale: str, tokenizer, tools: ToolRunner) -> tuple[list[int], list[bool]]:
    """A worked rationale ("9 + 4 =, 13 - 8 =") as the trajectory the sampler would produce: the
    model's pieces tokenized, and after each piece whose text ends with a trigger the tool's
    insertion as environment tokens (mask True)."""
    tokens, mask = [], []
    pieces = re.findall(r"[^=]*=|[^=]+$", " " + rationale.strip())
    for piece in pieces:
        ids = tokenizer(piece, add_special_tokens=False).input_ids
        tokens += ids
        mask += [False] * len(ids)
        inserted = tools.insertion(tokens) if tools else None
        if inserted:
            tokens += inserted
            mask += [True] * len(inserted)
    return tokens, mask


_RESULT = re.compile(r"=\s*(-?\d+)")
_INT = re.compile(r"-?\d+")


def steps_of(text: str) -> int:
    """Completed calculator steps in a rationale: its "=" signs followed by a result."""
    return len(_RESULT.findall(text))


def answer_of(text: str) -> int | None:
    """The answer a rationale derives: the last result after an `=`, else its last integer."""
    found = _RESULT.findall(text) or _INT.findall(text)
    return int(found[-1]) if found else None


def disallowed_by_chars(tokenizer, allowed: str) -> frozenset[int]:
    """Ids of every token whose text holds a character outside `allowed` (or no text at all)."""
    ok = set(allowed)
    out = set()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if not text or not set(text) <= ok:
            out.add(i)
    return frozenset(out)


def read_worked(cfg) -> list[tuple[int, dict[str, str]]]:
    """The worked examples of an arithmetic task's config, checked (answers are integers, and there
    are enough for `labelled` + `shots`): (line, row) of `data.train`'s file, or of `worked`'s
    generated questions (numbered from 1)."""
    if cfg.worked is not None:
        query, answer = ArithmeticTask._query_answer(cfg)
        rows = generate_questions(cfg.worked, query, answer, rationale_column=cfg.rationale_column)
        return list(enumerate(rows, 1))
    cols = ArithmeticTask.columns(cfg) + [cfg.rationale_column]
    worked = read_rows(cfg.data.train, cols, {cfg.answer_column: is_integer})
    if cfg.labelled + cfg.shots > len(worked):
        raise RecordError(f"{cfg.data.train}: holds {len(worked)} worked examples; task.labelled ({cfg.labelled}) "
                          f"+ task.shots ({cfg.shots}) need {cfg.labelled + cfg.shots}")
    return worked


def read_test_sets(cfg, taken: frozenset[str] = frozenset()) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Each test set's (where, row) pairs: a file's rows ("file:line"), or a generator's questions
    ("generated:i"), none of which is a query in `taken`."""
    out = {}
    query, answer = ArithmeticTask._query_answer(cfg)
    for name, spec in cfg.test_sets.items():
        if isinstance(spec, str):
            out[name] = [(f"{spec}:{line}", row) for line, row in
                         read_rows(spec, ArithmeticTask.columns(cfg), {cfg.answer_column: is_integer})]
        else:
            rows = generate_questions(spec, query, answer, exclude=taken)
            out[name] = [(f"generated:{i}", row) for i, row in enumerate(rows, 1)]
            taken = taken | {row[query] for row in rows}
    return out


def arithmetic_sets(cfg):
    """(worked examples, test sets, unlabelled training questions) of a config, in an order that
    keeps them apart whatever a run trains on: generated test questions avoid every worked example,
    and generated training questions avoid every test question, so runs that differ only in
    `generate` (e.g. SFT with none) are evaluated on the same questions."""
    query, answer = ArithmeticTask._query_answer(cfg)
    worked = read_worked(cfg)
    tests = read_test_sets(cfg, frozenset(row[query] for _, row in worked))
    taken = frozenset(row[query] for _, row in worked) | {row[query] for rows in tests.values() for _, row in rows}
    unlabelled = generate_questions(cfg.generate, query, answer, exclude=taken)
    return worked, tests, unlabelled


def validation_questions(cfg, generated: int) -> set[int]:
    """Indices of the generated training questions that `task.data.validation_fraction` holds out
    for choosing settings (seeded; none at fraction 0); a fraction that holds out none or all of
    them is refused."""
    if cfg.data.validation_fraction <= 0:
        return set()
    k = round(generated * cfg.data.validation_fraction)
    if not 0 < k < generated:
        raise ConfigError(f"task.data.validation_fraction {cfg.data.validation_fraction} of the {generated} generated "
                          f"questions (task.generate.count) holds out {k}; generate more questions or choose a "
                          f"fraction that keeps some of each")
    return set(random.Random(cfg.data.seed + 1).sample(range(generated), k))


class ArithmeticTask(InfillingTask):
    name = "arithmetic"

    def __init__(self, cfg, tokenizer, prefixes: str = "every", tools_cfg=()):
        self.tools = tool_runner(list(tools_cfg), tokenizer)
        if self.tools is None:
            raise ConfigError("task arithmetic: the rationales need the calculator; add sampler.tools: "
                             "[{kind: calculator}]")
        super().__init__(cfg, tokenizer, prefixes)
        self.banned_ids = frozenset(self.disallowed) if cfg.mask_disallowed else frozenset()
        self.ban_penalty = cfg.disallowed_penalty
        sep = cfg.shot_separator
        text = "".join(self.worked_text(r) + sep for r in self.shot_records)
        self.shot_ids = list(tokenizer(text).input_ids) if text else []
        self.shot_text = text

    # -- records -----------------------------------------------------------------------------

    @staticmethod
    def columns(cfg) -> list[str]:
        return columns_of(cfg.prompt_template, cfg.context_template, cfg.suffix_template)

    def draw_groups(self) -> list[tuple[list[int], float]] | None:
        """With `labelled_share`: the labelled questions (the first `labelled` records) in that share
        of the draws, the unlabelled ones in the rest."""
        share = self.cfg.labelled_share
        if share is None:
            return None
        labelled = [r for r in self.train_ids if r < self.cfg.labelled]
        return [(labelled, share), ([r for r in self.train_ids if r >= self.cfg.labelled], 1.0 - share)]

    def load_records(self, cfg) -> RecordSet:
        worked, tests, unlabelled = arithmetic_sets(cfg)
        order = list(range(len(worked)))
        random.Random(cfg.data.seed).shuffle(order)
        path = cfg.data.train if cfg.worked is None else "generated"
        labelled = [worked[i] for i in sorted(order[: cfg.labelled])]
        self.shot_records = [Record(-1, worked[i][1], "shot", f"{path}:{worked[i][0]}")
                             for i in order[cfg.labelled: cfg.labelled + cfg.shots]]
        held = validation_questions(cfg, len(unlabelled))
        records = [Record(i, row, "train", f"{path}:{line}") for i, (line, row) in enumerate(labelled)]
        for i, row in enumerate(unlabelled):
            records.append(Record(len(records), row, "validation" if i in held else "train", f"generated:{i + 1}"))
        train_ids = [r.id for r in records if r.split == "train"]
        validation_ids = [r.id for r in records if r.split == "validation"]
        self.test_sets: dict[str, list[int]] = {}
        for name, rows in tests.items():
            ids = []
            for where, row in rows:
                records.append(Record(len(records), {**row, "set": name}, "test", where))
                ids.append(records[-1].id)
            self.test_sets[name] = ids
        return RecordSet(records, train_ids, [i for ids in self.test_sets.values() for i in ids], validation_ids)

    @staticmethod
    def _query_answer(cfg) -> tuple[str, str]:
        names = columns_of(cfg.prompt_template)
        return (names[0] if names else "str_query"), cfg.answer_column

    def compute_disallowed(self, tokenizer, cfg) -> frozenset[int]:
        return disallowed_by_chars(tokenizer, cfg.allowed_chars)

    def adhoc_record(self, prompt: str, answer: str | None) -> int:
        """A record for a question typed by a user ("9 + 4 - 8" or the full "Question: ... Answer:")."""
        q = prompt.strip()
        if not q.startswith("Question:"):
            q = f"Question: {q.rstrip(' =?')} = ? Answer:"
        if answer is not None and is_integer(answer):
            raise RecordError(f"--answer: expected an integer, got {answer!r}")
        query_col, answer_col = self._query_answer(self.cfg)
        rid = len(self.records)
        self.records.records.append(Record(rid, {query_col: q, answer_col: (answer or "").strip()}, "adhoc", "command line"))
        return rid

    def answer(self, record_id: int) -> int:
        return int(self.records[record_id].fields[self.cfg.answer_column])

    # -- reward --------------------------------------------------------------------------------

    def worked_text(self, record: Record) -> str:
        """A worked example as text: X, the filled-in rationale, Y."""
        tokens, _ = fill_rationale(record.fields[self.cfg.rationale_column], self.tokenizer, self.tools)
        fields = record.fields
        return (self.cfg.prompt_template.format(**fields) + self.tokenizer.decode(tokens)
                + self.cfg.suffix_template.format(**fields))

    def _encode_context(self, record_id: int) -> list[int]:
        x = self.tokenizer(self.render(self.cfg.context_template, record_id), add_special_tokens=not self.shot_ids)
        return self.shot_ids + list(x.input_ids)

    def lm_scores(self, record_id: int, trajectories: list[Trajectory], prefixes: str | None = None) -> list[list[float]]:
        return self.lm.score(self.context_ids(record_id), trajectories, suffix_ids=self.suffix_ids(record_id),
                             prefixes=prefixes or self.prefixes, shared=len(self.shot_ids), first=self.min_len,
                             terminable_only=True,
                             can_end=self.scored_states())

    def reference(self, record_id: int) -> Trajectory | None:
        fields = self.records[record_id].fields
        rationale = fields.get(self.cfg.rationale_column)
        if self.records[record_id].split != "train" or not rationale:
            return None
        tokens, mask = fill_rationale(rationale, self.tokenizer, self.tools)
        if not self.min_len <= len(tokens) or mask.count(False) > self.max_len:  # max_len counts the policy's tokens
            return None
        t = Trajectory(record_id, tokens, terminated=True, tool_mask=mask if any(mask) else [],
                       temperature=float("nan"), version=-1, source="seed")
        return t if self.can_end(t)[-1] else None  # a rationale the policy could not end where it does

    def reference_text(self, record_id: int) -> str | None:
        ref = self.reference(record_id)
        return None if ref is None else self.tokenizer.decode(ref.tokens)

    # -- prediction ----------------------------------------------------------------------------

    def answers(self, trajectories: list[Trajectory]) -> list[int | None]:
        return [answer_of(self.tokenizer.decode(t.tokens)) for t in trajectories]

    def is_valid(self, t: Trajectory) -> bool:
        """Ended by the policy, allowed tokens only, and derives the record's answer."""
        return super().is_valid(t) and self.answers([t])[0] == self.answer(t.record_id)

    def shots_prompt_ids(self, record_id: int, k: int) -> list[int]:
        """The k-shot prompt of the prompting baselines: k worked examples (the labelled training
        ones, then the reward's shots), then X."""
        pool = [self.records[i] for i in self.train_ids if self.cfg.rationale_column in self.records[i].fields]
        pool += self.shot_records
        if k > len(pool):
            raise ConfigError(f"prompting with {k} shots: only {len(pool)} worked examples are loaded "
                             f"(task.labelled + task.shots)")
        text = "".join(self.worked_text(r) + self.cfg.shot_separator for r in pool[:k])
        return list(self.tokenizer(text + self.prompt_text(record_id)).input_ids)

    def evaluation(self, policy, sampler, eval_cfg, methods=None) -> Evaluation:
        """Accuracy of the majority vote per test set, for the trained policy (0-shot prompt) and
        k-shot prompting of the base model (methods 'prompt0', 'prompt3', ...), and steps_<set>: the
        calculator steps per sampled rationale over every vote (a question of n operands needs n - 1
        of the preset's two-operand steps)."""
        if methods is None:
            methods = ["trained"] + ([m for m in eval_cfg.baselines if m.startswith("prompt")] if eval_cfg.include_base else [])
        for m in methods:
            if m != "trained" and not re.fullmatch(r"prompt\d+", m):
                raise ConfigError(f"eval.baselines: {m!r} is not a method of the arithmetic task; use prompt<k> "
                                  f"(k-shot prompting of the base model, e.g. prompt0, prompt3)")
        k, temp = eval_cfg.samples_per_record, eval_cfg.vote_temperature
        from .lm_eval import eval_records, split_label

        if eval_cfg.split == "test":
            sets = {name: eval_records(self, eval_cfg, ids=ids) for name, ids in self.test_sets.items()}
        else:  # the held-out generated questions (validation), or the training questions, as one set
            sets = {eval_cfg.split: eval_records(self, eval_cfg)}

        def figures(m: str) -> tuple[dict, list]:
            if m == "trained":
                prompt_of, ctx = self.prompt_ids, contextlib.nullcontext()
            else:
                shots = int(m[len("prompt"):])
                prompt_of, ctx = (lambda r: self.shots_prompt_ids(r, shots)), policy.model.disable_adapter()
            fig, shown = {}, []
            with ctx:
                for name, ids in sets.items():
                    samples = self.sample_records(sampler, ids, k, temp, prompt_of)
                    correct, steps = 0, []
                    for n, rid in enumerate(ids):
                        texts = [self.tokenizer.decode(t.tokens) for t in samples[rid]]
                        winner, counts = vote([answer_of(z) for z in texts])  # decoded once, for the vote and the steps
                        correct += winner == self.answer(rid)
                        steps += [steps_of(z) for z in texts]
                        if n < 3:  # the first three questions of every set, three of their votes each
                            shown.append({"set": name, "record": rid, "question": self.prompt_text(rid),
                                          "answer": self.answer(rid), "vote": winner, "samples": texts[:3]})
                    fig[f"acc_{name}"] = correct / len(ids) if ids else float("nan")
                    fig[f"steps_{name}"] = sum(steps) / len(steps) if steps else float("nan")
                    fig[f"questions_{name}"] = len(ids)
            return {**fig, "votes": k, "vote_temperature": temp}, shown

        def line(m: str, fig: dict) -> str:
            return (f"gfnlm eval {m:>10}: " + "  ".join(f"acc[{n}] {fig[f'acc_{n}']:.3f}" for n in sets)
                    + "  steps " + "/".join(f"{fig[f'steps_{n}']:.2f}" for n in sets)
                    + f"  ({', '.join(f'{len(v)}' for v in sets.values())} questions, vote of {k} at T={temp:g}, "
                      f"{fig['seconds']:.0f} s)")

        def table(results: dict) -> str:
            names = list(sets)
            return ("| method | " + " | ".join(f"{split_label(n) if n == 'train' else n} ({len(sets[n])} q.)" for n in names)
                    + " | " + " | ".join(f"steps {n}" for n in names) + " |\n"
                    + "| --- |" + " --- |" * 2 * len(names) + "\n"
                    + "".join(f"| {m} | " + " | ".join(f"{100 * fig[f'acc_{n}']:.1f}" for n in names)
                              + " | " + " | ".join(f"{fig[f'steps_{n}']:.2f}" for n in names) + " |\n"
                              for m, fig in results.items()))

        @contextlib.contextmanager
        def context():
            sampler.tools = self.tools
            with eval_mode(policy.model), self.evaluation_lengths():  # 5 operands need more room
                yield

        return Evaluation(methods, figures, line, table, header={"task": self.name, "sets": dict(sets)}, context=context)

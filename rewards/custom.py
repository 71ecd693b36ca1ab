"""Your own posterior: R(Z) from a Python function of yours (task `custom`, `reward.function`).

The function is called as function(texts, records): the decoded Z strings of a batch and each one's
record fields (a dict of the record's columns), and returns one log R per text. Every prefix that can
end is scored as a finished Z of its own (the states SubTB balances), or only the whole Z with
`reward.prefixes: final` (TB, VarGrad). With `task.beta` the frozen LM's prior enters too:
log R = log p_LM(Z ⊤ | C) + value / β. A function that cannot be imported, raises, or returns the
wrong count or a value that is not a finite number is a one-line error naming it and the record.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

from gfnlm.actors.trajectory import Trajectory, by_record
from gfnlm.configs import UserError

from .lm_task import LMTask
from .records import load_records


class RewardFunctionError(UserError, ValueError):
    """The user's reward function cannot be loaded, or returned what cannot be a log R."""


def load_reward_function(spec: str):
    """The callable `spec` names: "module:function" (importable from the working directory) or
    "path/to/file.py:function" (relative to the working directory)."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py") or os.sep in where:
            path = os.path.abspath(where)
            if not os.path.isfile(path):
                raise RewardFunctionError(f"reward.function: no file {where!r} (from the working directory {os.getcwd()})")
            module_name = "gfnlm_user_reward_" + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # after gfnlm's own packages, which a user folder must not shadow
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except RewardFunctionError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RewardFunctionError(f"reward.function: cannot import {where!r}: {type(e).__name__}: {first}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardFunctionError(f"reward.function: {where!r} has no {name!r}")
    if not callable(fn):
        raise RewardFunctionError(f"reward.function: {spec!r} is not callable")
    return fn


class CustomTask(LMTask):
    name = "custom"

    def __init__(self, cfg, tokenizer, prefixes: str = "every", function: str | None = None):
        self.needs_lm = cfg.beta is not None  # the frozen LM is loaded only for the prior
        super().__init__(cfg, tokenizer, prefixes)
        if function is None:
            raise RewardFunctionError("reward.function: task custom needs your reward function")
        self.function_name = function
        self.function = load_reward_function(function)

    def load_records(self, cfg):
        """The records with every field of their rows (the reward function sees them all)."""
        return load_records(cfg.data, self.columns(cfg), extra=True)

    def user_log_r(self, texts: list[str], records: list[dict], record_id: int) -> list[float]:
        """The user's values for a batch of texts of one record, checked."""
        try:
            values = self.function(texts, records)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RewardFunctionError(f"reward.function {self.function_name} raised {type(e).__name__}: {first} "
                                      f"(record {record_id}, {self.records[record_id].where})") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward.function {self.function_name}: expected a list of numbers, got "
                                      f"{type(values).__name__} (record {record_id})") from None
        if len(values) != len(texts):
            raise RewardFunctionError(f"reward.function {self.function_name}: returned {len(values)} values for "
                                      f"{len(texts)} texts (record {record_id}); expected one log R per text")
        for v, text in zip(values, texts):
            if not math.isfinite(v):
                raise RewardFunctionError(f"reward.function {self.function_name}: returned {v} for {text!r} (record "
                                          f"{record_id}); expected a finite log R (use a low number, not -inf)")
        return values

    def score(self, trajectories: list[Trajectory]) -> None:
        groups = by_record(trajectories)
        ends = self.scored_states()
        for rid, ts in groups.items():
            prior = self.lm_scores(rid, ts) if self.cfg.beta is not None else None
            wanted = []  # (trajectory index, prefix length) scored by the user's function
            for b, t in enumerate(ts):
                can = ends(t) if ends is not None else [True] * (t.length + 1)
                first = t.length if self.prefixes == "final" else 0
                wanted += [(b, i) for i in range(first, t.length + 1)
                           if self.prefix_ok(rid, t, i) and (can[i] or i == t.length)]
            texts = [self.tokenizer.decode(ts[b].tokens[:i]) for b, i in wanted]
            fields = dict(self.records[rid].fields)
            values = self.user_log_r(texts, [fields] * len(texts), rid) if texts else []
            got = {key: v for key, v in zip(wanted, values)}
            for b, t in enumerate(ts):
                first = t.length if self.prefixes == "final" else 0
                can = self.can_end(t)  # a state that cannot end (a dead end's last one among them): the floor
                row = []
                for i in range(t.length + 1):
                    if i < first:
                        row.append(float("nan"))
                    elif (b, i) not in got or not can[i]:
                        row.append(self.floor)
                    elif prior is None:
                        row.append(got[(b, i)])
                    else:
                        lm = prior[b][i]
                        row.append(lm + got[(b, i)] / self.cfg.beta if lm == lm else self.floor)
                t.log_r = row

    def final_log_r(self, record_id: int, trajectories: list[Trajectory]) -> list[float]:
        """log R of each whole Z (what evaluation reports as log_r_mean / log_r_max)."""
        ts = [Trajectory(record_id, list(t.tokens), terminated=t.terminated) for t in trajectories]
        with self.final_state_only():
            self.score(ts)
        return [t.log_r[-1] for t in ts]

    def log_likelihood(self, record_id: int, trajectories: list[Trajectory]) -> list[float]:
        """The frozen LM's log-likelihood of each Z when there is a prior (beta), else NaN."""
        if self.cfg.beta is None:
            return [float("nan")] * len(trajectories)
        return super().log_likelihood(record_id, trajectories)

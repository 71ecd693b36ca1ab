"""Tools that act during generation: environment steps inserted into a trajectory.

A tool maps the text generated so far to text to insert. It fires when the sampled text ends with
its trigger (the calculator: `=`). The engine then appends the insertion's tokens as environment
tokens: they carry no log-prob, the state before them has no termination option, and they are
marked in the trajectory's tool mask, which the learner's loss honours.

The calculator reads the arithmetic expression just before the trigger and evaluates `+`, `-`
and `*` on integers with its own small parser. Model output never reaches Python's `eval`;
anything it cannot parse gets no insertion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from gfnlm.configs import ConfigError

TOOL_TOKENS_PER_CHOSEN = 4
"""Bound on a tool's inserted tokens per token the policy chooses (task.max_len counts the chosen
ones only): a Z holds at most max_len · (1 + this) tokens, and the samplers stop a row there."""


def longest_with_tools(max_chosen: int, tools) -> int:
    """Most tokens a Z of `max_chosen` chosen tokens may hold: their insertions on top where there are tools."""
    return max_chosen * (1 + TOOL_TOKENS_PER_CHOSEN) if tools else max_chosen


class Tool(Protocol):
    trigger: str

    def __call__(self, text: str) -> str: ...


_TOKEN = re.compile(r"\s*(\d+|[-+*])")
_EXPR_TAIL = re.compile(r"[0-9+\-*\s]*$")


def _tokens(expr: str) -> list[str] | None:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            return None
        out.append(m.group(1))
        pos = m.end()
    return out


def evaluate(expr: str, max_digits: int = 30) -> int | None:
    """Integer value of an expression of integers, unary minus, `+`, `-` and `*` (usual
    precedence), or None when it is anything else. Numbers longer than max_digits are refused."""
    toks = _tokens(expr)
    if not toks:
        return None
    pos = 0

    def atom() -> int | None:
        nonlocal pos
        sign = 1
        while pos < len(toks) and toks[pos] == "-":
            sign, pos = -sign, pos + 1
        if pos >= len(toks) or not toks[pos].isdigit() or len(toks[pos]) > max_digits:
            return None
        pos += 1
        return sign * int(toks[pos - 1])

    def term() -> int | None:
        nonlocal pos
        value = atom()
        while value is not None and pos < len(toks) and toks[pos] == "*":
            pos += 1
            rhs = atom()
            value = None if rhs is None else value * rhs
            if value is not None and abs(value) >= 10**max_digits:
                return None
        return value

    value = term()
    while value is not None and pos < len(toks) and toks[pos] in "+-":
        op, pos = toks[pos], pos + 1
        rhs = term()
        value = None if rhs is None else (value + rhs if op == "+" else value - rhs)
    return value if value is not None and pos == len(toks) else None


def last_operands(expr: str, k: int) -> str | None:
    """The part of an expression made of its last k operands and the operators between them
    ("6 - 0 - 4", k = 2 -> "0 - 4"; a unary minus stays with its operand), or None when it is not an
    expression of integers, unary minus, `+`, `-` and `*`."""
    toks = _tokens(expr)
    if not toks:
        return None
    operands: list[list[str]] = []  # each: unary minuses, then the number
    ops: list[str] = []
    current: list[str] = []
    expect_operand = True
    for t in toks:
        if expect_operand:
            current.append(t)
            if t.isdigit():
                operands.append(current)
                current, expect_operand = [], False
            elif t != "-":
                return None
        elif t in "+-*":
            ops.append(t)
            expect_operand = True
        else:
            return None
    if expect_operand:  # empty, or ends with an operator
        return None
    keep = operands[-k:]
    between = ops[len(ops) - (len(keep) - 1):] if len(keep) > 1 else []
    parts = [" ".join(keep[0])]
    for op, operand in zip(between, keep[1:]):
        parts += [op, " ".join(operand)]
    return " ".join(parts)


@dataclass
class Calculator:
    """Evaluates the expression that ends the text (after the last character that cannot belong
    to one, e.g. ',' or ':') and inserts `fmt` with its value: "2 + 3 * 4 =" gives " 14". With
    `max_operands` only the last that many operands before the trigger are evaluated ("6 - 0 - 4 ="
    with 2 gives " -4"): the authors' arithmetic experiment (limit_capability 2), so that copying
    the question and pressing "=" does not answer it."""

    trigger: str = "="
    fmt: str = " {}"
    max_operands: int | None = None

    def __call__(self, text: str) -> str:
        if not text.endswith(self.trigger):
            return ""
        body = text[: len(text) - len(self.trigger)]
        tail = _EXPR_TAIL.search(body).group(0)
        # a leading '-' glued to the previous word is a dash, not a sign
        if tail.strip() and self.max_operands is not None:
            tail = last_operands(tail, self.max_operands) or ""
        value = evaluate(tail) if tail.strip() else None
        return "" if value is None else self.fmt.format(value)


def make_tools(configs: Sequence) -> list[Tool]:
    tools: list[Tool] = []
    for c in configs:
        if c.kind == "calculator":
            tools.append(Calculator(trigger=c.trigger, fmt=c.format, max_operands=c.max_operands))
        else:  # pragma: no cover - the config schema admits nothing else
            raise ConfigError(f"sampler.tools: unknown tool kind {c.kind!r}")
    return tools


class ToolRunner:
    """Trigger detection and insertion for one tokenizer: shared by every engine. With
    `end_only_after` the policy may end (⊤) only right after a tool's insertion (`can_end_states`)."""

    def __init__(self, tools: Sequence[Tool], decode: Callable[[list[int]], str], encode: Callable[[str], list[int]],
                 end_only_after: bool = False):
        self.tools = list(tools)
        self.end_only_after = end_only_after
        self.decode = decode
        self.encode = encode
        self._last_chars = {t.trigger[-1] for t in self.tools}
        self._piece: dict[int, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.tools)

    def may_fire(self, token: int) -> bool:
        """Whether a text ending in `token` can end with a trigger (cached per token)."""
        hit = self._piece.get(token)
        if hit is None:
            piece = self.decode([token])
            hit = self._piece[token] = any(c in piece for c in self._last_chars)
        return hit

    def insertion(self, tokens: list[int]) -> list[int] | None:
        """Tokens to insert after `tokens` (the generated tokens so far, the last one sampled),
        or None when no tool fires. A tool that fires but has nothing to say gives []."""
        if not self.tools or not tokens or not self.may_fire(tokens[-1]):
            return None
        text = self.decode(tokens)
        for tool in self.tools:
            if text.endswith(tool.trigger):
                return self.encode(tool(text))
        return None

    @classmethod
    def for_tokenizer(cls, tools: Sequence[Tool], tokenizer, end_only_after: bool = False) -> "ToolRunner":
        return cls(tools, lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                   lambda s: tokenizer.encode(s, add_special_tokens=False) if s else [], end_only_after)


def tool_runner(configs: Sequence, tokenizer) -> ToolRunner | None:
    """The runner of `sampler.tools` entries (config objects) for a tokenizer; None without tools."""
    if not configs:
        return None
    return ToolRunner.for_tokenizer(make_tools(configs), tokenizer, any(c.end_only_after for c in configs))

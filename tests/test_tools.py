"""The calculator's own parser, trigger detection, and insertion tokens."""

import pytest
from transformers import AutoTokenizer

from actors.tools import Calculator, ToolRunner, evaluate


@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4", 14), ("6 - 0", 6), (" 2 - 8 ", -6), ("-6 + 3", -3), ("10*10*10", 1000), ("7", 7), ("3 - -2", 5),
])
def test_evaluates_integer_arithmetic(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", [
    "", "2 +", "* 3", "2 ** 3", "1 / 2", "2 3", "__import__('os').system('true')", "(1 + 2)", "1.5 + 1", "9" * 40,
])
def test_refuses_everything_else(expr):
    assert evaluate(expr) is None


def test_calculator_reads_the_expression_before_the_trigger():
    calc = Calculator()
    assert calc("6 - 0 =") == " 6"
    assert calc("6 - 0 = 6, 6 - 4 =") == " 2"
    assert calc("Answer: 5 + 9 - 3 * 2 =") == " 8"
    assert calc("no numbers here =") == ""
    assert calc("2 + 2") == ""  # no trigger at the end
    assert Calculator(trigger="==", fmt="[{}]")("3*3 ==") == "[9]"


def test_runner_fires_on_the_trigger_and_returns_tokens(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    runner = ToolRunner.for_tokenizer([Calculator()], tok)
    ids = tok.encode("12 + 30 =", add_special_tokens=False)
    assert tok.decode(runner.insertion(ids)) == " 42"
    assert runner.insertion(ids[:-1]) is None  # text does not end with '='
    assert runner.insertion(tok.encode("x =", add_special_tokens=False)) == []  # fired, nothing to say

"""The calculator's own parser, trigger detection, and insertion tokens."""

import pytest
from transformers import AutoTokenizer

from gfnlm.actors.tools import Calculator, ToolRunner, evaluate


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


@pytest.mark.parametrize("expr, k, part", [
    ("6 - 0 - 4", 2, "0 - 4"), ("6 - 0 - 4", 3, "6 - 0 - 4"), ("6 - 0 - 4", 9, "6 - 0 - 4"), ("7", 2, "7"),
    ("3 - -2", 2, "3 - - 2"), ("-6 + 3 * 2", 2, "3 * 2"), ("1 + 2 +", 2, None), ("", 2, None), ("2 ** 3", 2, None),
])
def test_last_operands(expr, k, part):
    from gfnlm.actors.tools import last_operands

    assert last_operands(expr, k) == part


def test_a_calculator_limited_to_two_operands_does_one_operation():
    """The authors' arithmetic experiment: copying the question and pressing '=' does not answer it."""
    calc = Calculator(max_operands=2)
    assert calc(" 6 - 0 - 4 =") == " -4"
    assert calc("Question: 9 + 4 - 8 = ? Answer: 9 + 4 = 13, 13 - 8 =") == " 5"
    assert calc(" 2 + 3 * 4 =") == " 12"
    assert calc(" 5 =") == " 5" and calc(" 5 - =") == ""
    assert Calculator()(" 6 - 0 - 4 =") == " 2"  # unlimited: the whole expression
    from gfnlm.actors.tools import make_tools
    from gfnlm.configs.schema import CalculatorTool

    tool, = make_tools([CalculatorTool(max_operands=2)])
    assert tool(" 1 + 1 + 1 =") == " 2"
    with pytest.raises(ValueError):
        CalculatorTool(max_operands=1)


def test_the_states_that_can_end():
    """k >= min_len, never right before a tool token, and with end_only_after_tool only right after an
    insertion (the last state may end only on the same terms)."""
    from gfnlm.actors.trajectory import can_end_states

    tool = [False, False, True, False, True, True, False]
    assert can_end_states(7, tool, 0) == [True, True, False, True, False, False, True, True]
    assert can_end_states(7, tool, 4) == [False, False, False, False, False, False, True, True]
    assert can_end_states(7, tool, 0, end_only_after_tool=True) == [False, False, False, True, False, False, True, False]
    assert can_end_states(3, [], 1, end_only_after_tool=True) == [False] * 4
    assert can_end_states(2, [], 1) == [False, True, True]

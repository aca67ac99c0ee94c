"""grpo_math/calculator.py: the arithmetic tool the policy calls. It must agree with GSM8K's own
calculator annotations, refuse everything that is not arithmetic with an "error: " string it never
raises, and stay fast whatever the model writes.

One behaviour per case; each case's id says why it exists.
"""

import ast
import decimal
import json
import os
import re
import time
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import ROOT, need_gsm8k
from grpo_math import calculator as calculator_module
from grpo_math.calculator import ERROR_PREFIX, MAX_LENGTH, calculator, is_error

FAST = 0.5  # seconds: far above what any call takes, far below a hang
CATCH_ALL = "could not evaluate"  # the answer to an exception the checks missed: no input should reach it

CASES = [
    pytest.param("2+3", "5", id="addition"),
    pytest.param("7/2", "3.5", id="division: a decimal when it does not divide"),
    pytest.param("1/3", "0.333333", id="division: rounded to 6 places"),
    pytest.param("8/3", "2.666667", id="division: rounded half up, 2.6666666... -> 2.666667"),
    pytest.param("1/10000000", "1e-07", id="non-zero below 6 places: 6 significant digits, not 0"),
    pytest.param("-1/3", "-0.333333", id="negative decimal"),
    pytest.param("-(4-10)", "6", id="unary minus on parentheses"),
    pytest.param("+5", "5", id="unary plus"),
    pytest.param("2+3*4", "14", id="precedence: * before +"),
    pytest.param("(2+3)*4", "20", id="parentheses"),
    pytest.param("2**10", "1024", id="power"),
    pytest.param("2**3**2", "512", id="power: right to left, 2**9"),
    pytest.param("-2**2", "-4", id="power binds tighter than unary minus, as in Python"),
    pytest.param("2**-2", "0.25", id="negative power"),
    pytest.param("17//5", "3", id="floor division"),
    pytest.param("-7//2", "-4", id="floor division floors, as in Python"),
    pytest.param("17%5", "2", id="modulo: % followed by a number"),
    pytest.param("17 % 5", "2", id="modulo with spaces"),
    pytest.param("1,234*2", "2468", id="thousands separator"),
    pytest.param("1,234,567.5 + 0.5", "1234568", id="thousands separators with decimals"),
    pytest.param("12.5% * 80", "10", id="percent: 12.5% is 0.125"),
    pytest.param("100% - 20%", "0.8", id="percent twice, the minus between is subtraction"),
    pytest.param("(50%)", "0.5", id="percent before a closing parenthesis"),
    pytest.param("$30 + $12.50", "42.5", id="dollar signs"),
    pytest.param("0.1+0.2", "0.3", id="exact: no binary floating point"),
    pytest.param("1e3 + .5", "1000.5", id="float literal forms, read exactly"),
    pytest.param("08 * 2", "16", id="a leading zero, as in times of day"),
    pytest.param("  3 *\t4  ", "12", id="spaces and tabs"),
    pytest.param("144.00 - 0.00", "144", id="an integer value prints as an integer"),
    pytest.param("10**30", "1" + "0" * 30, id="the largest value allowed, with no separators"),
]


@pytest.mark.parametrize("expression, expected", CASES)
def test_ordinary_arithmetic(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("value, expected", [(5, "5"), (2.5, "2.5"), (-3, "-3")])
def test_a_number_instead_of_a_string_is_read_as_that_number(value, expected):
    """{"expression": 5} from the model is a number, not a mistake worth an error."""
    assert calculator(value) == expected


HOSTILE = [
    pytest.param("__import__('os')", "function calls", id="import"),
    pytest.param("os.system('ls')", "function calls", id="shell"),
    pytest.param("x", "names such as 'x'", id="name"),
    pytest.param("nan", "names", id="nan: not a number this tool knows"),
    pytest.param("inf", "names", id="inf"),
    pytest.param("True", "only numbers", id="bool is not a number here"),
    pytest.param("(1).__class__", "attributes", id="attribute"),
    pytest.param("9**9**9", "power", id="power tower: 9**387420489 refused before computing"),
    pytest.param("10**100000", "power", id="huge power"),
    pytest.param("2**-99999", "power", id="huge negative power"),
    pytest.param("2**0.5", "whole number", id="fractional power"),
    pytest.param("10**31", "too large", id="past the size limit"),
    pytest.param("(1/7)**36", "too precise", id="denominator past the size limit"),
    pytest.param("(" * 10000 + "1" + ")" * 10000, "longer than", id="10,000 nested parentheses"),
    pytest.param("9" * 1_000_000, "longer than", id="a megabyte of digits"),
    pytest.param("1+" * 100 + "1", "longer than", id="one character over the length limit"),
    pytest.param("-" * 150 + "1", "nested", id="nested past MAX_DEPTH within the length limit"),
    pytest.param("1e999", "out of range", id="float literal past float range"),
    pytest.param("1e999999999", "out of range", id="exponent that Fraction would compute"),
    pytest.param("1/0", "division by zero", id="division by zero"),
    pytest.param("1//0", "division by zero", id="floor division by zero"),
    pytest.param("5%0", "modulo by zero", id="modulo by zero"),
    pytest.param("0**-1", "zero to a negative power", id="zero to a negative power"),
    pytest.param("١٢٣ + 1", "ASCII", id="arabic-indic digits"),
    pytest.param("１２", "ASCII", id="fullwidth digits"),
    pytest.param("3 × 4", "ASCII", id="multiplication sign"),
    pytest.param("2^3", "use ** for powers", id="caret: a hint, not xor"),
    pytest.param("1, 2", "comma", id="comma that is not a thousands separator: a tuple in Python"),
    pytest.param("12,34", "comma", id="comma with a group of two"),
    pytest.param("1,2345", "comma", id="comma with a group of four"),
    pytest.param("lambda: 1", "Lambda", id="lambda"),
    pytest.param("[x for x in (1, 2)]", "comma", id="comprehension: its comma is refused first"),
    pytest.param("'a'*10", "only numbers", id="string"),
    pytest.param("b'a'", "only numbers", id="bytes"),
    pytest.param("f'{1}'", "f-strings are not allowed", id="f-string"),
    pytest.param("[1]*10**9", "lists are not allowed", id="list repetition"),
    pytest.param("1 if 1 else 2", "if/else", id="conditional"),
    pytest.param("1<2", "comparisons", id="comparison"),
    pytest.param("(y := 1)", "assignments (:=) are not allowed", id="walrus"),
    pytest.param("1 << 3", "operator <<", id="shift"),
    pytest.param("~1", "operator ~", id="bitwise not"),
    pytest.param("1;2", "not a valid", id="semicolon"),
    pytest.param("1\nimport os", "not a valid", id="newline injection"),
    pytest.param("1\x00", "not a valid", id="null byte"),
    pytest.param("", "empty", id="empty"),
    pytest.param(" \t\n", "empty", id="whitespace only"),
    pytest.param(None, "must be a string", id="None"),
    pytest.param(["1+1"], "must be a string", id="a list"),
    pytest.param(True, "must be a string", id="a bool is not taken as 1"),
    pytest.param(10**5000, "too large", id="an int too long for str(), past the size limit"),
    pytest.param("*".join(["999999999"] * 20), "too large", id="multiplication chain past the size limit"),
]


@pytest.mark.parametrize("expression, says", HOSTILE)
def test_hostile_input_gets_a_short_error_quickly(expression, says):
    start = time.perf_counter()
    result = calculator(expression)
    assert time.perf_counter() - start < FAST
    assert isinstance(result, str) and is_error(result), result
    assert says in result and len(result) < 120, result
    assert CATCH_ALL not in result  # each refusal names its reason


def test_a_long_sum_under_the_length_limit_works():
    expression = "+".join(["1"] * 100)  # 199 characters, a left-leaning tree 100 deep
    assert len(expression) <= MAX_LENGTH and calculator(expression) == "100"


def test_the_deadline_is_checked_at_every_node_of_the_walk(monkeypatch):
    """A clock that advances one second per reading, and a limit of 4.5 s: the deadline is read once
    before the walk and once at each node, so 1+1 (3 nodes) is done in time and 1+1+1+1 (7) is not."""
    ticks = iter(range(1000))
    monkeypatch.setattr(calculator_module, "clock", lambda: next(ticks))
    monkeypatch.setattr(calculator_module, "TIME_LIMIT", 4.5)
    assert calculator("1+1") == "2"
    ticks = iter(range(1000))
    assert calculator("1+1+1+1").startswith(ERROR_PREFIX + "the expression took longer")


def test_the_deadline_counts_cpu_time_not_waiting():
    assert calculator_module.clock is time.thread_time  # a loaded machine's waits do not refuse a valid call


def test_the_catch_all_answers_what_the_checks_missed(monkeypatch):
    """The last line of defence, which no input reaches (the tests above and below say so): an exception
    the checks did not foresee still comes back as an error string."""
    monkeypatch.setattr(calculator_module, "evaluate", lambda expression: 1 / 0)
    assert calculator("1+1") == ERROR_PREFIX + "could not evaluate (ZeroDivisionError); " + calculator_module.OPERATORS


@pytest.mark.parametrize("expression, expected", [
    ("0x10", "16"), ("0o17", "15"), ("0b101", "5"), ("1_000", "1000"), ("1_0.5", "10.5"), ("1 + 2 # apples", "3"),
    ("(1 +\n 2)", "3"), ("1 + \\\n 2", "3")])
def test_pythons_other_number_forms_work_as_the_docstring_says(expression, expected):
    assert calculator(expression) == expected


def test_the_module_never_calls_eval_exec_or_compile():
    with open(os.path.join(ROOT, "grpo_math", "calculator.py")) as f:
        tree = ast.parse(f.read())
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_the_json_schema_the_chat_template_shows():
    from transformers.utils import get_json_schema

    function = get_json_schema(calculator)["function"]
    assert function["name"] == "calculator" and function["description"].startswith("Evaluate an arithmetic")
    assert function["parameters"]["properties"]["expression"]["type"] == "string"
    assert function["parameters"]["required"] == ["expression"]


# ---------------------------------------------------------------------------- GSM8K's own annotations

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")
ARITHMETIC = re.compile(r"[\d\s.,+\-*/%()$]+")


def test_agrees_with_gsm8k_calculator_annotations():
    """Every <<lhs=rhs>> in GSM8K, train and test. Measured on this copy: every annotation is exact, so
    the rule is exact equality of values, not a tolerance; what the annotations do differently is only
    how they write a number (144.00 for 144, .4 for 0.4), which comparing Fractions absorbs. An
    annotation with anything but digits and operators on its left is counted as not arithmetic (none
    in this copy)."""
    folder = need_gsm8k()
    agree, disagree, skipped = 0, [], 0
    for split in ("train", "test"):
        with open(os.path.join(folder, f"{split}.jsonl")) as f:
            for line in f:
                for lhs, rhs in ANNOTATION.findall(json.loads(line)["answer"]):
                    if not ARITHMETIC.fullmatch(lhs):
                        skipped += 1
                        continue
                    result = calculator(lhs)
                    if not is_error(result) and Fraction(result) == Fraction(rhs.replace(",", "")):
                        agree += 1
                    else:
                        disagree.append(f"<<{lhs}={rhs}>> -> {result}")
    total = agree + len(disagree)
    print(f"calculator agrees with {agree}/{total} = {agree / total:.2%} of GSM8K annotations "
          f"({skipped} skipped: not arithmetic)")
    assert total > 27_000  # 27,998 annotations in the two files
    assert not disagree, disagree[:20]


# ---------------------------------------------------------------------------- properties

@settings(max_examples=300, deadline=500)
@given(st.text(max_size=300))
def test_any_text_gives_a_string_and_never_raises(text):
    result = calculator(text)
    assert isinstance(result, str) and CATCH_ALL not in result


@settings(max_examples=300, deadline=500)
@given(st.text(alphabet="0123456789+-*/%().,$e ", max_size=250))
def test_any_text_over_the_calculator_alphabet_gives_a_string(text):
    """Text made of the characters the calculator accepts reaches the parser and the walk, not just the
    first checks; whatever comes back is a number or an error."""
    result = calculator(text)
    assert CATCH_ALL not in result
    assert is_error(result) or Fraction(result) is not None


def combine(pair):
    (left, a), op, (right, b) = pair
    return f"({left}) {op} ({right})", {"+": a + b, "-": a - b, "*": a * b}[op]


# Well-formed integer expressions with their value: at most 12 leaves under 100 keep them under
# MAX_LENGTH characters and under 1e30 in value.
EXPRESSIONS = st.recursive(
    st.integers(0, 99).map(lambda n: (str(n), n)),
    lambda children: st.one_of(
        st.tuples(children, st.sampled_from("+-*"), children).map(combine),
        children.map(lambda c: (f"-({c[0]})", -c[1])),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=500)
@given(EXPRESSIONS)
def test_integer_expressions_give_their_exact_value(case):
    expression, value = case
    assert calculator(expression) == str(value)  # a value, so neither a refusal nor the catch-all


@settings(max_examples=300, deadline=500)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6).filter(lambda b: b != 0))
@example(0, -1)  # Decimal's 0 / -1 is -0; the calculator writes 0
def test_division_is_the_exact_quotient_rounded_half_up_to_6_places(a, b):
    # Worked out independently with Decimal at 60 digits: |a / b| >= 1e-6 unless a is 0, so it never
    # rounds to 0.
    with decimal.localcontext(decimal.Context(prec=60)):
        quotient = decimal.Decimal(a) / decimal.Decimal(b) if a else decimal.Decimal(0)
    expected = f"{quotient.quantize(decimal.Decimal('1e-6'), rounding=decimal.ROUND_HALF_UP):f}"
    expected = expected.rstrip("0").rstrip(".") if "." in expected else expected
    assert calculator(f"{a} / {b}") == expected

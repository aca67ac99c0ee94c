"""rewards.py: extraction, grading, every registered reward, combining, and the registry.

One behaviour per case; each case's id says why it exists, and the arithmetic behind an
expected value sits in a comment beside it.
"""

import json
import math
import os
import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import (
    GSM8K_REWARD_WEIGHTS,
    HYBRID_WEIGHTS,
    REWARDS,
    CombinedReward,
    combine_rewards,
    correctness_reward,
    extract_answer,
    get_reward_funcs,
    is_correct,
    normalize_number,
    number_extraction_reward,
    stop_tag_bonus,
)


def chat(text):
    """A conversational completion: one assistant message."""
    return [{"role": "assistant", "content": text}]


# Rewards that grade against the reference, so return None when there is none.
NEEDS_ANSWER = {"similarity_reward", "correctness_reward", "partial_credit_reward", "graded_correctness_reward"}

# The full structured format, with a worked calculation and the answer 14.
GOOD = "<start_working_out>3 * 4 = 12, 12 + 2 = 14<end_working_out><SOLUTION>14</SOLUTION>"
# Everything hybrid_reward pays for: right, 30 words, all six step words, "3 * 4 = 12", the format.
HYBRID_MAX = (
    "<start_working_out>First, 3 * 4 = 12. Then next, so therefore finally we add 2 to get the total "
    "number of apples that she has in the basket today.<end_working_out><SOLUTION>14</SOLUTION>"
)
HUGE = "9" * 400  # past float range (about 1.8e308)


def documented_range(func):
    """The range a reward's docstring states: ('set', {0, 1}) or ('interval', lo, hi)."""
    m = re.search(r"Range ([\[{])([^\]})]*)([\])}])", func.__doc__)
    assert m, f"{func.__name__}'s docstring states no 'Range [lo, hi]' or 'Range {{a, b}}'"
    values = [float(v) for v in m.group(2).split(",")]
    if m.group(1) == "{":
        return ("set", set(values))
    return ("interval", values[0], values[1])


def assert_in_documented_range(func, value):
    kind, *bounds = documented_range(func)
    assert isinstance(value, float) and not math.isnan(value), (func.__name__, value)
    if kind == "set":
        assert value in bounds[0], (func.__name__, value, bounds[0])
    else:
        lo, hi = bounds
        assert lo - 1e-9 <= value <= hi + 1e-9, (func.__name__, value, lo, hi)


# ---------------------------------------------------------------------------- extract_answer

EXTRACT_CASES = [
    # The forms, strongest first
    pytest.param("Janet sells 9 eggs.\n#### 18", "18", id="hash: GSM8K's final line beats the 9 before it"),
    pytest.param("#### 18 cups, 3 left over", "18", id="hash: first number after ####, not the last"),
    pytest.param("so <SOLUTION>14</SOLUTION>", "14", id="solution tags"),
    pytest.param("<SOLUTION>5 + 3 = 8</SOLUTION>", "8", id="solution: a calculation in the span gives its last number"),
    pytest.param(r"so \boxed{42} is it", "42", id="boxed"),
    pytest.param(r"\boxed{2 \times 3 = 6}", "6", id="boxed: a calculation gives its last number"),
    pytest.param("The answer is 18 dollars, not 20.", "18", id="answer is: first number after it"),
    pytest.param("THE ANSWER IS: 7 (I checked 8)", "7", id="answer is: any case, optional colon"),
    pytest.param("Q: how many?\nA: 12 apples, 3 pears", "12", id="A: at the start of a line"),
    pytest.param("Job A: 5 hours, job B: 7 hours", "7", id="A: mid-line is no answer, so the fallback's last number"),
    pytest.param("3 + 4 = 7 </response>", "7", id="response: last number before the stop tag"),
    pytest.param("7 </response> then 99 more", "7", id="response: text after the stop tag is ignored"),
    pytest.param("</response> 12", None, id="response: a number only after the stop tag does not count"),
    pytest.param("I got 3, then 4", "4", id="fallback: the last number"),
    pytest.param("no digits at all", None, id="no number: None"),
    pytest.param("", None, id="empty text: None"),
    # Several answers
    pytest.param("#### 3\nwait, no\n#### 5", "5", id="several: the last occurrence of a form wins"),
    pytest.param("#### 5\n" + r"\boxed{7}", "5", id="several: #### outranks a later boxed"),
    pytest.param("<SOLUTION>none</SOLUTION> 9", "9", id="several: a form without a number falls through"),
    pytest.param("The answer is unclear. It is 4.", "4", id="several: 'answer is' with no number falls through"),
    # Normalization
    pytest.param("#### 1,234,567", "1234567", id="norm: thousands commas"),
    pytest.param("#### $18", "18", id="norm: dollar sign"),
    pytest.param("#### 25%", "25", id="norm: percent sign"),
    pytest.param("#### 12.0", "12", id="norm: trailing .0"),
    pytest.param("#### 3.00", "3", id="norm: trailing .00"),
    pytest.param("#### 12.50", "12.5", id="norm: trailing zero of a decimal"),
    pytest.param("#### .5", "0.5", id="norm: bare decimal point gets a 0"),
    pytest.param("#### 007", "7", id="norm: leading zeros"),
    pytest.param("#### -5", "-5", id="sign: minus"),
    pytest.param("#### \u22125", "-5", id="sign: unicode minus U+2212"),
    pytest.param("#### +7", "7", id="sign: plus is dropped"),
    pytest.param("#### -0", "0", id="sign: negative zero is zero"),
    pytest.param("#### -$1,234.50", "-1234.5", id="sign: minus, dollar, commas and decimal together"),
    pytest.param("#### $-5", "-5", id="sign: after the dollar sign"),
    pytest.param("5-3", "3", id="sign: a minus between digits is subtraction"),
    pytest.param("so x = -5", "-5", id="sign: a minus after a space is a sign"),
    pytest.param("#### \u0664\u0662", "42", id="unicode: Arabic-Indic digits become 42"),
    pytest.param("#### \uff14\uff12", "42", id="unicode: full-width digits become 42"),
    pytest.param(chat("#### 14"), "14", id="conversational: the message content"),
    pytest.param([{"role": "user", "content": "#### 3"}, {"role": "assistant", "content": "#### 14"}], "14",
                 id="conversational: the last message is graded"),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


NORMALIZE_CASES = [
    pytest.param("$1,000.00", "1000", id="the docstring's example"),
    pytest.param(18, "18", id="an int is read as its text"),
    pytest.param(18.0, "18", id="a float's .0 is dropped"),
    pytest.param(None, None, id="None stays None"),
    pytest.param("eighteen", None, id="words are no number"),
    pytest.param("7 or 8", "7", id="the first number of the text"),
]


@pytest.mark.parametrize("text, expected", NORMALIZE_CASES)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


# ---------------------------------------------------------------------------- is_correct

IS_CORRECT_CASES = [
    pytest.param("1,000", "1000.00", True, id="comma and decimals normalize alike"),
    pytest.param("$1,000", "1000", True, id="currency"),
    pytest.param(0.5, ".5", True, id="non-string input"),
    pytest.param("-0", "0", True, id="negative zero"),
    pytest.param("\u0664\u0662", "42", True, id="Arabic-Indic digits"),
    # |3.0000001 - 3| = 1e-7 <= 1e-6 * 3.0000001
    pytest.param("3.0000001", "3", True, id="within the relative tolerance"),
    # |3.00001 - 3| = 1e-5 > 1e-6 * 3.00001
    pytest.param("3.00001", "3", False, id="outside the relative tolerance"),
    # 1e-10 <= abs_tol 1e-9
    pytest.param("0.0000000001", "0", True, id="absolute tolerance near zero"),
    # 1e-9 relative would pass a tolerance; integers get none
    pytest.param("1000000001", "1000000000", False, id="integers compare exactly"),
    # both are the same double, 1.2345678901234567e19
    pytest.param("12345678901234567891", "12345678901234567890", False, id="huge integers are not floats"),
    pytest.param(HUGE, HUGE, True, id="integer past float range equals itself"),
    pytest.param(HUGE, "9" * 399 + "8", False, id="integers past float range differ in the last digit"),
    pytest.param(HUGE, "5.5", False, id="integer past float range against a decimal (raised OverflowError)"),
    pytest.param("1" * 400 + ".5", "2" * 400 + ".5", False, id="decimals past float range (were inf == inf)"),
    pytest.param("1" * 5000, "2" * 5000, False, id="integers past int()'s 4,300-digit limit"),
    pytest.param(None, "1", False, id="no prediction"),
    pytest.param("1", None, False, id="no reference"),
    pytest.param(None, None, False, id="None never equals None"),
    pytest.param("abc", "abc", False, id="equal text without a number is not correct"),
]


@pytest.mark.parametrize("pred, gold, expected", IS_CORRECT_CASES)
def test_is_correct(pred, gold, expected):
    assert is_correct(pred, gold) is expected


# ---------------------------------------------------------------------------- every reward

REWARD_CASES = [
    # unique_chars_reward: len(set(text))
    pytest.param("unique_chars_reward", "", "14", 0.0, id="unique_chars: empty text has 0"),
    pytest.param("unique_chars_reward", "aab", "14", 2.0, id="unique_chars: {a, b}"),
    pytest.param("unique_chars_reward", "\u00e9\u00e9\u4e2d", "14", 2.0,
                 id="unique_chars: unicode characters count once"),
    pytest.param("unique_chars_reward", "abc", None, 3.0, id="unique_chars: needs no reference"),
    # similarity_reward: 100 * 2 * matches / total length
    pytest.param("similarity_reward", "#### 14", "14", 100.0, id="similarity: same answer"),
    pytest.param("similarity_reward", "#### 1,000", "1000", 100.0, id="similarity: commas normalized in the guess"),
    pytest.param("similarity_reward", "#### 1000", "1,000", 100.0, id="similarity: commas normalized in the reference"),
    pytest.param("similarity_reward", "#### 18", 18.0, 100.0, id="similarity: a float reference 18.0 reads as 18"),
    pytest.param("similarity_reward", "#### 12", "14", 50.0, id="similarity: '12' vs '14' = 2*1/4 = 0.5"),
    pytest.param("similarity_reward", "#### -5", "5", 100 * 2 / 3, id="similarity: '-5' vs '5' = 2*1/3"),
    pytest.param("similarity_reward", "", "14", 0.0, id="similarity: empty text"),
    pytest.param("similarity_reward", "ab", "14", 0.0, id="similarity: no number, the whole text is compared"),
    pytest.param("similarity_reward", "#### 14", None, None, id="similarity: no reference gives None"),
    # correctness_reward
    pytest.param("correctness_reward", "#### 14", "14", 1.0, id="correctness: right"),
    pytest.param("correctness_reward", "#### 15", "14", 0.0, id="correctness: wrong"),
    pytest.param("correctness_reward", "", "14", 0.0, id="correctness: empty text"),
    pytest.param("correctness_reward", "fourteen", "14", 0.0, id="correctness: no number"),
    pytest.param("correctness_reward", "#### 3\n#### 14", "14", 1.0,
                 id="correctness: several answers, the last counts"),
    pytest.param("correctness_reward", "#### 14\n#### 3", "14", 0.0, id="correctness: several answers, last one wrong"),
    pytest.param("correctness_reward", "<SOLUTION>1,000</SOLUTION>", "1000", 1.0, id="correctness: commas"),
    pytest.param("correctness_reward", "#### \u22123.50", "-3.5", 1.0, id="correctness: unicode minus and decimal"),
    pytest.param("correctness_reward", "#### 3.5", "-3.5", 0.0, id="correctness: the sign matters"),
    pytest.param("correctness_reward", "#### 14", 14, 1.0, id="correctness: an int reference"),
    pytest.param("correctness_reward", "#### " + HUGE, HUGE, 1.0, id="correctness: huge number"),
    pytest.param("correctness_reward", "#### " + HUGE, "5.5", 0.0, id="correctness: huge number vs decimal reference"),
    pytest.param("correctness_reward", "#### 14", None, None, id="correctness: no reference gives None"),
    # partial_credit_reward: max(0, 1 - |pred - gold| / max(|gold|, 1))
    pytest.param("partial_credit_reward", "#### 4", "4", 1.0, id="partial: exact"),
    pytest.param("partial_credit_reward", "#### 3", "4", 0.75, id="partial: 1 - 1/4 = 0.75"),
    pytest.param("partial_credit_reward", "#### -3", "-4", 0.75, id="partial: negatives, 1 - 1/|-4| = 0.75"),
    pytest.param("partial_credit_reward", "#### 2", "2.5", 0.8, id="partial: decimals, 1 - 0.5/2.5 = 0.8"),
    pytest.param("partial_credit_reward", "#### 0.5", "0", 0.5, id="partial: gold 0 uses max(|0|, 1): 1 - 0.5/1 = 0.5"),
    pytest.param("partial_credit_reward", "#### 3", "0", 0.0, id="partial: gold 0, max(0, 1 - 3/1) = 0"),
    pytest.param("partial_credit_reward", "#### 12", "4", 0.0, id="partial: floored at 0, 1 - 8/4 = -1"),
    pytest.param("partial_credit_reward", "#### 1,000", "1000", 1.0, id="partial: commas"),
    pytest.param("partial_credit_reward", "no number", "4", 0.0, id="partial: no answer gives 0"),
    pytest.param("partial_credit_reward", "#### " + HUGE, "5.5", 0.0, id="partial: huge number vs decimal"),
    pytest.param("partial_credit_reward", "#### 4", None, None, id="partial: no reference gives None"),
    # graded_correctness_reward: error = |pred - gold| / max(|gold|, 1)
    pytest.param("graded_correctness_reward", "#### 100", "100", 3.0, id="graded: exact"),
    pytest.param("graded_correctness_reward", "#### 95", "100", 1.5, id="graded: 5/100 = 0.05 is within 10 %"),
    pytest.param("graded_correctness_reward", "#### 110", "100", 1.5, id="graded: 10/100 = 0.10, the 10 % edge is in"),
    pytest.param("graded_correctness_reward", "#### 85", "100", 0.5, id="graded: 15/100 = 0.15 is within 20 %"),
    pytest.param("graded_correctness_reward", "#### 120", "100", 0.5, id="graded: 20/100 = 0.20, the 20 % edge is in"),
    pytest.param("graded_correctness_reward", "#### 79", "100", -0.5, id="graded: 21/100 = 0.21 is wrong"),
    pytest.param("graded_correctness_reward", "#### -95", "-100", 1.5, id="graded: negatives, 5/100"),
    pytest.param("graded_correctness_reward", "#### 0.05", "0", 1.5, id="graded: gold 0, 0.05/max(0, 1)"),
    pytest.param("graded_correctness_reward", "", "100", -0.5, id="graded: empty text is wrong"),
    pytest.param("graded_correctness_reward", "#### " + HUGE, "5.5", -0.5, id="graded: huge number vs decimal"),
    pytest.param("graded_correctness_reward", "#### 100", None, None, id="graded: no reference gives None"),
    # format_exact_reward
    pytest.param("format_exact_reward", GOOD, "14", 3.0, id="format_exact: the full format"),
    pytest.param("format_exact_reward", f"\n {GOOD} </response>\n", "14", 3.0, id="format_exact: whitespace, stop tag"),
    pytest.param("format_exact_reward", GOOD, None, 3.0, id="format_exact: needs no reference"),
    pytest.param("format_exact_reward", GOOD + " so 14", "14", 0.0, id="format_exact: text after </SOLUTION>"),
    pytest.param("format_exact_reward", "<SOLUTION>14</SOLUTION>", "14", 0.0, id="format_exact: no reasoning section"),
    pytest.param("format_exact_reward", "<start_working_out><end_working_out><SOLUTION>14</SOLUTION>", "14", 0.0,
                 id="format_exact: empty reasoning"),
    pytest.param("format_exact_reward", "", "14", 0.0, id="format_exact: empty text"),
    # format_approx_reward: +0.5 per tag seen exactly once, -0.5 otherwise
    pytest.param("format_approx_reward", GOOD, "14", 2.0, id="format_approx: 4 * 0.5 = 2"),
    pytest.param("format_approx_reward", "", "14", -2.0, id="format_approx: empty, 4 * -0.5 = -2"),
    pytest.param("format_approx_reward", "<SOLUTION>14</SOLUTION>", "14", 0.0,
                 id="format_approx: only the solution tags, 2 * 0.5 - 2 * 0.5 = 0"),
    pytest.param("format_approx_reward", GOOD + "<SOLUTION>3</SOLUTION>", "14", 0.0,
                 id="format_approx: solution tags twice, 2 * 0.5 - 2 * 0.5 = 0"),
    # number_extraction_reward
    pytest.param("number_extraction_reward", "<SOLUTION>$1,000</SOLUTION>", "14", 1.5, id="number_extraction: number"),
    pytest.param("number_extraction_reward", "<SOLUTION>fourteen</SOLUTION>", "14", 0.0, id="number_extraction: words"),
    pytest.param("number_extraction_reward", "<SOLUTION>14", "14", 0.0, id="number_extraction: unclosed tag"),
    pytest.param("number_extraction_reward", "<SOLUTION>3</SOLUTION><SOLUTION>?</SOLUTION>", "14", 0.0,
                 id="number_extraction: the last section counts"),
    pytest.param("number_extraction_reward", "", None, 0.0, id="number_extraction: empty text, no reference"),
    # hybrid_reward, weights in HYBRID_WEIGHTS
    pytest.param("hybrid_reward", "", "14", 0.0, id="hybrid: empty text, quality of no words is 0"),
    pytest.param("hybrid_reward", "one two three", "14", 0.25, id="hybrid: no answer, quality 0.25 * 3/3 distinct"),
    pytest.param("hybrid_reward", "so so so so", "14", 0.1125,
                 id="hybrid: repetition, 0.25 * 1/4 distinct + 0.05 for the step word 'so'"),
    pytest.param("hybrid_reward", "#### 14", "14", 2.1, id="hybrid: right, 2 + 0.1 for a number"),
    pytest.param("hybrid_reward", GOOD, "14", 3.1,
                 id="hybrid: 2 right + 0.25 math + 0.5 format + 0.1 number + 0.25 calculation = 3.1"),
    pytest.param("hybrid_reward", GOOD, "15", 1.1, id="hybrid: wrong, the same bonuses 3.1 - 2 = 1.1"),
    pytest.param("hybrid_reward", GOOD, None, 1.1, id="hybrid: no reference, bonuses only"),
    pytest.param("hybrid_reward", HYBRID_MAX, "14", 3.6,
                 id="hybrid: the maximum, 2 + 0.25 + 0.25 + 0.25 (6 step words, capped) + 0.5 + 0.1 + 0.25 = 3.6"),
    # stop_tag_bonus
    pytest.param("stop_tag_bonus", "14 </response>", "14", 0.5, id="stop_tag: closes with </response>"),
    pytest.param("stop_tag_bonus", "14 </response>\n  ", None, 0.5, id="stop_tag: trailing whitespace is fine"),
    pytest.param("stop_tag_bonus", "</response> 14", "14", 0.0, id="stop_tag: text after the tag"),
    pytest.param("stop_tag_bonus", "", "14", 0.0, id="stop_tag: empty text"),
]


def test_reward_cases_cover_every_registered_reward():
    # A reward added to REWARDS without cases here would go unchecked.
    assert {p.values[0] for p in REWARD_CASES} == set(REWARDS)


@pytest.mark.parametrize("name, completion, answer, expected", REWARD_CASES)
def test_reward_value(name, completion, answer, expected):
    func = REWARDS[name]
    for batch in ([completion], [chat(completion)]):  # plain and conversational alike
        (value,) = func(batch, answer=[answer])
        if expected is None:
            assert value is None
        else:
            assert value == pytest.approx(expected)
            assert_in_documented_range(func, value)


# Every reward on the same edge cases. Columns, in this order:
EDGE_COLUMNS = (
    "unique_chars_reward", "similarity_reward", "correctness_reward", "partial_credit_reward",
    "graded_correctness_reward", "format_exact_reward", "format_approx_reward",
    "number_extraction_reward", "hybrid_reward", "stop_tag_bonus",
)
EDGE_CASES = [
    # completion, answer,  (uniq, sim, correct, partial, graded, f_exact, f_approx, num_ext, hybrid, stop)
    pytest.param("", "14", (0, 0, 0, 0, -0.5, 0, -2, 0, 0, 0), id="empty text"),
    # hybrid: no answer, so quality 0.25 * 1/1 distinct words
    pytest.param("fourteen", "14", (7, 0, 0, 0, -0.5, 0, -2, 0, 0.25, 0), id="no number"),
    # uniq {#, space, 3, newline, 1, 4}; hybrid 2 right + 0.1 a number
    pytest.param("#### 3\n#### 14", "14", (6, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="several answers, the last is right"),
    # sim '14' vs '3' share nothing; partial 1 - 11/14 = 3/14; hybrid 0.1 a number
    pytest.param("#### 14\n#### 3", "14", (6, 0, 0, 3 / 14, -0.5, 0, -2, 0, 0.1, 0),
                 id="several answers, the last is wrong"),
    # f_approx 2 tags once, 2 missing: 0; hybrid 2 + 0.1
    pytest.param("<SOLUTION>1,000</SOLUTION>", "1000", (13, 100, 1, 1, 3, 0, 0, 1.5, 2.1, 0), id="commas"),
    # sim '1100' vs '1000' share '100': 2*3/8 = 75; partial 1 - 100/1000 = 0.9; graded 0.10 is within 10 %
    pytest.param("<SOLUTION>1,100</SOLUTION>", "1000", (13, 75, 0, 0.9, 1.5, 0, 0, 1.5, 0.1, 0),
                 id="commas, off by 10 %"),
    pytest.param("#### -14", "-14", (5, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="negative"),
    # sim '14' vs '-14': 2*2/5 = 80; partial max(0, 1 - 28/14) = 0
    pytest.param("#### 14", "-14", (4, 80, 0, 0, -0.5, 0, -2, 0, 0.1, 0), id="negative, sign missing"),
    pytest.param("The answer is 2.50", "2.5", (14, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="decimal, trailing zero"),
    # sim '2.4' vs '2.5': 2*2/6; partial 1 - 0.1/2.5 = 0.96; graded 0.04 is within 10 %
    pytest.param("The answer is 2.4", "2.5", (13, 200 / 3, 0, 0.96, 1.5, 0, -2, 0, 0.1, 0), id="decimal, near miss"),
    pytest.param("#### " + HUGE, HUGE, (3, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="huge number, right"),
    # 20 digits, one apart: not correct, as integers compare exactly; sim 2*19/40 = 95;
    # partial 1 - 1/12345678901234567890 rounds to 1.0, and graded's error 8e-20 is within 10 %
    pytest.param("#### 12345678901234567891", "12345678901234567890", (12, 95, 0, 1, 1.5, 0, -2, 0, 0.1, 0),
                 id="huge number, last digit wrong"),
    pytest.param("#### \u221214", "-14", (5, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="unicode minus"),
    pytest.param("#### \u0661\u0664", "14", (4, 100, 1, 1, 3, 0, -2, 0, 2.1, 0), id="unicode Arabic-Indic digits"),
]


def test_edge_columns_are_every_registered_reward():
    assert sorted(EDGE_COLUMNS) == sorted(REWARDS)


@pytest.mark.parametrize("completion, answer, expected", EDGE_CASES)
def test_every_reward_on_edge_cases(completion, answer, expected):
    for name, value in zip(EDGE_COLUMNS, expected):
        func = REWARDS[name]
        for batch in ([completion], [chat(completion)]):  # plain and conversational alike
            (got,) = func(batch, answer=[answer])
            assert got == pytest.approx(value), name
            assert_in_documented_range(func, got)


def test_hybrid_maximum_is_the_sum_of_the_weights_it_can_earn_together():
    # "quality" is paid only when no answer is extracted, "correct" only when one is.
    assert sum(HYBRID_WEIGHTS.values()) - HYBRID_WEIGHTS["quality"] == pytest.approx(3.6)
    assert documented_range(REWARDS["hybrid_reward"]) == ("interval", 0.0, 3.6)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_reward_without_reference(name):
    # TRL skips None; a reward that needs no reference still grades.
    out = REWARDS[name]([GOOD, "", chat("#### 3")], answer=None)
    assert len(out) == 3
    if name in NEEDS_ANSWER:
        assert out == [None, None, None]
    else:
        assert all(isinstance(v, float) for v in out)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_reward_batch_shapes(name):
    func = REWARDS[name]
    texts = ["#### 14", "#### 3", GOOD]
    # A single reference is broadcast to every completion.
    assert func(texts, answer="14") == func(texts, answer=["14", "14", "14"])
    # A None inside the answer column only blanks that completion.
    mixed = func(texts, answer=["14", None, "14"])
    full = func(texts, answer=["14", "14", "14"])
    assert mixed[0] == full[0] and mixed[2] == full[2]
    assert (mixed[1] is None) == (name in NEEDS_ANSWER)
    assert func([], answer=[]) == []


def test_correctness_reward_docstring_example():
    assert correctness_reward(["... so she has <SOLUTION>1,000</SOLUTION>"], answer=["1000"]) == [1.0]


# ---------------------------------------------------------------------------- combine_rewards

# correctness_reward with answer "4":  [1, 0, 1, 0]
# stop_tag_bonus:                      [0, 0.5, 0.5, 0]
BATCH = ["#### 4", "#### 3 </response>", "#### 4 </response>", "no answer"]
R2 = math.sqrt(2)
COMBINE_CASES = [
    # mean of the two
    pytest.param("uniform", [0.5, 0.25, 0.75, 0.0], id="uniform: (1 + 0)/2, (0 + 0.5)/2, (1 + 0.5)/2, 0"),
    # std 0.5 and 0.25, 1/std = 2 and 4, weights 1/3 and 2/3
    pytest.param("std", [1 / 3, 1 / 3, 2 / 3, 0.0], id="std: 1/3*1, 2/3*0.5, 1/3 + 2/3*0.5, 0"),
    # L2 norms sqrt(1 + 1) and sqrt(0.25 + 0.25) = 1/sqrt(2)
    pytest.param("l2", [1 / R2, R2 / 2, 1 / R2 + R2 / 2, 0.0], id="l2: 1/sqrt2, 0.5*sqrt2, their sum, 0"),
    # centered columns are orthogonal, variances 0.25 > 0.0625, so the component is (1, 0)
    pytest.param("pca", [1.0, 0.0, 1.0, 0.0], id="pca: the higher-variance reward alone"),
]


@pytest.mark.parametrize("method, expected", COMBINE_CASES)
def test_combine_rewards_values(method, expected):
    combined = combine_rewards([correctness_reward, stop_tag_bonus], method)
    assert combined(BATCH, answer="4") == pytest.approx(expected)


def test_combine_rewards_pca_projects_on_the_shared_direction():
    # correctness [1, 0], number_extraction [1.5, 0]: they move together, so the first component
    # is their direction and the first row's projection is its length, sqrt(1^2 + 1.5^2) = sqrt(3.25)
    combined = combine_rewards([correctness_reward, number_extraction_reward], "pca")
    assert combined(["<SOLUTION>14</SOLUTION>", "no"], answer="14") == pytest.approx([math.sqrt(3.25), 0.0])


NONE_CASES = [
    # row 2 has no correctness; stop_tag_bonus alone is 0.5, its weight renormalized to 1
    pytest.param("uniform", 0.5, id="uniform: the present reward's value"),
    pytest.param("std", 0.5, id="std: the present reward's value"),
    # stop_tag_bonus column has no None, norm 1/sqrt(2): 0.5 * sqrt(2)
    pytest.param("l2", R2 / 2, id="l2: the present reward over its norm"),
]


@pytest.mark.parametrize("method, row2", NONE_CASES)
def test_combine_rewards_drops_a_none(method, row2):
    combined = combine_rewards([correctness_reward, stop_tag_bonus], method)
    out = combined(BATCH, answer=["4", None, "4", "4"])
    assert out[1] == pytest.approx(row2)


@pytest.mark.parametrize("method", CombinedReward.METHODS)
def test_combine_rewards_all_none_gives_none(method):
    # no reference: both rewards give None for every completion
    combined = combine_rewards([correctness_reward, REWARDS["partial_credit_reward"]], method)
    assert combined(BATCH, answer=None) == [None] * 4


@pytest.mark.parametrize("method", CombinedReward.METHODS)
def test_combine_rewards_has_its_name_and_pickles(method):
    # TRL logs rewards/<__name__>/mean, and multiprocessing pickles reward functions
    combined = combine_rewards([correctness_reward, stop_tag_bonus], method, name="gsm8k_mix")
    assert combined.__name__ == "gsm8k_mix"
    assert combine_rewards([correctness_reward], method).__name__ == f"combined_{method}_reward"
    restored = pickle.loads(pickle.dumps(combined))
    assert restored.__name__ == "gsm8k_mix"
    assert restored(BATCH, answer="4") == combined(BATCH, answer="4")


def test_combine_rewards_rejects_unknown_method_and_no_functions():
    with pytest.raises(ValueError, match="unknown combine method 'median'.*uniform.*std.*pca.*l2"):
        combine_rewards([correctness_reward], "median")
    with pytest.raises(ValueError, match="at least one reward"):
        combine_rewards([], "uniform")


# ---------------------------------------------------------------------------- fuzz

# Pieces that reach the extraction and format code, which st.text() alone rarely does.
FRAGMENTS = st.sampled_from([
    "####", " ", "\n", "1", "0", "7", ",", ".", "-", "\u2212", "$", "%", "=", "*", "x", "answer is",
    "A:", "<SOLUTION>", "</SOLUTION>", "<start_working_out>", "<end_working_out>", "</response>",
    "\\boxed{", "{", "}", "\u0663", "so", "then", HUGE, "1" * 4400,
])
TEXTS = st.one_of(st.text(), st.lists(FRAGMENTS, max_size=25).map("".join))
ANSWERS = st.one_of(st.none(), st.sampled_from(["14", "-3.5", "0", "1,000", "5.5", HUGE]), st.text(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(TEXTS, max_size=4), answer=ANSWERS, conversational=st.booleans())
def test_no_reward_raises_on_arbitrary_text(texts, answer, conversational):
    completions = [chat(t) for t in texts] if conversational else texts
    for name, func in REWARDS.items():
        out = func(completions, answer=answer)
        assert len(out) == len(completions), name
        for value in out:
            if answer is None and name in NEEDS_ANSWER:
                assert value is None, name
            else:
                assert_in_documented_range(func, value)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4), answer=ANSWERS, method=st.sampled_from(CombinedReward.METHODS))
def test_combined_rewards_do_not_raise_on_arbitrary_text(texts, answer, method):
    out = combine_rewards(list(REWARDS.values()), method)(texts, answer=answer)
    assert len(out) == len(texts)
    # the rewards that need no reference always grade, so no completion is left without a value
    assert all(isinstance(v, float) and math.isfinite(v) for v in out)


# ---------------------------------------------------------------------------- registry

def test_registry_keys_are_function_names():
    # the key is the metric name TRL logs, rewards/<__name__>/mean
    assert all(name == func.__name__ for name, func in REWARDS.items())


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_reward_docstring_is_one_line_with_its_range(name):
    doc = REWARDS[name].__doc__
    assert doc and "\n" not in doc.strip() and "Range" in doc
    documented_range(REWARDS[name])  # and the range parses


def test_get_reward_funcs():
    assert get_reward_funcs(["correctness_reward", "stop_tag_bonus"]) == [correctness_reward, stop_tag_bonus]
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['no_such_reward'\]; available: .*correctness"):
        get_reward_funcs(["correctness_reward", "no_such_reward"])


def test_gsm8k_weights_name_registered_rewards():
    assert set(GSM8K_REWARD_WEIGHTS) <= set(REWARDS)
    assert get_reward_funcs(list(GSM8K_REWARD_WEIGHTS))  # the recipe resolves as it is


# ---------------------------------------------------------------------------- real GSM8K solutions

FINAL_FORMS = [
    pytest.param(None, id="the solution as it is, with its #### line"),
    pytest.param("\\boxed{{{n}}}", id="boxed"),
    pytest.param("The answer is {n}.", id="answer is"),
    pytest.param("<SOLUTION>{n}</SOLUTION>", id="solution tags"),
    pytest.param("A: {n}", id="A: on its own line"),
    pytest.param("{n} </response>", id="stop tag"),
]


@pytest.mark.parametrize("form", FINAL_FORMS)
def test_extract_answer_on_every_gsm8k_test_solution(gsm8k_dir, form):
    with open(os.path.join(gsm8k_dir, "test.jsonl"), encoding="utf-8") as f:
        solutions = [json.loads(line)["answer"] for line in f if line.strip()]
    assert len(solutions) == 1319
    wrong = []
    for solution in solutions:
        reasoning, final = solution.rsplit("####", 1)  # reasoning ends in "\n", so forms start a line
        gold = normalize_number(final)
        assert gold is not None
        text = solution if form is None else reasoning + form.format(n=final.strip())
        if extract_answer(text) != gold:
            wrong.append((text[-120:], extract_answer(text), gold))
    assert wrong == []

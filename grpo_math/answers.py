"""Finding the final answer in a completion, and grading it: the two steps every reward and every
evaluation share, so that the training reward and the reported accuracy cannot drift apart.

    extract_answer(text) -> "42" or None   the final number: "#### N", <SOLUTION>N</SOLUTION>,
                                           \\boxed{N}, "The answer is N", "A: N", else the last number
    normalize_number(text) -> "1000"       "$1,000.00" and "1000" read the same
    is_correct(pred, gold) -> bool          numeric comparison, with a relative tolerance
    relative_error(pred, gold) -> float     |pred - gold| / max(|gold|, 1), for partial credit
    grade(text, gold, style, tokens)        an evaluated completion's record: lenient and strict
                                            answers (strict_answer: only in the prompt's form), each graded
    answer_part(text)                       what every one of them reads: the text after a </think>
                                            (Qwen3's thinking, with --thinking), nothing while still thinking

Also the tags of the answer format the chat prompts ask for (agents.SYSTEM_PROMPT) and the stop tag
of the XML prompt form. rewards.py turns these into rewards.

>>> extract_answer("Half of 36 is 18. #### 18 cups")
'18'
>>> is_correct("18.0", "18")
True
"""

import math
import re
import unicodedata
from decimal import Decimal

# The structured answer format the chat prompts ask for (see agents.SYSTEM_PROMPT).
REASONING_START = "<start_working_out>"
REASONING_END = "<end_working_out>"
SOLUTION_START = "<SOLUTION>"
SOLUTION_END = "</SOLUTION>"
STOP_TAG = "</response>"  # what the XML-tag prompt form ends its answer with
THINK_START, THINK_END = "<think>", "</think>"  # Qwen3's thinking, with --thinking (grpo_math/families.py)

# A number's digits: thousands commas, decimals, a percent sign. _numbers() adds the sign and
# currency in front by hand, which is several times faster than one regex that tries both.
NUMBER_RE = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?%?")
_PREFIX_CHARS = "$-+\u2212"
# Where a final answer is announced, strongest first: (pattern, which number of the span to take).
# "#### 18 cups" and "the answer is 18 dollars" give the first number after them; a <SOLUTION>
# or \\boxed{} span may hold a calculation ("5 + 3 = 8"), so its last number is the answer.
# Text that ends in </response> needs no pattern: it is cut at the tag, and then the last number
# is the answer, as in the fallback.
_FINAL_ANSWER_PATTERNS = [
    # (a substring the form needs, cheap to test first; the pattern; which number to take)
    ("####", re.compile(r"####\s*([^\n]*)"), 0),
    (SOLUTION_START, re.compile(re.escape(SOLUTION_START) + r"(.*?)" + re.escape(SOLUTION_END), re.DOTALL), -1),
    ("boxed", re.compile(r"\\boxed\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}"), -1),
    ("nswer", re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE), 0),
    ("A:", re.compile(r"^\s*A:\s*([^\n]*)", re.MULTILINE), 0),  # "Job A: 5" is no answer
]
SOLUTION_RE = _FINAL_ANSWER_PATTERNS[1][1]  # the <SOLUTION> span
_SOLUTION_SPAN_RE = re.compile(re.escape(SOLUTION_START) + r".*?" + re.escape(SOLUTION_END), re.DOTALL)  # tags and all


def completion_text(completion):
    """The text of one completion: a string, or the content of the model's last chat message. With tools
    (--tools), a completion is several turns, and a tool's result is never read as the model's answer."""
    if isinstance(completion, str):
        return answer_part(completion)
    if isinstance(completion, dict):
        return answer_part(str(completion.get("content") or ""))
    if isinstance(completion, (list, tuple)):
        own = [m for m in completion if not isinstance(m, dict) or m.get("role", "assistant") == "assistant"]
        return completion_text(own[-1]) if own else ""
    return ""


def answer_part(text):
    """What follows a completion's thinking, which is all that is graded: the text after its last </think>.
    A completion that opened <think> and never closed it ran out of tokens while thinking: no answer."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    return "" if THINK_START in text else text


def _numbers(text):
    """Every number in ``text`` with its sign and currency: '-$1,000.50 or 7%' -> ['-$1,000.50', '7%']."""
    found = []
    for m in NUMBER_RE.finditer(text):
        i = m.start()
        if i and text[i - 1] == "." and not text[i - 2 : i - 1].isdigit():
            i -= 1  # ".5"
        j = i
        while j and i - j < 2 and text[j - 1] in _PREFIX_CHARS:
            j -= 1
        if j < i and text[j - 1 : j].isalnum():
            j = i  # "5-3" is a subtraction, not a negative 3
        found.append(text[j : m.end()])
    return found


def normalize_number(text):
    """'$1,000.00' -> '1000', '-3.50' -> '-3.5', '+7%' -> '7'; None if ``text`` holds no number."""
    if text is None:
        return None
    numbers = _numbers(str(text))
    if not numbers:
        return None
    s = numbers[0]
    if not s.isascii():  # digits of other scripts (Arabic-Indic, full-width) become 0-9
        s = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in s)
    negative = "-" in s or "\u2212" in s
    whole, _, frac = re.sub(r"[^\d.]", "", s).partition(".")
    digits = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "-" + digits if negative and digits != "0" else digits


def extract_answer(text):
    """The final answer in ``text`` as a normalized number string, or None if it holds no number.

    Looks, in order, for ``#### N``, ``<SOLUTION>N</SOLUTION>``, ``\\boxed{N}``, "The answer is N",
    "A: N" at the start of a line; the last occurrence of a form wins. Otherwise it falls back to
    the last number. Text after a ``</response>`` stop tag is ignored, so "... 14 </response>" gives 14.
    """
    text = completion_text(text).split(STOP_TAG, 1)[0]  # nothing after the stop tag counts
    for needle, pattern, which in _FINAL_ANSWER_PATTERNS:
        if needle not in text and (needle != "nswer" or "NSWER" not in text):
            continue
        for span in reversed(pattern.findall(text)):
            numbers = _numbers(span)
            if numbers:
                return normalize_number(numbers[which])
    numbers = _numbers(text)
    return normalize_number(numbers[-1]) if numbers else None


def _to_number(s):
    """int for integer strings (exact even when huge), else float; None if unparseable."""
    if s is None:
        return None
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return None


def is_correct(pred, gold, rel_tol=1e-6):
    """Numeric equality with a small relative tolerance: '1,000' equals '1000.00'; integers exactly."""
    p, g = normalize_number(pred), normalize_number(gold)
    if p is None or g is None:
        return False
    if "." not in p and "." not in g:
        return p == g  # normalized integer strings are canonical, so this is exact at any size
    # Decimal, not float: a float overflows past 1e308, where isclose() raised or called inf == inf.
    p, g = Decimal(p), Decimal(g)
    return abs(p - g) <= max(Decimal(rel_tol) * max(abs(p), abs(g)), Decimal("1e-9"))


def relative_error(pred, gold):
    """|pred - gold| / max(|gold|, 1), so a gold of 0 is graded on the absolute error."""
    p, g = _to_number(normalize_number(pred)), _to_number(normalize_number(gold))
    if p is None or g is None:
        return math.inf
    try:
        return abs(float(p) - float(g)) / max(abs(float(g)), 1.0)
    except OverflowError:
        return 0.0 if p == g else math.inf


def strict_answer(text, style):
    """The answer only when given in the prompt's required form, else None."""
    text = answer_part(text)
    if style == "chat":
        spans = _SOLUTION_SPAN_RE.findall(text)
        return extract_answer(spans[-1]) if spans else None
    return extract_answer(text) if STOP_TAG in text or "####" in text else None


def grade(text, gold, style, tokens):
    """One completion's record: its lenient and strict answers and whether each is right."""
    lenient, strict = extract_answer(text), strict_answer(text, style)
    return {"completion": text, "tokens": tokens, "answer": lenient, "correct": is_correct(lenient, gold),
            "strict_answer": strict, "strict_correct": strict is not None and is_correct(strict, gold)}

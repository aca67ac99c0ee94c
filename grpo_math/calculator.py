"""calculator: an arithmetic tool the policy calls during training, as GRPOTrainer(tools=[calculator]).

It reads numbers and + - * / // % ( ) ** with exact fractions (0.1 + 0.2 is 0.3), and the forms GSM8K
writes: 1,234 (thousands, in groups of three), 12.5% (0.125) and $30 (30). It never executes model
output: the text is parsed with ast.parse and only numbers and those operators are walked; names, calls,
attributes, strings, comparisons and everything else are refused, as is any non-ASCII character.
Because the text is read as Python, Python's other ways of writing a number work too: 0x10 (16), 0o17
(15), 0b101 (5), 1_000 (1000; also 1_0.5, which is 10.5), a comment (1 + 2 # apples is 3), and a line
break inside brackets or after a backslash.

Limits, so that every call returns in well under a millisecond whatever the model writes:
    MAX_LENGTH    characters, checked before anything is parsed
    MAX_DEPTH     nesting of the parsed expression
    MAX_VALUE     every intermediate numerator and denominator, so no number ever grows past 1e30
    MAX_EXPONENT  powers: whole exponents up to 64, and only when the result stays within MAX_VALUE
    TIME_LIMIT    a deadline checked at every node of the walk, in this thread's CPU time, so that a
                  busy machine does not refuse a valid expression (the limits above already bound it)

It never raises: a refusal or a mistake comes back as a short string starting with "error: ", which
the model reads as the tool's answer and can correct. A result is an integer ("42"), or a decimal
rounded to 6 places, halves away from zero, trailing zeros dropped ("3.5", "0.333333"); a non-zero
value that would round to 0 is shown to 6 significant digits instead ("1e-07").

A tool of your own:
    1. Write a plain function with type hints and a Google-style docstring: a one-line summary and an
       Args: section naming every argument. transformers turns these into the JSON schema the chat
       template shows the model (check it with transformers.utils.get_json_schema(fn)).
    2. Return a short string and never raise: an error is a string the model reads.
    3. Keep it fast and bounded: it runs inside every rollout, on whatever text the model wrote.
    4. Add it to the registry TOOLS in grpo_math/tools.py, so that --tools NAME finds it.
"""

import ast
import operator
import re
import time
import warnings
from fractions import Fraction

ERROR_PREFIX = "error: "
MAX_LENGTH = 200  # characters; a megabyte of digits or 10,000 parentheses never reaches the parser
MAX_DEPTH = 100  # a left-leaning sum 1+1+...+1 of 100 terms fits in MAX_LENGTH and is 100 deep
MAX_VALUE = 10**30  # bound on |numerator| and on denominator of every number, literals included
MAX_EXPONENT = 64  # |exponent| of **, and of the e in 1e30
TIME_LIMIT = 0.1  # seconds of CPU time
DECIMALS = 6  # places a non-integer result is rounded to
OPERATORS = "use numbers and + - * / // % ( ) **"
clock = time.thread_time  # CPU time of this thread: other threads and processes do not count

REFUSED = {ast.Call: "function calls are", ast.Attribute: "attributes are", ast.Compare: "comparisons are",
           ast.BoolOp: "and/or are", ast.IfExp: "if/else is", ast.Subscript: "indexing is",
           ast.List: "lists are", ast.JoinedStr: "f-strings are", ast.NamedExpr: "assignments (:=) are"}
SYMBOLS = {ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&", ast.MatMult: "@",
           ast.Invert: "~", ast.Not: "not"}
# 1,234 and 1,234,567.5: proper groups of three after 1 to 3 digits; any other comma is refused.
THOUSANDS = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?!\w|,\d)")
# 12.5% (the sign right after the number, no number or bracket after it) is 0.125; 17%5 stays modulo.
PERCENT = re.compile(r"(?<![\w.])((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)%(?!\s*[\w.(])")


class Refused(Exception):
    """What the model is told, after ERROR_PREFIX."""


def is_error(result: str) -> bool:
    return result.startswith(ERROR_PREFIX)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, such as "(12 + 8) * 3" or "1,234 * 12.5%".

    Args:
        expression: the arithmetic to do: numbers, + - * / // % ( ) and ** (small powers)
    """
    try:
        if isinstance(expression, (int, float)) and not isinstance(expression, bool):
            if isinstance(expression, int) and abs(expression) > MAX_VALUE:  # str() refuses 4,300+ digits
                raise Refused("a number is too large: the calculator works up to 1e30")
            expression = str(expression)  # {"expression": 42} is a number, not a mistake
        return format_number(evaluate(expression))
    except Refused as e:
        return ERROR_PREFIX + str(e)
    except Exception as e:  # a path the checks above missed: still an answer, never a crash
        return ERROR_PREFIX + f"could not evaluate ({type(e).__name__}); {OPERATORS}"


def evaluate(expression):
    """The exact value of EXPRESSION as a Fraction; raises Refused with the reason."""
    if not isinstance(expression, str):
        raise Refused(f"the expression must be a string, not {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise Refused(f"the expression is longer than {MAX_LENGTH} characters")
    if not expression.isascii():  # unicode digits (١٢٣, １２) and signs (×, ÷, €) alike
        odd = next(c for c in expression if not c.isascii())
        raise Refused(f"only ASCII digits and operators are allowed, not {odd!r}")
    if not expression.strip():
        raise Refused("the expression is empty")
    if "^" in expression:
        raise Refused("^ is not a power here; use ** for powers, as in 2 ** 10")
    text = THOUSANDS.sub(lambda m: m.group().replace(",", ""), expression.strip())  # " 2" is an indent
    if "," in text:
        raise Refused("a comma may only separate thousands, as in 1,234,567")
    text = re.sub(r"\$\s*(?=[\d.])", "", text)  # $30 is 30
    text = re.sub(r"(?<![\w.])0+(?=\d)", "", text)  # 08 is 8 (Python refuses leading zeros)
    text = PERCENT.sub(r"(\1/100)", text)
    try:
        with warnings.catch_warnings():  # ast.parse warns on forms such as "1if 1else 2"
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise Refused(f"not a valid arithmetic expression; {OPERATORS}") from None
    return walk(tree.body, text, 1, clock() + TIME_LIMIT)


def walk(node, text, depth, deadline):
    if depth > MAX_DEPTH:
        raise Refused(f"the expression is nested more than {MAX_DEPTH} deep")
    if clock() > deadline:
        raise Refused(f"the expression took longer than {TIME_LIMIT} s")
    if isinstance(node, ast.Constant):
        return checked(literal(node, text))
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        if type(node.op) not in OPERATIONS:
            symbol = SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise Refused(f"the operator {symbol} is not allowed; {OPERATORS}")
        children = [node.operand] if isinstance(node, ast.UnaryOp) else [node.left, node.right]
        operands = [walk(child, text, depth + 1, deadline) for child in children]
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and operands[1] == 0:
            raise Refused("modulo by zero" if isinstance(node.op, ast.Mod) else "division by zero")
        return checked(OPERATIONS[type(node.op)](*operands))
    if isinstance(node, ast.Name):
        raise Refused(f"names such as {node.id[:20]!r} are not allowed; {OPERATORS}")
    what = REFUSED.get(type(node), f"{type(node).__name__} expressions are")
    raise Refused(f"{what} not allowed; {OPERATORS}")


def literal(node, text):
    """A number literal as an exact Fraction, read from its source text (12.5 is 25/2, not a float)."""
    if type(node.value) is int:
        return Fraction(node.value)
    if type(node.value) is not float:
        raise Refused(f"only numbers are allowed, not {type(node.value).__name__}; {OPERATORS}")
    source = ast.get_source_segment(text, node)
    mantissa, _, exponent = source.lower().partition("e")
    if abs(int(exponent or 0)) > MAX_EXPONENT:  # Fraction("1e999999999") would compute 10**999999999
        raise Refused(f"{source[:20]} is out of range: the calculator works from 1e-30 to 1e30")
    return Fraction(mantissa) * Fraction(10) ** int(exponent or 0)


def power(base, exponent):
    if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
        raise Refused(f"a power must be a whole number from -{MAX_EXPONENT} to {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise Refused("zero to a negative power (division by zero)")
    # |base ** n| has at least (bits - 1) * n bits: refuse before computing what checked() would refuse.
    bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if (bits - 1) * abs(exponent.numerator) > MAX_VALUE.bit_length():
        raise Refused("a number is too large: the calculator works up to 1e30")
    return base ** exponent.numerator


OPERATIONS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: operator.mod, ast.Pow: power,
              ast.UAdd: operator.pos, ast.USub: operator.neg}


def checked(value):
    if abs(value.numerator) > MAX_VALUE:
        raise Refused("a number is too large: the calculator works up to 1e30")
    if value.denominator > MAX_VALUE:
        raise Refused("a number is too precise: the calculator works to 1e-30")
    return value


def format_number(value):
    """42, -7, 3.5, 0.333333: rounded half away from zero to DECIMALS places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    units = int(abs(value) * 10**DECIMALS + Fraction(1, 2))  # int() floors a positive number
    if units == 0:
        return format(float(value), f".{DECIMALS}g")  # 1e-07, not 0
    whole, part = divmod(units, 10**DECIMALS)
    digits = f"{whole}.{part:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return "-" + digits if value < 0 else digits

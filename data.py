"""Data: GSM8K from the hub or a local file, and generated GSM8K-style problems.

Both return a datasets.Dataset with three columns:
    question  the word problem
    cot       the worked reasoning (GSM8K's <<calculator>> annotations removed)
    answer    the final number as a normalized string ("1000", "-3.5")

    load_gsm8k()                                        # hub: openai/gsm8k, "main", train split
    load_gsm8k("../shared/data/gsm8k/test.jsonl")       # a local .jsonl / .json / .parquet file
    load_gsm8k("../shared/data/gsm8k", split="test")    # a folder holding test.jsonl
    load_gsm8k(GSM8K_SAMPLE)                            # the 48 rows shipped in gsm8k_sample/
    synthetic_problems(100, difficulty="hard", seed=1)  # 3-4 arithmetic steps each
    load_questions("../shared/data/gsm8k", "test", 200, 20, seed=0)  # evaluate.py's scored and calibration rows

A hub id that is not cached fails at once (hub.HubUnavailable) when the hub cannot be reached,
naming the shipped sample as the way to go on.
"""

import json
import os
import random
import re

from grpo_math import hub
from rewards import normalize_number

GSM8K_HUB_ID = "openai/gsm8k"
# The first 48 rows of GSM8K's train split, shipped with the kit (see gsm8k_sample/NOTICE.md): what
# --smoke reads on a machine that cannot reach the hub.
GSM8K_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_sample", "train.jsonl")
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


def parse_gsm8k_row(row, where="row"):
    """A raw {question, answer: "reasoning\\n#### N"} row -> {question, cot, answer}."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'question' and 'answer', got {type(row).__name__}")
    missing = [k for k in ("question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise ValueError(f"{where}: missing or empty field(s) {missing}; each row needs 'question' and 'answer' text")
    if "####" not in row["answer"]:
        raise ValueError(f"{where}: 'answer' has no '#### <number>' final line: {row['answer'][-80:]!r}")
    reasoning, final = row["answer"].rsplit("####", 1)
    answer = normalize_number(final)
    if answer is None:
        raise ValueError(f"{where}: the '####' line holds no number: {final.strip()!r}")
    return {
        "question": row["question"].strip(),
        "cot": _CALCULATOR_RE.sub("", reasoning).strip(),
        "answer": answer,
    }


def _read_local(path):
    """Raw rows of a .jsonl, .json or .parquet file. Any file that cannot be read gives a ValueError
    naming the file (and the row, for .jsonl), never a bare decoder traceback."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path, "rb") as f:  # bytes, decoded line by line, so that a bad byte has a row number
            for line in f:
                # Number rows, not lines (blank ones are skipped), as load_gsm8k's own errors do.
                where = f"{path}: row {len(rows) + 1}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{where}: not UTF-8 text: is it a binary file? "
                                     "Save it as UTF-8 JSON lines") from None
                if not text.strip():
                    continue
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        return rows
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (at byte {e.start}): is it a binary file? "
                             "Save it as a UTF-8 JSON list of rows") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return rows
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def _local_hint():
    """What to pass instead of a hub id that cannot be loaded: the shipped sample, by its shorter path."""
    sample = min(GSM8K_SAMPLE, os.path.relpath(GSM8K_SAMPLE), key=len)
    return (f"Give a local file instead: --dataset {sample} (48 rows shipped with the kit) "
            "or a GSM8K train.jsonl you downloaded.")


def load_gsm8k(source=GSM8K_HUB_ID, split="train", limit=None, seed=0):
    """GSM8K as a Dataset of {question, cot, answer}; ``limit`` takes a seeded random subset."""
    from datasets import Dataset

    source = os.fspath(source)  # a pathlib.Path as well
    if os.path.isdir(source):
        source = os.path.join(source, f"{split}.jsonl")
    if os.path.exists(source):
        raw, where = _read_local(source), source
    elif source.endswith((".jsonl", ".json", ".parquet")) or os.sep in source and not source.startswith(GSM8K_HUB_ID):
        raise FileNotFoundError(f"dataset file {source!r} does not exist; give a .jsonl, .json or .parquet file, "
                                f"a folder holding {split}.jsonl, or the hub id {GSM8K_HUB_ID}")
    else:
        from datasets import load_dataset

        hub.require(source, "dataset", "--dataset", _local_hint())
        raw, where = load_dataset(source, "main", split=split), f"{source}[{split}]"
    rows = [parse_gsm8k_row(r, f"{where}: row {i}") for i, r in enumerate(raw, 1)]
    if not rows:
        raise ValueError(f"{where}: no rows")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------- synthetic problems

# Stories: (subject, thing, opening with {n}). Steps are then chained onto the running quantity.
_STORIES = [
    ("Maya", "apples", "Maya picks {n} apples at the orchard."),
    ("Omar", "dollars", "Omar has saved {n} dollars."),
    ("The bakery", "cookies", "The bakery bakes {n} cookies in the morning."),
    ("Lena", "stickers", "Lena has a collection of {n} stickers."),
    ("The library", "books", "The library receives {n} new books."),
    ("Kai", "marbles", "Kai starts the day with {n} marbles."),
]
# Each step: (operation, sentences); {k} is the operand, {s} the subject, {w} the subject mid-sentence.
_STEPS = {
    "+": ["Then {w} gets {k} more {t}.", "Later, {k} more {t} are added.", "{s} finds another {k} {t}."],
    "-": ["{s} gives away {k} {t}.", "Then {k} {t} are used up.", "{s} loses {k} {t}."],
    "*": ["Then the number of {t} becomes {k} times as large.", "{s} ends up with {k} times as many {t}."],
    "/": ["{s} splits the {t} equally into {k} groups and keeps one group.",
          "Then the {t} are shared equally among {k} friends, and {w} keeps one share."],
}
_STEP_COUNTS = {"easy": (1, 1), "medium": (2, 2), "hard": (3, 4)}


def _apply(value, op, k):
    return {"+": value + k, "-": value - k, "*": value * k, "/": value // k}[op]


def _next_step(rng, value):
    """An operation and operand that keep the quantity a whole number between 1 and 100,000."""
    ops = ["+", "-", "*", "/"]
    rng.shuffle(ops)
    for op in ops:
        if op == "+":
            return op, rng.randint(2, 50)
        if op == "-" and value > 3:
            return op, rng.randint(2, value - 1)
        if op == "*" and value * 5 <= 100_000:
            return op, rng.randint(2, 5)
        divisors = [d for d in range(2, 11) if value % d == 0]
        if op == "/" and divisors:
            return op, rng.choice(divisors)
    return "+", rng.randint(2, 50)


def synthetic_problems(n, difficulty="easy", seed=0):
    """``n`` GSM8K-style problems with a computed answer, a ``cot`` and the ``expression`` it came
    from; easy = 1 step, medium = 2, hard = 3-4. The same seed gives the same problems."""
    from datasets import Dataset

    if difficulty not in _STEP_COUNTS:
        raise ValueError(f"difficulty must be one of {list(_STEP_COUNTS)}, got {difficulty!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"{seed}-{difficulty}")
    rows = []
    for _ in range(n):
        subject, thing, opening = rng.choice(_STORIES)
        who = "the" + subject[3:] if subject.startswith("The ") else subject
        value = rng.randint(5, 60)
        sentences, cot, expression = [opening.format(n=value)], [], str(value)
        for _ in range(rng.randint(*_STEP_COUNTS[difficulty])):
            op, k = _next_step(rng, value)
            new = _apply(value, op, k)
            sentences.append(rng.choice(_STEPS[op]).format(s=subject, w=who, k=k, t=thing))
            cot.append(f"{value} {op} {k} = {new}")
            expression = f"({expression} {'//' if op == '/' else op} {k})"
            value = new
        sentences.append(f"How many {thing} does {who} have now?")
        rows.append({
            "question": " ".join(sentences),
            "cot": "\n".join(cot),
            "answer": str(value),
            "expression": expression,
            "difficulty": difficulty,
        })
    return Dataset.from_list(rows)


def load_questions(dataset, split, n, calibration_n, seed):
    """(scored, calibration): disjoint slices of one seeded shuffle of the split, or of
    synthetic_problems(n + calibration_n, level, seed) for "synthetic:level"; rows keep their cot."""
    if dataset.startswith("synthetic:"):
        rows = synthetic_problems(n + calibration_n, dataset.split(":", 1)[1], seed=seed).to_list()
        return rows[:n], rows[n:]
    try:
        rows = load_gsm8k(dataset, split).to_list()
    except hub.HubUnavailable as e:
        raise SystemExit(str(e))  # it names --dataset itself
    except (ValueError, OSError) as e:  # OSError: a missing file, or the hub failing mid-download
        raise SystemExit(f"--dataset: {e}")
    if n + calibration_n > len(rows):
        raise SystemExit(f"{dataset} [{split}] has {len(rows)} questions, but --n {n} plus "
                         f"--calibration-n {calibration_n} needs {n + calibration_n}; lower one of them")
    random.Random(seed).shuffle(rows)
    return rows[:n], rows[n : n + calibration_n]


def split_held_out(rows, n_report, n_select, exclude=()):
    """(report, select, rest): the first ``n_report`` questions of ``rows`` for the figure reported after
    training, the next ``n_select`` for selecting the adapter kept during training (grpo_math/best.py),
    and the rows left to train on. No question is in two of them (a repeated question goes to the first
    part that takes it, and is dropped from the others); questions in ``exclude`` are held out of
    neither report nor select."""
    held, taken = [], set(exclude)
    for row in rows:
        if len(held) == n_report + n_select:
            break
        if row["question"] not in taken:
            held.append(row)
            taken.add(row["question"])
    held_questions = {row["question"] for row in held}
    rest = [row for row in rows if row["question"] not in held_questions]
    report, select = held[:n_report], held[n_report:]
    return report, select, rest


def synthetic_held_out(n_report, n_select, difficulty, seed, train_questions):
    """(report, select): generated problems of ``seed`` for the two held-out sets, none of them among
    ``train_questions`` nor in both (easy ones repeat: a one-step problem has few variants)."""
    if not n_report + n_select:
        return [], []
    n = 2 * (n_report + n_select) + 50
    report, select, _ = split_held_out(synthetic_problems(n, difficulty, seed=seed).to_list(), n_report, n_select,
                                       exclude=set(train_questions))
    if len(report) + len(select) < n_report + n_select:
        raise ValueError(f"only {len(report) + len(select)} generated {difficulty} problems differ from the training "
                         f"ones; lower --eval-examples ({n_report}) or --select-examples ({n_select})")
    return report, select

"""data.py: GSM8K from local files (good, malformed and unreadable), the shipped sample, a hub that
cannot be reached, and the generated problems.

One behaviour per case; each case's id says why it exists.
"""

import ast
import gzip
import json
import operator
import os
import re
import time

import pytest

from grpo_math import hub
from data import GSM8K_SAMPLE, load_gsm8k, synthetic_problems
from rewards import normalize_number

NUMBER_RE = re.compile(r"-?\d+(\.\d+)?")


def raw_final_answers(path):
    """The '#### N' values of a GSM8K file, normalized, read without data.py."""
    with open(path, encoding="utf-8") as f:
        return [normalize_number(json.loads(line)["answer"].rsplit("####", 1)[1]) for line in f if line.strip()]


# ---------------------------------------------------------------------------- load_gsm8k, shared files

def test_load_gsm8k_folder_and_split(gsm8k_dir):
    ds = load_gsm8k(gsm8k_dir, split="test")
    assert len(ds) == 1319
    assert ds.column_names == ["question", "cot", "answer"]
    assert ds["answer"] == raw_final_answers(os.path.join(gsm8k_dir, "test.jsonl"))


def test_load_gsm8k_file_path_matches_folder(gsm8k_dir):
    path = os.path.join(gsm8k_dir, "test.jsonl")
    assert load_gsm8k(path).to_list() == load_gsm8k(gsm8k_dir, split="test").to_list()


def test_load_gsm8k_rows_are_clean(gsm8k_dir):
    ds = load_gsm8k(gsm8k_dir, split="test")
    # calculator annotations such as <<16-3-4=9>> are removed, the reasoning stays
    assert not any("<<" in c or ">>" in c for c in ds["cot"])
    assert all(c and "####" not in c for c in ds["cot"])
    # answers are normalized: no commas, signs or trailing zeros ("1,450,000" in the file)
    assert all(NUMBER_RE.fullmatch(a) and normalize_number(a) == a for a in ds["answer"])
    assert "1450000" in ds["answer"]
    assert all(q == q.strip() and q for q in ds["question"])
    # the first row, by hand: "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day. ... #### 18"
    assert ds[0]["answer"] == "18"
    assert ds[0]["cot"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")


def test_load_gsm8k_limit_is_a_reproducible_subset(gsm8k_dir):
    full = load_gsm8k(gsm8k_dir, split="test")["question"]
    a = load_gsm8k(gsm8k_dir, split="test", limit=20, seed=1)["question"]
    b = load_gsm8k(gsm8k_dir, split="test", limit=20, seed=1)["question"]
    c = load_gsm8k(gsm8k_dir, split="test", limit=20, seed=2)["question"]
    assert len(a) == 20 and len(set(a)) == 20
    assert a == b  # same seed, same rows in the same order
    assert a != c  # another seed, another sample
    assert set(a) <= set(full)
    assert len(load_gsm8k(gsm8k_dir, split="test", limit=5000)) == 1319  # a limit past the end takes all


# ---------------------------------------------------------------------------- load_gsm8k, malformed files

GOOD_ROW = {"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}

MALFORMED_CASES = [
    # lines of the file; the row that is wrong is always the second one
    pytest.param([json.dumps(GOOD_ROW), '{"question": "Q", "answer": '], r"row 2: not valid JSON", id="bad JSON line"),
    pytest.param([json.dumps(GOOD_ROW), json.dumps({"question": "Q"})],
                 r"row 2: missing or empty field\(s\) \['answer'\]", id="missing field"),
    pytest.param([json.dumps(GOOD_ROW), json.dumps({"question": " ", "answer": "#### 4"})],
                 r"row 2: missing or empty field\(s\) \['question'\]", id="blank field"),
    pytest.param([json.dumps(GOOD_ROW), json.dumps({"question": "Q", "answer": "it is 4"})],
                 r"row 2: 'answer' has no '#### <number>' final line", id="no ####"),
    pytest.param([json.dumps(GOOD_ROW), json.dumps({"question": "Q", "answer": "so\n#### four"})],
                 r"row 2: the '####' line holds no number: 'four'", id="#### with no number"),
    pytest.param([json.dumps(GOOD_ROW), "[1, 2]"], r"row 2: expected an object", id="a row that is not an object"),
]


@pytest.mark.parametrize("lines, problem", MALFORMED_CASES)
def test_load_gsm8k_malformed_jsonl_names_file_row_and_problem(tmp_path, lines, problem):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .*" + problem):
        load_gsm8k(str(path))


@pytest.mark.parametrize("bad_line, problem", [
    pytest.param('{"question": "Q"', "not valid JSON", id="bad JSON"),
    pytest.param(json.dumps({"question": "Q"}), "missing or empty field", id="missing field"),
])
def test_load_gsm8k_row_numbers_agree_across_blank_lines(tmp_path, bad_line, problem):
    # good row, blank line, bad row: whatever is wrong with it, it is row 2 (it was row 3 for bad JSON)
    path = tmp_path / "gappy.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2: " + problem):
        load_gsm8k(str(path))


def test_load_gsm8k_takes_a_pathlib_path(tmp_path):
    # tmp_path and notebooks hand over pathlib.Path objects (these raised AttributeError)
    (tmp_path / "test.jsonl").write_text(json.dumps(GOOD_ROW) + "\n", encoding="utf-8")
    assert load_gsm8k(tmp_path / "test.jsonl")["answer"] == ["4"]
    assert load_gsm8k(tmp_path, split="test")["answer"] == ["4"]
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "missing.jsonl")


def test_load_gsm8k_reads_a_small_good_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n", encoding="utf-8")  # a blank line is skipped
    assert load_gsm8k(str(path)).to_list() == [{"question": "What is 2 + 2?", "cot": "2 + 2 = 4", "answer": "4"}]


def test_load_gsm8k_json_list_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD_ROW, {"question": "Q", "answer": "#### $1,000.00"}]), encoding="utf-8")
    assert load_gsm8k(str(path))["answer"] == ["4", "1000"]


FILE_ERRORS = [
    pytest.param("rows.json", json.dumps(GOOD_ROW), "expected a JSON list of rows", id="json file that is no list"),
    pytest.param("rows.csv", "question,answer\n", "unsupported file type", id="unsupported extension"),
    pytest.param("empty.jsonl", "\n", "no rows", id="file with no rows"),
]


@pytest.mark.parametrize("name, content, message", FILE_ERRORS)
def test_load_gsm8k_file_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        load_gsm8k(str(path))


UNREADABLE_FILES = [
    # (file name, bytes, what the message says after the file name)
    pytest.param("train.jsonl", gzip.compress(b'{"question": "Q", "answer": "#### 1"}\n' * 20),
                 r"row 1: not UTF-8 text: is it a binary file\? Save it as UTF-8 JSON lines",
                 id="a gzipped file named .jsonl"),
    pytest.param("rows.json", gzip.compress(json.dumps([GOOD_ROW]).encode()),
                 r"not UTF-8 text \(at byte 1\): is it a binary file\?", id="a gzipped file named .json"),
    pytest.param("rows.json", b'[{"question": "Q",\n  "answer": }]', r"not valid JSON \(.* at line 2, column 13\)",
                 id="a .json file that is not JSON"),
    pytest.param("rows.parquet", b"question,answer\n", r"not a readable parquet file \(.*magic bytes",
                 id="a .parquet file that is not parquet"),
]


@pytest.mark.parametrize("name, content, message", UNREADABLE_FILES)
def test_load_gsm8k_unreadable_file_names_the_file(tmp_path, name, content, message):
    # these were bare UnicodeDecodeError, JSONDecodeError and ArrowInvalid tracebacks, with no file name
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        load_gsm8k(str(path))


def test_load_gsm8k_non_utf8_line_names_its_row(tmp_path):
    # two good rows, a blank line, then a row saved as latin-1 ("café"): it is row 3, on line 4
    good = json.dumps(GOOD_ROW).encode()
    latin1 = json.dumps({"question": "A café sells 3 cakes. How many?", "answer": "#### 3"},
                        ensure_ascii=False).encode("latin-1")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good, good, b"", latin1, good]) + b"\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": row 3: not UTF-8 text"):
        load_gsm8k(str(path))


def test_shipped_sample_loads():
    # gsm8k_sample/train.jsonl: the first 48 rows of GSM8K's train split, for --smoke without a network
    assert os.path.isabs(GSM8K_SAMPLE) and os.path.isfile(GSM8K_SAMPLE)
    ds = load_gsm8k(GSM8K_SAMPLE)
    assert len(ds) == 48
    assert all(q and c and normalize_number(a) == a for q, c, a in zip(ds["question"], ds["cot"], ds["answer"]))
    assert ds[0]["answer"] == "72"  # Natalia's clips: 48 + 24
    for name in ("LICENSE", "NOTICE.md"):
        assert os.path.isfile(os.path.join(os.path.dirname(GSM8K_SAMPLE), name))


def test_shipped_sample_is_the_start_of_the_train_split(gsm8k_dir):
    with open(os.path.join(gsm8k_dir, "train.jsonl"), "rb") as f:
        head = [f.readline() for _ in range(48)]
    with open(GSM8K_SAMPLE, "rb") as f:
        assert f.readlines() == head  # byte for byte


def test_load_gsm8k_hub_id_offline_fails_fast_naming_the_sample(monkeypatch, tmp_path):
    # datasets would retry the hub for half a minute, then raise a ConnectionError traceback
    from huggingface_hub import constants
    import datasets.config

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # and no hub, should anything ask
    start = time.perf_counter()
    with pytest.raises(hub.HubUnavailable, match=r"--dataset 'gsm8k' .* offline mode is set \(HF_HUB_OFFLINE=1\)\. "
                                                 r"Give a local file instead: --dataset \S*gsm8k_sample/train\.jsonl"):
        load_gsm8k("gsm8k")
    assert time.perf_counter() - start < 5


MISSING_PATHS = [
    pytest.param("missing.jsonl", None, id="a file that is not there"),
    pytest.param("no_such_folder", None, id="a folder that is not there"),
    pytest.param("", "validation", id="a folder without the split's file"),
]


@pytest.mark.parametrize("name, split", MISSING_PATHS)
def test_load_gsm8k_missing_path(tmp_path, name, split):
    source = os.path.join(str(tmp_path), name) if name else str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gsm8k(source, split=split or "train")


def test_load_gsm8k_bad_limit(gsm8k_dir):
    with pytest.raises(ValueError, match="limit must be positive, got 0"):
        load_gsm8k(gsm8k_dir, split="test", limit=0)


# ---------------------------------------------------------------------------- synthetic_problems

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
COT_LINE_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def evaluate_expression(text):
    """The value of an expression of ints and +, -, *, //, parsed with ast; anything else is refused."""

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"not an int arithmetic expression: {ast.dump(node)}")

    return value(ast.parse(text, mode="eval").body)


def test_evaluate_expression_refuses_anything_else():
    # the checker itself: a call or a name must not slip through
    assert evaluate_expression("((7 + 3) // 2)") == 5
    for bad in ("__import__('os')", "x + 1", "2 ** 3", "1.5 + 1"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)


DIFFICULTIES = [
    pytest.param("easy", {1}, id="easy: 1 step"),
    pytest.param("medium", {2}, id="medium: 2 steps"),
    pytest.param("hard", {3, 4}, id="hard: 3 or 4 steps, both seen"),
]


@pytest.mark.parametrize("difficulty, steps", DIFFICULTIES)
def test_synthetic_problems(difficulty, steps):
    ds = synthetic_problems(60, difficulty=difficulty, seed=0)
    assert len(ds) == 60
    assert set(ds["difficulty"]) == {difficulty}
    seen_steps = set()
    for row in ds:
        # the answer, recomputed from the expression
        assert evaluate_expression(row["expression"]) == int(row["answer"])
        # and from the cot: "a op b = c" lines, each starting from the last one's result
        lines = row["cot"].split("\n")
        seen_steps.add(len(lines))
        value = None
        for line in lines:
            a, op, b, c = COT_LINE_RE.fullmatch(line).groups()
            a, b, c = int(a), int(b), int(c)
            assert value is None or a == value
            if op == "/":
                assert a % b == 0  # shared equally: no remainder
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert 1 <= c <= 100_000  # a whole, positive count
            value = c
        assert str(value) == row["answer"]
        # the question opens with the first quantity and asks for the count
        assert re.search(r"\d+", row["question"]).group() == lines[0].split()[0]
        assert row["question"].endswith("have now?")
    assert seen_steps == steps


def test_synthetic_problems_same_seed_same_problems():
    assert synthetic_problems(10, "hard", seed=7).to_list() == synthetic_problems(10, "hard", seed=7).to_list()


def test_synthetic_problems_different_seed_different_problems():
    assert synthetic_problems(10, "hard", seed=7)["question"] != synthetic_problems(10, "hard", seed=8)["question"]


SYNTHETIC_ERRORS = [
    pytest.param(5, "expert", "difficulty must be one of \\['easy', 'medium', 'hard'\\], got 'expert'",
                 id="bad difficulty"),
    pytest.param(0, "easy", "n must be positive, got 0", id="n = 0"),
    pytest.param(-3, "easy", "n must be positive, got -3", id="negative n"),
]


@pytest.mark.parametrize("n, difficulty, message", SYNTHETIC_ERRORS)
def test_synthetic_problems_errors(n, difficulty, message):
    with pytest.raises(ValueError, match=message):
        synthetic_problems(n, difficulty)

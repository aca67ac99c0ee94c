"""evaluate.py: grading, votes, consistency and pass@k on hand-built answers, report.py's tables on
them, then the script end to end on a tiny saved model, a tiny LoRA adapter and a small GSM8K-format
file, and quick_eval on the same model."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import report
from agents import get_agents
from models import add_lora, tiny_model_and_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "evaluate.py")


# ---------------------------------------------------------------------------- grading

@pytest.mark.parametrize("text, style, strict", [
    ("<start_working_out>2+3<end_working_out><SOLUTION>5</SOLUTION>", "chat", "5"),
    ("<SOLUTION>1</SOLUTION> no, <SOLUTION>$1,000</SOLUTION>", "chat", "1000"),  # the last one counts
    ("so the answer is 5", "chat", None),               # right number, wrong form: lenient only
    ("<SOLUTION>five</SOLUTION>", "chat", None),       # the tags hold no number
    ("3 + 2 = 5 </response>", "xml", "5"),               # closed with the stop tag
    ("3 + 2 = 5\n#### 5", "xml", "5"),
    ("3 + 2 = 5", "xml", None),                          # never closed
])
def test_strict_answer(text, style, strict):
    assert evaluate.strict_answer(text, style) == strict


def test_grade_strict_and_lenient():
    g = evaluate.grade("so the answer is 5", "5", "chat", tokens=6)
    assert (g["answer"], g["correct"], g["strict_answer"], g["strict_correct"]) == ("5", True, None, False)


def test_cut_at_stop_keeps_the_first_stop():
    assert evaluate.cut_at_stop("a 5 </response> b </response>", ("</response>",)) == "a 5 </response>"
    assert evaluate.cut_at_stop("no tag", ("</response>",)) == "no tag"


# ---------------------------------------------------------------------------- figures

def fake_records():
    """Four questions, three agents; a trailing comment gives each agent's lenient answer."""
    def sol(n):
        return f"<SOLUTION>{n}</SOLUTION>"

    rows = [
        ("5", [sol(5), sol(5), sol(7)]),                 # a 5, b 5, c 7
        ("3", [sol(3), sol(4), sol(4)]),                 # a 3, b 4, c 4
        ("8", [sol(8), sol(8), "so it is 8"]),           # a 8, b 8, c 8 (c not in the format)
        ("2", ["no number here", sol(6), sol(9)]),       # a None, b 6, c 9
    ]
    return [{"question": f"q{i}", "gold": gold,
             "agents": {name: [evaluate.grade(t, gold, "chat", tokens=10)] for name, t in zip("abc", texts)}}
            for i, (gold, texts) in enumerate(rows)]


def test_per_agent_accuracy_and_format():
    s = evaluate.score(fake_records())
    # a: right on q0, q1, q2 -> 3/4; b: q0, q2 -> 2/4; c: q2 only, and not in the format -> 1/4, strict 0/4
    assert {n: a["accuracy"] for n, a in s["agents"].items()} == {"a": 0.75, "b": 0.5, "c": 0.25}
    assert s["agents"]["c"]["strict_accuracy"] == 0.0
    # formats: a misses q3, c misses q2 -> 3/4 each; b always -> 4/4
    assert {n: a["format_rate"] for n, a in s["agents"].items()} == {"a": 0.75, "b": 1.0, "c": 0.75}
    assert (s["best_agent"], s["best_agent_accuracy"]) == ("a", 0.75)
    assert s["weighted_vote"] is None and s["pass_at_k"] is None and s["ensemble"] is None


def test_majority_vote_and_consistency():
    records = fake_records()
    s = evaluate.score(records)
    # votes: q0 5 (2 of 3) right; q1 4 (2 of 3) wrong; q2 8 right; q3 6 vs 9, a tie the first seen wins: wrong
    assert [r["vote"]["answer"] for r in records] == ["5", "4", "8", "6"]
    assert s["majority_vote"]["accuracy"] == 0.5
    # pairwise agreement of 3 answers (3 pairs): q0 1/3, q1 1/3, q2 3/3, q3 0/3 (None agrees with nothing)
    # mean (1/3 + 1/3 + 1 + 0) / 4 = 5/12
    assert s["consistency"] == pytest.approx(5 / 12)


def test_weighted_vote_uses_the_calibration_weights():
    records = fake_records()
    s = evaluate.score(records, weights={"a": 1.0, "b": 0.25, "c": 0.25})
    # q1: 3 gets 1.0 (a), 4 gets 0.25 + 0.25 = 0.5 (b, c): 3 wins, now right;
    # q3: 6 (0.25) ties 9 (0.25), the first seen wins: wrong. So q0, q1, q2 right: 3/4.
    assert [r["weighted_vote"]["answer"] for r in records] == ["5", "3", "8", "6"]
    assert s["weighted_vote"]["accuracy"] == 0.75
    assert s["weighted_vote"]["weights"] == {"a": 1.0, "b": 0.25, "c": 0.25}


def test_weighted_vote_with_all_zero_weights_counts_equally():
    # No agent right on the calibration slice: the weighted vote falls back to the plain vote.
    s = evaluate.score(fake_records(), weights={"a": 0.0, "b": 0.0, "c": 0.0})
    assert s["weighted_vote"]["equal_weights_fallback"] is True
    assert s["weighted_vote"]["accuracy"] == s["majority_vote"]["accuracy"] == 0.5


def test_pass_at_k_in_score():
    # One agent, two samples per question: q0 right once, q1 never.
    def grade(text):
        return evaluate.grade(text, "5", "chat", tokens=3)

    records = [{"question": "q0", "gold": "5", "agents": {"a": [grade("<SOLUTION>5</SOLUTION>"), grade("1")]}},
               {"question": "q1", "gold": "5", "agents": {"a": [grade("2"), grade("3")]}}]
    s = evaluate.score(records)
    # pass@1: q0 1/2, q1 0 -> 0.25; pass@2: q0 1, q1 0 -> 0.5
    assert s["pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert s["agents"]["a"]["accuracy"] == 0.25  # the mean over samples, = pass@1


def brute_pass_at_k(n, c, k):
    """The share of k-subsets of n samples (the first c right) holding a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k)), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        evaluate.pass_at_k(n, c, k)


# ---------------------------------------------------------------------------- reports

def fake_summary(weights):
    """fake_records scored, with the timings evaluate() adds."""
    s = evaluate.score(fake_records(), weights)
    for part in (*s["agents"].values(), s["majority_vote"], s["weighted_vote"]):
        part["seconds_per_question"] = 0.5
    return s


def test_compare_and_markdown():
    base = fake_summary({"a": 1.0, "b": 1.0, "c": 1.0})      # equal weights: the weighted vote is the plain one
    trained = fake_summary({"a": 1.0, "b": 0.25, "c": 0.25})  # a's vote wins q1: 3/4 (see above)
    assert [row[:2] for row in report.table_rows(trained)] == [
        ("agent a", 0.75), ("agent b", 0.5), ("agent c", 0.25), ("majority vote", 0.5), ("weighted vote", 0.75)]
    cmp = report.compare(base, trained)
    assert list(cmp) == ["agent a", "agent b", "agent c", "majority vote", "weighted vote", "consistency"]
    assert cmp["weighted vote"] == {"base": 0.5, "trained": 0.75, "delta": 0.25}
    assert cmp["agent a"]["delta"] == cmp["consistency"]["delta"] == 0
    config = {"model_name": "m", "adapter": "run", "n": 4, "dataset": "d", "split": "test", "seed": 0,
              "agents": {"a": "", "b": "", "c": ""}, "prompt_style": "chat", "samples": 1, "max_new_tokens": 8,
              "calibration_n": 2}
    text = report.markdown({"config": config, "runs": {"base": base, "trained": trained}, "comparison": cmp})
    assert text.startswith("# Evaluation of m + run\n")
    assert "| weighted vote | 50.0% | 75.0% | +25.0 pts |" in text
    assert "| agent c | 25.0% | 0.0% | 75.0% | 10 | 0.50 |" in text  # c's strict misses q2, its format q3
    assert "Vote weights (calibration accuracy): a 100.0%, b 25.0%, c 25.0%." in text


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model folder, a run folder with a LoRA adapter for it, and a 6-question GSM8K file."""
    root = tmp_path_factory.mktemp("eval")
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    peft_model = add_lora(model, rank=4)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so trained differs from base
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(root / "run")
    with open(root / "gsm8k.jsonl", "w") as f:
        for i in range(6):
            row = {"question": f"Kai has {i + 4} marbles and finds 3 more. How many marbles does he have?",
                   "answer": f"{i + 4} + 3 = <<{i + 4}+3={i + 7}>>{i + 7}\n#### {i + 7}"}
            f.write(json.dumps(row) + "\n")
    return {"model": str(root / "model"), "run": str(root / "run"), "data": str(root / "gsm8k.jsonl"),
            "tokenizer": tok, "peft_model": peft_model}


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


SUMMARY_KEYS = {"n", "agents", "best_agent", "best_agent_accuracy", "majority_vote", "weighted_vote", "ensemble",
                "consistency", "pass_at_k", "calibration", "questions"}
AGENT_KEYS = {"accuracy", "strict_accuracy", "format_rate", "mean_tokens", "seconds_per_question", "pass_at_k"}


def check_run(s, n, agents):
    assert set(s) == SUMMARY_KEYS
    assert s["n"] == n == len(s["questions"])
    assert list(s["agents"]) == agents
    assert all(set(a) == AGENT_KEYS for a in s["agents"].values())
    for key in ("majority_vote", "weighted_vote", "ensemble"):
        assert 0 <= s[key]["accuracy"] <= 1 and s[key]["seconds_per_question"] > 0
    assert 0 <= s["consistency"] <= 1
    assert s["calibration"]["n"] == 1 and set(s["calibration"]["accuracy"]) == set(agents)
    q = s["questions"][0]
    assert {"question", "gold", "agents", "vote", "weighted_vote", "ensemble", "consistency"} <= set(q)
    assert {"completion", "answer", "correct", "strict_answer", "strict_correct", "tokens"} <= set(q["agents"][agents[0]][0])
    assert 0 < q["ensemble"]["tokens"] <= 6


def test_end_to_end_base_model(saved, tmp_path):
    out = tmp_path / "out"
    r = run_script("--model-name", saved["model"], "--dataset", saved["data"], "--n", 2, "--calibration-n", 1,
                   "--agents", 2, "--max-new-tokens", 6, "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["eval.json", "eval.md", "eval.png"]  # no temp files left
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == {"config", "runs", "comparison"} and result["comparison"] is None
    assert list(result["runs"]) == ["base"]
    check_run(result["runs"]["base"], 2, ["step_by_step", "concise"])
    assert "| majority vote |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes().startswith(b"\x89PNG")


def test_end_to_end_compare_base(saved, tmp_path):
    out = tmp_path / "out"
    r = run_script("--model-name", saved["model"], "--adapter", saved["run"], "--compare-base",
                   "--dataset", saved["data"], "--n", 2, "--calibration-n", 1, "--agents", 2,
                   "--max-new-tokens", 6, "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    assert list(result["runs"]) == ["base", "trained"]
    for s in result["runs"].values():
        check_run(s, 2, ["step_by_step", "concise"])
    # the same questions in both runs, answered differently by the adapted model
    base, trained = (result["runs"][k]["questions"] for k in ("base", "trained"))
    assert [q["question"] for q in base] == [q["question"] for q in trained]
    assert [q["ensemble"]["completion"] for q in base] != [q["ensemble"]["completion"] for q in trained]
    cmp = result["comparison"]
    assert {"agent step_by_step", "majority vote", "weighted vote", "hidden-state ensemble", "consistency"} <= set(cmp)
    assert cmp["majority vote"]["delta"] == pytest.approx(cmp["majority vote"]["trained"] - cmp["majority vote"]["base"])
    assert "Original vs trained" in (out / "eval.md").read_text()


def test_bad_adapter_path_is_a_clear_error(saved, tmp_path):
    missing = tmp_path / "no-such-run"
    r = run_script("--model-name", saved["model"], "--adapter", missing, "--dataset", saved["data"],
                   "--out", tmp_path / "out")
    assert r.returncode != 0
    assert str(missing) in r.stderr and "adapter_config.json" in r.stderr and "run folder" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_existing_out_folder_is_refused(saved, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model-name", saved["model"], "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    assert evaluate.parse_args(["--model-name", saved["model"], "--out", str(out), "--overwrite"]).overwrite


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--samples", "2", "--temperature", "0"], "needs --temperature > 0"),
    (["--compare-base"], "pass --adapter"),
    (["--agents", "nonsense"], "unknown agent set"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model-name", "m", *flags])
    assert message in capsys.readouterr().err


def test_scored_and_calibration_questions_are_disjoint(saved):
    scored, calibration = evaluate.load_questions(saved["data"], "test", 3, 2, seed=0)
    assert len(scored) == 3 and len(calibration) == 2
    assert not {r["question"] for r in scored} & {r["question"] for r in calibration}
    # the scored questions do not depend on the size of the calibration slice
    assert evaluate.load_questions(saved["data"], "test", 3, 0, seed=0)[0] == scored
    with pytest.raises(SystemExit, match="lower one of them"):
        evaluate.load_questions(saved["data"], "test", 5, 2, seed=0)


def test_samples_report_pass_at_k(saved):
    # In-process, xml prompts, two sampled completions per agent: pass@1 and pass@2 per agent.
    model, tok = saved["peft_model"].eval(), saved["tokenizer"]
    scored, calibration = evaluate.load_questions(saved["data"], "test", 2, 0, seed=0)
    s = evaluate.evaluate(model, tok, scored, calibration, {"a": "Solve.", "b": "Be brief."}, style="xml",
                          max_new_tokens=4, samples=2, temperature=1.0, ensemble=False)
    assert set(s["pass_at_k"]) == {"1", "2"} and s["ensemble"] is None and s["weighted_vote"] is None
    assert all(len(q["agents"]["a"]) == 2 for q in s["questions"])
    assert s["agents"]["a"]["pass_at_k"]["1"] == s["agents"]["a"]["accuracy"]


def test_unreachable_hub_model_exits_before_loading(saved, tmp_path, monkeypatch, capsys):
    # a hub id with the hub switched off: one line naming the flag and a local option, not a half-minute
    # of retries and a traceback; nothing is loaded and --out is not created
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # and no hub, should anything ask
    monkeypatch.setattr(evaluate, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(evaluate, "load_gsm8k", lambda *a, **k: pytest.fail("the data was loaded"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model-name", "someorg/some-model", "--dataset", saved["data"], "--out", str(out)])
    message = str(e.value.code)
    assert message.startswith("--model-name 'someorg/some-model' is not a local path")
    assert "offline mode is set (HF_HUB_OFFLINE=1)" in message
    assert "local model folder" in message and "--model-name smollm2-135m-gguf" in message
    assert not out.exists()


def test_failed_model_load_leaves_no_out_folder(saved, tmp_path, monkeypatch):
    # the folder is made once the model has loaded, so a failed load leaves no empty one behind
    def broken(*args, **kwargs):
        raise OSError("not a model folder")

    monkeypatch.setattr(evaluate, "load_pretrained", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="not a model folder"):
        evaluate.main(["--model-name", saved["model"], "--dataset", saved["data"], "--n", "2",
                       "--calibration-n", "1", "--out", str(out)])
    assert not out.exists()


def test_unreachable_hub_dataset_is_a_clear_exit(tmp_path, monkeypatch):
    # load_questions turns HubUnavailable into one line, which names --dataset once
    from huggingface_hub import constants
    import datasets.config

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"^--dataset 'openai/gsm8k' is not a local path.*gsm8k_sample"):
        evaluate.load_questions("openai/gsm8k", "test", 2, 0, seed=0)


def test_quick_eval_grades_the_first_agent_as_evaluate_does(saved):
    # training's held-out check: the first agent's greedy answers, the same completions evaluate() gets
    model, tok = saved["peft_model"].eval(), saved["tokenizer"]
    rows = evaluate.load_questions(saved["data"], "test", 3, 0, seed=0)[0]
    r = evaluate.quick_eval(model, tok, rows, "2", "xml", max_new_tokens=4)
    first = next(iter(get_agents("2").items()))
    assert set(r) == {"n", "agent", "accuracy", "format_compliance", "records"}
    assert r["n"] == 3 and r["agent"] == first[1]
    assert [q["gold"] for q in r["records"]] == [row["answer"] for row in rows]
    assert r["accuracy"] == sum(q["correct"] for q in r["records"]) / 3
    assert r["format_compliance"] == sum(q["strict_answer"] is not None for q in r["records"]) / 3
    s = evaluate.evaluate(model, tok, rows, [], dict([first]), style="xml", max_new_tokens=4, ensemble=False)
    assert [q["completion"] for q in r["records"]] == [q["agents"][first[0]][0]["completion"] for q in s["questions"]]
    assert r["accuracy"] == s["agents"][first[0]]["accuracy"]

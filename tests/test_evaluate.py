"""evaluate.py: grading, votes, consistency and pass@k on hand-built answers, grpo_math/report.py's
tables on them, then the script end to end on a tiny saved model, a tiny LoRA adapter and a small
GSM8K-format file (with the matched-compute baselines, worked examples and the reference
perplexity), on generated problems, and quick_eval on the same model."""

import itertools
import json
import os
import re

import pytest
import torch

import evaluate
from agents import WORKED_EXAMPLES, get_agents
from conftest import forks
from data import synthetic_problems
from grpo_math import evaluation, report, scoring
from grpo_math.models import add_lora, tiny_model_and_tokenizer

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
    assert evaluation.cut_at_stop("a 5 </response> b </response>", ("</response>",)) == "a 5 </response>"
    assert evaluation.cut_at_stop("no tag", ("</response>",)) == "no tag"


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
            assert scoring.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k)), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        scoring.pass_at_k(n, c, k)


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
    # c's strict misses q2, its format q3; 1 right of 4 has the Wilson interval [4.6%, 69.9%]
    assert "| agent c | 25.0% | [4.6%, 69.9%] | 0.0% | 75.0% | 10 | 0.50 |" in text
    assert "| weighted vote | 75.0% | [30.1%, 95.4%] | - | - | - | 0.50 |" in text
    assert "Vote weights (calibration accuracy): a 100.0%, b 25.0%, c 25.0%." in text


def test_markdown_of_matched_compute():
    s = fake_summary({"a": 1.0, "b": 1.0, "c": 1.0})
    method = {"accuracy": 0.5, "low": 0.15, "high": 0.85, "correct": 2, "n": 4, "completions_per_question": 3,
              "samples_generated": 12, "seconds_per_question": 1.5}
    s["matched_compute"] = {"k": 3, "best_agent": "a", "picked_on": "scored", "pick_accuracy": {"a": 0.5, "b": 0.5},
                            "methods": {m: dict(method) for m in scoring.METHODS}}
    s["matched_compute"]["methods"]["best_agent_greedy"]["completions_per_question"] = 1
    config = {"model_name": "m", "adapter": None, "n": 4, "dataset": "synthetic:hard", "split": "test", "seed": 0,
              "agents": {"a": "", "b": "", "c": ""}, "prompt_style": "xml", "samples": 1, "max_new_tokens": 8,
              "calibration_n": 0, "temperature": 0.7, "worked_examples": 0}
    text = report.markdown({"config": config, "runs": {"base": s}, "comparison": None})
    assert "4 questions from synthetic:hard (seed 0), 3 agents, xml prompts, 1 sample(s)" in text  # no split
    assert "### Matched compute (K = 3 completions per question)" in text
    assert "| 3 agents x 1 sample, vote | 3 | 50.0% | [15.0%, 85.0%] | 1.50 |" in text
    assert "| best agent x 3 samples, vote | 3 |" in text and "| best agent, greedy | 1 |" in text
    assert ("The best agent, a, was picked on the scored questions themselves (a 50.0%, b 50.0%), so its rows are "
            "optimistic: pass --calibration-n to pick it on other questions. Every agent tied, so the first listed "
            "was taken.") in text


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
    """``python evaluate.py ARGS``, forked from the session's server (conftest.forks), on one thread."""
    return forks().run([SCRIPT, *args]).result(timeout=300)


SUMMARY_KEYS = {"n", "agents", "best_agent", "best_agent_accuracy", "majority_vote", "weighted_vote", "ensemble",
                "consistency", "pass_at_k", "matched_compute", "reference_perplexity", "tools", "calibration",
                "questions"}
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
    assert s["reference_perplexity"]["n"] == n and s["reference_perplexity"]["perplexity"] > 1
    assert q["reference_nll"]["tokens"] > 0
    assert s["tools"] is None and "agents_with_tools" not in q  # without --tools


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
    (["--dataset", "synthetic:extreme"], "--dataset synthetic:extreme: difficulty must be one of ['easy', 'medium'"),
    (["--worked-examples", "9"], "--worked-examples must be between 0 and 3, got 9"),
    (["--worked-examples", "-1"], "--worked-examples must be between 0 and 3, got -1"),
    (["--matched-compute", "--temperature", "0"], "give --temperature > 0"),   # its votes need samples that differ
    (["--matched-compute", "--samples", "2"], "leave --samples at 1"),        # it reuses the greedy answers
    (["--matched-compute", "--agents", "1"], "give --agents 2 or more"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model-name", "m", *flags])
    assert message in capsys.readouterr().err


def test_matched_compute_and_perplexity_end_to_end(saved, tmp_path):
    # base and trained, each with the three matched-compute methods (K = 2 agents) and the reference
    # perplexity, in eval.json, in each run's eval.md table and in the comparison
    out = tmp_path / "out"
    evaluate.main(["--model-name", saved["model"], "--adapter", saved["run"], "--compare-base", "--dataset", saved["data"],
                   "--n", "3", "--calibration-n", "1", "--agents", "2", "--max-new-tokens", "4", "--no-ensemble",
                   "--matched-compute", "--temperature", "1.0", "--worked-examples", "2", "--out", str(out)])
    result = json.loads((out / "eval.json").read_text())
    assert result["config"]["worked_examples"] == 2 and result["config"]["matched_compute"] is True
    for s in result["runs"].values():
        m = s["matched_compute"]
        assert (m["k"], m["picked_on"]) == (2, "calibration") and m["best_agent"] in s["agents"]
        assert list(m["methods"]) == ["agents_vote", "self_consistency", "best_agent_greedy"]
        for v in m["methods"].values():
            assert v["n"] == 3 and v["low"] <= v["accuracy"] <= v["high"]
        assert [v["samples_generated"] for v in m["methods"].values()] == [6, 6, 3]
        # the greedy method is the best agent's per-agent run, not generated again
        assert m["methods"]["best_agent_greedy"]["accuracy"] == s["agents"][m["best_agent"]]["accuracy"]
        assert all(len(q["matched_compute"]["self_consistency"]["samples"]) == 2 for q in s["questions"])
        assert s["reference_perplexity"]["n"] == 3 and s["reference_perplexity"]["perplexity"] > 1
    base, trained = result["runs"]["base"], result["runs"]["trained"]
    assert base["reference_perplexity"]["perplexity"] != trained["reference_perplexity"]["perplexity"]
    cmp = result["comparison"]
    assert {"matched: 2 agents x 1 sample, vote", "matched: best agent x 2 samples, vote",
            "matched: best agent, greedy", "reference perplexity"} <= set(cmp)
    assert cmp["reference perplexity"]["base"] == base["reference_perplexity"]["perplexity"]
    text = (out / "eval.md").read_text()
    assert text.count("### Matched compute (K = 2 completions per question)") == 2
    assert "| 2 agents x 1 sample, vote | 2 |" in text and "| best agent, greedy | 1 |" in text
    assert "was picked on the calibration slice" in text and "with 2 worked example(s)" in text
    assert "| reference perplexity |" in text and "Perplexity of the reference solutions" in text


def test_matched_compute_without_a_calibration_slice_says_the_pick_is_optimistic(saved, tmp_path):
    out = tmp_path / "out"
    evaluate.main(["--model-name", saved["model"], "--dataset", saved["data"], "--n", "2", "--calibration-n", "0",
                   "--agents", "2", "--max-new-tokens", "3", "--no-ensemble", "--no-perplexity",
                   "--matched-compute", "--out", str(out)])
    s = json.loads((out / "eval.json").read_text())["runs"]["base"]
    assert s["matched_compute"]["picked_on"] == "scored" and s["reference_perplexity"] is None
    assert s["matched_compute"]["best_agent"] == s["best_agent"]
    assert "so its rows are optimistic" in (out / "eval.md").read_text()


def test_synthetic_dataset_scores_generated_problems(saved, tmp_path):
    # --dataset synthetic:easy: synthetic_problems(n + calibration_n, "easy", seed=--seed), the first n scored
    out = tmp_path / "out"
    evaluate.main(["--model-name", saved["model"], "--dataset", "synthetic:easy", "--n", "3", "--calibration-n", "1",
                   "--seed", "5", "--agents", "2", "--max-new-tokens", "3", "--no-ensemble", "--prompt-style", "xml",
                   "--out", str(out)])
    result = json.loads((out / "eval.json").read_text())
    s = result["runs"]["base"]
    expected = synthetic_problems(4, "easy", seed=5).to_list()
    assert [(q["question"], q["gold"]) for q in s["questions"]] == [(r["question"], r["answer"]) for r in expected[:3]]
    assert s["calibration"]["n"] == 1 and s["reference_perplexity"]["n"] == 3  # generated rows have a cot
    assert "3 questions from synthetic:easy (seed 5)" in (out / "eval.md").read_text()


def test_worked_examples_reach_every_prompt(saved, monkeypatch):
    # the agents', the ensemble's, the matched-compute methods' and the perplexity's prompts all open
    # with the first two worked examples, and only with --worked-examples
    seen = []

    def spy(function, index):
        def wrapped(*args, **kwargs):
            seen.extend(args[index])
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(evaluate, "generate_answers", spy(evaluate.generate_answers, 2))
    monkeypatch.setattr(evaluate, "_ensemble_ids", spy(evaluate._ensemble_ids, 2))
    monkeypatch.setattr(scoring, "reference_nll", spy(scoring.reference_nll, 2))
    model, tok = saved["peft_model"].eval(), saved["tokenizer"]
    rows = evaluate.load_questions(saved["data"], "test", 2, 1, seed=0)
    agents = {"a": "Solve.", "b": "Be brief."}
    for examples in (0, 2):
        seen.clear()
        evaluate.evaluate(model, tok, *rows, agents, max_new_tokens=2, temperature=1.0, examples=examples,
                          matched_compute=True)
        # calibration 2 agents x 1 + scored 2 x 2, ensemble 2 x 2, matched 2 x 2 + 1 x 2, perplexity 2
        assert len(seen) == 2 + 4 + 4 + 6 + 2
        assert all((WORKED_EXAMPLES[1][0] in p) == (examples == 2) for p in seen)
        assert not any(WORKED_EXAMPLES[2][0] in p for p in seen)
    assert WORKED_EXAMPLES[0][0] in evaluate.render(tok, "Solve.", "q", "xml", examples=2)


def test_questions_keep_their_reference_solution(saved, gsm8k_dir):
    scored, _ = evaluate.load_questions(saved["data"], "test", 6, 0, seed=0)
    assert {(r["cot"], r["answer"]) for r in scored} >= {("4 + 3 = 7", "7")}  # the <<...>> annotation removed
    real, calibration = evaluate.load_questions(gsm8k_dir, "test", 3, 2, seed=0)
    assert all(r["cot"] and r["answer"] for r in real + calibration)


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
    monkeypatch.setattr(evaluate, "load_questions", lambda *a, **k: pytest.fail("the data was loaded"))
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
    r = evaluation.quick_eval(model, tok, rows, "2", "xml", max_new_tokens=4)
    first = next(iter(get_agents("2").items()))
    assert set(r) == {"n", "agent", "accuracy", "format_compliance", "records"}
    assert r["n"] == 3 and r["agent"] == first[1]
    assert [q["gold"] for q in r["records"]] == [row["answer"] for row in rows]
    assert r["accuracy"] == sum(q["correct"] for q in r["records"]) / 3
    assert r["format_compliance"] == sum(q["strict_answer"] is not None for q in r["records"]) / 3
    s = evaluate.evaluate(model, tok, rows, [], dict([first]), style="xml", max_new_tokens=4, ensemble=False)
    assert [q["completion"] for q in r["records"]] == [q["agents"][first[0]][0]["completion"] for q in s["questions"]]
    assert r["accuracy"] == s["agents"][first[0]]["accuracy"]


def test_the_stop_matcher_is_made_once_and_stops_where_stop_strings_stop(monkeypatch):
    """generate_answers' stop strings reach generate() as a matcher made once per tokenizer
    (evaluation.stop_criteria; transformers' own stop_strings makes it again at every call), which stops the
    answers exactly where stop_strings stops them."""
    from transformers.generation import stopping_criteria

    model, tokenizer = tiny_model_and_tokenizer()
    model.eval()
    prompts = [q["question"] for q in synthetic_problems(4, seed=5)]
    sampled = dict(max_new_tokens=12, temperature=1.0, seed=3)
    text = evaluation.generate_answers(model, tokenizer, prompts, **sampled)[0][0][0]
    stop = re.search(r"[a-z]{2}", text[len(text) // 3:])[0]  # two letters from the first answer, past its start
    made = []
    init = stopping_criteria.StopStringCriteria.__init__
    monkeypatch.setattr(stopping_criteria.StopStringCriteria, "__init__",
                        lambda self, *a, **kw: made.append(init(self, *a, **kw)))
    answers = [evaluation.generate_answers(model, tokenizer, prompts, stop=[stop], **sampled) for _ in range(2)]
    assert len(made) == 1 and answers[0] == answers[1]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    torch.manual_seed(sampled["seed"])
    with torch.no_grad():
        reference = model.generate(**enc, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, do_sample=True,
                                   temperature=1.0, stop_strings=[stop], tokenizer=tokenizer)
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    lengths = [next((i for i, t in enumerate(ids) if t in ends), len(ids))
               for ids in reference[:, enc["input_ids"].shape[1]:].tolist()]
    assert [a[0][1] for a in answers[0]] == lengths and min(lengths) < 12  # stopped, where stop_strings stops

"""grpo_math/scoring.py's matched-compute baselines and reference perplexity: the votes and the best
agent's pick on hand-built graded answers, the generation they ask for through a stand-in, and the
perplexity against the tiny model's own forward pass."""

import math

import pytest
import torch

from evaluate import grade
from grpo_math import scoring
from grpo_math.models import tiny_model_and_tokenizer


def sol(n):
    return f"<SOLUTION>{n}</SOLUTION>"


def graded(texts, gold):
    return [grade(t, gold, "chat", tokens=5) for t in texts]


def matched_records():
    """Two questions, agents a and b (one greedy answer each), and the sampled methods' completions
    of K = 2 (a comment gives each method's lenient answers)."""
    rows = [
        # gold, greedy a, greedy b, agents_vote (a, b), self_consistency (two samples of the best agent)
        ("5", sol(5), sol(4), [sol(5), sol(6)], [sol(7), sol(7)]),  # agents 5, 6 -> 5; samples 7, 7 -> 7
        ("3", sol(2), sol(3), ["no number", sol(3)], [sol(3), sol(1)]),  # agents None, 3 -> 3; samples 3, 1 -> 3
    ]
    return [{"question": f"q{i}", "gold": gold, "agents": {"a": graded([a], gold), "b": graded([b], gold)},
             "matched_compute": {"agents_vote": {"samples": graded(av, gold)},
                                 "self_consistency": {"samples": graded(sc, gold)}}}
            for i, (gold, a, b, av, sc) in enumerate(rows)]


def test_matched_votes_and_intervals():
    records = matched_records()
    m = scoring.score_matched(records, 2, "b", "calibration", {"a": 0.0, "b": 1.0},
                              {"agents_vote": 4.0, "self_consistency": 2.0, "best_agent_greedy": 1.0})
    # q0: the agents' vote 5 (a tie with 6, the first seen wins) is right, the samples' 7 is wrong
    assert [r["matched_compute"]["agents_vote"]["answer"] for r in records] == ["5", "3"]  # None never wins
    assert [r["matched_compute"]["self_consistency"]["answer"] for r in records] == ["7", "3"]
    methods = m["methods"]
    assert list(methods) == list(scoring.METHODS)
    # agents_vote 2/2; self_consistency 1/2; b greedy: 4 wrong, 3 right -> 1/2
    assert {k: (v["correct"], v["n"]) for k, v in methods.items()} == {
        "agents_vote": (2, 2), "self_consistency": (1, 2), "best_agent_greedy": (1, 2)}
    for v in methods.values():
        assert v["low"] <= v["accuracy"] <= v["high"]
    assert (methods["self_consistency"]["low"], methods["self_consistency"]["high"]) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    # cost: 2 completions per question for both votes, 1 for greedy; seconds over 2 questions
    assert [(v["completions_per_question"], v["samples_generated"], v["seconds_per_question"]) for v in methods.values()] \
        == [(2, 4, 2.0), (2, 4, 1.0), (1, 2, 0.5)]
    assert (m["k"], m["best_agent"], m["picked_on"]) == (2, "b", "calibration")


def test_interval_holds_an_accuracy_of_0_or_1():
    # wilson(0, 3)'s low end comes out at 5.6e-17, not 0, by rounding: the method's interval still holds 0
    records = matched_records() + matched_records()[:1]  # three questions
    spent = dict.fromkeys(scoring.METHODS, 1.0)
    for r in records:
        r["agents"]["b"] = graded([sol(0)], r["gold"])  # b always wrong
    v = scoring.score_matched(records, 2, "b", "scored", {}, spent)["methods"]["best_agent_greedy"]
    assert (v["low"], v["accuracy"], v["n"]) == (0.0, 0.0, 3)


def accuracy_records(outcomes):
    """One record per question; ``outcomes`` maps each agent to whether it is right, question by question."""
    n = len(next(iter(outcomes.values())))
    return [{"gold": "1", "agents": {a: graded([sol(1 if right[i] else 0)], "1") for a, right in outcomes.items()}}
            for i in range(n)]


def test_best_agent_is_picked_on_the_calibration_slice():
    scored = accuracy_records({"a": [True, True, False], "b": [False, False, True]})  # a 2/3, b 1/3
    calibration = accuracy_records({"a": [False, False], "b": [True, False]})      # a 0/2, b 1/2
    assert scoring.pick_best_agent(scored, calibration) == ("b", "calibration", {"a": 0.0, "b": 0.5})
    # no calibration slice: picked where it is scored
    assert scoring.pick_best_agent(scored, []) == ("a", "scored", {"a": 2 / 3, "b": 1 / 3})
    # a tie goes to the agent listed first
    assert scoring.pick_best_agent(accuracy_records({"a": [False], "b": [False]}))[0] == "a"


def test_run_matched_asks_each_agent_once_and_the_best_agent_k_times():
    records = accuracy_records({"a": [True, False], "b": [False, False]})
    calls = []

    def ask(instruction, k, temperature, seed):
        calls.append((instruction, k, temperature, seed))
        return [[grade(sol(1), "1", "chat", 3)] * k for _ in records], 1.5

    m = scoring.run_matched(ask, records, [], {"a": "Solve.", "b": "Be brief."}, 0.7, 10, {"a": 0.25, "b": 9.0})
    # one sample of each agent, then K = 2 of the best (a, on the scored questions), each call its own seed
    assert calls == [("Solve.", 1, 0.7, 11), ("Be brief.", 1, 0.7, 12), ("Solve.", 2, 0.7, 13)]
    assert [len(r["matched_compute"][k]["samples"]) for r in records for k in scoring.METHODS[:2]] == [2, 2, 2, 2]
    assert (m["best_agent"], m["picked_on"]) == ("a", "scored")
    # seconds per question over 2 questions: agents 1.5 + 1.5, self-consistency 1.5, greedy a's 0.25
    assert [v["seconds_per_question"] for v in m["methods"].values()] == [1.5, 0.75, 0.125]


# ---------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("style, text", [
    ("chat", "<start_working_out>2 + 3 = 5<end_working_out><SOLUTION>5</SOLUTION>"),
    ("xml", "2 + 3 = 5\n#### 5 </response>"),
])
def test_reference_solution_in_the_answer_form(style, text):
    assert scoring.reference_solution({"question": "q", "cot": "2 + 3 = 5", "answer": "5"}, style) == text


def test_corpus_perplexity_weights_questions_by_tokens():
    # (2.0 + 0.0) nats over 1 + 3 tokens: exp(0.5), not the mean of exp(2.0) and exp(0.0)
    assert scoring.perplexity([(2.0, 1), (0.0, 3)]) == pytest.approx(math.exp(0.5))


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model_and_tokenizer()
    return model.eval(), tok


def direct_nll(model, tok, prompt, solution):
    """The summed NLL of the solution's tokens, from one unpadded forward pass over prompt + solution."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    s = tok(solution, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + s])).logits[0].float()
    # the logits at position i predict token i + 1: the solution's come from positions len(p) - 1 onwards
    return float(torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(s), reduction="sum")), len(s)


def test_reference_nll_scores_the_solution_tokens_only(tiny):
    model, tok = tiny
    prompts = ["<question>Kai has 4 marbles and finds 3 more. How many?</question>\n<response>", "<response>"]
    solutions = ["4 + 3 = 7\n#### 7 </response>", "#### 12 </response>"]
    # batched and left-padded (the prompts differ in length), against each pair alone
    found = scoring.reference_nll(model, tok, prompts, solutions, batch_size=2)
    for (nll, tokens), p, s in zip(found, prompts, solutions):
        expected, n = direct_nll(model, tok, p, s)
        assert tokens == n == len(tok(s, add_special_tokens=False)["input_ids"])
        assert nll == pytest.approx(expected, rel=1e-4)
    # the prompt is not scored: another prompt before the same solution changes only the conditioning
    longer = scoring.reference_nll(model, tok, ["Solve. " + prompts[1]], [solutions[1]])[0]
    assert longer[1] == found[1][1] and longer[0] != pytest.approx(found[1][0], rel=1e-6)


def test_reference_perplexity_of_a_run(tiny):
    model, tok = tiny
    rows = [{"question": "Kai has 4 marbles and finds 3 more.", "cot": "4 + 3 = 7", "answer": "7"},
            {"question": "No reference here.", "answer": "1"},  # no cot: not scored
            {"question": "Mia has 9 pens and loses 2.", "cot": "9 - 2 = 7", "answer": "7"}]
    records = [{} for _ in rows]
    p = scoring.reference_perplexity(model, tok, rows, records, lambda q: f"<question>{q}</question>\n<response>", "xml")
    assert p["n"] == 2 and "reference_nll" not in records[1]
    each = [records[i]["reference_nll"] for i in (0, 2)]
    assert p["tokens"] == sum(e["tokens"] for e in each)
    assert p["perplexity"] == pytest.approx(math.exp(sum(e["nll_sum"] for e in each) / p["tokens"]))
    assert p["mean_nll"] == pytest.approx(math.log(p["perplexity"]))

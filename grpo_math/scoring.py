"""A run's figures: from graded answers, and from the model's likelihood of the reference solutions.

evaluate.py generates and grades; what it reports is computed here.

    score(records, weights)       per agent (accuracy, strict accuracy, format rate, tokens, pass@k),
                                  majority and weighted vote, ensemble, consistency
    pass_at_k(n, c, k)            Chen et al.'s unbiased estimator
    agent_accuracy(records)       {agent: accuracy}: the weighted vote's weights on the calibration slice

Matched compute. Several agents voting spend K completions on a question; one prompt given the
same K completions is the comparison that tells prompt diversity from extra compute. With K
agents, evaluate.py --matched-compute scores three methods on the same questions:

    agents_vote        the K agents, one completion each, sampled at --temperature: majority vote
    self_consistency   the best agent, K completions sampled at --temperature: majority vote
    best_agent_greedy  the best agent's one greedy completion (the per-agent run's, not generated again)

The first two cost the same K completions per question; the third costs one. "The best agent" is
the one most accurate on the calibration slice (greedy, never scored) when there is one, else on
the scored questions themselves, which flatters it.

    pick_best_agent(scored, calibration)  (agent, "calibration" or "scored", accuracies)
    vote(samples, gold)                   the majority of graded samples' lenient answers
    run_matched(ask, records, ...)        generates the sampled methods' completions through ``ask``
    score_matched(records, k, best, ...)  each method's accuracy, Wilson 95% interval and cost

Perplexity. The reference solution, in the kit's answer form for the prompt style, is appended to
the first agent's prompt; its perplexity is exp of the mean negative log-likelihood of its own
tokens, the prompt's masked:

    reference_solution(row, style)        a row's cot and answer as the prompt asks for them
    reference_nll(model, tokenizer, prompts, solutions)  each solution's summed NLL and token count
    perplexity(nlls)                      exp of the token-weighted mean NLL over all questions
    reference_perplexity(...)             the corpus figure of a run, and each question's NLL

Records, one per scored question: {question, gold, agents: {name: [graded samples]}, ensemble},
graded samples as evaluate.grade makes them; the matched-compute methods add matched_compute:
{method: {samples, answer, correct}}.
"""

import math
import time

import torch

from agents import consistency, majority_vote
from grpo_math.answers import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, STOP_TAG, is_correct
from grpo_math.intervals import wilson

METHODS = ("agents_vote", "self_consistency", "best_agent_greedy")


# ---------------------------------------------------------------------------- per agent and votes

def pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them right, hold a right one."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _completion_stats(graded):
    return {"accuracy": _mean(g["correct"] for g in graded),
            "strict_accuracy": _mean(g["strict_correct"] for g in graded),
            "format_rate": _mean(g["strict_answer"] is not None for g in graded),
            "mean_tokens": _mean(g["tokens"] for g in graded)}


def score(records, weights=None):
    """Every figure from graded records, one per question: {gold, agents: {name: [graded samples]},
    ensemble: graded or None}. Adds each record's vote, weighted vote and consistency in place."""
    names = list(records[0]["agents"])
    k = len(records[0]["agents"][names[0]])
    vote_weights = [weights[name] for name in names for _ in range(k)] if weights else None
    if vote_weights and sum(vote_weights) <= 0:
        vote_weights = None  # no agent was right on the calibration slice: count votes equally
    for r in records:
        answers = [s["answer"] for name in names for s in r["agents"][name]]  # every sample votes
        vote = majority_vote(answers)
        r["vote"] = {"answer": vote, "correct": is_correct(vote, r["gold"])}
        if weights:
            vote = majority_vote(answers, vote_weights)
            r["weighted_vote"] = {"answer": vote, "correct": is_correct(vote, r["gold"])}
        r["consistency"] = consistency(answers)
    agents = {name: _completion_stats([s for r in records for s in r["agents"][name]]) for name in names}
    ks = sorted({1, k} | {2**i for i in range(k.bit_length()) if 2**i <= k}) if k > 1 else []
    for name in names:
        counts = [sum(s["correct"] for s in r["agents"][name]) for r in records]
        agents[name]["pass_at_k"] = {str(j): _mean(pass_at_k(k, c, j) for c in counts) for j in ks} or None
    best = max(names, key=lambda a: agents[a]["accuracy"])
    ensembled = [r["ensemble"] for r in records if r.get("ensemble")]
    return {
        "n": len(records),
        "agents": agents,
        "best_agent": best,
        "best_agent_accuracy": agents[best]["accuracy"],
        "majority_vote": {"accuracy": _mean(r["vote"]["correct"] for r in records)},
        "weighted_vote": {"accuracy": _mean(r["weighted_vote"]["correct"] for r in records), "weights": weights,
                          "equal_weights_fallback": vote_weights is None} if weights else None,
        "ensemble": _completion_stats(ensembled) if ensembled else None,
        "consistency": _mean(r["consistency"] for r in records),
        "pass_at_k": {str(j): _mean(agents[a]["pass_at_k"][str(j)] for a in names) for j in ks} or None,
    }


# ---------------------------------------------------------------------------- matched compute

def agent_accuracy(records):
    """{name: the share of the agent's samples that are right}, over the records."""
    return {name: _mean(s["correct"] for r in records for s in r["agents"][name]) for name in records[0]["agents"]}


def pick_best_agent(scored, calibration=()):
    """(name, where, {name: accuracy}): the most accurate agent on the calibration records when
    there are any, else on the scored ones (optimistic: it is then scored where it was picked).
    Ties go to the agent listed first."""
    records, where = (calibration, "calibration") if calibration else (scored, "scored")
    accuracy = agent_accuracy(records)
    return max(accuracy, key=accuracy.get), where, accuracy


def vote(samples, gold):
    """{answer, correct}: agents.majority_vote over the samples' lenient answers, in their order."""
    answer = majority_vote([s["answer"] for s in samples])
    return {"answer": answer, "correct": is_correct(answer, gold)}


def _method(correct, completions, seconds):
    n, k = len(correct), sum(correct)
    low, high = wilson(k, n)
    return {"accuracy": k / n, "low": low, "high": high, "correct": k, "n": n,
            "completions_per_question": completions, "samples_generated": completions * n,
            "seconds_per_question": seconds / n}


def score_matched(records, k, best, picked_on, pick_accuracy, seconds):
    """The matched-compute summary; ``seconds`` holds each method's generation time, the greedy
    agent's included. Adds each record's vote per sampled method in place."""
    for r in records:
        for m in METHODS[:2]:
            r["matched_compute"][m].update(vote(r["matched_compute"][m]["samples"], r["gold"]))
    methods = {m: _method([r["matched_compute"][m]["correct"] for r in records], k, seconds[m]) for m in METHODS[:2]}
    methods["best_agent_greedy"] = _method([r["agents"][best][0]["correct"] for r in records], 1,
                                           seconds["best_agent_greedy"])
    return {"k": k, "best_agent": best, "picked_on": picked_on, "pick_accuracy": pick_accuracy, "methods": methods}


def run_matched(ask, records, calibration_records, agents, temperature, seed, seconds):
    """The matched-compute summary of the scored ``records``. ``ask(instruction, k, temperature,
    seed)`` returns every scored question's k graded completions from one agent and the seconds
    taken; ``seconds`` holds each agent's greedy generation time. Each call has its own seed, so
    that the agents' samples are not drawn with the same random numbers."""
    best, where, accuracy = pick_best_agent(records, calibration_records)
    k = len(agents)
    votes = [ask(instruction, 1, temperature, seed + 1 + i) for i, instruction in enumerate(agents.values())]
    samples, sc_seconds = ask(agents[best], k, temperature, seed + 1 + k)
    for j, r in enumerate(records):
        r["matched_compute"] = {"agents_vote": {"samples": [graded[j][0] for graded, _ in votes]},
                                "self_consistency": {"samples": samples[j]}}
    spent = {"agents_vote": sum(s for _, s in votes), "self_consistency": sc_seconds, "best_agent_greedy": seconds[best]}
    return score_matched(records, k, best, where, accuracy, spent)


# ---------------------------------------------------------------------------- perplexity

def reference_solution(row, style):
    """The reference solution as a completion the prompt asks for: tagged working and answer (chat),
    or the working, "#### N" and the stop tag (xml), as in the worked examples."""
    if style == "chat":
        return f"{REASONING_START}{row['cot']}{REASONING_END}{SOLUTION_START}{row['answer']}{SOLUTION_END}"
    return f"{row['cot']}\n#### {row['answer']} {STOP_TAG}"


@torch.no_grad()
def reference_nll(model, tokenizer, prompts, solutions, batch_size=16):
    """[(summed NLL in nats, token count)] of each solution given its rendered prompt. Prompt and
    solution are tokenized apart and joined, so only the solution's own tokens are scored."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    found = []
    for i in range(0, len(prompts), batch_size):
        pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(s, add_special_tokens=False)["input_ids"])
                 for p, s in zip(prompts[i : i + batch_size], solutions[i : i + batch_size])]
        width, tail = max(len(p) + len(s) for p, s in pairs), max(len(s) for _, s in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, s) in enumerate(pairs):  # left padding: every solution ends at the last column
            ids[row, width - len(p) - len(s) :] = torch.tensor(p + s)
            mask[row, width - len(p) - len(s) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as model.generate counts them under left padding
        # Only the last tail + 1 positions' logits: they predict the last ``tail`` tokens.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=tail + 1,
                       return_dict=True).logits[:, -tail - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, -tail:], reduction="none")
        found += [(float(nll[row, tail - len(s) :].sum()), len(s)) for row, (_, s) in enumerate(pairs)]
    return found


def perplexity(nlls):
    """exp(total NLL / total tokens) over [(summed NLL, tokens)]: the corpus perplexity."""
    tokens = sum(t for _, t in nlls)
    return math.exp(sum(v for v, _ in nlls) / tokens)


def reference_perplexity(model, tokenizer, rows, records, prompt, style, batch_size=16):
    """{perplexity, mean_nll, tokens, n, seconds_per_question} of the reference solutions of the
    ``rows`` that have one (a ``cot``), each after ``prompt(question)``; each such record gets its
    {nll_sum, tokens}. None when no row has a reference solution."""
    have = [i for i, r in enumerate(rows) if r.get("cot") is not None]
    if not have:
        return None
    start = time.perf_counter()
    nlls = reference_nll(model, tokenizer, [prompt(rows[i]["question"]) for i in have],
                         [reference_solution(rows[i], style) for i in have], batch_size)
    seconds = time.perf_counter() - start
    for i, (nll, tokens) in zip(have, nlls):
        records[i]["reference_nll"] = {"nll_sum": nll, "tokens": tokens}
    tokens = sum(t for _, t in nlls)
    return {"perplexity": perplexity(nlls), "mean_nll": sum(v for v, _ in nlls) / tokens, "tokens": tokens,
            "n": len(nlls), "seconds_per_question": seconds / len(nlls)}

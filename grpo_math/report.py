"""The reports of an evaluation: what evaluate.py writes once every run is scored.

    table_rows(s)               one row per method of a scored run: accuracy, strict accuracy,
                                format rate, mean tokens, seconds per question
    matched_rows(s)             the matched-compute methods (--matched-compute): completions per
                                question, accuracy, its Wilson 95% interval, seconds per question
    compare(base, trained)      base vs trained, method by method, with the difference; the
                                matched-compute methods and the reference perplexity included
    markdown(result)            eval.md: the comparison, then per run its table (accuracies with a
                                Wilson 95% interval over the questions), the matched-compute table
                                and the perplexity of the reference solutions
    plot(result, path)          eval.png: lenient accuracy per method, one bar per run
    write_reports(out, result)  eval.json, eval.md and eval.png, each written atomically

``result`` is evaluate.main's {config, runs: {label: evaluate.score's summary}, comparison}.
"""

import json
import os

from grpo_math.intervals import wilson

# The matched-compute methods (scoring.METHODS) as the tables name them; k is the agent count.
MATCHED_LABELS = {"agents_vote": "{k} agents x 1 sample, vote", "self_consistency": "best agent x {k} samples, vote",
                  "best_agent_greedy": "best agent, greedy"}


def table_rows(s):
    """(method, accuracy, strict accuracy, format rate, mean tokens, seconds per question)."""
    rows = [(f"agent {name}", a["accuracy"], a["strict_accuracy"], a["format_rate"], a["mean_tokens"],
             a["seconds_per_question"]) for name, a in s["agents"].items()]
    for key, label in (("majority_vote", "majority vote"), ("weighted_vote", "weighted vote")):
        if s[key]:
            rows.append((label, s[key]["accuracy"], None, None, None, s[key]["seconds_per_question"]))
    if s["ensemble"]:
        e = s["ensemble"]
        rows.append(("hidden-state ensemble", e["accuracy"], e["strict_accuracy"], e["format_rate"],
                     e["mean_tokens"], e["seconds_per_question"]))
    return rows


def matched_rows(s):
    """(method, completions per question, accuracy, low, high, seconds per question), or [] when
    the run has no matched-compute figures."""
    m = s.get("matched_compute")
    return [(MATCHED_LABELS[key].format(k=m["k"]), v["completions_per_question"], v["accuracy"], v["low"], v["high"],
             v["seconds_per_question"]) for key, v in m["methods"].items()] if m else []


def compare(base, trained):
    """{method: {base, trained, delta}} for the accuracies, consistency, pass@k, the matched-compute
    methods and the reference perplexity (each where both runs have it)."""
    pairs = {row[0]: (row[1], t[1]) for row, t in zip(table_rows(base), table_rows(trained))}
    pairs["consistency"] = (base["consistency"], trained["consistency"])
    for j, v in (base["pass_at_k"] or {}).items():
        pairs[f"pass@{j}"] = (v, trained["pass_at_k"][j])
    for row, t in zip(matched_rows(base), matched_rows(trained)):
        pairs[f"matched: {row[0]}"] = (row[2], t[2])
    if base.get("reference_perplexity") and trained.get("reference_perplexity"):
        pairs["reference perplexity"] = (base["reference_perplexity"]["perplexity"],
                                         trained["reference_perplexity"]["perplexity"])
    return {m: {"base": b, "trained": t, "delta": t - b} for m, (b, t) in pairs.items()}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _interval(low, high):
    return f"[{_pct(low)}, {_pct(high)}]"


def _wilson_of(accuracy, n):
    """The Wilson interval of an accuracy over n questions (a mean over samples counts as its share of n)."""
    return _interval(*wilson(min(n, round(accuracy * n, 9)), n))


def _matched_lines(s, c):
    """The matched-compute table of one run and where its best agent was picked."""
    m = s["matched_compute"]
    lines = [f"### Matched compute (K = {m['k']} completions per question)", "",
             f"Both votes spend K = {m['k']} completions per question, sampled at temperature {c['temperature']}; "
             "the greedy row spends one.", "",
             "| method | completions / question | accuracy | 95% interval | s / question |", "|---|---|---|---|---|"]
    for name, per, acc, low, high, secs in matched_rows(s):
        lines.append(f"| {name} | {per} | {_pct(acc)} | {_interval(low, high)} | {secs:.2f} |")
    accuracies = ", ".join(f"{a} {_pct(v)}" for a, v in m["pick_accuracy"].items())
    if m["picked_on"] == "calibration":
        other = f"{c['calibration_n']} other question" + ("s" if c["calibration_n"] != 1 else "")
        where = f"on the calibration slice ({other}, never scored): {accuracies}."
    else:
        where = (f"on the scored questions themselves ({accuracies}), so its rows are optimistic: "
                 "pass --calibration-n to pick it on other questions.")
    tied = " Every agent tied, so the first listed was taken." if len(set(m["pick_accuracy"].values())) == 1 else ""
    return lines + ["", f"The best agent, {m['best_agent']}, was picked {where}{tied}"]


def _tool_lines(t):
    """evaluate.py --tools: each agent's greedy accuracy without and with the tools, on the same questions."""
    lines = [f"With tools ({', '.join(t['tools'])}; up to {t['max_tool_calls']} rounds of calls), the same agents "
             "and questions, greedy, lenient accuracy:", "",
             "| agent | without tools | with tools | answers with a call | calls per answer | failed calls |",
             "|---|---|---|---|---|---|"]
    for name, a in t["agents"].items():
        lines.append(f"| {name} | {_pct(a['accuracy_without_tools'])} | {_pct(a['accuracy_with_tools'])} | "
                     f"{_pct(a['answers_with_a_call'])} | {a['calls_per_answer']:.2f} | {_pct(a['failed_calls_per_call'])} |")
    return lines


def markdown(result):
    """eval.md: the comparison (with --compare-base), then one table per run."""
    c, runs = result["config"], result["runs"]
    source = c["dataset"] if c["dataset"].startswith("synthetic:") else f"{c['dataset']} [{c['split']}]"
    examples = c.get("worked_examples", 0)
    lines = [f"# Evaluation of {c['model_name']}" + (f" + {c['adapter']}" if c["adapter"] else ""), "",
             f"{c['n']} questions from {source} (seed {c['seed']}), {len(c['agents'])} agents, "
             f"{c['prompt_style']} prompts" + (f" with {examples} worked example(s)" if examples else "")
             + f", {c['samples']} sample(s) per agent, max {c['max_new_tokens']} new tokens, "
             f"calibration slice of {c['calibration_n']} other questions.", ""]
    if result["comparison"]:
        lines += ["## Original vs trained (lenient accuracy)", "", "| method | base | trained | difference |",
                  "|---|---|---|---|"]
        for m, v in result["comparison"].items():
            if m in ("consistency", "reference perplexity"):  # not accuracies; lower perplexity is better
                lines.append(f"| {m} | {v['base']:.3f} | {v['trained']:.3f} | {v['delta']:+.3f} |")
            else:
                lines.append(f"| {m} | {_pct(v['base'])} | {_pct(v['trained'])} | {100 * v['delta']:+.1f} pts |")
        lines.append("")
    for label, s in runs.items():
        lines += [f"## {label}", "", "| method | accuracy | 95% interval | strict | format | mean tokens | s / question |",
                  "|---|---|---|---|---|---|---|"]
        for m, acc, strict, fmt, tokens, secs in table_rows(s):
            lines.append(f"| {m} | {_pct(acc)} | {_wilson_of(acc, s['n'])} | {_pct(strict)} | {_pct(fmt)} | "
                         f"{'-' if tokens is None else f'{tokens:.0f}'} | {secs:.2f} |")
        lines += ["", f"95% interval: Wilson's, over the {s['n']} questions.",
                  f"Consistency (mean pairwise agreement of the agents' answers): {s['consistency']:.3f}."]
        if s["pass_at_k"]:
            lines.append("pass@k, mean over agents: " + ", ".join(f"pass@{j} {_pct(v)}" for j, v in s["pass_at_k"].items()))
        if s["weighted_vote"]:
            lines.append("Vote weights (calibration accuracy): " + ", ".join(
                f"{a} {_pct(w)}" for a, w in s["weighted_vote"]["weights"].items())
                + (" (all 0, so the weighted vote counted votes equally)."
                   if s["weighted_vote"]["equal_weights_fallback"] else "."))
        if s.get("reference_perplexity"):
            p = s["reference_perplexity"]
            lines.append(f"Perplexity of the reference solutions after the first agent's prompt: {p['perplexity']:.3f} "
                         f"({p['n']} questions, {p['tokens']} solution tokens, mean NLL {p['mean_nll']:.3f} nats).")
        if s.get("matched_compute"):
            lines += [""] + _matched_lines(s, c)
        if s.get("tools"):
            lines += [""] + _tool_lines(s["tools"])
        lines.append("")
    return "\n".join(lines)


def _write_atomic(path, write):
    """Write through a temp file in the same folder, then os.replace: never half a file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path, content):
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)


def plot(result, path):
    """eval.png: lenient accuracy per method, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    methods = [row[0] for row in table_rows(next(iter(runs.values())))]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 4))
    for i, (label, s) in enumerate(runs.items()):
        accs = [100 * row[1] for row in table_rows(s)]
        ax.bar([x + (i - (len(runs) - 1) / 2) * width for x in range(len(methods))], accs, width, label=label)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result['config']['model_name']}: {result['config']['n']} questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_reports(out, result):
    """eval.json, eval.md and eval.png in ``out``, each written atomically; returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    text = markdown(result)
    for name, content in (("eval.json", json.dumps(result, indent=1)), ("eval.md", text)):
        _write_atomic(os.path.join(out, name), lambda tmp: _write_text(tmp, content))
    _write_atomic(os.path.join(out, "eval.png"), lambda tmp: plot(result, tmp))
    return text

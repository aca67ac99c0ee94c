"""The reports of an evaluation: what evaluate.py writes once every run is scored.

    table_rows(s)               one row per method of a scored run: accuracy, strict accuracy,
                                format rate, mean tokens, seconds per question
    compare(base, trained)      base vs trained, method by method, with the difference
    markdown(result)            eval.md: the comparison, then one table per run
    plot(result, path)          eval.png: lenient accuracy per method, one bar per run
    write_reports(out, result)  eval.json, eval.md and eval.png, each written atomically

``result`` is evaluate.main's {config, runs: {label: evaluate.score's summary}, comparison}.
"""

import json
import os


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


def compare(base, trained):
    """{method: {base, trained, delta}} for the accuracies, consistency and pass@k."""
    pairs = {row[0]: (row[1], t[1]) for row, t in zip(table_rows(base), table_rows(trained))}
    pairs["consistency"] = (base["consistency"], trained["consistency"])
    for j, v in (base["pass_at_k"] or {}).items():
        pairs[f"pass@{j}"] = (v, trained["pass_at_k"][j])
    return {m: {"base": b, "trained": t, "delta": t - b} for m, (b, t) in pairs.items()}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result):
    """eval.md: the comparison (with --compare-base), then one table per run."""
    c, runs = result["config"], result["runs"]
    lines = [f"# Evaluation of {c['model_name']}" + (f" + {c['adapter']}" if c["adapter"] else ""), "",
             f"{c['n']} questions from {c['dataset']} [{c['split']}] (seed {c['seed']}), {len(c['agents'])} agents, "
             f"{c['prompt_style']} prompts, {c['samples']} sample(s) per agent, max {c['max_new_tokens']} new tokens, "
             f"calibration slice of {c['calibration_n']} other questions.", ""]
    if result["comparison"]:
        lines += ["## Original vs trained (lenient accuracy)", "", "| method | base | trained | difference |",
                  "|---|---|---|---|"]
        for m, v in result["comparison"].items():
            if m == "consistency":
                lines.append(f"| {m} | {v['base']:.3f} | {v['trained']:.3f} | {v['delta']:+.3f} |")
            else:
                lines.append(f"| {m} | {_pct(v['base'])} | {_pct(v['trained'])} | {100 * v['delta']:+.1f} pts |")
        lines.append("")
    for label, s in runs.items():
        lines += [f"## {label}", "", "| method | accuracy | strict | format | mean tokens | s / question |",
                  "|---|---|---|---|---|---|"]
        for m, acc, strict, fmt, tokens, secs in table_rows(s):
            lines.append(f"| {m} | {_pct(acc)} | {_pct(strict)} | {_pct(fmt)} | "
                         f"{'-' if tokens is None else f'{tokens:.0f}'} | {secs:.2f} |")
        lines += ["", f"Consistency (mean pairwise agreement of the agents' answers): {s['consistency']:.3f}."]
        if s["pass_at_k"]:
            lines.append("pass@k, mean over agents: " + ", ".join(f"pass@{j} {_pct(v)}" for j, v in s["pass_at_k"].items()))
        if s["weighted_vote"]:
            lines.append("Vote weights (calibration accuracy): " + ", ".join(
                f"{a} {_pct(w)}" for a, w in s["weighted_vote"]["weights"].items())
                + (" (all 0, so the weighted vote counted votes equally)."
                   if s["weighted_vote"]["equal_weights_fallback"] else "."))
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

"""Which adapter to keep: each candidate rule's two error rates, simulated (a benchmark)

A run scores the same selection questions at each evaluated step (grpo_math/held_out.py), and a rule
picks the step that ships from those outcomes (grpo_math/best.py). Two errors matter:

  P(keep)   the chance that a run whose true accuracy rises by +5, +10 or +15 points ships a trained
            step, not the base model
  P(harm)   the chance that a run whose trained steps are truly 5 or 10 points below the base ships
            one of them

The outcomes. Question i has an ease z_i ~ N(0, 1); at evaluation k it is right when
sqrt(r) z_i + sqrt(1 - r) e_ik > t_k, with fresh noise e_ik ~ N(0, 1), and t_k set so that the
step's true accuracy is p_k. The correlation r sets the churn: the share of questions that flip each
way between two evaluations of equal accuracy. The churn is taken from the kit's own recorded
outcomes (CHURN_SOURCES: the learning study's base against each trained run on 300 problems, and the
kept-adapter runs' base, last and kept on 100): for each pair, min(questions only A got right, only B
got right) / n. The lowest, median and highest of them are simulated.

The runs. The default schedule of a 250-step run at --eval-every 20 (held_out.due: steps 0, 5, 10,
20, 40, ..., 240, 250: 16 evaluations). A run that learns rises linearly from the base accuracy p0
to p0 + gain at its last step; one that collapses is at p0 - loss from its first trained evaluation
on. Base accuracies 20% and 60%.

The rules (ALPHA the one-sided exact sign test's level on the questions where two steps differ):
  sequential   the kit's rule before: a step replaces the best so far when it is clearly better
  last         the last adapter, unless the base model is clearly better than it
  last-earlier the last adapter, unless an earlier step (the base included) is clearly better: then
               the highest-scoring of those
  last-best    the last adapter, unless the base or the highest-scoring trained step (the one adapter
               kept beside the last) is clearly better: then whichever of those two that is has the
               more right (the base on a tie)
  highest      the trained step with the most right (the latest of ties), unless the base is clearly
               better than it

    python -m bench.selection_power                    # the table of BENCHMARKS.md, "Which adapter you get"
    python -m bench.selection_power --reps 4000 --json bench/selection-power/result.json
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHURN_SOURCES = ("bench/learning-study/base.json", "bench/learning-study/results/*.json", "bench/kept-adapter/*/")
SIZES = (32, 100, 150, 200, 300, 500)
ALPHAS = (0.05, 0.1, 0.2)
RULES = ("sequential", "last", "last-earlier", "last-best", "highest")
GAINS, LOSSES, BASES = (5, 10, 15), (5, 10), (0.2, 0.6)


def schedule(max_steps=250, every=20):
    """The evaluated steps of a run (held_out.due's rule, restated so that this runs without torch)."""
    return [s for s in range(max_steps + 1)
            if s % every == 0 or s >= max_steps or (every >= 4 and s in (every // 4, every // 2))]


def recorded_churn(root=ROOT):
    """[(what, n, only A right, only B right, churn)] from the kit's recorded per-question outcomes."""
    pairs = []
    base_path = os.path.join(root, "bench/learning-study/base.json")
    if os.path.exists(base_path):
        base = json.load(open(base_path))["first_correct"]
        for path in sorted(glob.glob(os.path.join(root, "bench/learning-study/results/*.json"))):
            after = json.load(open(path))["after"]["first_correct"]
            pairs.append((f"learning study {os.path.basename(path)[:-5]}: base, after", base, after))
    for folder in sorted(glob.glob(os.path.join(root, "bench/kept-adapter/*/"))):
        scored = {name: [r["correct"] for r in json.load(open(os.path.join(folder, f"{name}.json")))["records"]]
                  for name in ("base", "last", "kept") if os.path.exists(os.path.join(folder, f"{name}.json"))}
        names = sorted(scored)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pairs.append((f"kept adapter {os.path.basename(folder.rstrip('/'))}: {a}, {b}", scored[a], scored[b]))
    out = []
    for what, a, b in pairs:
        only_a = sum(bool(x) and not y for x, y in zip(a, b))
        only_b = sum(bool(y) and not x for x, y in zip(a, b))
        out.append((what, len(a), only_a, only_b, min(only_a, only_b) / len(a)))
    return out


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _quantile(p):
    """The standard normal's quantile, by bisection on _phi."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < p else (lo, mid)
    return (lo + hi) / 2


def flip_rate(r, p, q=None):
    """P(right at an evaluation of accuracy p, wrong at one of accuracy q) under correlation r: the
    integral over the ease z of P(right | z, p) P(wrong | z, q)."""
    q = p if q is None else q
    tp, tq = _quantile(1 - p), _quantile(1 - q)
    if r >= 1:
        return max(0.0, p - q)
    s, step, total = math.sqrt(r), 0.01, 0.0
    for i in range(-800, 801):
        z = i * step
        right = _phi((s * z - tp) / math.sqrt(1 - r))
        wrong = 1 - _phi((s * z - tq) / math.sqrt(1 - r))
        total += math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * right * wrong * step
    return total


def correlation_for(churn, p):
    """The r at which two evaluations of accuracy p flip ``churn`` of the questions each way."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flip_rate(mid, p) > churn else (lo, mid)
    return (lo + hi) / 2


def simulate(accuracies, n, r, reps, rng):
    """Outcomes, bool (reps, evaluations, n): each evaluation's true accuracy in ``accuracies``."""
    z = rng.standard_normal((reps, 1, n))
    t = np.array([_quantile(1 - p) for p in accuracies]).reshape(1, -1, 1)
    e = rng.standard_normal((reps, len(accuracies), n))
    return math.sqrt(r) * z + math.sqrt(1 - r) * e > t


_TAILS = np.ones((1, 1))  # _TAILS[d, k] = P(Bin(d, 1/2) >= k), grown as needed


def _p_better(wins, losses):
    """The one-sided exact sign test's p for ``wins`` against ``losses`` (arrays): P(Bin(w+l, 1/2) >= w)."""
    global _TAILS
    top = int((wins + losses).max()) if np.size(wins) else 0
    if top >= len(_TAILS):
        _TAILS = np.ones((top + 1, top + 1))
        for d in range(top + 1):
            tail, total = [], 0
            for k in range(d, -1, -1):  # exact integers: 2**d overflows a float's range past d = 1023
                total += math.comb(d, k)
                tail.append(total / 2**d)
            _TAILS[d, : d + 1] = tail[::-1]
    return _TAILS[wins + losses, wins]


def clearly_better(a, b, alpha):
    """Per repetition: is ``a`` (reps, n) right on clearly more of the questions where it differs from ``b``?"""
    wins, losses = (a & ~b).sum(-1), (b & ~a).sum(-1)
    return _p_better(wins, losses) <= alpha


def keep(rule, outcomes, alpha):
    """The index of the evaluation each repetition's ``rule`` keeps (0: the base model)."""
    reps, looks, _ = outcomes.shape
    rows = np.arange(reps)
    last = np.full(reps, looks - 1)
    if rule == "sequential":
        kept = np.zeros(reps, dtype=int)
        for k in range(1, looks):
            kept = np.where(clearly_better(outcomes[:, k], outcomes[rows, kept], alpha), k, kept)
        return kept
    if rule == "last":
        return np.where(clearly_better(outcomes[:, 0], outcomes[:, -1], alpha), 0, last)
    right = outcomes.sum(-1)
    if rule == "last-earlier":
        better = np.stack([clearly_better(outcomes[:, k], outcomes[:, -1], alpha) for k in range(looks - 1)], 1)
        score = np.where(better, right[:, :-1] * looks + np.arange(looks - 1), -1)  # most right, then latest
        return np.where(better.any(1), score.argmax(1), last)
    if rule == "last-best":
        trained = right[:, 1:] * looks + np.arange(1, looks)
        top = trained.argmax(1) + 1  # the highest-scoring trained step (the latest of ties): its adapter is kept
        base_beats = clearly_better(outcomes[:, 0], outcomes[:, -1], alpha)
        top_beats = clearly_better(outcomes[rows, top], outcomes[:, -1], alpha)
        fallback = np.where(top_beats & (~base_beats | (right[rows, top] > right[:, 0])), top, 0)
        return np.where(base_beats | top_beats, fallback, last)
    if rule == "highest":
        trained = right[:, 1:] * looks + np.arange(1, looks)  # most right, then the latest
        top = trained.argmax(1) + 1
        return np.where(clearly_better(outcomes[:, 0], outcomes[rows, top], alpha), 0, top)
    raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")


def trajectory(p0, change, steps):
    """True accuracy at each evaluated step: a rise to p0 + change, linear in the step, or for a
    negative change a collapse to p0 + change from the first trained evaluation on. "rise-fall": up
    to p0 + 0.15 at mid-run, then down to p0 - 0.10 at the last step, linearly."""
    last = steps[-1]
    if change == "rise-fall":
        return [p0 + (0.15 * s / (last / 2) if s <= last / 2 else 0.15 - 0.25 * (s - last / 2) / (last / 2))
                for s in steps]
    if change >= 0:
        return [p0 + change * s / last for s in steps]
    return [p0] + [p0 + change] * (len(steps) - 1)


def power_table(churns, sizes=SIZES, rules=RULES, alphas=ALPHAS, reps=2000, seed=0, steps=None):
    """{(rule, alpha, n): {"keep": {(p0, gain): worst P(ship a trained step) over churns}, "harm": {(p0, loss):
    worst P(ship a trained step)}, "shipped": {(p0, scenario): worst mean true gain of what ships, in points}}}."""
    steps = steps or schedule()
    rng = np.random.default_rng(seed)
    table = {}
    for p0 in BASES:
        for churn in churns:
            r = correlation_for(churn, p0)
            for n in sizes:
                for change in [g / 100 for g in GAINS] + [-l / 100 for l in LOSSES] + ["rise-fall"]:
                    truth = np.array(trajectory(p0, change, steps)) - p0
                    outcomes = simulate(truth + p0, n, r, reps, rng)
                    for rule in rules:
                        for alpha in alphas if rule != "sequential" else (0.05,):
                            kept = keep(rule, outcomes, alpha)
                            row = table.setdefault((rule, alpha, n), {"keep": {}, "harm": {}, "shipped": {}})
                            name = change if isinstance(change, str) else f"{round(change * 100):+d}"
                            shipped = float(100 * truth[kept].mean())
                            row["shipped"][(p0, name)] = min(row["shipped"].get((p0, name), shipped), shipped)
                            if isinstance(change, str):
                                continue
                            p = float((kept > 0).mean())
                            kind, key = ("keep", (p0, round(change * 100))) if change > 0 else \
                                ("harm", (p0, round(-change * 100)))
                            worst = min if kind == "keep" else max
                            row[kind][key] = worst(row[kind].get(key, p), p)
    return table


def meets(row, keep_at=10, keep_min=0.90, harm_at=10, harm_max=0.05):
    """Whether a rule's row meets P(keep a +10 gain) >= 90% and P(ship a -10 loss) <= 5% at both bases."""
    return all(row["keep"][(p0, keep_at)] >= keep_min and row["harm"][(p0, harm_at)] <= harm_max for p0 in BASES)


def report(table, churns):
    print(f"churn each way (min, median, max of the recorded pairs): {', '.join(f'{100 * c:.1f}%' for c in churns)}; "
          f"worst case over them")
    head = "".join(f"{f'keep +{g} @{int(100 * p0)}%':>14}" for p0 in BASES for g in GAINS)
    head += "".join(f"{f'harm -{l} @{int(100 * p0)}%':>14}" for p0 in BASES for l in LOSSES)
    print(f"{'rule':<14}{'alpha':>6}{'n':>5}{head}  meets")
    for (rule, alpha, n), row in table.items():
        cells = "".join(f"{100 * row['keep'][(p0, g)]:>13.1f}%" for p0 in BASES for g in GAINS)
        cells += "".join(f"{100 * row['harm'][(p0, l)]:>13.1f}%" for p0 in BASES for l in LOSSES)
        print(f"{rule:<14}{alpha:>6}{n:>5}{cells}  {'yes' if meets(row) else 'no'}")
    print("\nmean true gain shipped, points (worst over churns): +10 rise, rise to +15 then fall to -10, -10 collapse")
    for (rule, alpha, n), row in table.items():
        cells = "".join(f"{row['shipped'][(p0, name)]:>+12.1f}" for p0 in BASES for name in ("+10", "rise-fall", "-10"))
        print(f"{rule:<14}{alpha:>6}{n:>5}{cells}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2000, help="simulated runs per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="selection set sizes")
    p.add_argument("--json", help="write the table and the recorded churn here")
    args = p.parse_args(argv)
    recorded = recorded_churn()
    if not recorded:
        sys.exit("no recorded outcomes found (bench/learning-study/, bench/kept-adapter/): run it from the kit's folder")
    for what, n, a, b, churn in recorded:
        print(f"{what}: n {n}, only the first right {a}, only the second {b}, churn {100 * churn:.1f}%")
    values = [c for *_, c in recorded]
    churns = (min(values), statistics.median(values), max(values))
    table = power_table(churns, sizes=[int(s) for s in args.sizes.split(",")], reps=args.reps, seed=args.seed)
    report(table, churns)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        rows = [{"rule": rule, "alpha": alpha, "n": n, "meets": meets(row),
                 "keep": {f"{int(100 * p0)}%+{g}": v for (p0, g), v in row["keep"].items()},
                 "harm": {f"{int(100 * p0)}%-{l}": v for (p0, l), v in row["harm"].items()},
                 "shipped": {f"{int(100 * p0)}% {name}": v for (p0, name), v in row["shipped"].items()}}
                for (rule, alpha, n), row in table.items()]
        with open(args.json, "w") as f:
            json.dump({"command": "python -m bench.selection_power " + " ".join(argv or sys.argv[1:]),
                       "reps": args.reps, "seed": args.seed, "schedule": schedule(), "churns": churns,
                       "recorded": recorded, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

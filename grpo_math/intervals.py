"""95% intervals for accuracies measured on a fixed set of questions.

    wilson(k, n)                  the Wilson score interval of one accuracy, k right of n
    paired_difference(a, b)       mean(b) - mean(a) over the same questions, with a paired
                                  bootstrap interval: the questions are resampled, not the runs
    mcnemar(a, b)                 the exact McNemar test: of the questions where a and b disagree,
                                  how unlikely is a split this uneven if neither is better
    pooled_difference(pairs)      over several training seeds, each a pair (a, b) on the same
                                  questions: the mean paired difference, with a two-level bootstrap
                                  interval (the seeds are resampled, then the questions within each)

``a`` and ``b`` are per-question outcomes (True/False or 1/0) in the same order, before and after
training say. At 100 questions an accuracy's interval is about +-9 points wide, so a change of a
few points is noise; the paired interval is narrower, as each question is its own control.
"""

import math
import random

Z95 = 1.959963984540054


def wilson(k, n, z=Z95):
    """(low, high) of the Wilson score interval for k successes in n trials."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)  # exact ends, no rounding


def paired_difference(a, b, reps=10_000, seed=0, level=0.95):
    """{"difference", "low", "high", "n"}: mean(b) - mean(a), with a percentile interval from
    ``reps`` bootstrap resamples of the questions."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equal, non-empty lists of outcomes, got {len(a)} and {len(b)}")
    deltas = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(deltas)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(deltas, k=n)) / n for _ in range(reps))
    tail = (1 - level) / 2
    return {"difference": sum(deltas) / n, "low": means[int(tail * reps)],
            "high": means[min(reps - 1, int((1 - tail) * reps))], "n": n}


def mcnemar(a, b):
    """{"only_a", "only_b", "p_value"}: the questions only ``a`` got right, only ``b`` got right,
    and the exact two-sided p-value of that split (binomial, one half)."""
    if len(a) != len(b):
        raise ValueError(f"need two equal lists of outcomes, got {len(a)} and {len(b)}")
    only_a = sum(bool(x) and not y for x, y in zip(a, b))
    only_b = sum(bool(y) and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def pooled_difference(pairs, reps=10_000, seed=0, level=0.95):
    """{"difference", "low", "high", "se", "seeds", "n"}: the mean over seeds of mean(b) - mean(a), for
    ``pairs`` [(a, b), ...] of outcomes, one pair per training seed. The interval resamples the seeds,
    then the questions within each seed drawn, so it holds both the spread between seeds and the
    noise of a finite question set; ``se`` is the standard deviation of the resampled means."""
    if not pairs or any(len(a) != len(b) or not a for a, b in pairs):
        raise ValueError("need one or more pairs of equal, non-empty lists of outcomes")
    deltas = [[float(y) - float(x) for x, y in zip(a, b)] for a, b in pairs]
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        seeds = rng.choices(deltas, k=len(deltas))
        means.append(sum(sum(rng.choices(d, k=len(d))) / len(d) for d in seeds) / len(seeds))
    means.sort()
    centre = sum(means) / reps
    tail = (1 - level) / 2
    return {"difference": sum(sum(d) / len(d) for d in deltas) / len(deltas), "low": means[int(tail * reps)],
            "high": means[min(reps - 1, int((1 - tail) * reps))],
            "se": math.sqrt(sum((m - centre) ** 2 for m in means) / (reps - 1)),
            "seeds": len(deltas), "n": sum(len(d) for d in deltas)}


def detectable_difference(se, z_power=0.8416212335729143, z=Z95):
    """The smallest true difference a study whose estimate has standard error ``se`` finds with 80%
    power at the 5% level (two-sided): (z_0.975 + z_0.8) x se, about 2.8 standard errors."""
    return (z + z_power) * se

"""The rule that picks the adapter a run keeps (grpo_math/best.py) on simulated runs, and the simulation
that chose it (bench/selection_power.py): its figures against the exact binomial, and the kit's rule
against the simulation's copy of it."""

import math

import numpy as np
import pytest

from bench import selection_power as sim
from grpo_math import best


def runs(change, reps, n=200, p0=0.4, churn=0.05, seed=0):
    """``reps`` simulated runs of the default schedule, bool (reps, evaluations, n)."""
    steps = sim.schedule()
    r = sim.correlation_for(churn, p0)
    return steps, sim.simulate(sim.trajectory(p0, change, steps), n, r, reps, np.random.default_rng(seed))


def kept_steps(steps, outcomes):
    return [best.select(list(zip(steps, run.tolist()))) for run in outcomes]


def test_a_run_that_gains_keeps_a_trained_step_and_a_collapse_keeps_the_base():
    """200 selection questions, 16 evaluations, 5% of answers flipping each way between any two."""
    steps, rising = runs(0.15, 40)
    assert all(step > 0 for step in kept_steps(steps, rising))  # +15 points by the last step
    assert kept_steps(steps, rising).count(steps[-1]) >= 30  # most often the last itself
    steps, collapsed = runs(-0.10, 40, seed=1)
    assert all(step == 0 for step in kept_steps(steps, collapsed))  # 10 points below from step 5 on


def test_a_flat_run_keeps_the_last_adapter_unless_an_earlier_model_wins_by_chance():
    """No true change: the rule keeps the last, except where the base or the highest-scoring step is clearly
    better by chance (p <= 0.2 against the last), which then ships: no worse than the last, in truth. The
    highest of 15 equal steps is often that far above the last: about half the runs keep it."""
    steps, flat = runs(0.0, 60, seed=2)
    kept = kept_steps(steps, flat)
    assert 0.25 < kept.count(steps[-1]) / len(kept) < 0.75
    for step, run in zip(kept, flat):
        if step != steps[-1]:
            other = run[steps.index(step)]
            assert best.compare(other.tolist(), run[-1].tolist())["p_better"] <= best.ALPHA


def test_the_simulations_copy_of_the_rule_is_the_kits():
    for change, seed in ((0.10, 3), (-0.05, 4), ("rise-fall", 5), (0.0, 6)):
        steps, outcomes = runs(change, 30, n=40, seed=seed)
        assert kept_steps(steps, outcomes) == [steps[i] for i in sim.keep("last-best", outcomes, best.ALPHA)]


def exact_keep(rule_alpha, n, w, l, step_must_win):
    """One look: P(the step is kept) as a trinomial sum over W (only the step right) and L (only the base)."""
    total = 0.0
    for wins in range(n + 1):
        for losses in range(n + 1 - wins):
            p = math.comb(n, wins) * math.comb(n - wins, losses) * w**wins * l**losses * (1 - w - l) ** (n - wins - losses)
            tail = (lambda k, d: sum(math.comb(d, i) for i in range(k, d + 1)) / 2**d)
            if step_must_win:  # the old rule: the step replaces the base when it is clearly better
                kept = tail(wins, wins + losses) <= rule_alpha
            else:  # the last adapter, unless the base is clearly better
                kept = not tail(losses, wins + losses) <= rule_alpha
            total += p * kept
    return total


@pytest.mark.parametrize("rule, alpha", [("sequential", 0.05), ("last", 0.2)])
def test_one_look_matches_the_exact_binomial(rule, alpha):
    """Base and one step, 30 questions answered independently (r = 0): base right with 30%, step with 45%.
    Then a question is right only for the step with 0.7 x 0.45 = 0.315, only for the base with 0.3 x 0.55."""
    n, p0, p1, reps = 30, 0.30, 0.45, 20000
    outcomes = sim.simulate([p0, p1], n, 0.0, reps, np.random.default_rng(7))
    simulated = (sim.keep(rule, outcomes, alpha) > 0).mean()
    exact = exact_keep(alpha, n, (1 - p0) * p1, p0 * (1 - p1), step_must_win=rule == "sequential")
    assert abs(simulated - exact) < 4 * math.sqrt(exact * (1 - exact) / reps), (simulated, exact)


def test_the_churn_calibration():
    r = sim.correlation_for(0.05, 0.3)
    assert 0 < r < 1 and abs(sim.flip_rate(r, 0.3) - 0.05) < 1e-3
    assert abs(sim.flip_rate(0.0, 0.3) - 0.3 * 0.7) < 1e-3  # independent: right once and wrong once
    outcomes = sim.simulate([0.3, 0.3], 4000, r, 20, np.random.default_rng(8))
    only_first = (outcomes[:, 0] & ~outcomes[:, 1]).mean()
    assert abs(only_first - 0.05) < 0.005  # the simulated churn is the calibrated one

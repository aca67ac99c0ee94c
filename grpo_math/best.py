"""Which adapter a run keeps: the best by held-out accuracy, so that a run never ends worse than the
model it started from.

    compare(candidate, best)  the paired comparison of two evaluations on the same questions: the
                              questions only one of them got right, and the one-sided p-values
    select(evaluations)       the step the rule keeps from [(step, outcomes)], oldest first
    Keeper(out, ...)          the rule as training goes (held_out.py calls it after each evaluation):
                              saves each new best to RUN/best/, counts the evaluations clearly below it
    read(out)                 RUN/best/best.json, or None where the run selected nothing
    adapter_to_load(out, which)
                              for evaluate.py and export.py: the folder of the kept adapter (or of the
                              last, with --checkpoint last), or None for the base model, and the line
                              that says which

The rule. Every evaluation scores the same selection questions (--select-examples, held out from
training and apart from the --eval-examples the final figure is taken on), so two steps compare
question by question. A step replaces the best so far only when it is right on clearly more of the
questions on which the two differ: the one-sided exact sign test on those questions gives p <= ALPHA.
Ties and small gains keep the earlier step, and step 0 is the base model, so a run keeps the base
until some step beats it by more than noise. The highest accuracy would not do: in the learning check
that collapsed (BENCHMARKS.md, "Which adapter you get"), 16 questions read 1 right at the base and 2
at step 20, which scored 21 points below the base on 100 others.

What the rule can see: a step must win at least MIN_WINS = 5 more questions than it loses before it
can replace the best (with no question lost, p = 1/32 <= 0.05; 4 give 1/16), that is 5/n of
accuracy: 16 points with the default 32 questions. A smaller gain keeps the earlier step: the rule
trades missed gains for no false ones.

RUN/best/ holds the kept adapter and tokenizer, and best.json: the step, its accuracy with a Wilson
95% interval, n, format compliance, why it was kept, the same figures for step 0, and the per-question
outcomes (a resumed run compares against them). When no step beat the base, best.json names step 0
and there is no adapter. A new best is written beside the old one (best.new/) and then swapped in, so
that a kill at any moment leaves one complete RUN/best/. A resumed run compares against the best it
finds there, even one saved after the checkpoint it resumes from: that adapter was scored on the same
questions. The trainer's own best_metric and best_global_step (trainer_state.json) record it too;
best_model_checkpoint is left alone, since it names a checkpoint-N folder that save_total_limit must
spare, and the kept adapter is written at evaluation steps, not checkpoint steps, without the optimizer
state that makes a checkpoint several times larger.
"""

import json
import math
import os
import shutil

from grpo_math import intervals, runs

ALPHA = 0.05  # a step replaces the best when a fair coin would win that often in fewer than 1 in 20 tries
MIN_WINS = math.ceil(math.log2(1 / ALPHA))  # the fewest net wins that can pass: 0.5**5 = 1/32
BEST_DIR, BEST_FILE = "best", "best.json"
RULE = (f"a step replaces the best so far when it is right on more of the questions where the two differ, "
        f"one-sided exact sign test p <= {ALPHA}; ties go to the earlier step")


def compare(candidate, best):
    """{"wins", "losses", "p_better", "p_worse"}: the questions only ``candidate`` got right (wins) and
    only ``best`` got right (losses), and the one-sided exact p-values of a split at least that lopsided
    each way, if each such question were a fair coin."""
    if len(candidate) != len(best):
        raise ValueError(f"need the outcomes of the same questions, got {len(candidate)} and {len(best)}")
    wins = sum(bool(c) and not b for c, b in zip(candidate, best))
    losses = sum(bool(b) and not c for c, b in zip(candidate, best))
    n = wins + losses

    def tail(k):
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n else 1.0

    return {"wins": wins, "losses": losses, "p_better": tail(wins), "p_worse": tail(losses)}


def select(evaluations):
    """The step the rule keeps from ``evaluations``, [(step, outcomes)] oldest first (step 0 the base)."""
    kept_step, kept = evaluations[0]
    for step, outcomes in evaluations[1:]:
        if compare(outcomes, kept)["p_better"] <= ALPHA:
            kept_step, kept = step, outcomes
    return kept_step


def summary(step, result):
    """The figures best.json gives of one evaluation (a quick_eval result)."""
    correct = [bool(r["correct"]) for r in result["records"]]
    n, right = len(correct), sum(correct)
    return {"step": step, "accuracy": right / n, "accuracy_95": list(intervals.wilson(right, n)), "n": n,
            "format_compliance": result["format_compliance"]}


def describe(record):
    """One line: the kept step, its accuracy, and why."""
    acc = f"held-out accuracy {record['accuracy']:.3f} [{record['accuracy_95'][0]:.3f}, {record['accuracy_95'][1]:.3f}]"
    if not record["adapter"]:
        return (f"no step beat the base model on the {record['n']} held-out selection questions ({acc} at step 0): "
                "the kept model is the base model")
    return f"kept step {record['step']} ({acc} on {record['n']} selection questions): {record['why']}"


class Keeper:
    """The rule as training goes, on the first process. ``update`` takes each evaluation: a new best is
    saved to RUN/best/ at once; ``worse_in_a_row`` counts the evaluations since that were clearly below it
    (p_worse <= ALPHA), for --stop-after-worse."""

    def __init__(self, out, model, tokenizer):
        self.out, self.model, self.tokenizer = out, model, tokenizer
        self.best = None
        self.worse_in_a_row = 0

    def resume(self):
        """A resumed run: the best so far from RUN/best/best.json (None where the run had none)."""
        self.best = read(self.out)

    def update(self, step, result):
        """Compare the evaluation of ``step`` with the best so far; save it when it is the new best.
        Returns the best record after it."""
        outcomes = [bool(r["correct"]) for r in result["records"]]
        if self.best is None or step == 0:
            why = "the base model, scored first" if step == 0 else "the first step scored on --resume with no best saved"
            return self._keep(step, result, outcomes, why)
        if len(self.best["correct"]) != len(outcomes):  # another --select-examples on --resume: start the count again
            return self._keep(step, result, outcomes, "the first step scored on these questions")
        c = compare(outcomes, self.best["correct"])
        if c["p_better"] <= ALPHA:
            why = (f"beat step {self.best['step']}: right on {c['wins']} questions it got wrong, wrong on "
                   f"{c['losses']} it got right (one-sided sign test p={c['p_better']:.2g} <= {ALPHA})")
            return self._keep(step, result, outcomes, why, against=c)
        self.worse_in_a_row = self.worse_in_a_row + 1 if c["p_worse"] <= ALPHA else 0
        return self.best

    def _keep(self, step, result, outcomes, why, against=None):
        record = {**summary(step, result), "adapter": step > 0, "why": why, "rule": RULE,
                  "against_best": against,
                  "base": summary(0, result) if step == 0 else self.best and self.best["base"],
                  "questions": [r["question"] for r in result["records"]], "correct": outcomes}
        save(self.out, self.model if step else None, self.tokenizer, record)
        self.best, self.worse_in_a_row = record, 0
        return record


def save(out, model, tokenizer, record):
    """RUN/best/: ``model``'s adapter and the tokenizer (none for the base model) and best.json, written
    to best.new/ and swapped in."""
    path = os.path.join(out, BEST_DIR)
    new, old = path + ".new", path + ".old"
    if os.path.isdir(path):  # what an earlier kill left beside a whole best/
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    if model is not None:
        model.save_pretrained(new)
        tokenizer.save_pretrained(new)
    runs.write_json_atomic(os.path.join(new, BEST_FILE), record)  # last: best.new/ is complete once it is there
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def read(out):
    """The kept record of the run in ``out``, or None. A kill in the middle of save() leaves best.old/
    or a complete best.new/ beside a missing best/: the newest complete one is put back."""
    path = os.path.join(out, BEST_DIR)
    if not os.path.isfile(os.path.join(path, BEST_FILE)):
        for candidate in (path + ".new", path + ".old"):
            if os.path.isfile(os.path.join(candidate, BEST_FILE)):
                shutil.rmtree(path, ignore_errors=True)
                os.rename(candidate, path)
                break
        else:
            return None
    with open(os.path.join(path, BEST_FILE)) as f:
        return json.load(f)


def last_step(out):
    """The step of the run's last adapter (in ``out`` itself), where config.json records it."""
    return runs.read_config(out).get("finished_step")


def adapter_to_load(out, which="best"):
    """(folder of the adapter to load, or None for the base model; the line that says which) for the run
    in ``out``. ``which``: "best", the kept one where the run selected one, or "last"."""
    last = last_step(out)
    last_name = f"the last adapter (step {last})" if last is not None else "the last adapter"
    if which == "last":
        return out, f"{out}: loading {last_name} (--checkpoint last)"
    record = read(out)
    if record is None:
        return out, (f"{out}: no {BEST_DIR}/, the run selected no adapter (held-out evaluation during training was "
                     f"off): loading {last_name}")
    if not record["adapter"]:
        return None, (f"{out}: no step beat the base model on the held-out questions ({BEST_DIR}/{BEST_FILE}): "
                      f"using the base model; --checkpoint last takes {last_name}")
    return os.path.join(out, BEST_DIR), (f"{out}: loading the kept adapter, step {record['step']} of the run "
                                         f"({BEST_DIR}/); --checkpoint last takes {last_name}")


def load_kept(model, out, kept, last):
    """Put the kept adapter's weights into ``model``, which holds those of the last step ``last``."""
    if kept is not None and kept["adapter"] and kept["step"] != last:
        runs.load_checkpoint_weights(model, {"checkpoint": os.path.join(out, BEST_DIR), "step": kept["step"]})


def evaluate_kept(model, out, kept, last, quick_eval):
    """After training: score the kept model with ``quick_eval(model)`` on the questions the selection never
    saw, and the last adapter too where it is another; write eval.json. ``model`` holds the last step's
    weights, and the kept ones after (the base model's are scored with the adapter turned off)."""
    last_result = quick_eval(model) if kept is not None and kept["step"] != last else None
    load_kept(model, out, kept, last)
    if kept is not None and not kept["adapter"]:
        with model.disable_adapter():
            result = quick_eval(model)
    else:
        result = quick_eval(model)
    which = "the last adapter" if kept is None else "the base model" if not kept["adapter"] else "the kept adapter"
    result = {**result, "model": which, "step": last if kept is None else kept["step"]}
    if last_result is not None:
        result["last"] = {k: last_result[k] for k in ("n", "accuracy", "format_compliance")} | {"step": last}
    runs.write_json_atomic(os.path.join(out, "eval.json"), result)
    for r, what in ((result, f"{which} (step {result['step']})"), (last_result, f"the last adapter (step {last})")):
        if r is not None:
            lo, hi = intervals.wilson(sum(x["correct"] for x in r["records"]), r["n"])
            print(f"quick evaluation of {what} on {r['n']} held-out questions: accuracy {r['accuracy']:.3f} "
                  f"[{lo:.3f}, {hi:.3f}], format compliance {r['format_compliance']:.3f}")
    return result


def closing_line(out, kept, last):
    """What the run leaves, and what evaluate.py and export.py take from it."""
    if kept is None:
        return (f"no adapter was selected (held-out evaluation during training was off: --eval-every 0, "
                f"--select-examples 0 or --skip-evaluation): {out} holds the last adapter, step {last}")
    if not kept["adapter"]:
        return (describe(kept) + f" ({BEST_DIR}/{BEST_FILE}). The last adapter, step {last}, is in {out}: "
                "evaluate.py and export.py take it with --checkpoint last")
    return (describe(kept) + f". It is in {out}/{BEST_DIR}/, which evaluate.py and export.py take; the last "
            f"adapter, step {last}, stays in {out} (--checkpoint last)")

"""Which adapter a run keeps: the last, unless the held-out questions say clearly that an earlier model
is better, so that a run keeps what it gained and never ships a collapse.

    compare(candidate, other)  the paired comparison of two evaluations on the same questions: the
                              questions only one of them got right, and the one-sided p-values
    choose(base, highest, last)
                              the rule: which of the three evaluations ships, why, and the comparison
    select(evaluations)       the step the rule keeps from [(step, outcomes)], oldest first
    Keeper(out, ...)          the rule as training goes (held_out.py calls it after each evaluation):
                              saves the kept adapter to RUN/best/ and the highest-scoring one to
                              RUN/highest/, counts the evaluations at which the latest step lost
    read(out)                 RUN/best/best.json, or None where the run selected nothing
    adapter_to_load(out, which)
                              for evaluate.py and export.py: the folder of the kept adapter (or of the
                              last, with --checkpoint last), or None for the base model, and the line
                              that says which

The rule. Every evaluation scores the same selection questions (--select-examples, held out from
training and apart from the --eval-examples the final figure is taken on), so two models compare
question by question. The last adapter ships, unless the base model or the highest-scoring trained
step (the one adapter kept beside the last) is clearly better than it: right on more of the questions
where the two differ, enough that the one-sided exact sign test on those questions gives p <= ALPHA.
Then whichever of those two is clearly better, or of both the one with more right (the base on a
tie), ships instead.

Why this rule, and ALPHA = 0.2 with 200 selection questions (BENCHMARKS.md, "Which adapter you get";
bench/selection_power.py simulates each candidate rule with the churn measured in the kit's own
runs): over the 16 evaluations of a 250-step run, at base accuracies of 20% and 60%, a run whose
accuracy rises by 10 points ships a trained step in 99.9% of runs or more, and one whose steps are
all 10 points below the base ships one in at most 1.0%. The rule it replaces (a step replaces the
best so far when it is clearly better, p <= 0.05, on 32 questions) kept the base model in 64-66% of
the runs that gained 10 points. What gives way: a step only 5 points below the base ships in 30-33%
of runs. A run that rises 15 points and then falls 10 below the base ships, on average, a step 13.5
points above it.

RUN/best/ holds the kept adapter and tokenizer, and best.json: the step, its accuracy with a Wilson
95% interval, n, format compliance, why it was kept, the base model's figures and per-question
outcomes, and those of the highest-scoring and the last evaluated steps (a resumed run compares
against them). When the base model is kept, best.json names step 0 and there is no adapter.
RUN/highest/ holds the highest-scoring trained step's adapter and highest.json (its step and
outcomes), for the rule to fall back to. Each folder is written beside the old one (NAME.new/) and
then swapped in, so that a kill at any moment leaves one complete folder. The trainer's own
best_metric and best_global_step (trainer_state.json) record the kept step too; best_model_checkpoint
is left alone, since it names a checkpoint-N folder that save_total_limit must spare, and the kept
adapter is written at evaluation steps, not checkpoint steps, without the optimizer state that makes
a checkpoint several times larger.
"""

import json
import math
import os
import shutil

from grpo_math import intervals, runs

ALPHA = 0.2  # clearly better: a fair coin would split the differing questions so unevenly less than 1 time in 5
BEST_DIR, BEST_FILE = "best", "best.json"
HIGHEST_DIR, HIGHEST_FILE = "highest", "highest.json"
RULE = (f"the last adapter, unless the base model or the highest-scoring trained step is clearly better on the "
        f"selection questions (one-sided exact sign test on the questions where the two differ, p <= {ALPHA}): "
        "then that one, or of both the one with more right (the base on a tie)")


def compare(candidate, other):
    """{"wins", "losses", "p_better", "p_worse"}: the questions only ``candidate`` got right (wins) and
    only ``other`` got right (losses), and the one-sided exact p-values of a split at least that lopsided
    each way, if each such question were a fair coin."""
    if len(candidate) != len(other):
        raise ValueError(f"need the outcomes of the same questions, got {len(candidate)} and {len(other)}")
    wins = sum(bool(c) and not b for c, b in zip(candidate, other))
    losses = sum(bool(b) and not c for c, b in zip(candidate, other))
    n = wins + losses

    def tail(k):
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n else 1.0

    return {"wins": wins, "losses": losses, "p_better": tail(wins), "p_worse": tail(losses)}


def choose(base, highest, last):
    """The rule on three evaluations, each {"step", "correct"} (``base`` or ``highest`` may be None, and
    ``highest`` may be ``last`` itself): (the one that ships, why, the comparison that decided or None)."""
    beats = []
    for other in (base, highest):
        if other is not None and other["step"] != last["step"]:
            c = compare(other["correct"], last["correct"])
            if c["p_better"] <= ALPHA:
                beats.append((sum(other["correct"]), other is base, other, c))
    if not beats:
        return last, "the last adapter: neither the base model nor an earlier step was clearly better", None
    _, _, kept, c = max(beats, key=lambda b: b[:2])  # more right, then the base
    name = "the base model" if kept is base else f"step {kept['step']}"
    return kept, (f"{name} was clearly better than step {last['step']}: right on {c['wins']} selection questions it "
                  f"got wrong, wrong on {c['losses']} it got right (one-sided sign test p={c['p_better']:.2g} <= "
                  f"{ALPHA})"), c


def select(evaluations):
    """The step the rule keeps from ``evaluations``, [(step, outcomes)] oldest first (step 0 the base)."""
    entries = [{"step": step, "correct": outcomes} for step, outcomes in evaluations]
    base, trained = entries[0], entries[1:]
    if not trained:
        return base["step"]
    highest = max(trained, key=lambda e: (sum(e["correct"]), e["step"]))  # the latest of ties
    return choose(base, highest, trained[-1])[0]["step"]


def summary(step, result):
    """The figures best.json gives of one evaluation (a quick_eval result)."""
    correct = [bool(r["correct"]) for r in result["records"]]
    n, right = len(correct), sum(correct)
    return {"step": step, "accuracy": right / n, "accuracy_95": list(intervals.wilson(right, n)), "n": n,
            "format_compliance": result["format_compliance"]}


def describe(record):
    """One line: the kept model, its accuracy, and why."""
    acc = f"held-out accuracy {record['accuracy']:.3f} [{record['accuracy_95'][0]:.3f}, {record['accuracy_95'][1]:.3f}]"
    if not record["adapter"]:
        return f"the base model is kept ({acc} on {record['n']} selection questions): {record['why']}"
    return f"kept step {record['step']} ({acc} on {record['n']} selection questions): {record['why']}"


class Keeper:
    """The rule as training goes, on the first process. ``update`` takes each evaluation: the highest-scoring
    trained step's adapter is saved to RUN/highest/, the kept one's to RUN/best/, at once; ``worse_in_a_row``
    counts the evaluations since the last at which the rule kept the latest step, for --stop-after-worse."""

    def __init__(self, out, model, tokenizer):
        self.out, self.model, self.tokenizer = out, model, tokenizer
        self.best = None  # best.json's record
        self.highest = None  # highest.json's: {"step", "correct", ...}
        self.worse_in_a_row = 0

    def resume(self):
        """A resumed run: the kept record and the highest-scoring step so far (None where there are none)."""
        self.best, self.highest = read(self.out), read(self.out, HIGHEST_DIR, HIGHEST_FILE)

    def update(self, step, result):
        """Add the evaluation of ``step`` (step 0: the base model), apply the rule and save what it keeps.
        Returns the kept record."""
        entry = {**summary(step, result), "correct": [bool(r["correct"]) for r in result["records"]]}
        base = self.best and self.best["base"]
        if step == 0:
            base, self.highest = entry, None
        elif base is not None and len(base["correct"]) != len(entry["correct"]):
            base = self.highest = None  # another --select-examples on --resume: compare from here on
        if step == 0:
            kept, why, against = base, "the base model, scored first", None
        else:
            if self.highest is None or len(self.highest["correct"]) != len(entry["correct"]) or \
                    sum(entry["correct"]) >= sum(self.highest["correct"]):
                self.highest = entry
                save(self.out, self.model, self.tokenizer, entry, HIGHEST_DIR, HIGHEST_FILE)
            kept, why, against = choose(base, self.highest, entry)
        self.worse_in_a_row = self.worse_in_a_row + 1 if step and kept is not entry else 0
        record = {**{k: v for k, v in kept.items() if k != "correct"}, "adapter": kept["step"] > 0, "why": why,
                  "rule": RULE, "against": against, "questions": [r["question"] for r in result["records"]],
                  "correct": kept["correct"], "base": base, "highest": self.highest, "last": entry}
        if kept is entry:  # the model holds its weights
            save(self.out, self.model if step else None, self.tokenizer, record)
        elif kept is base:
            save(self.out, None, self.tokenizer, record)
        else:  # the highest-scoring step: its adapter is in RUN/highest/
            save(self.out, None, self.tokenizer, record, source=os.path.join(self.out, HIGHEST_DIR))
        self.best = record
        return record


def save(out, model, tokenizer, record, name=BEST_DIR, file=BEST_FILE, source=None):
    """RUN/NAME/: ``model``'s adapter and the tokenizer (or those in the folder ``source``; neither for the base
    model) and ``record`` as FILE, written to NAME.new/ and swapped in."""
    path = os.path.join(out, name)
    new, old = path + ".new", path + ".old"
    if os.path.isdir(path):  # what an earlier kill left beside a whole folder
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)
    if source is not None:
        shutil.copytree(source, new, ignore=shutil.ignore_patterns(HIGHEST_FILE))
    else:
        os.makedirs(new)
        if model is not None:
            save_adapter(model, tokenizer, new)
    runs.write_json_atomic(os.path.join(new, file), record)  # last: NAME.new/ is complete once it is there
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, tokenizer, folder):
    """The LoRA adapter of ``model`` and the tokenizer, as PeftModel.save_pretrained writes them, from this
    process alone: only the first process evaluates, and Unsloth's save_pretrained, with several processes,
    waits for the others (a collective they never join)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def read(out, name=BEST_DIR, file=BEST_FILE):
    """The record of RUN/NAME/FILE (the kept one by default), or None. A kill in the middle of save() leaves
    NAME.old/ or a complete NAME.new/ beside a missing NAME/: the newest complete one is put back."""
    path = os.path.join(out, name)
    if not os.path.isfile(os.path.join(path, file)):
        for candidate in (path + ".new", path + ".old"):
            if os.path.isfile(os.path.join(candidate, file)):
                shutil.rmtree(path, ignore_errors=True)
                os.rename(candidate, path)
                break
        else:
            return None
    with open(os.path.join(path, file)) as f:
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
        return None, (f"{out}: the run kept the base model, clearly better than its last adapter on the held-out "
                      f"selection questions ({BEST_DIR}/{BEST_FILE}): using the base model; --checkpoint last takes "
                      f"{last_name}")
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
    if kept["step"] == last:
        return describe(kept) + f". It is in {out}/{BEST_DIR}/ and {out}, which evaluate.py and export.py take"
    return (describe(kept) + f". It is in {out}/{BEST_DIR}/, which evaluate.py and export.py take; the last "
            f"adapter, step {last}, stays in {out} (--checkpoint last)")

"""Which adapter a run keeps (grpo_math/best.py): the rule on made-up outcomes, then the tiny model end
to end with the evaluations rigged (tests/faults.py rig-best-step-N) so that one step is the best: what
RUN/best/ holds, what evaluate.py and export.py load, --resume after a kill, --stop-after-worse, and
the held-out sets, apart from each other and from the training rows."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import export
from conftest import assert_held_out_sets_apart, forks, stats_of
from grpo_math import best, held_out

SCRIPT = "train_synthetic.py"
RIGGED = ["--smoke", "--eval-every", "1"]  # steps 0 to 4 all scored, 8 selection questions, a checkpoint every 2


def outcomes(right, n=16):
    """``right`` questions right (the first ones) of ``n``."""
    return [i < right for i in range(n)]


@pytest.mark.parametrize("what, evaluations, kept", [
    # rising: the last is the highest, and nothing earlier beats it
    ("rising", [(0, outcomes(2)), (20, outcomes(5)), (40, outcomes(8)), (60, outcomes(9))], 60),
    # rising a little: 2 more right than the base, far from proof, and the last still ships
    ("rising a little", [(0, outcomes(4)), (20, outcomes(5)), (40, outcomes(6))], 40),
    # up by 6 at step 20, then below the base: step 20 is clearly better than the last (9 of 9), and has more
    # right than the base, which is clearly better too (3 of 3)
    ("up, then down", [(0, outcomes(4)), (20, outcomes(10)), (40, outcomes(3)), (60, outcomes(1))], 20),
    # collapsing: every step below the base, which is clearly better than the last and has the most right
    ("collapsing", [(0, outcomes(8)), (20, outcomes(3)), (40, outcomes(2)), (60, outcomes(1))], 0),
    # flat: the same answers at every step; the last ships
    ("flat", [(0, outcomes(6)), (20, outcomes(6)), (40, outcomes(6))], 40),
    # a small fall, 2 questions (the learning check's 2 -> 1 of 16 seen the other way): no proof, the last ships
    ("a small fall", [(0, outcomes(3)), (20, outcomes(2)), (40, outcomes(1))], 40),
    # only the base was scored: it is what the run has
    ("base only", [(0, outcomes(3))], 0),
])
def test_the_rule_on_made_up_runs(what, evaluations, kept):
    assert best.select(evaluations) == kept, what


def test_the_rule_compares_question_by_question():
    """The same accuracy is not a tie when the questions differ; 3 wins and no loss are clearly better (1/8 <= 0.2),
    2 are not (1/4)."""
    a = [True] * 6 + [False] * 10
    b = [False] * 6 + [True] * 6 + [False] * 4  # 6 right each, on other questions
    c = best.compare(b, a)
    assert (c["wins"], c["losses"]) == (6, 6) and c["p_better"] == c["p_worse"] > 0.5
    assert best.compare(outcomes(3), outcomes(0))["p_better"] == 1 / 8 <= best.ALPHA
    assert best.compare(outcomes(2), outcomes(0))["p_better"] == 1 / 4 > best.ALPHA
    assert best.compare(outcomes(0), outcomes(5))["p_worse"] == 1 / 32
    with pytest.raises(ValueError, match="same questions"):
        best.compare(outcomes(1, 8), outcomes(1, 16))


def test_early_evaluations_are_scheduled():
    assert [s for s in range(61) if held_out.due(s, 20, 60)] == [0, 5, 10, 20, 40, 60]
    assert [s for s in range(5) if held_out.due(s, 2, 4)] == [0, 2, 4]  # below 4, no early ones
    assert [s for s in range(7) if held_out.due(s, 3, 7)] == [0, 3, 6]  # and the last step, 7, beyond the range
    assert not any(held_out.due(s, 0, 10) for s in range(11))


def popen(fault, *flags):
    """tests/faults.py FAULT SCRIPT FLAGS, started (forked: conftest.forks)."""
    return forks().run([os.path.join("tests", "faults.py"), fault, SCRIPT, *flags])


@pytest.fixture(scope="module")
def rigged_runs(tmp_path_factory):
    """Side by side: step 2 of 4 rigged to be the best; the same killed after step 3, then resumed; the base
    rigged to be the best with --stop-after-worse 2; then evaluate.py and export.py on the first."""
    base = tmp_path_factory.mktemp("best")
    out = {name: str(base / name) for name in ("best-2", "killed", "stop")}
    procs = {"best-2": popen("rig-best-step-2", *RIGGED, "--output-dir", out["best-2"]),
             "killed": popen("rig-best-step-2+kill-after-step-3", *RIGGED, "--output-dir", out["killed"]),
             "stop": popen("rig-best-step-0", *RIGGED, "--stop-after-worse", "2", "--output-dir", out["stop"])}
    done = {name: p.result(timeout=600) for name, p in procs.items()}
    for name in ("best-2", "stop"):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    assert done["killed"].returncode == -9, done["killed"].stderr[-3000:]
    done["killed_best"] = best.read(out["killed"])
    resumed = popen("rig-best-step-2", "--resume", "--output-dir", out["killed"])
    done["resumed"] = resumed.result(timeout=600)
    assert done["resumed"].returncode == 0, done["resumed"].stderr[-3000:]
    return out, done


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_keeps_the_best_step_and_names_it(rigged_runs):
    """Step 2 answers all 8 selection questions, the others none: step 2 is clearly better than the last, step 4."""
    out, done = rigged_runs
    run = out["best-2"]
    record = best.read(run)
    assert (record["step"], record["adapter"], record["n"], record["accuracy"]) == (2, True, 8, 1.0)
    assert record["base"]["step"] == 0 and record["base"]["accuracy"] == 0.0
    assert (record["highest"]["step"], record["last"]["step"]) == (2, 4)
    assert record["against"] == {"wins": 8, "losses": 0, "p_better": 1 / 256, "p_worse": 1.0}
    assert "step 2 was clearly better than step 4: right on 8 selection questions" in record["why"]
    # RUN/best/ and RUN/highest/ hold exactly step 2's adapter: checkpoint-2's weights, not the last step's
    kept = adapter(os.path.join(run, best.BEST_DIR))
    assert_same_tensors(kept, adapter(os.path.join(run, "checkpoint-2")))
    assert_same_tensors(kept, adapter(os.path.join(run, best.HIGHEST_DIR)))
    assert not all(torch.equal(kept[k], v) for k, v in adapter(run).items())
    assert os.path.isfile(os.path.join(run, best.BEST_DIR, "tokenizer.json"))
    # named in the stats, the trainer's state, config.json and the run's last lines
    assert [e[held_out.BEST_STEP] for e in stats_of(run)] == [0, 1, 2, 2, 2]  # step 1 was the last, then
    state = json.load(open(os.path.join(run, "checkpoint-4", "trainer_state.json")))
    assert (state["best_global_step"], state["best_metric"]) == (2, 1.0)
    assert json.load(open(os.path.join(run, "config.json")))["kept"]["step"] == 2
    stdout = done["best-2"].stdout
    assert "kept step 2 (held-out accuracy 1.000" in stdout and "the last adapter, step 4, stays in" in stdout
    quick = json.load(open(os.path.join(run, "eval.json")))
    assert (quick["model"], quick["step"], quick["last"]["step"]) == ("the kept adapter", 2, 4)
    assert "quick evaluation of the kept adapter (step 2)" in stdout and "quick evaluation of the last adapter (step 4)" in stdout


def test_evaluate_and_export_take_the_kept_adapter(rigged_runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = rigged_runs[0]["best-2"]
    model = os.path.join(run, "base-model")
    flags = ["--model-name", model, "--adapter", run, "--dataset", "synthetic:easy", "--n", "2", "--calibration-n", "0",
             "--agents", "1", "--max-new-tokens", "4", "--no-ensemble", "--no-perplexity"]
    evaluate.main([*flags, "--out", str(tmp_path / "kept")])
    assert f"{run}: loading the kept adapter, step 2 of the run" in capsys.readouterr().out
    evaluate.main([*flags, "--checkpoint", "last", "--out", str(tmp_path / "last")])
    assert f"{run}: loading the last adapter (step 4) (--checkpoint last)" in capsys.readouterr().out
    loaded = json.load(open(tmp_path / "last" / "eval.json"))["config"]["loaded"]
    assert loaded.startswith(f"{run}: loading the last adapter")

    export.main([run, "--merged"])
    assert "loading the kept adapter, step 2" in capsys.readouterr().out
    ids = torch.tensor([[5, 17, 42, 7, 99]])

    def logits(m):
        with torch.no_grad():
            return m(ids).logits

    merged = logits(AutoModelForCausalLM.from_pretrained(os.path.join(run, "merged")))
    with_kept = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), os.path.join(run, "best")))
    with_last = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), run))
    assert torch.allclose(merged, with_kept, atol=1e-5) and not torch.allclose(merged, with_last, atol=1e-5)


def test_a_run_killed_after_step_3_still_keeps_step_2_when_resumed(rigged_runs):
    out, done = rigged_runs
    assert done["killed_best"]["step"] == 2  # saved as step 3 was scored, before the kill
    assert "resuming from checkpoint-2" in done["resumed"].stdout
    record = best.read(out["killed"])
    assert record["step"] == 2 and "kept step 2" in done["resumed"].stdout
    assert [e[held_out.BEST_STEP] for e in stats_of(out["killed"])] == [0, 1, 2, 2, 2]
    # the same adapter as the run that was not killed: step 2 trained the same way
    assert_same_tensors(adapter(os.path.join(out["killed"], "best")), adapter(os.path.join(out["best-2"], "best")))


def test_stop_after_worse_ends_the_run_and_keeps_the_base(rigged_runs, tmp_path, capsys):
    out, done = rigged_runs
    run = out["stop"]
    assert [e["step"] for e in stats_of(run)] == [0, 1, 2]  # steps 1 and 2 scored clearly below the base
    assert ("stopped early at step 2: 2 evaluations in a row clearly below an earlier model; the kept one is the "
            "base model (--stop-after-worse 2)") in done["stop"].stdout
    assert os.path.isdir(os.path.join(run, "checkpoint-2"))
    record = best.read(run)
    assert record["step"] == 0 and not record["adapter"]
    assert not os.path.exists(os.path.join(run, best.BEST_DIR, "adapter_model.safetensors"))
    assert "the base model is kept (held-out accuracy 1.000 [0.676, 1.000] on 8 selection questions): the base " \
           "model was clearly better than step 2: right on 8" in done["stop"].stdout
    # the base model kept: evaluate.py evaluates it, export.py has nothing to merge
    flags = ["--model-name", os.path.join(run, "base-model"), "--adapter", run, "--dataset", "synthetic:easy",
             "--n", "2", "--calibration-n", "0", "--agents", "1", "--max-new-tokens", "4", "--no-ensemble",
             "--no-perplexity", "--out", str(tmp_path / "eval")]
    evaluate.main(flags)
    assert "the run kept the base model, clearly better than its last adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        export.main([run, "--merged"])
    assert "--merged was not done: the run kept the base model" in str(refused.value.code)
    assert f"python export.py {run} --merged --checkpoint last" in str(refused.value.code)


def test_selection_and_reporting_questions_never_overlap(rigged_runs):
    import train_synthetic
    from data import synthetic_problems
    from grpo_math import settings

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke"], train_synthetic.add_args)
    train = synthetic_problems(s["max_examples"], s["difficulty"], seed=s["seed"])["question"]
    assert_held_out_sets_apart(rigged_runs[0]["best-2"], train)


def test_split_held_out_drops_repeated_and_excluded_questions():
    from data import split_held_out

    rows = [{"question": q} for q in "a b a c d b e f g".split()]
    report, select, rest = split_held_out(rows, 2, 2, exclude={"c"})
    assert [r["question"] for r in report] == ["a", "b"] and [r["question"] for r in select] == ["d", "e"]
    assert [r["question"] for r in rest] == ["c", "f", "g"]  # the repeats of a and b are dropped


def test_a_kill_while_the_best_is_swapped_in_leaves_one_whole_best(tmp_path):
    """save() writes best.new/, moves best/ to best.old/ and best.new/ into place: a kill between any two
    of these leaves a run whose newest complete best read() puts back."""
    def folder(name, step):
        os.makedirs(tmp_path / name)
        (tmp_path / name / best.BEST_FILE).write_text(json.dumps({"step": step}))

    folder("best.old", 2)  # killed after the first rename
    folder("best.new", 4)
    assert best.read(str(tmp_path))["step"] == 4 and sorted(os.listdir(tmp_path)) == ["best", "best.old"]
    best.save(str(tmp_path), None, None, {"step": 6})  # the next save clears what was left
    assert best.read(str(tmp_path))["step"] == 6 and os.listdir(tmp_path) == ["best"]
    os.rename(tmp_path / "best", tmp_path / "best.old")  # killed with only the old one
    os.makedirs(tmp_path / "best.new")  # and a new one not yet complete (no best.json)
    assert best.read(str(tmp_path))["step"] == 6
    assert best.read(str(tmp_path / "none")) is None

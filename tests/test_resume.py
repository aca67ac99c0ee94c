"""Nothing lost: the run folder's rules, and runs interrupted at chosen points, then --resume.

Each fault is injected at the same point on every run (tests/faults.py), so these tests are
deterministic. After each, --resume must end with one stats entry per step, 1..4, and the same
rewards as an uninterrupted run. The runs go side by side, each on one thread, forked from a process that
has already imported the libraries (tests/forks.py), to keep CI short.
"""

import hashlib
import json
import os
import sys

import pytest

from conftest import ROOT, side_by_side, stats_of
from grpo_math import runs

SCRIPT = "train_synthetic.py"
SMOKE = ["--smoke", "--skip-evaluation"]  # 4 steps, a checkpoint every 2


def folder_digest(folder):
    """Every file's path, size and content hash: equal digests mean nothing changed."""
    digest = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


# fault: (the first run's exit code, the checkpoint --resume continues from)
FAULTS = {
    "kill-after-step-3": (-9, "resuming from checkpoint-2"),
    "kill-in-checkpoint-4": (-9, "resuming from checkpoint-2"),
    "kill-in-final-save": (-9, "training reached step 4 before the run stopped; writing its outputs from checkpoint-4"),
    "ctrl-c-after-step-2": (130, "resuming from checkpoint-3"),  # stops after the step under way, step 3
    "ctrl-c-twice-after-step-3": (130, "resuming from checkpoint-2"),  # stops at once, losing step 3
    "sigterm-after-step-2": (130, "resuming from checkpoint-3"),  # a scheduler's stop: as Ctrl-C
}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """An uninterrupted run ("straight"), a 2-step run ("short"), and each fault's run; then
    --resume on each, on the finished straight run, and with --max-steps 4 on the short one."""
    base = tmp_path_factory.mktemp("runs")
    out = {name: str(base / name) for name in ["straight", "short", *FAULTS]}
    first = side_by_side(
        [[os.path.join(ROOT, SCRIPT), *SMOKE, "--output-dir", out["straight"]],
         [os.path.join(ROOT, SCRIPT), *SMOKE, "--output-dir", out["short"], "--max-steps", "2"]]
        + [[os.path.join(ROOT, "tests", "faults.py"), fault, SCRIPT, *SMOKE, "--output-dir", out[fault]]
           for fault in FAULTS]
    )
    for proc in first[:2]:
        assert proc.returncode == 0, proc.stderr[-3000:]
    after_fault = {fault: {"proc": proc, "files": sorted(os.listdir(out[fault])), "stats": stats_of(out[fault]),
                           "checkpoint-4": sorted(os.listdir(os.path.join(out[fault], "checkpoint-4")))
                           if os.path.isdir(os.path.join(out[fault], "checkpoint-4")) else None}
                   for fault, proc in zip(FAULTS, first[2:])}
    before = folder_digest(out["straight"])
    resumed = side_by_side(
        [[os.path.join(ROOT, SCRIPT), "--resume", "--output-dir", out["straight"]],
         [os.path.join(ROOT, SCRIPT), "--resume", "--output-dir", out["short"], "--max-steps", "4"]]
        + [[os.path.join(ROOT, SCRIPT), "--resume", "--output-dir", out[fault]] for fault in FAULTS]
    )
    return {"out": out, "after_fault": after_fault, "straight_before_resume": before,
            "resumed": dict(zip(["straight", "short", *FAULTS], resumed))}


@pytest.mark.parametrize("fault", FAULTS)
def test_resume_after_a_fault_ends_as_an_uninterrupted_run(fault, runs_dir):
    code, resumed_from = FAULTS[fault]
    first, resumed = runs_dir["after_fault"][fault]["proc"], runs_dir["resumed"][fault]
    assert first.returncode == code, first.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from in resumed.stdout
    straight, run = stats_of(runs_dir["out"]["straight"]), stats_of(runs_dir["out"][fault])
    assert [e["step"] for e in run] == [1, 2, 3, 4]  # no gap, no step twice
    assert [e["reward"] for e in run] == [e["reward"] for e in straight]
    for name in ("adapter_model.safetensors", "rewards.png", "checkpoint-4"):
        assert os.path.exists(os.path.join(runs_dir["out"][fault], name)), name
    assert "Traceback" not in first.stderr + resumed.stderr


def test_kill_inside_a_checkpoint_write_is_skipped_and_named(runs_dir):
    after = runs_dir["after_fault"]["kill-in-checkpoint-4"]
    # what the kill left: the weights and half an optimizer.pt, but no scheduler.pt or trainer_state.json
    assert "adapter_model.safetensors" in after["checkpoint-4"] and "trainer_state.json" not in after["checkpoint-4"]
    assert "skipped checkpoint-4: incomplete (no scheduler.pt, trainer_state.json), removed" in \
        runs_dir["resumed"]["kill-in-checkpoint-4"].stdout


def test_kill_in_the_final_save_finishes_without_training_again(runs_dir):
    resumed = runs_dir["resumed"]["kill-in-final-save"]
    assert runs_dir["after_fault"]["kill-in-final-save"]["stats"][-1]["step"] == 4  # training had ended
    assert "| reward" not in resumed.stdout  # no step trained again: the outputs come from checkpoint-4
    from safetensors.torch import load_file

    run, straight = runs_dir["out"]["kill-in-final-save"], runs_dir["out"]["straight"]
    saved, expected = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (run, straight))
    assert saved.keys() == expected.keys() and all((saved[k] == expected[k]).all() for k in saved)


@pytest.mark.parametrize("fault, line", [
    ("ctrl-c-after-step-2", "stopped by Ctrl-C at step 3/4, checkpoint-3 saved; it continues from checkpoint-3 with: "),
    ("ctrl-c-twice-after-step-3", "stopped by Ctrl-C at step 3/4; it continues from checkpoint-2 with: "),
    ("sigterm-after-step-2", "stopped by SIGTERM at step 3/4, checkpoint-3 saved; it continues from checkpoint-3 with: "),
])
def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(fault, line, runs_dir):
    after, out = runs_dir["after_fault"][fault], runs_dir["out"][fault]
    assert f"{line}python {SCRIPT} --resume --output-dir {out}\n" in after["proc"].stdout
    assert "Traceback" not in after["proc"].stderr and "KeyboardInterrupt" not in after["proc"].stderr
    assert [e["step"] for e in after["stats"]] == [1, 2, 3]  # the stats so far, and their plot
    assert "rewards.png" in after["files"]


def test_resume_of_a_finished_run_changes_nothing(runs_dir):
    out, resumed = runs_dir["out"]["straight"], runs_dir["resumed"]["straight"]
    assert resumed.returncode == 0
    assert f"{out} is finished: trained to step 4 (--max-steps 4); nothing changed." in resumed.stdout
    assert f"--resume --output-dir {out} --max-steps 8" in resumed.stdout  # how to train further
    assert folder_digest(out) == runs_dir["straight_before_resume"]
    assert "backend:" not in resumed.stdout  # it stopped before choosing a backend or loading anything


def test_resume_with_a_larger_max_steps_extends_a_finished_run(runs_dir):
    short, straight = stats_of(runs_dir["out"]["short"]), stats_of(runs_dir["out"]["straight"])
    assert "resuming from checkpoint-2 (step 2/4)" in runs_dir["resumed"]["short"].stdout
    assert [e["step"] for e in short] == [1, 2, 3, 4]
    # The same weights and random state after the resume: step 3 samples the same completions and
    # computes the same gradient as the uninterrupted run. (Step 4's learning rate differs: the
    # cosine schedule of the first part was built for 2 steps.)
    assert [e["reward"] for e in short] == [e["reward"] for e in straight]
    assert [e["grad_norm"] for e in short[:3]] == pytest.approx([e["grad_norm"] for e in straight[:3]], rel=1e-5)
    state = json.load(open(os.path.join(runs_dir["out"]["short"], "checkpoint-4", "trainer_state.json")))
    assert state["global_step"] == 4


# ---------------------------------------------------------------------------- the folder's rules

def settings(out, resume=False, overwrite=False, max_steps=4):
    return {"output_dir": str(out), "resume": resume, "overwrite": overwrite, "max_steps": max_steps}


def make_checkpoint(folder, step, files=("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"weights")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize("damage, problem", [
    # a kill just after transformers made the folder
    (lambda p: [f.unlink() for f in p.iterdir()], "no adapter_model.safetensors, optimizer.pt, scheduler.pt, trainer_state.json"),
    # a kill during optimizer.pt: the files after it were never written
    (lambda p: [(p / f).unlink() for f in ("scheduler.pt", "trainer_state.json")], "no scheduler.pt, trainer_state.json"),
    # a kill while trainer_state.json itself was written
    (lambda p: (p / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is cut short"),
])
def test_an_incomplete_checkpoint_is_not_resumed_from(damage, problem, tmp_path):
    make_checkpoint(tmp_path, 2)
    damage(make_checkpoint(tmp_path, 4))
    complete, incomplete = runs.checkpoints(str(tmp_path))
    assert complete == [(2, str(tmp_path / "checkpoint-2"))]
    assert incomplete == [(str(tmp_path / "checkpoint-4"), problem)]
    assert runs.last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("a previous run")
    with pytest.raises(SystemExit, match="already holds a run. Continue it with --resume, move it aside with --overwrite"):
        runs.inspect_run(settings(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "a previous run"  # nothing was touched


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again(tmp_path):
    """Only config.json (an incomplete checkpoint, the adapter kept at step 1): nothing is lost by starting
    it again, with or without --resume, instead of refusing both ways. The kept adapter goes: it is not the
    new run's, which may not select one."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text('{"step": 1}')
    for resume in (False, True):
        plan = runs.inspect_run(settings(tmp_path, resume=resume))
        assert plan["action"] == "reuse" and plan["checkpoint"] is None
    runs.prepare_run(settings(tmp_path), plan)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # the unloadable checkpoint and best/ are gone


def test_a_run_with_a_checkpoint_is_not_reused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    make_checkpoint(tmp_path, 2)
    with pytest.raises(SystemExit, match="already holds a run"):
        runs.inspect_run(settings(tmp_path))
    assert runs.inspect_run(settings(tmp_path, resume=True))["action"] == "resume"


@pytest.mark.parametrize("files", [
    ["config.json", "adapter_model.safetensors"],  # a trained adapter whose checkpoints were deleted
    ["config.json", "model.safetensors", "tokenizer.json"],  # a model folder, whose config.json is not a run's
    ["config.json", "notes.txt"],  # the user's own file
])
def test_a_folder_with_more_than_an_early_stop_is_not_reused(files, tmp_path):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(SystemExit, match="already holds a run"):
        runs.inspect_run(settings(tmp_path))


def test_resume_without_any_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        runs.inspect_run(settings(tmp_path / "missing", resume=True))
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(SystemExit, match="no complete checkpoint-N folder"):
        runs.inspect_run(settings(tmp_path, resume=True))


def test_overwrite_moves_the_old_run_aside_only_when_prepared(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("a previous run")
    plan = runs.inspect_run(settings(out, overwrite=True))
    assert (out / "notes.txt").exists()  # deciding moves nothing
    runs.prepare_run(settings(out, overwrite=True), plan)
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(backups) == 1 and (backups[0] / "notes.txt").read_text() == "a previous run"
    assert out.is_dir() and not any(out.iterdir())


def test_stats_file_is_written_atomically(tmp_path):
    path = str(tmp_path / "stats.json")
    runs.write_json_atomic(path, [{"step": 1}])
    runs.write_json_atomic(path, [{"step": 1}, {"step": 2}])
    assert json.load(open(path)) == [{"step": 1}, {"step": 2}]
    assert os.listdir(tmp_path) == ["stats.json"]  # no temporary file left behind


def test_ctrl_c_before_training_began_exits_without_a_traceback(tmp_path, capsys, monkeypatch):
    import train_synthetic

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data is made

    monkeypatch.setattr(train_synthetic, "synthetic_problems", ctrl_c)
    with pytest.raises(SystemExit) as exc:
        train_synthetic.main(["--smoke", "--output-dir", str(tmp_path / "run")])
    assert exc.value.code == 130 and "stopped by Ctrl-C before training began" in capsys.readouterr().out


@pytest.mark.parametrize("argv0, expected", [
    ("train_synthetic.py", "python train_synthetic.py --resume --output-dir out/run --max-steps 8"),
    # a notebook kernel's argv[0] is ipykernel_launcher.py: the user needs the call to put in a cell
    ("/usr/lib/python3/ipykernel_launcher.py", 'main(["--resume", "--output-dir", "out/run", "--max-steps", "8"])'),
])
def test_resume_command_fits_where_the_run_was_started(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0, "-f", "kernel.json"])
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # only argv[0] says where
    assert runs.resume_command("out/run", "--max-steps", "8") == expected

"""bench/gpu_check.py: the dry run end to end on the CPU (every part, the JSON and the tables), and a
part that crashes or runs past its limit, recorded while the next part still runs."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from bench import bench, gpu_check, gpu_plan
from conftest import ROOT, forks, need_gsm8k, need_qwen_tokenizer

PY = sys.executable
FIGURE_UNITS = {"env": {"gpu", "unsloth_patched_trl", "wall"},
                "unsloth": {"trl.step_s", "trl.peak_reserved_gib", "trl.first_step_s", "trl.loaded_s",
                            "trl.agents 1.step_s", "trl.agents core.step_s",
                            "trl.generation batch 64.s_per_completion", "trl.generation batch 32.tokens_per_s"},
                "train-chat": {"steps", "step_time_median", "grad_norm_min", "merged_saved"},
                "evaluate": {"questions", "ensemble_seconds_per_question"}}
# The dry run's parts: one of each kind of command (the others differ in flags that only a GPU can tell
# apart; test_every_parts_command_is_accepted checks those flags).
DRY_PARTS = ["env", "unsloth", "t4", "model", "train-chat", "evaluate", "train-tools"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    need_gsm8k()
    out = tmp_path_factory.mktemp("gpu-check") / "check"
    # forked from the session's server, and so is each part (tests/forks.py, launches_forked)
    proc = forks().run(["-m", "bench.gpu_check", "--out", out, "--dry-run", "--parts", ",".join(DRY_PARTS)],
                       launches_forked=True).result(timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu-check.json") as f:
        return out, proc.stdout, json.load(f)


def test_dry_run_runs_its_parts(dry_run):
    out, _, report = dry_run
    assert list(report["parts"]) == DRY_PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["exit_code"] == 0, (name, part["log_tail"])
        assert os.path.isfile(out / "logs" / f"{name}.log")
    assert report["dry_run"] is True


@pytest.mark.parametrize("dry_run", [True, False])
def test_every_parts_command_is_accepted(dry_run, tmp_path, monkeypatch, capsys):
    """Each part's command line, on the GPU and in the dry run, through the parser of what it runs."""
    import evaluate
    import train_gsm8k
    from grpo_math import settings

    need_qwen_tokenizer()  # the GPU's bench commands ask for it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))  # --smoke sets it
    (tmp_path / "runs" / "chat").mkdir(parents=True)  # evaluate.py reads the adapter train-chat leaves
    (tmp_path / "runs" / "chat" / "adapter_config.json").write_text("{}")
    for name, _, cmd in gpu_plan.parts(argparse.Namespace(out=str(tmp_path), dry_run=dry_run)):
        args = cmd[cmd.index("bench.bench") + 1:] if "bench.bench" in cmd else cmd[2:]
        if "bench.bench" in cmd:
            monkeypatch.setattr(sys, "argv", ["bench", *args])
            bench.parse_args()
        elif cmd[1].endswith("train_gsm8k.py"):
            s = settings.parse_settings("", train_gsm8k.DEFAULTS, args, train_gsm8k.add_args)
            assert s["compile"] == ("auto" if dry_run else "off"), name
        elif cmd[1].endswith("evaluate.py"):
            evaluate.parse_args(args)
        else:
            assert cmd[1:3] == ["-m", "bench.gpu_check"], name
    assert "error" not in capsys.readouterr().err


def test_the_plan_fits_its_calls_and_loans():
    """--plan's arithmetic: each call's limits fit one command, each loan's expected seconds (its start
    and the waits between calls included) fit the loan, and every part is in one call, in order."""
    plan = gpu_plan.parts(argparse.Namespace(out="DIR", dry_run=False))
    calls = gpu_plan.plan_calls(plan)
    assert [name for call in calls for name in call[2]] == [name for name, _, _ in plan]
    expected = dict((name, e) for name, e, _ in plan)
    for loan in {c[0] for c in calls}:
        mine = [c for c in calls if c[0] == loan]
        assert [c[1] for c in mine] == list(range(1, len(mine) + 1))
        assert gpu_plan.MACHINE_START_S + gpu_plan.CALL_GAP_S * (len(mine) - 1) + sum(c[3] for c in mine) <= 900
        for _, _, names, seconds, limits in mine:
            assert limits <= gpu_plan.CALL_S and limits == sum(gpu_plan.limit_of(expected[n]) for n in names)
            assert seconds == pytest.approx(sum(expected[n] for n in names))
    # the unsloth part: 25 s for bench.py, 55 to load, step 1 uncompiled 80, then 6 steps of 17 and two
    # generation calls each of 32 and of 64 completions with the steps that train on them
    assert expected["unsloth"] == pytest.approx(25 + 55 + 80 + 6 * 17 + (2 * 17 * 1.5 + 4 * 0.7) + (2 * 17 * 2 + 8 * 0.7))
    assert gpu_plan.limit_of(100) == 155  # x 1.25 + 30 s


def test_a_part_longer_than_a_call_is_refused_by_the_plan():
    with pytest.raises(ValueError, match="over one call's 600 s"):
        gpu_plan.plan_calls([("short", 100, []), ("long", 500, [])])


def test_plan_prints_each_call_with_its_parts():
    proc = run_check("--plan")
    assert proc.returncode == 0, proc.stderr
    assert "loan 1: " in proc.stdout and "call 1: --parts env" in proc.stdout and "of 900" in proc.stdout
    assert not os.path.exists(os.path.join(ROOT, "DIR"))  # --plan writes nothing


def test_dry_run_writes_every_figure_with_its_unit(dry_run):
    _, _, report = dry_run
    figures = report["figures"]
    for part, names in FIGURE_UNITS.items():
        assert names <= set(figures[part]), (part, sorted(figures[part]))
    for part, named in figures.items():
        for name, figure in named.items():
            assert set(figure) == {"value", "unit"}, (part, name)
    assert figures["env"]["gpu"]["value"] == "none (CPU)"
    assert figures["unsloth"]["trl.step_s"]["value"] > 0 and figures["unsloth"]["trl.step_s"]["unit"] == "s"
    assert figures["unsloth"]["trl.peak_reserved_gib"] == {"value": None, "unit": "GiB"}  # no CUDA device
    assert figures["unsloth"]["trl.generation batch 64.s_per_completion"]["value"] > 0
    assert figures["unsloth"]["trl.compile"]["value"] is None  # the trl backend has no compile to switch
    assert figures["train-chat"]["steps"]["value"] == 2 and figures["train-chat"]["grad_norm_min"]["value"] > 0
    assert figures["train-chat"]["merged_saved"]["value"] is True  # --save-merged on train-chat only
    assert figures["train-tools"]["merged_saved"]["value"] is False
    assert figures["evaluate"]["questions"]["value"] == 8
    assert figures["t4"]["fits"]["value"] is True  # the trl backend on a CPU: no cap to hit, but recorded


def test_dry_run_renders_the_tables(dry_run):
    out, stdout, report = dry_run
    text = (out / "gpu-check.md").read_text()
    assert text.startswith("GPU check (dry run, CPU)")
    assert "| unsloth | ok | 0 |" in text and "| train-tools | ok | 0 |" in text
    assert "| step time, unsloth / trl | not measured | <= 0.5 | n/a |" in text  # no unsloth on a CPU
    assert "| train-chat | grad_norm_min |" in text
    assert text in stdout  # printed as written
    assert len(report["targets"]) == 6


def plan_of(*parts):
    return [(name, limit, [PY, "-c", code]) for name, limit, code in parts]


def test_a_crash_and_a_timeout_are_recorded_and_the_next_part_runs(tmp_path):
    hang = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid))\n"
            "print('hanging', flush=True)\ntime.sleep(60)")
    plan = plan_of(("crash", 30, "import sys; print('about to crash'); sys.exit(3)"),
                   ("hang", 8, hang),  # 8 s to start Python and a child, and to write the pid, on a loaded machine
                   ("after", 30, "print('the next part ran')"))
    seen = []
    results = gpu_check.run_parts(plan, str(tmp_path), budget_s=120, on_part=lambda r: seen.append(list(r)))
    assert results["crash"]["status"] == "failed" and results["crash"]["exit_code"] == 3
    assert results["crash"]["log_tail"][-1] == "about to crash"
    assert results["hang"]["status"] == "timeout" and 8 <= results["hang"]["seconds"] < 30
    assert results["hang"]["log_tail"][-1] == "hanging"
    assert results["after"]["status"] == "ok" and results["after"]["log_tail"][-1] == "the next part ran"
    assert seen == [["crash"], ["crash", "hang"], ["crash", "hang", "after"]]  # the report after each part
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid)  # the part's own children went with it


def running(pid):
    """True while ``pid`` runs; a killed process its parent has not reaped (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_a_part_that_would_start_past_the_budget_is_skipped(tmp_path):
    plan = plan_of(("slow", 5, "import time; time.sleep(2)"), ("late", 60, "print('should not run')"))
    results = gpu_check.run_parts(plan, str(tmp_path), budget_s=10)  # 8 s left: too little for a 60 s part
    assert results["slow"]["status"] == "ok"
    assert results["late"]["status"] == "skipped" and "of --budget-s left" in results["late"]["why"]
    assert not os.path.exists(tmp_path / "logs" / "late.log")


def test_the_targets_are_met_missed_or_not_measured():
    fig = lambda v: {"value": v, "unit": ""}
    figs = {"unsloth": {"unsloth/trl.step_s": fig(0.4), "unsloth/trl.peak_reserved_gib": fig(0.7),
                        "unsloth.peak_reserved_gib": fig(5.0), "unsloth.agents core.step_s": fig(2.0),
                        "unsloth.agents 1.step_s": fig(2.0)},
            "t4": {"unsloth.step_s": fig(3.0), "fits": fig(False)}, "t4-trl": {"trl.step_s": fig(4.0), "fits": fig(True)}}
    met = {label: ok for label, _, _, ok in gpu_check.targets(figs)}
    assert gpu_check.targets({})[3][1:] == (None, "fits", None)  # the t4 part did not run
    assert met == {"step time, unsloth / trl": True, "peak reserved memory, unsloth / trl": False,
                   "peak reserved memory, default recipe, unsloth (GB)": True,  # 5 GiB is 5.37 GB
                   "the default recipe in fp16 under 15 GiB, unsloth: s/step": False,  # out of memory under the cap
                   "the default recipe in fp16 under 15 GiB, trl: s/step": True,
                   "4 agents / 1 agent, step time": True}


def test_the_compiles_cost_and_pay_back_come_from_the_two_parts(tmp_path):
    """Step 1's extra with the compile, over what each later step saves: the steps that pay it back."""
    for part, first, step in (("unsloth", 78.85, 16.235), ("compile-on", 204.4, 10.881)):  # two H200 runs
        (tmp_path / f"{part}.json").write_text(json.dumps({"backends": {"unsloth": {
            "first_step_s": first, "step_s": step, "compile": "on" if part == "compile-on" else "off"}}}))
    figs = gpu_check.figures(argparse.Namespace(out=str(tmp_path)), {})
    assert figs["compile-on"]["step 1 extra"]["value"] == pytest.approx(125.55)
    assert figs["compile-on"]["steps to pay back"]["value"] == pytest.approx(125.55 / 5.354)  # 23.4 steps
    assert figs["unsloth"]["unsloth.compile"]["value"] == "off"


def test_the_bundle_pins_are_read_from_its_info_file(tmp_path, monkeypatch):
    (tmp_path / "BUNDLE-INFO.txt").write_text(
        "Pinned wheels (sha256):\n  55aa  bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl\n"
        "  e46f  trl-1.14.0-py3-none-any.whl\nLeft out: studio\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "absent"), str(tmp_path)]))
    assert gpu_check.bundle_pins() == ["bitsandbytes==0.50.2", "trl==1.14.0"]


def run_check(*flags):
    return subprocess.run([PY, "-m", "bench.gpu_check", *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_folder_holding_anything_is_not_written_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_check("--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == ["notes.txt"]
    proc = run_check("--out", str(tmp_path / "new"), "--dry-run", "--parts", "env,gpu")
    assert proc.returncode == 2 and "--parts: unknown gpu; choose from env, unsloth" in proc.stderr


@pytest.mark.parametrize("missing", ["QWEN_TOKENIZER", "GSM8K_DIR"])
def test_a_gpu_check_without_the_data_is_refused_before_any_part(tmp_path, monkeypatch, capsys, missing):
    """On a fresh GPU machine ../shared/data is absent until copied there: each part used to fail on it
    with a traceback in its log, after seconds of its limit. The other folder is a stand-in holding the
    file the check looks for, so that each case runs without ../shared/data."""
    present = {"QWEN_TOKENIZER": "tokenizer_config.json", "GSM8K_DIR": "test.jsonl"}
    for name, file in present.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("{}")
        monkeypatch.setattr(gpu_check, name, str(tmp_path / name))
    monkeypatch.setattr(gpu_check, missing, str(tmp_path / "absent"))
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(tmp_path / "check"), "--parts", "unsloth"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"is not at {tmp_path / 'absent'}: copy the data there first" in err
    assert "cp -r .gpu-data/. ../shared/data/" in err and not (tmp_path / "check").exists()


def test_bench_without_the_qwen_tokenizer_is_refused_before_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QWEN_TOKENIZER", str(tmp_path / "absent"))
    monkeypatch.setattr(sys, "argv", ["bench", "--backends", "trl"])
    with pytest.raises(SystemExit) as stop:
        bench.parse_args()
    assert stop.value.code == 2 and "the Qwen tokenizer is not at" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench", "--smoke"])  # the tiny model needs no data
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --smoke sets it: restored after the test
    assert bench.parse_args().shape == "tiny"


def test_parts_rerun_into_a_check_keep_the_others(tmp_path):
    out = tmp_path / "check"
    assert run_check("--out", str(out), "--dry-run", "--parts", "env").returncode == 0
    report = json.loads((out / "gpu-check.json").read_text())
    report["parts"]["earlier"] = {"status": "ok", "exit_code": 0, "seconds": 1.0, "limit_s": 1, "log_tail": []}
    (out / "gpu-check.json").write_text(json.dumps(report))
    assert run_check("--out", str(out), "--dry-run", "--parts", "env").returncode == 0
    assert list(json.loads((out / "gpu-check.json").read_text())["parts"]) == ["earlier", "env"]
    proc = run_check("--out", str(out), "--parts", "env")  # the GPU run's parts into a dry run's folder
    assert proc.returncode == 2 and "holds a dry run" in proc.stderr


def test_ctrl_c_takes_the_running_part_with_it(tmp_path):
    """A check stopped by Ctrl-C leaves no part running: the part has a session of its own, so the
    terminal's signal does not reach it, and the check kills it on the way out. The Ctrl-C comes once the
    part has written its pid, however long it takes to start."""
    code = ("import os, signal, sys\nfrom bench import gpu_check\n"
            "def tick(*_):\n"
            f"    if os.path.exists({str(tmp_path / 'pid')!r}): raise KeyboardInterrupt\n"
            "    signal.setitimer(signal.ITIMER_REAL, 0.1)\n"
            "signal.signal(signal.SIGALRM, tick)\nsignal.setitimer(signal.ITIMER_REAL, 0.1)\n"
            f"gpu_check.run_parts([('hang', 60, [sys.executable, '-c', \"import os, time; "
            f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(60)\"])], {str(tmp_path)!r}, 120)")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "KeyboardInterrupt" in proc.stderr
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid)

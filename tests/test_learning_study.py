"""bench/learning_study.py on the tiny model: a grid of 2 arms x 2 seeds x 2 steps, its continuation
by a second call that trains nothing, and its report. Each call runs the command in this process, as
`python -m bench.learning_study` runs it (runpy, a fresh module each time); its training runs are
processes of their own, as always, forked from the session's server (tests/forks.py)."""

import json
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import SCRIPT_ENV, forks, stats_of
from grpo_math import models


@pytest.fixture
def study_command(monkeypatch, capsys):
    """python -m bench.learning_study FLAGS, in this process: (returncode, stdout, stderr) as the command's."""
    for name, value in SCRIPT_ENV.items():
        monkeypatch.setenv(name, value)  # for its training processes, as run_script gives them
    # and those processes forked from the session's server (tests/forks.py), which has imported the libraries
    monkeypatch.setattr(subprocess, "Popen", forks().popen())

    def call(*flags, check=True):
        monkeypatch.setattr(sys, "argv", ["bench/learning_study.py", *flags])
        capsys.readouterr()
        try:
            runpy.run_module("bench.learning_study", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        if isinstance(code, str):  # as Python does with an uncaught SystemExit("message")
            code, err = 1, err + code + "\n"
        assert not check or code in (0, None), f"learning_study {flags} failed:\n{out[-3000:]}\n{err[-3000:]}"
        return SimpleNamespace(returncode=code or 0, stdout=out, stderr=err)

    return call


def report_of(stdout):
    """The report's lines, from its title on (the lines before it say what this call did)."""
    return stdout[stdout.index("learning study: "):]


def test_a_study_trains_its_grid_once_and_reports_it_the_same_way_again(tmp_path, study_command):
    model, tokenizer = models.tiny_model_and_tokenizer()
    base = str(tmp_path / "tiny")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    study = tmp_path / "study"
    flags = ["--model-name", base, "--seeds", "1,2", "--max-steps", "2", "--max-examples", "40", "--held-out", "8",
             "--eval-examples", "2", "--vllm", "off", "--engine", "generate", "--output-dir", str(study)]
    first = study_command(*flags).stdout
    names = ["agents-1-seed1", "agents-1-seed2", "agents-4-seed1", "agents-4-seed2"]
    assert first.count("\n== ") == 4 and sorted(os.listdir(study / "results")) == [n + ".json" for n in names]
    for name in names:
        config = json.load(open(study / "runs" / name / "config.json"))
        # the arms differ in their agents only; the seed's problems and the completions per step are shared
        assert len(config["agents"]) == (4 if name.startswith("agents-4") else 1)
        assert config["settings"]["batch_size"] == 16 and config["settings"]["max_examples"] == 40
        assert any(e.get("grad_norm", 0) > 0 for e in stats_of(study / "runs" / name))  # it trained
        result = json.load(open(study / "results" / f"{name}.json"))
        assert len(result["after"]["first_correct"]) == len(result["after"]["vote_correct"]) == 8
    held_out = {r["question"] for r in json.load(open(study / "study.json"))["held_out"]}
    assert len(held_out) == 8
    for lines in ("accuracy, first agent: before", "pooled agents-4", "pooled agents-1", "agents-4 - agents-1",
                  "4 runs, "):
        assert lines in first
    assert (study / "learning.png").stat().st_size > 0

    second = study_command(*flags).stdout  # everything is done: nothing trains or scores
    assert "\n== " not in second and "scoring the base model" not in second
    assert report_of(second) == report_of(first)
    assert report_of(study_command("--show", str(study)).stdout) == report_of(first)

    # A kill after a run's training and before its scoring: the next call scores it, training nothing more.
    cut = study / "results" / "agents-1-seed2.json"
    kept = json.loads(cut.read_text())
    cut.unlink()
    third = study_command(*flags).stdout
    assert third.count("\n== ") == 1 and "--output-dir " + str(study / "runs" / "agents-1-seed2") + " --resume" in third
    again = json.loads(cut.read_text())
    assert again["after"] == kept["after"] | {"seconds": again["after"]["seconds"]} and again["resumed"] is True
    assert again["step_seconds_total"] == kept["step_seconds_total"]  # read from the run's own stats
    figures = lambda stdout: report_of(stdout).split(" train s ")[0]  # the timings aside
    assert figures(third) == figures(first) and "* resumed: the wall time of its last part only" in third

    # Another recipe in the same folder would mix two studies: refused, with the way out.
    refused = study_command(*flags, "--max-steps", "3", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "holds a study with another max_steps" in refused.stderr and "--output-dir" in refused.stderr
    nothing = study_command("--show", base, check=False)  # a folder that holds no study
    assert nothing.returncode == 1 and nothing.stderr.strip().endswith("holds no study (no study.json): pass the "
                                                                       "--output-dir of one")

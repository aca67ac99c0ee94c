"""Exports and the push (export.py, --save-merged, --push-to-hub): checked before training, run last,
never at the cost of what training saved. GGUF: test_gguf.py; the push itself: test_push.py, against
the stand-in Hub of hub_server.py; the unsloth side: test_unsloth.py."""

import os
import shutil

import pytest
import torch

import export
import train_synthetic
from conftest import keep_the_base
from grpo_math import best
from hub_server import hub  # noqa: F401  (a fixture)
from test_training import run_script

RUN_FILES = ("adapter_model.safetensors", "training_stats.json", "rewards.png", "eval.json", "checkpoint-2")


def train(tmp_path, *flags):
    out = str(tmp_path / "run")
    argv = ["--smoke", "--max-steps", "2", "--output-dir", out, *flags]
    train_synthetic.main(argv)
    return out


def test_a_failed_export_loses_nothing(tmp_path, monkeypatch, capsys):
    """The merge fails (the hub is unreachable, say): the adapter, stats, plot and evaluation are all
    saved, the message says how to try again, and the run exits non-zero without a traceback."""
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(export, "save_merged", unreachable)
    with pytest.raises(SystemExit) as exc:  # no selection: the tiny model's base would be kept, with nothing to merge
        train(tmp_path, "--save-merged", "--eval-every", "0")
    out = str(tmp_path / "run")
    assert "--save-merged was not done (see above)" in str(exc.value.code)
    for name in RUN_FILES:
        assert os.path.exists(os.path.join(out, name)), name
    printed = capsys.readouterr().out
    assert "--save-merged failed (OSError: We couldn't connect" in printed
    assert f"Try again with: python export.py {out} --merged" in printed


def test_merged_export_from_training_and_from_export_py(tmp_path, capsys):
    """--save-merged writes RUN/merged, a plain model equal to base + adapter; export.py refuses to
    overwrite it unless asked, and writes it again from the saved run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train(tmp_path, "--save-merged", "--skip-evaluation")
    merged = os.path.join(out, export.MERGED_DIR)
    assert f"merged 16-bit model: {merged}" in capsys.readouterr().out

    def logits(model):
        ids = torch.tensor([[5, 17, 42, 7, 99]])
        with torch.no_grad():
            return model(ids).logits

    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(out, "base-model")), out)
    reference = logits(trained)
    with trained.disable_adapter():
        assert not torch.allclose(reference, logits(trained))  # the adapter changes the output...
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(merged)), reference, atol=1e-5)  # ...and is merged in

    again = run_script("export.py", out, "--merged", check=False)
    assert again.returncode != 0 and "already holds an export" in again.stderr and "--overwrite" in again.stderr
    os.remove(os.path.join(merged, "model.safetensors"))
    run_script("export.py", out, "--merged", "--overwrite")
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(merged)), reference, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["RUN"], "say what to do"),
    (["RUN", "--merged"], "holds no adapter"),
])
def test_export_py_refuses_bad_input(tmp_path, argv, message):
    (tmp_path / "RUN").mkdir()
    proc = run_script("export.py", *[str(tmp_path / a) if a == "RUN" else a for a in argv], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_token_the_hub_refuses_stops_the_run_before_training(hub, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = run_script("train_synthetic.py", "--smoke", "--push-to-hub", "tiny-grpo", "--output-dir", str(out),
                      check=False, env={"HF_TOKEN": "hf_not_a_token"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("--push-to-hub") and "token" in line
    assert "step" not in proc.stdout and not out.exists()  # nothing trained, nothing written
    assert not hub.repos


def test_a_push_that_fails_after_training_loses_nothing_and_export_py_pushes_later(hub, tmp_path, capsys):  # noqa: F811
    """The Hub fails the commit after training: the run is whole, the message gives the command that pushes it
    later, and that command pushes the adapter, byte for byte."""
    hub.fail_commit = True
    with pytest.raises(SystemExit) as exc:
        train(tmp_path, "--push-to-hub", "tiny-grpo", "--eval-every", "0")  # no selection: the last adapter goes
    out = str(tmp_path / "run")
    assert "--push-to-hub was not done (see above)" in str(exc.value.code)
    for name in RUN_FILES:
        assert os.path.exists(os.path.join(out, name)), name
    printed = capsys.readouterr().out
    retry = f"python export.py {out} --push-to-hub alice/tiny-grpo"
    assert "--push-to-hub failed (" in printed and f"Push it later with: {retry}" in printed
    assert not any(hub.repos.values())  # the repo was created, and no file arrived

    hub.fail_commit = False
    export.main(retry.split()[2:])
    pushed = hub.repos["alice/tiny-grpo"]
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        assert pushed["adapter_model.safetensors"] == f.read()
    assert "README.md" in pushed and "run/eval.json" in pushed
    assert f"pushed: {hub.url}/alice/tiny-grpo" in capsys.readouterr().out


@pytest.fixture(scope="module")
def base_kept_run(tmp_path_factory):
    """A 2-step smoke run made one that kept the base model (conftest.keep_the_base): RUN/best/ holds only
    best.json, step 0; the last adapter, step 2, is at the run folder's root."""
    out = str(tmp_path_factory.mktemp("base-kept") / "run")
    run_script("train_synthetic.py", "--smoke", "--max-steps", "2", "--output-dir", out)
    keep_the_base(out)
    return out


@pytest.mark.parametrize("flags, command", [
    (["--save-merged"], "--merged"),
    (["--save-merged", "--push-to-hub", "tiny-grpo"], "--merged --push-to-hub alice/tiny-grpo"),  # the full repo id
])
def test_a_run_that_kept_the_base_exports_nothing(hub, tmp_path, monkeypatch, capsys, flags, command):  # noqa: F811
    """After training, RUN/best/ names the base model: no export and no push is made, one line says why and gives
    the export.py command that takes the last adapter, and the run ends non-zero with everything else saved."""
    read = best.read

    def kept_the_base(out):  # step 9 reads RUN/best/ once training is over: it is made to name the base model
        monkeypatch.setattr(best, "read", read)
        keep_the_base(out)
        return read(out)

    monkeypatch.setattr(best, "read", kept_the_base)
    with pytest.raises(SystemExit) as exc:
        train(tmp_path, *flags)
    out = str(tmp_path / "run")
    asked = [flag for flag in flags if flag.startswith("--")]
    assert exc.value.code == f"training and evaluation are saved, but {' and '.join(asked)} " \
                             f"{'was' if len(asked) == 1 else 'were'} not done (see above)"
    line = next(x for x in capsys.readouterr().out.splitlines() if "not done" in x)
    assert line.startswith(f"{' and '.join(asked)} {'was' if len(asked) == 1 else 'were'} not done: the run kept "
                           f"the base model (clearly better than its trained steps on the held-out questions, {out}/best/best.json)")
    assert line.endswith(f"the last adapter, step 2, anyway: python export.py {out} {command} --checkpoint last")
    for name in RUN_FILES:
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, export.MERGED_DIR)) and not os.path.exists(os.path.join(out, "gguf"))
    assert not hub.repos


def refusal(proc):
    """The one line export.py ended with (its stderr may go on with the native libraries' notes at exit)."""
    lines = [line for line in proc.stderr.splitlines() if " not done: " in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("flags", [["--gguf", "q4_k_m"], ["--check"], ["--merged", "--gguf", "f16", "--overwrite"]])
def test_export_py_on_a_run_that_kept_the_base_says_why_in_one_line(base_kept_run, flags):
    proc = run_script("export.py", base_kept_run, *flags, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = refusal(proc)
    assert "not done: the run kept the base model" in line
    assert line.endswith(f"anyway: python export.py {base_kept_run} {' '.join(flags)} --checkpoint last")
    assert sorted(os.listdir(os.path.join(base_kept_run, best.BEST_DIR))) == [best.BEST_FILE]  # nothing written
    assert not os.path.exists(os.path.join(base_kept_run, export.MERGED_DIR))


def test_export_py_refuses_a_run_that_kept_the_base_and_its_command_exports_the_last_adapter(base_kept_run, tmp_path):
    """export.py RUN --merged: non-zero, with the command; that command, --checkpoint last, writes RUN/merged."""
    out = str(tmp_path / "run")
    shutil.copytree(base_kept_run, out)
    refused = run_script("export.py", out, "--merged", check=False)
    line = refusal(refused)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert line.startswith(f"--merged was not done: the run kept the base model (clearly better than its trained "
                           f"steps on the held-out questions, {out}/best/best.json), so it has no trained weights to "
                           "export.")
    assert line.endswith(f"To export the last adapter, step 2, anyway: python export.py {out} --merged --checkpoint last")
    assert not os.path.exists(os.path.join(out, export.MERGED_DIR))

    command = line.split("anyway: ")[1].split()
    assert command[:2] == ["python", "export.py"]
    done = run_script(*command[1:])
    assert "loading the last adapter (step 2) (--checkpoint last)" in done.stdout
    assert os.path.isfile(os.path.join(out, export.MERGED_DIR, "config.json"))

"""Exports (export.py, --save-merged, --save-gguf): checked before training, run last, never at the
cost of what training saved. The unsloth side (GGUF) is in test_unsloth.py."""

import os

import pytest
import torch

import export
import train_synthetic
from test_training import run_script

RUN_FILES = ("adapter_model.safetensors", "training_stats.json", "rewards.png", "eval.json", "checkpoint-2")


@pytest.mark.parametrize("flags, reason", [
    # --backend auto on a machine without CUDA falls back to trl, which cannot write GGUF
    (["--backend", "auto", "--model-name", "Qwen/Qwen2.5-0.5B-Instruct"], "no CUDA device"),
    (["--smoke"], "--smoke: tiny offline model on CPU"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the trl fallback on a machine without CUDA")
def test_gguf_on_trl_is_refused_before_anything_loads(tmp_path, flags, reason):
    out = tmp_path / "run"
    proc = run_script("train_synthetic.py", *flags, "--save-gguf", "q4_k_m", "--output-dir", str(out), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--save-gguf needs the unsloth backend, and this run would use trl ({reason})" in proc.stderr
    assert "step" not in proc.stdout and not out.exists()  # nothing trained, nothing written


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
    assert "--save-merged failed" in str(exc.value.code)
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
    (["RUN"], "say what to export"),
    (["RUN", "--merged"], "holds no adapter"),
])
def test_export_py_refuses_bad_input(tmp_path, argv, message):
    (tmp_path / "RUN").mkdir()
    proc = run_script("export.py", *[str(tmp_path / a) if a == "RUN" else a for a in argv], check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr

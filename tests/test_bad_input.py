"""Bad data, an unreachable hub and a bad --overwrite: each stops before a model loads, with one or
two lines that name the file, row or flag and the fix, and leaves every folder as it was.

The script's main() runs in this process: a SystemExit is the clean refusal the user sees; any other
exception would fail the test (and would have been a traceback)."""

import os

import pytest

import train_gsm8k
from data import GSM8K_SAMPLE


def main(*flags):
    return train_gsm8k.main(["--smoke", *flags])


def refusal(capsys, *flags):
    """The message main() stops with; asserts that no model was loaded on the way."""
    with pytest.raises(SystemExit) as exc:
        main(*flags)
    assert "settings:" not in capsys.readouterr().out  # printed only once the model has loaded
    return str(exc.value.code)


def write_rows(path, n):
    """The first ``n`` rows of the GSM8K sample shipped with the kit."""
    with open(GSM8K_SAMPLE) as f:
        path.write_text("".join(f.readline() for _ in range(n)))
    return str(path)


@pytest.mark.parametrize("rows, flags, counts", [
    # the smoke run holds out 2 questions for the evaluation and 8 for the selection: 10 rows leave none to train on
    (10, [], "0 training questions (0 prompts over the agents) after 10 held out (--eval-examples 2, "
             "--select-examples 8)"),
    # 4 rows, 3 held out: 1 question asked by 1 random agent = 1 prompt, but a step of 8 completions
    # in groups of 4 needs 2 (TRL would train no step at all, and exit 0)
    (4, ["--eval-examples", "3", "--select-examples", "0", "--agent-sampling", "random", "--batch-size", "8"],
     "1 training questions (1 prompts over the agents) after 3 held out"),
])
def test_data_too_small_to_train_on_is_refused_with_the_counts(rows, flags, counts, tmp_path, capsys):
    out = tmp_path / "run"
    message = refusal(capsys, "--dataset", write_rows(tmp_path / "small.jsonl", rows), "--output-dir", str(out), *flags)
    assert counts in message and "lower --eval-examples and --select-examples" in message
    assert not out.exists()  # nothing written: not even the run folder


def test_non_utf8_data_names_the_file_and_row(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n\x89PNG\r\n\x1a\n\x00\x00')
    message = refusal(capsys, "--dataset", str(path), "--output-dir", str(tmp_path / "run"))
    assert f"{path}: row 2: not UTF-8 text" in message


def test_missing_dataset_file_is_named(tmp_path, capsys):
    message = refusal(capsys, "--dataset", str(tmp_path / "trian.jsonl"), "--output-dir", str(tmp_path / "run"))
    assert "trian.jsonl" in message and "does not exist" in message and "a folder holding train.jsonl" in message


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    """The old run is moved aside only once data and settings have passed their checks."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"a": "good run"}')
    (out / "adapter_model.safetensors").write_bytes(b"trained weights")
    message = refusal(capsys, "--overwrite", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(out))
    assert "missing.jsonl" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no run.old-TIME: nothing was moved
    assert (out / "adapter_model.safetensors").read_bytes() == b"trained weights"


def test_hub_dataset_offline_fails_fast_with_a_local_path(tmp_path, monkeypatch, capsys):
    """A typo such as --dataset gsm8k used to retry the hub for 27 s and end in ConnectionError."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refusal(capsys, "--dataset", "gsm8k", "--output-dir", str(tmp_path / "run"))
    assert "--dataset 'gsm8k'" in message and "offline mode is set" in message
    assert "gsm8k_sample/train.jsonl" in message  # a local path that works


def test_hub_model_unreachable_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    message = refusal(capsys, "--model-name", "someorg/some-model", "--output-dir", str(tmp_path / "run"))
    assert "--model-name 'someorg/some-model'" in message and "cannot be reached" in message
    assert "local model folder" in message

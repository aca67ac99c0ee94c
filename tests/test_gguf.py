"""GGUF exports made by llama.cpp's own converter (grpo_math/llama_cpp.py), on the trl backend, end to end:
the tiny model trains with --save-merged --save-gguf f16,q8_0, and the files read back with the merged
model's logits; the Modelfile asks as the run trained, in the tokens llama.cpp reads from the GGUF's own
metadata; export.py --check scores every export, and falls back to transformers' GGUF loader when
llama.cpp's runtime fails.

The tiny model takes the Qwen tokenizer here: the converter refuses a tokenizer it does not know, as
the --smoke model's, trained in-process, would be. k-quants (q4_k_m) and llama.cpp's runtime need a C++
build of several minutes: BENCHMARKS.md, "Sharing the model", measures them, not CI, so here every GGUF is
read by transformers' GGUF loader, each file once (load_gguf, below). .ci/run fetches the pinned
llama.cpp (python -m grpo_math.llama_cpp fetch); a test run by hand without it skips.
"""

import functools
import json
import mmap
import os
import struct
import subprocess
import sys

import pytest
import torch

import export
import train_synthetic
from conftest import forks, need_qwen_tokenizer, run_script
from grpo_math import fidelity, llama_cpp, models

# Largest |logit| difference from the merged model allowed, on logits of about +-1.3 (the tiny model). f16 rounds
# each weight to 11 significant bits (measured: 5e-4); q8_0 to 8 bits per block of 32 (measured: 1.4e-2).
TOLERANCE = {"f16": 5e-3, "q8_0": 5e-2}
IDS = [[5, 17, 42, 7, 99, 1000, 20000, 151]]


def need_llama_cpp():
    try:
        return llama_cpp.source(fetch_if_missing=False)
    except llama_cpp.LlamaCppMissing as e:
        if os.environ.get("GRPO_MATH_REQUIRE_DATA") == "1":
            pytest.fail(f"{e}; .ci/run fetches it", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step run of the tiny model with the Qwen tokenizer, its last adapter merged and converted. For the
    module, each GGUF file is parsed once (fidelity.load_gguf; some 11 s each for a 151k-token vocabulary), and
    llama.cpp's runtime counts as absent, as it is in CI, wherever it is built."""
    need_llama_cpp()
    patch = pytest.MonkeyPatch()
    patch.setattr(fidelity, "load_gguf", functools.cache(fidelity.load_gguf))
    patch.setattr(llama_cpp, "runtime_available", lambda: False)
    from transformers import AutoTokenizer

    from grpo_math.offline import tiny_model_and_tokenizer

    base = str(tmp_path_factory.mktemp("tiny-qwen"))
    model, tokenizer = tiny_model_and_tokenizer(tokenizer=AutoTokenizer.from_pretrained(need_qwen_tokenizer()))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = str(tmp_path_factory.mktemp("gguf") / "run")
    with pytest.MonkeyPatch.context() as forked:  # llama.cpp's converter forked from the session's server
        forked.setattr(subprocess, "Popen", forks().popen())
        train_synthetic.main(["--smoke", "--model-name", base, "--max-steps", "2", "--eval-every", "0",  # last adapter
                              "--save-merged", "--save-gguf", "f16,q8_0", "--output-dir", out])
    yield {"out": out, "base": base}
    patch.undo()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_each_gguf_reads_back_with_the_merged_models_logits(run, quant):
    from transformers import AutoModelForCausalLM

    folder = os.path.join(run["out"], export.GGUF_DIR)
    merged = logits(AutoModelForCausalLM.from_pretrained(os.path.join(run["out"], export.MERGED_DIR)))
    assert not torch.allclose(merged, logits(AutoModelForCausalLM.from_pretrained(run["base"])))  # trained, merged
    gguf = fidelity.load_gguf(os.path.join(folder, llama_cpp.file_name(quant)), run["out"])  # transformers' loader
    assert (logits(gguf) - merged).abs().max().item() < TOLERANCE[quant]
    sizes = {q: os.path.getsize(os.path.join(folder, llama_cpp.file_name(q))) for q in TOLERANCE}
    assert sizes["q8_0"] < 0.7 * sizes["f16"]  # 8.5 bits a weight against 16: really quantized


def test_the_modelfile_asks_as_the_run_trained(run):
    """Ollama fills {{ .Prompt }} with the user's question: the text must be the prompt the run trained on,
    the agent's instruction included, and stop where the xml answer ends or the turn does."""
    from agents import get_agents
    from grpo_math.evaluation import render
    from grpo_math.models import load_tokenizer

    with open(os.path.join(run["out"], export.GGUF_DIR, "Modelfile")) as f:
        text = f.read()
    assert "FROM ./model-F16.gguf\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    question = "What is 2 + 3?"
    instruction = next(iter(get_agents("core").values()))
    tokenizer = load_tokenizer(run["base"])
    assert template.replace("{{ .Prompt }}", question) == render(tokenizer, instruction, question, "xml")
    assert 'PARAMETER stop "</response>"' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_export_check_scores_every_export_against_the_adapter_reading_ggufs_with_transformers(run, capsys):
    """Without llama.cpp's runtime (CI does not build it), each GGUF is read by transformers' loader, and the
    table says so."""
    export.main([run["out"], "--check"])
    with open(os.path.join(run["out"], fidelity.FIDELITY_FILE)) as f:
        result = json.load(f)
    with open(os.path.join(run["out"], "eval.json")) as f:
        assert result["questions"] == len(json.load(f)["records"]) == 2
    lines = {e["name"]: e for e in result["exports"]}
    assert list(lines) == ["adapter", "merged", "f16", "q8_0"]
    assert lines["adapter"]["difference"] is None and lines["merged"]["agreement"] is not None
    for line in result["exports"]:
        assert 0 <= line["accuracy"] <= 1 and line["interval"][0] <= line["accuracy"] <= line["interval"][1]
    assert result["runtime"]["gguf"] == fidelity.TRANSFORMERS
    assert [line.get("runtime") for line in result["exports"]] == [None, None, *[fidelity.TRANSFORMERS] * 2]
    printed = capsys.readouterr().out
    assert "merged" in printed and "q8_0" in printed and f"GGUF files read by {result['runtime']['gguf']}" in printed


def test_a_llama_cpp_runtime_that_crashes_falls_back_to_transformers(run, monkeypatch, tmp_path, capsys):
    """Where llama.cpp's runtime is at hand but its process dies on a file (SIGABRT, as llama.cpp's tokenizer
    aborted on SmolLM2's GGUF; a stand-in process here), the file is read by transformers' loader instead, and the
    run says why."""
    monkeypatch.setattr(llama_cpp, "runtime_available", lambda: True)
    crash = tmp_path / "python"
    crash.write_text("#!/bin/sh\nkill -ABRT $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    with open(os.path.join(run["out"], "config.json")) as f:
        s = json.load(f)["settings"]
    gguf = os.path.join(run["out"], export.GGUF_DIR, llama_cpp.file_name("f16"))
    records, used = fidelity.score_gguf(gguf, models.load_tokenizer(run["out"]), fidelity.held_out_rows(run["out"]),
                                        s, run["out"])
    assert used == fidelity.TRANSFORMERS and len(records) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"llama.cpp's runtime failed on model-F16.gguf (signal 6): reading it with {fidelity.TRANSFORMERS}"


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9  # gguf.GGUFValueType


def gguf_bos(gguf_file):
    """(add_bos_token, bos_token_id): what llama.cpp reads from the GGUF's header to begin a prompt. Read here
    key by key, skipping the rest: gguf's GGUFReader first parses every token of the vocabulary into numpy views
    (some 10 s for Qwen's 151k)."""
    with open(gguf_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def read(fmt):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return value

        def value(kind):
            nonlocal pos
            if kind == STRING:
                n = read("<Q")
                pos += n
                return bytes(data[pos - n:pos]).decode()
            if kind == ARRAY:
                item, n = read("<I"), read("<Q")
                if item in SCALARS:
                    pos += n * struct.calcsize(SCALARS[item])
                    return None
                return [value(item) for _ in range(n)]
            return read(SCALARS[kind])

        assert data[:4] == b"GGUF"
        pos = 8  # the magic and the version
        _, n_kv = read("<Q"), read("<Q")
        fields = {}
        for _ in range(n_kv):
            key = value(STRING)
            fields[key] = value(read("<I"))
    assert "tokenizer.ggml.add_bos_token" in fields, f"{gguf_file} does not say whether llama.cpp adds a BOS"
    return fields["tokenizer.ggml.add_bos_token"], fields.get("tokenizer.ggml.bos_token_id")


@pytest.mark.parametrize("family, bos", [
    ("qwen2.5", None),            # the run's own f16 file, from export.py's merged folder
    ("qwen2.5", "<|im_start|>"),  # SmolLM2's way: its BOS is the token that opens a turn, and the tokenizer adds none
    ("llama3", None),             # the tokenizer adds <|begin_of_text|>, and the template writes it too
    ("gemma3", None),             # adds <bos>; the template writes it, and has no system turn
])
def test_the_modelfile_gives_llama_cpp_the_tokens_the_run_trained_on(run, family, bos, tmp_path):
    """Ollama renders TEMPLATE and tokenizes it with the GGUF's vocabulary, adding the BOS the GGUF names where
    the GGUF says to: the ids must be those of the prompt the run trained on, neither a BOS twice nor a turn's
    opening token dropped. The other families' GGUFs are llama.cpp's converter's --vocab-only files (no weights)
    of their tokenizer files as save_pretrained writes them beside a merged model."""
    from agents import get_agents
    from families import family_config, family_tokenizer
    from grpo_math.evaluation import render

    if (family, bos) == ("qwen2.5", None):
        tokenizer = models.load_tokenizer(run["out"])
        gguf = os.path.join(run["out"], export.GGUF_DIR, llama_cpp.file_name("f16"))
    else:
        tokenizer = family_tokenizer(family)
        if bos:
            tokenizer.bos_token = bos
        family_config(family, tokenizer).save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        gguf = str(tmp_path / "vocab.gguf")
        # llama.cpp's converter, forked from the session's server (conftest.forks), which imported torch for it
        proc = forks().run([os.path.join(llama_cpp.source(), "convert_hf_to_gguf.py"), tmp_path, "--vocab-only",
                            "--outfile", gguf]).result(timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    add_bos, bos_id = gguf_bos(gguf)
    text = export.modelfile(tokenizer, {"agents": "core", "prompt_style": "chat", "worked_examples": 1}, "m.gguf")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    question = "What is 2 + 3?"
    trained = render(tokenizer, next(iter(get_agents("core").values())), question, "chat", 1)
    prompt = tokenizer(template.replace("{{ .Prompt }}", question), add_special_tokens=False).input_ids
    assert [bos_id] * add_bos + prompt == tokenizer(trained, add_special_tokens=False).input_ids
    assert 'PARAMETER stop "</SOLUTION>"' in text


@pytest.mark.parametrize("flags, env, message", [
    (["--save-gguf", "q4_k_mm"], {}, "--save-gguf q4_k_mm is not a GGUF type the kit makes; choose one or more"),
    (["--save-gguf", "q8_0"], {"LLAMA_CPP_DIR": "EMPTY"}, "holds no convert_hf_to_gguf.py"),
])
def test_a_gguf_that_cannot_be_made_is_refused_before_training(tmp_path, flags, env, message):
    (tmp_path / "EMPTY").mkdir()
    env = {k: str(tmp_path / v) for k, v in env.items()}
    out = tmp_path / "run"
    proc = run_script("train_synthetic.py", "--smoke", *flags, "--output-dir", str(out), check=False, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert "step" not in proc.stdout and not out.exists()  # nothing trained, nothing written

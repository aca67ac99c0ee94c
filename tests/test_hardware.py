"""What the kit decides from the GPU: precision, the backend and its reason, and vLLM's fallback."""

import os
import stat
import subprocess
import sys
import types
import weakref

import pytest
import torch
import trl
from trl import GRPOConfig  # noqa: F401  (imported now: under a faked CUDA, TrainingArguments would not import)

import evaluate
import train_gsm8k
from grpo_math import compiling, grpo_trainer, models, settings


def fake_cuda(monkeypatch, capability):
    """A CUDA device of this compute capability, as the kit's checks see it. torch.cuda.is_bf16_supported
    answers True on every such card, as it does on a real T4 (emulated bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("capability, dtype", [
    ((7, 0), torch.float16),   # V100
    ((7, 5), torch.float16),   # T4: Colab and Kaggle's free GPU
    ((8, 0), torch.bfloat16),  # A100
    ((8, 9), torch.bfloat16),  # L4, RTX 40xx
    ((9, 0), torch.bfloat16),  # H100
])
def test_precision_follows_compute_capability(monkeypatch, capability, dtype):
    """Every place that picks a dtype agrees with Unsloth's loader, which uses fp16 below capability 8."""
    fake_cuda(monkeypatch, capability)
    assert models.compute_dtype() == dtype
    kwargs = models.load_kwargs(quantize=True)  # the trl backend's 4-bit load, and evaluate.py's
    assert kwargs["dtype"] == dtype and kwargs["quantization_config"].bnb_4bit_compute_dtype == dtype
    s = settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", "--backend", "unsloth"], train_gsm8k.add_args)
    monkeypatch.setattr(trl, "GRPOConfig", dict)  # the arguments as given: a real config refuses fp16 on a CPU
    config = train_gsm8k.grpo_config(s, "unsloth", models.tiny_model_and_tokenizer()[1])
    assert (config["bf16"], config["fp16"]) == (dtype == torch.bfloat16, dtype == torch.float16)
    assert config["optim"] == "adamw_8bit" and config["use_cpu"] is False


def test_evaluation_loads_in_fp16_on_a_t4(monkeypatch, gsm8k_dir, tmp_path):
    """evaluate.py's model load asks for fp16 on a T4, not the bf16 that torch says it supports."""
    fake_cuda(monkeypatch, (7, 5))
    seen = {}

    class Loaded(Exception):
        """Raised by the stand-in loader once it has seen its arguments: nothing is loaded."""

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise Loaded

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(evaluate, "check_source", lambda name: None)  # "some/model" is on no hub
    monkeypatch.setattr(evaluate.families, "describe", lambda *a, **k: "model: (no tokenizer loaded)")
    with pytest.raises(Loaded):
        evaluate.main(["--model-name", "some/model", "--dataset", gsm8k_dir, "--n", "2", "--calibration-n", "0",
                       "--out", str(tmp_path / "eval")])
    assert seen["dtype"] == torch.float16


def fake_nvidia_smi(tmp_path, monkeypatch, line="Tesla T4, 535.104.05"):
    """An nvidia-smi on PATH that sees a GPU, as on a machine whose driver torch cannot use."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"#!/bin/sh\necho '{line}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_driver_too_old_for_torch_is_named(tmp_path, monkeypatch):
    # torch 2.11 from PyPI is built for CUDA 13.0; a 535 driver only runs CUDA 12.2
    fake_nvidia_smi(tmp_path, monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    backend, reason = models.choose_backend("auto")
    assert backend == "trl"
    assert "Tesla T4 with driver 535.104.05" in reason and "too old for the CUDA 13.0" in reason
    with pytest.raises(SystemExit, match="too old for the CUDA 13.0"):
        models.choose_backend("unsloth")


def test_cpu_only_torch_beside_a_gpu_is_named(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in models.choose_backend("auto")[1]


def test_no_gpu_at_all(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert models.choose_backend("auto") == ("trl", "no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on a machine without CUDA")
def test_default_recipe_names_the_driver_problem(tmp_path):
    """The GPU recipe on a machine where nvidia-smi sees a GPU and torch does not: the message says
    why, not just "no GPU", before anything is downloaded."""
    from test_training import run_script

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Tesla T4, 535.104.05'\n")
    smi.chmod(0o755)
    proc = run_script("train_gsm8k.py", check=False, env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    # this machine's torch is the CPU build, so that is what the message names
    assert "nvidia-smi sees a Tesla T4" in proc.stderr and "CPU-only build" in proc.stderr


class FakeFastLanguageModel:
    """Stands in for unsloth.FastLanguageModel: from_pretrained fails with vLLM as a broken vLLM does."""
    calls = []

    @classmethod
    def from_pretrained(cls, fast_inference=False, **kwargs):
        cls.calls.append(fast_inference)
        if fast_inference:
            raise ImportError("Unsloth: vLLM was disabled at import: undefined symbol _ZN3c104cuda9SetDevice")
        return models.tiny_model_and_tokenizer()

    @staticmethod
    def get_peft_model(model, **kwargs):
        return model


def test_broken_vllm_falls_back_to_unsloths_generation(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FakeFastLanguageModel))
    monkeypatch.setattr(models, "vllm_available", lambda: True)
    FakeFastLanguageModel.calls.clear()
    model, tokenizer, vllm = models.load_unsloth("some/model", max_seq_length=64, lora_rank=4)
    assert vllm is False and FakeFastLanguageModel.calls == [True, False]  # tried vLLM, then went without
    out = capsys.readouterr().out
    assert "vLLM is installed but did not start (ImportError: Unsloth: vLLM was disabled" in out
    assert "Unsloth's own generate" in out


def test_a_model_error_is_not_blamed_on_vllm(monkeypatch):
    """Without vLLM there is nothing to fall back from: the loader's own error comes through."""
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FakeFastLanguageModel))
    monkeypatch.setattr(models, "vllm_available", lambda: False)
    monkeypatch.setattr(FakeFastLanguageModel, "from_pretrained", classmethod(
        lambda cls, **kw: (_ for _ in ()).throw(OSError("some/model is not a local folder or a hub repo"))))
    with pytest.raises(OSError, match="not a local folder"):
        models.load_unsloth("some/model", max_seq_length=64, lora_rank=4)


def test_vllm_on_stops_where_vllm_does_not_start(monkeypatch):
    """--vllm on asks for vLLM: no quiet fallback to the slower generate, one line that says what to try."""
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FakeFastLanguageModel))
    FakeFastLanguageModel.calls.clear()
    with pytest.raises(SystemExit) as stop:
        models.load_unsloth("some/model", max_seq_length=64, lora_rank=4, fast_inference=True, vllm_required=True)
    message = str(stop.value)
    assert message.startswith("--vllm on: vLLM did not start (ImportError: Unsloth: vLLM was disabled")
    assert "lower --gpu-memory-utilization" in message and "--vllm off" in message
    assert FakeFastLanguageModel.calls == [True]  # no second load


class HalfStartedEngine:
    """What a vLLM that fails to start leaves: an engine object (GBs of GPU memory on a real one)."""
    last = None  # a weak reference to the latest


class FailingEngineLoader(FakeFastLanguageModel):
    """from_pretrained with vLLM builds an engine, then fails; without vLLM it records whether the failed
    engine still lives, as a traceback kept alive by a retry inside the except block would keep it."""
    engine_alive = []

    @classmethod
    def from_pretrained(cls, fast_inference=False, **kwargs):
        if fast_inference:
            engine = HalfStartedEngine()
            HalfStartedEngine.last = weakref.ref(engine)
            raise RuntimeError("No available memory for the cache blocks")
        cls.engine_alive.append(HalfStartedEngine.last() is not None)
        return models.tiny_model_and_tokenizer()


def test_a_failed_vllm_is_gone_before_the_fallback_loads(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FailingEngineLoader))
    FailingEngineLoader.engine_alive.clear()
    model, tokenizer, vllm = models.load_unsloth("some/model", max_seq_length=64, lora_rank=4, fast_inference=True)
    assert vllm is False and FailingEngineLoader.engine_alive == [False]
    assert "did not start (RuntimeError: No available memory for the cache blocks)" in capsys.readouterr().out


@pytest.mark.parametrize("vllm, quantized", [(False, True), (True, False)])
def test_the_trl_backend_quantizes_only_when_vllm_does_not_sample(monkeypatch, tmp_path, vllm, quantized):
    """With vLLM sampling, TRL's sync into a 4-bit vLLM re-quantizes weights a step never moves: the base is
    loaded unquantized instead, on a GPU (here a stand-in A100), so that vLLM samples the trained model."""
    fake_cuda(monkeypatch, (8, 0))
    asked = []
    monkeypatch.setattr(models, "choose_vllm", lambda requested: (vllm, f"--vllm {requested}"))
    monkeypatch.setattr(models, "load_pretrained", lambda name, quantize=False, tokenizer=None:
                        asked.append(quantize) or models.tiny_model_and_tokenizer())
    monkeypatch.setattr(models, "add_lora", lambda model, *a, **kw: model)
    monkeypatch.setattr(models, "prepare_vllm", lambda: None)
    s = {"model_name": "some/model", "vllm": "on" if vllm else "off", "lora_rank": 4, "seed": 0,
         "output_dir": str(tmp_path)}
    models.load_model(s, "trl")
    assert asked == [quantized]


@pytest.mark.parametrize("backend", ["trl", "unsloth"])
def test_importance_sampling_is_set_on_each_backend(backend):
    """Each token's ratio of the trained model's probability to vLLM's, capped at 2 (truncated importance
    sampling), on both backends: not TRL's default (the whole completion's ratio, dropped above 3), nor
    Unsloth's (none)."""
    s = {"prompt_style": "chat", "tool_names": []}
    args = grpo_trainer.generation_args(s, backend, tokenizer=None, vllm=True)
    config = trl.GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[],
                            **{k: v for k, v in args.items() if k.startswith("vllm_importance")})
    assert config.vllm_importance_sampling_correction is True
    assert (config.vllm_importance_sampling_mode, config.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)
    assert config.vllm_importance_sampling_clip_min is None


IMPORT_ORDER = """
import sys
import {script}
from grpo_math import models

def backend_chosen(s):  # where unsloth is imported on a GPU: nothing it patches may be loaded yet
    loaded = [m for m in ("trl", "transformers", "peft") if m in sys.modules]
    raise SystemExit("loaded before the backend was chosen: " + (", ".join(loaded) or "none"))

models.pick_backend = backend_chosen
{script}.main(["--output-dir", sys.argv[1], "--model-name", sys.argv[2], *sys.argv[3:]])
"""


@pytest.mark.parametrize("script", ["train_gsm8k", "train_synthetic"])
def test_nothing_unsloth_patches_is_imported_before_the_backend_is_chosen(script, tmp_path):
    """Unsloth patches trl, transformers and peft when it is imported; imported after them, it warns
    and leaves their unpatched code running (seen on an H200). A fresh process is the only clean view."""
    from conftest import ROOT, SCRIPT_ENV

    model, tokenizer = models.tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = ["--dataset", os.path.join(ROOT, "gsm8k_sample")] if script == "train_gsm8k" else []
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER.format(script=script), str(tmp_path / "run"),
                           str(tmp_path / "model"), *data],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, **SCRIPT_ENV})
    assert "loaded before the backend was chosen: none" in proc.stderr, proc.stderr[-3000:]


def test_nothing_unsloth_patches_is_imported_by_the_benchmark_worker():
    from conftest import ROOT

    code = "import sys, bench.bench_worker; print([m for m in ('trl', 'transformers', 'peft') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("requested, steps, mode", [
    ("auto", 250, "on"),    # the default recipe: the minutes of compiling pay back after about 30 steps
    ("auto", compiling.COMPILE_PAYS_BACK_STEPS, "on"),
    ("auto", compiling.COMPILE_PAYS_BACK_STEPS - 1, "off"),  # a short check would wait for nothing
    ("on", 2, "on"),        # asked for, it is done, however short the run
    ("off", 250, "off"),
])
def test_the_compile_is_on_where_it_pays_back(monkeypatch, requested, steps, mode):
    """--compile becomes Unsloth's UNSLOTH_COMPILE_DISABLE, set before unsloth is imported (which reads it)."""
    monkeypatch.delitem(sys.modules, "unsloth_zoo", raising=False)  # not imported yet, as in a fresh process
    monkeypatch.setenv("UNSLOTH_COMPILE_DISABLE", "partial")  # whatever was there, the flag decides
    assert compiling.set_compile(requested, steps) == mode
    assert os.environ["UNSLOTH_COMPILE_DISABLE"] == {"on": "0", "off": "1"}[mode]

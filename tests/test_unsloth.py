"""The unsloth backend through Unsloth's real patched trl, on a CPU.

Each training case runs tests/unsloth_cpu.py in a process of its own, because Unsloth patches trl and
transformers for the whole process; the five checks of the "checks" fixture share one, and so do the
four model families of the "families" fixture, trained in turn. Each of those processes is forked from
a server where Unsloth was imported, with the compile setting the run asks for, and patched trl, as the
harness does it (tests/forks.py): the 15-25 s of that import are paid once per setting. That script's
docstring lists what is real and every stand-in, with the reason for each. The scripted cases check the
mechanics (precision, stop tag, rewards, run folder) on completions that are all the same, which train
nothing; the varied cases and the families check that Unsloth's trainer trains.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import train_gsm8k
import unsloth_cpu
from conftest import ROOT, forks, need_shared
from families import FAMILIES
from grpo_math import compiling, models, runs, settings
from rewards import STOP_TAG

pytestmark = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                                reason="unsloth is not installed (.ci/run installs it for the CPU tests)")
HARNESS = os.path.join(ROOT, "tests", "unsloth_cpu.py")
TRAIN = ["--smoke", "--backend", "unsloth", "--model-name", "stand-in/tiny-qwen2", "--max-steps", "2"]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """The harness's config, vllm, exports, gguf and ensemble checks, run once in one process."""
    return harness(tmp_path_factory.mktemp("checks"), "checks")


def harness(tmp_path, mode, *args, rest=()):
    """Run one mode of the harness, forked from the server (conftest.forks) where Unsloth was imported with
    the compile setting the run asks for, as the harness would import it; (its RESULT dict, its stdout)."""
    env = {"LLAMA_CPP_DIR": str(tmp_path / "llama.cpp")}  # a stand-in: its converter is never run
    (tmp_path / "llama.cpp").mkdir(exist_ok=True)
    (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").touch()
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    server = forks(compiling.resolve(*unsloth_cpu.compile_request(rest)), unpatched=mode == "unpatched")
    proc = server.run([HARNESS, mode, "--out", scratch, *args, "--", *rest], cwd=tmp_path, env=env).result(600)
    if proc.returncode != 0:
        raise AssertionError(f"{mode} {args} {rest} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, proc.stdout[-3000:]
    return json.loads(results[-1][len("RESULT "):]), proc.stdout


# The chat prompt's structured answer, closed by the model's eos; the xml prompt's answer, closed
# by the stop tag and followed by words that generation must never reach.
SCRIPTS = {"chat": "<start_working_out>3 + 4 = 7<end_working_out><SOLUTION>7</SOLUTION><|im_end|>",
           "xml": f" 7 {STOP_TAG} and more words"}
REWARDS = {"chat": "format_exact_reward,format_approx_reward", "xml": "correctness_reward,stop_tag_bonus"}


# Colab's T4 and an Ampere card, in the two prompt styles (neither the stop tag nor the chat answer
# depends on the card), and --compile on and auto (off, for 2 steps): it reaches Unsloth before the
# import, and step 1's line says which is in effect.
@pytest.mark.parametrize("gpu, style, compile", [("t4", "xml", "on"), ("ampere", "chat", "auto")])
def test_two_grpo_steps_through_unsloths_trainer(tmp_path, gpu, style, compile):
    """train_synthetic.py's main on the unsloth backend: the kit's trainer subclasses the generated
    UnslothGRPOTrainer, Unsloth accepts the kit's precision for the card (on a T4 an fp16 model and
    fp16 mixed precision; bf16 there makes Unsloth refuse), and the per-agent rewards, the progress
    and sample lines and the run folder come out as on the trl backend."""
    run = tmp_path / "run"
    result, stdout = harness(tmp_path, "train", "--gpu", gpu, "--script", SCRIPTS[style], rest=[
        *TRAIN, "--prompt-style", style, "--rewards", REWARDS[style], "--max-completion-length", "48",
        "--output-dir", str(run), "--compile", compile])
    assert "trl.GRPOTrainer is UnslothGRPOTrainer" in stdout
    assert "backend: unsloth (CUDA device and unsloth available, no vLLM)" in stdout
    mode = "off" if compile == "auto" else compile  # auto: 2 steps are too few for the compile to pay back
    assert result["unsloth_compile_disable"] == (mode == "off")  # what Unsloth read when it was imported
    # Compiling, the silence before step 1's line is the compiler, not a hang; and that line says which.
    assert (models.FIRST_STEP_NOTE in stdout) == (mode == "on")
    first = next(line for line in stdout.splitlines() if line.startswith("step    1/2 | reward"))
    assert first.endswith(f"| unsloth compile {mode} (--compile)")
    assert "compile" not in next(line for line in stdout.splitlines() if line.startswith("step    2/2 | reward"))
    assert result["trainer_bases"] == ["KitGRPOTrainer", "UnslothGRPOTrainer"]

    half = "bfloat16" if gpu == "ampere" else "float16"  # the dtype the kit asks Unsloth to load in (below)
    # LoRA trains in fp32 on both cards: Unsloth's trainer drops TRL's bf16 cast of a 4-bit model's
    # LoRA, which fp16's GradScaler could not unscale (and the kit's trainer would undo on a T4).
    assert result["trainable_dtypes"] == ["torch.float32"]
    assert (result["bf16"], result["fp16"]) == ((True, False) if gpu == "ampere" else (False, True))
    assert result["use_cpu"] is False and result["optimizer"].startswith("bitsandbytes")  # the GPU recipe's 8-bit AdamW
    assert result["weight_decay"] == 0.0
    load, lora = result["calls"]
    assert load["load_in_4bit"] is True and load["dtype"] == f"torch.{half}" and load["fast_inference"] is False
    assert lora["use_gradient_checkpointing"] == "unsloth" and lora["r"] == lora["lora_alpha"] == 4
    assert lora["target_modules"] == models.LORA_TARGETS

    stats = json.load(open(run / runs.STATS_FILE))
    assert [e["step"] for e in stats] == [0, 1, 2]
    # held-out accuracy before training and at the last step, generated between Unsloth's training steps
    assert [e["step"] for e in stats if "eval/accuracy" in e] == [0, 2]
    assert [e["eval/format_compliance"] for e in stats if "eval/accuracy" in e] == [1.0, 1.0]  # the scripted answer
    assert "reward" in stats[-1]  # the last step's own figures, beside its evaluation
    for entry in stats[1:]:  # one question per step, so one agent, whose mean is the step's reward
        (agent_key,) = [k for k in entry if k.startswith("agents/")]
        assert entry[agent_key] == pytest.approx(entry["reward"])
    assert "step    2/2 | reward" in stdout
    # one scripted answer: every completion of a group is the same, so no advantage and no gradient
    assert all(e["frac_reward_zero_std"] == 1.0 and e["grad_norm"] == 0.0 for e in stats[1:])
    sample = next(line for line in stdout.splitlines() if line.startswith("  sample ["))
    config = json.load(open(run / "config.json"))
    assert config["backend"] == "unsloth" and config["precision"] == half
    assert (run / "adapter_model.safetensors").exists() and (run / "rewards.png").exists()
    assert json.load(open(run / "eval.json"))["format_compliance"] == 1.0

    if style == "xml":
        # The </response> stop: every completion ends at the tag, before the length limit.
        assert result["stop_strings"] == [[STOP_TAG]]
        assert sample.endswith(f"{STOP_TAG}'")
        assert all(e["rewards/stop_tag_bonus/mean"] == 0.5 for e in stats[1:])
        assert all(e["completions/mean_length"] < 48 for e in stats[1:])
    else:
        assert not result["generation_kwargs"]  # no stop string: the chat answer ends with eos
        assert all(e["rewards/format_exact_reward/mean"] == 3.0 for e in stats[1:])
        assert all(e["completions/clipped_ratio"] == 0.0 for e in stats[1:])


# Without --script the tiny model samples, so a group's completions differ, and so do their rewards
# (--smoke's unique_chars_reward); 3 steps, because LoRA-A first moves at the third (B starts at 0).
# At --smoke's learning rate, 5e-4, that third step moves some LoRA-A tensors of the tiny model by less
# than fp16 resolves (T4); at 5e-3 every one moves.
VARIED = ["--smoke", "--backend", "unsloth", "--model-name", "stand-in/tiny-qwen2", "--max-steps", "3",
          "--max-completion-length", "48", "--learning-rate", "5e-3"]


def varied_run(tmp_path, gpu, style, *flags):
    run = tmp_path / "run"
    result, stdout = harness(tmp_path, "train", "--gpu", gpu, *flags,
                             rest=[*VARIED, "--prompt-style", style, "--output-dir", str(run)])
    assert "its __init__ wrapped as on a GPU" in stdout  # _patch_trl_trainer() applied, as a GPU import does
    steps = [e for e in json.load(open(run / runs.STATS_FILE)) if e["step"] > 0]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all(e["frac_reward_zero_std"] < 1 for e in steps)  # rewards differ in a group: advantages not all 0
    print("grad_norm per step:", [e["grad_norm"] for e in steps], "LoRA:", result["lora"])
    return [e["grad_norm"] for e in steps], result["lora"]


@pytest.mark.parametrize("gpu, style", [("t4", "chat"), ("ampere", "xml")])
def test_unsloths_trainer_trains_on_varied_completions(tmp_path, gpu, style):
    """A gradient flows through Unsloth's generated GRPO loss on every step, in fp16 (T4) and bf16,
    in both prompt styles; every LoRA weight moves, and the adapter saved in the run folder is the
    trained one, not the one training started from."""
    grad_norms, lora = varied_run(tmp_path, gpu, style)
    assert all(math.isfinite(g) and g > 0 for g in grad_norms), grad_norms
    assert lora["b_tensors"] == len(models.LORA_TARGETS) * 2  # the tiny model's 2 layers
    assert lora["b_moved"] == lora["a_moved"] == lora["b_tensors"], lora
    assert lora["saved_tensors"] == 2 * lora["b_tensors"] == lora["saved_differs_from_start"], lora
    assert lora["saved_minus_trained"] == 0.0


def test_the_training_checks_catch_a_loss_cut_from_the_model(tmp_path):
    """The same run with the loss detached before backward(), as a broken backward would leave it:
    grad_norm is 0 on every step, no LoRA weight moves, and the saved adapter is the initial one. So
    the checks above cannot pass without a gradient."""
    grad_norms, lora = varied_run(tmp_path, "t4", "chat", "--detach-loss")
    assert grad_norms == [0.0, 0.0, 0.0]
    assert lora["b_moved"] == lora["a_moved"] == lora["saved_differs_from_start"] == 0 and lora["b_tensors"] > 0


# The families users switch --model-name to, trained in turn in one process: each a tiny random model of the
# family's class with its real tokenizer (tests/families.py), through the harness's stand-in loader, which runs
# Unsloth's loader patches for the family (its docstring, stand-in 2). --compile on: with it off (auto, for 2
# steps) Unsloth leaves transformers' Gemma 3 classes as they are; torch.compile itself stays off (stand-in 9).
# An Ampere card: on a T4 Unsloth loads Gemma 3 in float32, which the stand-in does not. Four completions of 8
# tokens: enough for the rewards of a group to differ.
FAMILY_RUN = ["--smoke", "--backend", "unsloth", "--max-steps", "2", "--max-completion-length", "8",
              "--num-generations", "4", "--eval-examples", "0", "--select-examples", "0", "--compile", "on",
              "--prompt-style", "chat"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """(the harness's RESULT per family, their runs' folder): the four families' runs, in one process."""
    for family, (_, folder, _) in FAMILIES.items():
        need_shared(folder, ("tokenizer.json", "tokenizer_config.json"), f"the {family} tokenizer")
    tmp_path = tmp_path_factory.mktemp("families")
    result, stdout = harness(tmp_path, "train", "--gpu", "ampere", "--families", ",".join(FAMILIES),
                             rest=[*FAMILY_RUN, "--output-dir", str(tmp_path / "runs")])
    assert stdout.count("trl.GRPOTrainer is UnslothGRPOTrainer, its __init__ wrapped as on a GPU") == 1
    return result, tmp_path / "runs"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unsloths_trainer_trains_each_model_family(families, family):
    """Qwen2.5, Qwen3, Llama 3 and Gemma 3, each of its own architecture class and with its real tokenizer and
    chat template, through Unsloth's loader patches for the family and its generated GRPO trainer: a
    gradient on both steps, LoRA-B moved, and the trained adapter saved in the run folder."""
    results, folder = families
    result, run = results[family], folder / family
    load, peft = result["calls"]
    assert load["model_name"] == f"stand-in/{family}" and load["architecture"] == FAMILIES[family][0]
    assert load["unsloth_patches"] and load["pad_token"]  # Llama 3.1's tokenizer has none: Unsloth picks one
    assert load["compiled_class"] == (family == "gemma3")  # Unsloth's rewrite of transformers' Gemma 3 module
    assert peft["target_modules"] == models.LORA_TARGETS
    assert result["trainer_bases"] == ["KitGRPOTrainer", "UnslothGRPOTrainer"]
    assert result["bf16"] and result["trainable_dtypes"] == ["torch.float32"]

    steps = [e for e in json.load(open(run / runs.STATS_FILE)) if e["step"] > 0]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(e["frac_reward_zero_std"] < 1 for e in steps)  # varied completions: advantages not all 0
    assert all(math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0 for e in steps), steps
    moved = result["lora"]  # how far training moved the LoRA weights, in the model and in the saved adapter
    assert moved["b_tensors"] == len(models.LORA_TARGETS) * 2 == moved["b_moved"], moved  # 2 layers; A moves at step 3
    assert (run / "adapter_model.safetensors").exists()
    assert moved["saved_tensors"] == 2 * moved["b_tensors"] and moved["saved_minus_trained"] == 0.0, moved
    assert moved["saved_differs_from_start"] >= moved["b_tensors"], moved
    assert json.load(open(run / "config.json"))["backend"] == "unsloth"


UNSLOTH_ONLY = {"push_to_hub_token", "unsloth_grpo_mini_batch", "unsloth_logit_chunk_multiplier", "unsloth_num_chunks",
                "vllm_sampling_params"}


def test_unsloths_config_trains_the_kits_recipe(checks):
    """The kit's GRPOConfig arguments give the same config under Unsloth's patch as under plain trl,
    except where a field cannot change what is trained. Unsloth's own defaults differ (weight decay
    0.001, an emptied CUDA cache every 250 steps), so the kit sets those values itself."""
    unsloth_cfg = checks[0]["config"]
    s = settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", "--output-dir", unsloth_cfg["output_dir"]],
                                train_gsm8k.add_args)
    trl_cfg = json.loads(train_gsm8k.grpo_config(s, "unsloth", models.tiny_model_and_tokenizer()[1]).to_json_string())
    # Every field, lists and dicts included (generation_kwargs, reward_weights, lr_scheduler_kwargs), as
    # each config's own JSON writes it; and the fields only one side has.
    assert set(unsloth_cfg) - set(trl_cfg) == UNSLOTH_ONLY and not set(trl_cfg) - set(unsloth_cfg)
    may_differ = {
        "per_device_eval_batch_size", "eval_accumulation_steps",  # evaluation through the trainer, which the kit never runs
        "logging_nan_inf_filter",  # what is logged, not trained
        "router_aux_loss_coef",  # mixture-of-experts models only
        "vllm_importance_sampling_correction",  # only when vLLM generates, which the trl backend never does
    }
    differ = {k: (trl_cfg[k], unsloth_cfg[k]) for k in trl_cfg if trl_cfg[k] != unsloth_cfg[k]}
    # Unsloth writes {} for None; TRL's trainer adds nothing from either (grpo_trainer.py, "if
    # args.generation_kwargs is not None: generation_kwargs.update(...)").
    assert differ.pop("generation_kwargs", None) in (None, (None, {}))
    assert set(differ) <= may_differ, differ
    assert {k: unsloth_cfg[k] for k in UNSLOTH_ONLY} == {  # Unsloth's own fields, at their defaults
        "push_to_hub_token": None, "unsloth_grpo_mini_batch": None, "unsloth_logit_chunk_multiplier": None,
        "unsloth_num_chunks": -1, "vllm_sampling_params": None}
    assert unsloth_cfg["weight_decay"] == 0.0 and unsloth_cfg["torch_empty_cache_steps"] is None


def test_unsloths_vllm_patches_take(checks):
    """Under the patch the config accepts vllm_sampling_params, as the kit builds them for the xml
    stop tag, and trl's vLLM generation class carries Unsloth's LoRA hook."""
    result = checks[0]["vllm"]
    assert result["sampling_params"] == {"stop": [STOP_TAG], "include_stop_str_in_output": True}
    assert not result["generation_kwargs"]  # vLLM stops on its own; no transformers stop strings
    assert result["generate_wrapped"] and result["init_loads_lora"]
    assert result["sync_patched"] == "<unsloth_trl_vllm_generation_sync_weights_patch>"


def test_failed_trainer_patch_is_said_in_one_line(tmp_path):
    """trl left unpatched, as when Unsloth's patch fails and it only warns: the kit says so once,
    does not start vLLM, and gives trl's own config no vllm_sampling_params, which it would refuse."""
    result, stdout = harness(tmp_path, "unpatched", "--gpu", "ampere", "--vllm-installed",
                             rest=[*TRAIN, "--output-dir", str(tmp_path / "run")])
    assert stdout.count("Unsloth did not patch trl's GRPOTrainer") == 1
    assert result["trainer_bases"] == ["KitGRPOTrainer", "GRPOTrainer"]
    assert result["calls"][0]["fast_inference"] is False
    assert result["stop_strings"] == [[STOP_TAG]]
    assert "step    2/2 | reward" in stdout


def test_ensemble_decoding_on_an_unsloth_patched_model(checks):
    """Unsloth's forward for the whole Qwen2 class returns a tuple on its one-token decode path and no
    hidden states; ensemble decoding gives the same tokens as before the patch, and with one agent
    the tokens of greedy generate."""
    result = checks[0]["ensemble"]
    assert result["after"] == result["before"]
    assert result["after"][0] == result["greedy"][: len(result["after"][0])]
    assert len(set(result["after"][1])) > 5  # varied text, so a wrong token would show


def test_gguf_files_land_in_run_gguf(checks):
    """On the unsloth backend, the converter reads Unsloth's 16-bit merge (a plain transformers folder), made in
    RUN/gguf-work and deleted after; RUN/gguf holds the GGUF file and the Modelfile."""
    result = checks[0]["gguf"]
    assert result["paths"] == ["gguf/model-Q4_K_M.gguf", "gguf/Modelfile"]
    assert result["files"] == ["config.json", "gguf/Modelfile", "gguf/model-Q4_K_M.gguf"]  # no gguf-work/ left
    assert result["converted"]["quants"] == ["q4_k_m"]
    assert "config.json" in result["converted"]["files"] and "model.safetensors" in result["converted"]["files"]


def test_gguf_settings_checked_before_training(checks):
    """An unknown GGUF type is refused with the kit's list, before anything loads."""
    result = checks[0]["exports"]
    assert result["q4_k_m"] == "accepted"
    assert "--save-gguf q4_k_mm is not a GGUF type the kit makes" in result["q4_k_mm"] and "q4_k_m" in result["q4_k_mm"]


def test_compile_is_set_before_unsloth_imports_and_a_later_change_is_said(tmp_path):
    """--compile reaches Unsloth through UNSLOTH_COMPILE_DISABLE, which it reads once, on import: set
    before, it takes; asked for again in the same process (a notebook's second run), the first choice
    stands, and one line says so rather than ignoring it."""
    code = ("import sys; sys.path.insert(0, 'tests'); import unsloth_cpu; from grpo_math import compiling\n"
            "print('first', compiling.set_compile('off'))\n"
            "unsloth_cpu.import_unsloth(patch_trl=False)\n"
            "from unsloth_zoo.temporary_patches.common import UNSLOTH_COMPILE_DISABLE\n"
            "print('disabled', UNSLOTH_COMPILE_DISABLE)\n"
            "print('second', compiling.set_compile('on'))\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "UNSLOTH_COMPILE_LOCATION": str(tmp_path / "cache")}
    env.pop("UNSLOTH_COMPILE_DISABLE", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "first off" in lines and "disabled True" in lines and "second off" in lines
    assert ("--compile on: Unsloth was imported in this process with its compile off, which stands; restart the "
            "process (the notebook's kernel) for --compile on") in lines

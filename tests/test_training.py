"""The training scripts end to end on the tiny --smoke model (CPU, offline), and their settings."""

import json
import os
import sys

import pytest
import torch

import train_gsm8k
import train_synthetic
from agents import expand_agents
from data import GSM8K_SAMPLE, load_gsm8k, split_held_out
from grpo_math import grpo_trainer, models, settings
from grpo_math.prompt_budget import fit_prompts
from rewards import STOP_TAG
from conftest import assert_held_out_sets_apart, run_script, stats_of


def assert_reloadable_run(run_dir, steps):
    """The run folder holds what the README promises, and the adapter reloads with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.json",
                 "training_stats.json", "rewards.png", "eval.json", f"checkpoint-{steps}"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    # one stats entry per step, in order, after step 0's: the held-out baseline (--eval-every)
    assert [e["step"] for e in stats_of(run_dir)] == list(range(steps + 1))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "base-model"))
    model = PeftModel.from_pretrained(base, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    ids = tokenizer("12 apples", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)
    # the trained LoRA B matrices are no longer all zero, so the adapter holds the training
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_synthetic_smoke_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("train_synthetic.py", "--smoke", "--output-dir", out)
    assert "backend: trl (--smoke" in proc.stdout  # it says which path it took
    assert "step    4/4 | reward" in proc.stdout  # the fixed-format progress line
    assert_reloadable_run(out, steps=4)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["settings"]["prompt_style"] == "xml" and config["backend"] == "trl"
    # every step logs the mean reward of the agents it sampled (one question, so one agent, per step)
    names = {f"agents/{a}/reward" for a in ["step_by_step", "concise", "verify", "teacher"]}
    for entry in stats_of(out)[1:]:
        keys = {k for k in entry if k.startswith("agents/")}
        assert keys and keys <= names
        assert entry[keys.pop()] == pytest.approx(entry["reward"])  # one agent: its mean is the step's
    evaluation = json.load(open(os.path.join(out, "eval.json")))
    assert evaluation["n"] == 2 and 0 <= evaluation["accuracy"] <= 1


def test_no_held_out_questions(tmp_path, capsys):
    """--eval-examples 0 and --select-examples 0, as --help allows (train_gsm8k.py takes them too): the run
    trains and saves, with no evaluation, no eval.json and no adapter selected."""
    out = tmp_path / "run"
    train_synthetic.main(["--smoke", "--eval-examples", "0", "--select-examples", "0", "--max-steps", "1",
                          "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "step    1/1 | reward" in printed and "quick evaluation" not in printed
    assert (out / "adapter_model.safetensors").exists() and not (out / "eval.json").exists()
    assert not any("eval/accuracy" in e for e in stats_of(out))
    assert not (out / "best").exists() and f"no adapter was selected" in printed


def test_gsm8k_smoke_end_to_end(tmp_path):
    """--smoke without --dataset reads the GSM8K rows shipped in gsm8k_sample/: no network needed."""
    out = str(tmp_path / "run")
    proc = run_script("train_gsm8k.py", "--smoke", "--output-dir", out)
    assert json.load(open(os.path.join(out, "config.json")))["settings"]["dataset"] == GSM8K_SAMPLE
    assert "on 2 held-out questions: accuracy" in proc.stdout  # the quick evaluation
    assert_reloadable_run(out, steps=4)
    # the held-out sets: apart from each other and from the rows trained on
    s = parse(["--smoke"])
    rows = load_gsm8k(GSM8K_SAMPLE, limit=s["max_examples"] + s["eval_examples"] + s["select_examples"], seed=s["seed"])
    *_, train = split_held_out(rows.to_list(), s["eval_examples"], s["select_examples"])
    assert_held_out_sets_apart(out, [r["question"] for r in train])
    stats = stats_of(out)[1:]  # the steps, after the held-out baseline
    assert all("rewards/correctness_reward/mean" in e for e in stats)  # the GSM8K recipe's rewards


def parse(argv, defaults=train_gsm8k.DEFAULTS, extra=train_gsm8k.add_args):
    return settings.parse_settings("test", defaults, argv, extra)


@pytest.mark.parametrize("argv, message", [
    # 4 x 1 = 4 completions per step cannot hold whole groups of 3
    (["--smoke", "--num-generations", "3", "--batch-size", "4"], "must be a multiple of --num-generations"),
    (["--smoke", "--num-generations", "1"], "at least 2"),  # one completion has no group to compare
    (["--smoke", "--learning-rate", "0"], "positive"),
    (["--smoke", "--learning-rate", "nan"], "positive"),
    (["--smoke", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["--smoke", "--rewards", "correctness_reward,made_up_reward"], "made_up_reward"),
    (["--smoke", "--rewards", "correctness_reward:heavy"], "not a number"),
    (["--smoke", "--agents", "nonsense"], "unknown agent set"),
    (["--smoke", "--resume", "--overwrite"], "contradict"),
    (["--smoke", "--max-stepz", "3"], "unrecognized arguments"),  # a typo is refused, not ignored
    (["--smoke", "--max-steps", "three"], "invalid int value"),
    # greedy rollouts would make every completion of a group the same: nothing to compare
    (["--smoke", "--temperature", "0"], "--temperature must be above 0"),
    (["--smoke", "--temperature", "-0.5"], "--temperature must be above 0"),
    (["--smoke", "--eval-examples", "-1"], "--eval-examples must be 0 or more"),
    (["--smoke", "--eval-every", "-1"], "--eval-every must be 0 or more"),  # 0 is off; no step is negative
    (["--smoke", "--sample-every", "-2"], "--sample-every must be 0 or more"),
    (["--smoke", "--worked-examples", "9"], "--worked-examples must be between 0 and 3, got 9"),
    (["--smoke", "--worked-examples", "-1"], "--worked-examples must be between 0 and 3, got -1"),
    (["--smoke", "--batch-size", "four"], "expected a whole number, or ''"),
    # the smoke step is 4 completions in one group of 4: 6 would split a step and a group
    (["--smoke", "--generation-batch-size", "6"], "--generation-batch-size 6 must be a multiple of the completions "
     "of one step on every process (--batch-size 4 x 1 process = 4) and of --num-generations 4: for example 4 or 16"),
    (["--smoke", "--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["--smoke", "--gpu-memory-utilization", "60"], "--gpu-memory-utilization must be between 0 and 1, got 60.0"),
])
def test_bad_settings_are_refused_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_worked_examples_widen_the_context_unsloth_is_given():
    """The context is measured on the rendered prompts (prompt_budget.py), so it holds the solved questions
    shown before each one, whatever their length in the model's tokens."""
    tokenizer = models.load_tokenizer("tiny")
    question = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7"}]
    plain, shown = parse(["--smoke"]), parse(["--smoke", "--worked-examples", "2"])
    tokens = {}
    for s in (plain, shown):
        prompt = expand_agents(question, ["Solve it."], style="chat", examples=s["worked_examples"])
        fit_prompts(s, prompt, tokenizer)
        tokens[s["worked_examples"]] = len(tokenizer.apply_chat_template(
            prompt[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert shown["max_seq_length"] - plain["max_seq_length"] == tokens[2] - tokens[0] > 100  # two solved questions


def test_batch_defaults_to_one_group():
    s = parse(["--smoke", "--num-generations", "6", "--max-steps", "1"])
    assert s["batch_size"] == 6  # None resolves to num_generations: the one unambiguous fix
    # the help says "'' (empty) = num_generations", and the parser agrees
    assert parse(["--smoke", "--num-generations", "6", "--batch-size", ""])["batch_size"] == 6


def test_a_generation_batch_is_sampled_once_for_several_steps():
    """--generation-batch-size 16 with 4 completions a step: one generation call, then 4 steps train on it."""
    s = parse(["--smoke", "--generation-batch-size", "16"])
    args = train_gsm8k.grpo_config(s, "trl", tokenizer=None)
    assert (args.generation_batch_size, args.steps_per_generation) == (16, 4)
    default = train_gsm8k.grpo_config(parse(["--smoke"]), "trl", tokenizer=None)
    assert (default.generation_batch_size, default.steps_per_generation) == (4, 1)  # one step's, as before


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a run folder")
    with pytest.raises(SystemExit) as exc:
        parse(["--smoke", "--output-dir", str(path)])
    assert exc.value.code == 2 and "is a file" in capsys.readouterr().err
    assert path.read_text() == "not a run folder"


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("tensorboard", "tensorboard"), ("trackio", "trackio")])
def test_tracker_that_is_not_installed_is_refused(tracker, package, monkeypatch, capsys):
    """Refused at start-up, not after the model has loaded, when transformers looks for it."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as on a machine without it
    with pytest.raises(SystemExit):
        parse(["--smoke", "--report-to", tracker])
    assert f"pip install {package}" in capsys.readouterr().err


def test_smoke_takes_the_shipped_gsm8k_sample():
    s = settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke"], train_gsm8k.add_args, train_gsm8k.SMOKE)
    assert s["dataset"] == GSM8K_SAMPLE and os.path.isfile(GSM8K_SAMPLE)
    given = settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", "--dataset", "x.jsonl"],
                                    train_gsm8k.add_args, train_gsm8k.SMOKE)
    assert given["dataset"] == "x.jsonl"  # a flag still wins over --smoke's choice


def test_precedence_defaults_then_smoke_then_flags():
    s = parse(["--smoke", "--max-steps", "7"])
    assert s["model_name"] == "tiny"   # from SMOKE
    assert s["max_steps"] == 7         # the flag wins
    assert s["reward_weights"]["correctness_reward"] == 2.0  # from the script's DEFAULTS


def test_default_model_without_cuda_stops_with_a_pointer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        parse([])
    message = str(exc.value.code)
    assert "needs a CUDA GPU" in message and "--smoke" in message and "nothing was downloaded" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on a machine without CUDA")
def test_default_model_without_cuda_as_a_script():
    proc = run_script("train_gsm8k.py", check=False)  # no flags: the GPU recipe, on a CPU machine
    assert proc.returncode != 0 and "--smoke" in proc.stderr


def test_notebook_kernel_arguments_are_ignored(monkeypatch):
    # A script pasted into Colab runs with the kernel's argv: ipykernel_launcher.py -f kernel.json
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/kernel-123.json"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a Colab GPU runtime
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    s = settings.parse_settings("test", train_synthetic.DEFAULTS, None, train_synthetic.add_args)
    assert s["max_steps"] == train_synthetic.DEFAULTS["max_steps"]


def test_backend_auto_without_unsloth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setitem(sys.modules, "unsloth", None)  # "import unsloth" now raises ImportError
    assert models.choose_backend("auto") == ("trl", "unsloth not installed")
    with pytest.raises(SystemExit, match="unsloth is not installed"):
        models.choose_backend("unsloth")


def test_backend_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.choose_backend("auto") == ("trl", "no CUDA device")
    assert models.choose_backend("trl")[0] == "trl"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        models.choose_backend("unsloth")


def test_xml_generation_stops_at_the_stop_tag(tmp_path):
    """A model scripted to write "7 </response> and then more" is cut at the tag during training,
    and TRL masks the padding after it: the completions end with </response> and are shorter
    than the token limit."""
    from datasets import Dataset
    from rewards import stop_tag_bonus

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", "--max-steps", "1",
                                "--max-completion-length", "48", "--output-dir", str(tmp_path)], train_synthetic.add_args)
    model, tokenizer = models.tiny_model_and_tokenizer()
    script = tokenizer(" 7 </response> and more words")["input_ids"]
    assert len(script) < s["max_completion_length"]  # without the stop, the tail would be generated too
    state = {"step": 0}

    def count(module, args):  # a prompt (several tokens) starts the script; each decode step advances it
        state["step"] = 0 if args[0].shape[1] > 1 else state["step"] + 1

    def force(module, args, logits):  # the scripted token wins by a margin that no sampling undoes
        logits[:, -1, script[min(state["step"], len(script) - 1)]] += 1e4
        return logits

    model.model.embed_tokens.register_forward_pre_hook(count)
    model.lm_head.register_forward_hook(force)
    model = models.add_lora(model, s["lora_rank"])
    rows = [{"question": "How many?", "answer": "7"}] * 4
    dataset = Dataset.from_list(expand_agents(rows, "core", "all", style="xml"))
    trainer = grpo_trainer.make_trainer_class()(
        model=model, reward_funcs=[stop_tag_bonus], args=train_synthetic.grpo_config(s, "trl", tokenizer),
        train_dataset=dataset, processing_class=tokenizer,
        reward_weights={"stop_tag_bonus": 1.0}, stop_strings=[STOP_TAG],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    completions = list(trainer._logs["completion"])
    assert completions and all(c.rstrip().endswith(STOP_TAG) for c in completions), completions
    assert logs["rewards/stop_tag_bonus/mean"] == 0.5
    assert logs["completions/mean_length"] < s["max_completion_length"]  # stopped, padding masked


def test_importing_ipykernel_is_not_being_in_a_notebook(monkeypatch):
    """A notebook runner (nbclient, as in tests/test_notebook.py) imports ipykernel; a script it starts
    still takes its command line."""
    import ipykernel  # noqa: F401

    monkeypatch.setattr(sys, "argv", ["train_gsm8k.py", "--smoke", "--max-steps", "3"])
    assert not settings.in_notebook()
    assert settings.parse_settings("test", train_gsm8k.DEFAULTS, None, train_gsm8k.add_args)["max_steps"] == 3

"""Tool calling (--tools calculator) through TRL's real tool loop, on a scripted model.

The model is the tiny random one with the Qwen tokenizer and Qwen2.5-Instruct's chat template (TRL's
copy, trl/chat_templates/qwen2_5.jinja). Hooks script what it writes: after a prompt, a tool call in the
template's form; after a tool's result, the final answer. At the answer's last digit two tokens are
scripted alike, so sampling gives a right and a wrong answer within a group: the rewards differ, and
GRPO has something to train on. Every trainer part is TRL's own: its tool loop, its tool_mask, its loss.
"""

import importlib.util
import json

import pytest

import evaluate
import train_gsm8k
from agents import AGENT_SETS, chat_prompt
from conftest import forks, need_qwen_tokenizer, run_script
from grpo_math import grpo_trainer, models, offline, settings, tools
from grpo_math.calculator import calculator

QUESTION = {"question": "A box holds 6 rows of 7 eggs. How many eggs are in the box?", "answer": "42"}


def qwen_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(need_qwen_tokenizer())
    tokenizer.chat_template = offline.qwen2_5_template()  # Qwen2.5-Instruct's, the kit's default model's
    return tokenizer


def scripted_model(tokenizer, expression, answer_digits, keep_calling=False, hidden_size=128):
    """The tiny model, made to write a calculator call of ``expression`` after a prompt, and after a
    tool's result "<SOLUTION>N</SOLUTION>", N's last digit sampled among ``answer_digits`` (equal odds).
    With ``keep_calling`` it calls again after every result, and never answers. What it writes does not depend
    on ``hidden_size``; its cost does (the logits over the tokenizer's whole vocabulary)."""
    model, _ = offline.tiny_model_and_tokenizer(hidden_size=hidden_size, tokenizer=tokenizer)
    call = tokenizer(f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n'
                     "</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    head = tokenizer("<SOLUTION>" + "4", add_special_tokens=False)["input_ids"]
    tail = tokenizer("</SOLUTION><|im_end|>", add_special_tokens=False)["input_ids"]
    digits = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in answer_digits]
    assert all(len(d) == 1 for d in digits)  # Qwen writes a digit per token
    answer = [[t] for t in head] + [[d[0] for d in digits]] + [[t] for t in tail]
    result_open = tokenizer.convert_tokens_to_ids("<tool_response>")
    state = {"scripts": None, "step": 0}

    def count(module, args):  # a prompt (several tokens) picks each row's script; each decode step advances it
        ids = args[0]
        if ids.shape[1] > 1:
            state["scripts"] = [answer if (row == result_open).any() and not keep_calling else [[t] for t in call]
                                for row in ids]
            state["step"] = 0
        else:
            state["step"] += 1

    def force(module, args, logits):  # the scripted tokens win by a margin that no sampling undoes
        for b, script in enumerate(state["scripts"]):
            logits[b, -1, script[min(state["step"], len(script) - 1)]] += 1e4
        return logits

    model.model.embed_tokens.register_forward_pre_hook(count)
    model.lm_head.register_forward_hook(force)
    return model


def tool_settings(tmp_path, *flags):
    return settings.parse_settings("test", train_gsm8k.DEFAULTS, [
        "--smoke", "--tools", "calculator", "--agents", "calculator", "--max-steps", "1", "--num-generations", "8",
        "--max-completion-length", "96", "--output-dir", str(tmp_path), *flags], train_gsm8k.add_args)


def train_one_step(tmp_path, expression):
    """One GRPO step through TRL's tool loop; returns the trainer, its log and what the loss was given."""
    from datasets import Dataset

    from agents import expand_agents
    from rewards import correctness_reward

    s = tool_settings(tmp_path, "--rewards", "correctness_reward")
    tokenizer = tools.check_tokenizer(qwen_tokenizer(), "Qwen2.5 (test)")
    model = models.add_lora(scripted_model(tokenizer, expression, "21"), s["lora_rank"])
    dataset = Dataset.from_list(expand_agents([QUESTION], {"calc": "Use the calculator."}, "all", style="chat"))
    trainer = grpo_trainer.make_trainer_class()(
        model=model, reward_funcs=[correctness_reward], args=train_gsm8k.grpo_config(s, "trl", tokenizer),
        train_dataset=dataset, processing_class=tokenizer, reward_weights={"correctness_reward": 1.0},
        tools=tools.get_tools(s["tools"]))
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: inputs[k].clone() for k in ("completion_ids", "completion_mask", "tool_mask")})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    return trainer, trainer.state.log_history[0], seen, tokenizer


def test_a_grpo_step_calls_the_calculator_masks_its_result_and_rewards_the_final_answer(tmp_path):
    trainer, log, seen, tokenizer = train_one_step(tmp_path, "6*7")
    # Every completion made one call, and the calculator answered it.
    assert log["tools/call_frequency"] == 1.0 and log["tools/failure_frequency"] == 0.0
    completions = trainer.tool_completions
    assert all([m["role"] for m in c] == ["assistant", "tool", "assistant"] for c in completions)
    assert all(c[1]["content"] == "42" for c in completions)  # the calculator's answer entered the completion
    # The loss's tool_mask is 0 on exactly the result turn the template wrapped around "42", 1 elsewhere.
    (batch,) = seen
    suffix = tools.tool_suffix_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "42"}])
    for ids, mask, tool_mask in zip(batch["completion_ids"], batch["completion_mask"], batch["tool_mask"]):
        ids, live = ids.tolist(), mask.bool() & tool_mask.bool()
        masked = [t for t, m, keep in zip(ids, mask.tolist(), tool_mask.tolist()) if m and not keep]
        assert masked == suffix and "<tool_response>\n42\n</tool_response>" in tokenizer.decode(masked)
        trained = tokenizer.decode([t for t, keep in zip(ids, live.tolist()) if keep])
        assert trained.startswith("<tool_call>") and "<SOLUTION>4" in trained and "tool_response" not in trained
    # The reward grades the model's final answer, not the tool's "42": "41" earns nothing.
    finals = [c[-1]["content"] for c in completions]
    rewards = trainer._logs["rewards"]["correctness_reward"]
    assert {f: r for f, r in zip(finals, rewards)} == {"<SOLUTION>42</SOLUTION>": 1.0, "<SOLUTION>41</SOLUTION>": 0.0}
    # Both kinds of answer called the tool: with a call, the share right is the reward's mean.
    assert log["tools/accuracy_with_call"] == log["rewards/correctness_reward/mean"]
    assert "tools/accuracy_without_call" not in log  # no completion answered without a call
    assert log["grad_norm"] > 0  # right and wrong answers in one group: an advantage, a gradient


def test_a_calculator_error_is_a_failed_call_the_model_reads(tmp_path):
    trainer, log, _, _ = train_one_step(tmp_path, "6/0")
    # TRL counts a tool that raised; the calculator answers an error string, which the kit counts.
    assert log["tools/call_frequency"] == 1.0 and log["tools/failure_frequency"] == 1.0
    assert all(c[1]["content"] == "error: division by zero" for c in trainer.tool_completions)


def test_the_evaluation_answers_through_the_calculator(tmp_path):
    """evaluate() with tools: the same scripted model, greedy, answers through the calculator, beside its
    answers without it; each answer keeps its calls, and eval.md shows both. The loop is the kit's own
    (tools.answer_with_tools, written to follow TRL's), not TRL's, which the tests above run."""
    tokenizer = tools.check_tokenizer(qwen_tokenizer(), "Qwen2.5 (test)")
    model = scripted_model(tokenizer, "6*7", "2")
    agents = {"calc": "Use the calculator."}
    summary = evaluate.evaluate(model, tokenizer, [QUESTION] * 2, [], agents, max_new_tokens=96, ensemble=False,
                                perplexity=False, tools=[calculator], max_tool_calls=2)
    figures = summary["tools"]["agents"]["calc"]
    assert figures["accuracy_with_tools"] == 1.0 and figures["calls_per_answer"] == 1.0
    assert figures["accuracy_without_tools"] == summary["agents"]["calc"]["accuracy"]
    answer = summary["questions"][0]["agents_with_tools"]["calc"]
    assert answer["completion"] == "<SOLUTION>42</SOLUTION>" and answer["correct"]
    assert answer["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "6*7"}, "result": "42"}]
    # The answers without tools came from the same prompts, rendered without the tool schema.
    assert "<tool_call>" in summary["questions"][0]["agents"]["calc"][0]["completion"]
    from grpo_math.report import markdown

    report = markdown({"config": {"model_name": "m", "adapter": None, "dataset": "d", "split": "test", "n": 2,
                                  "seed": 0, "agents": agents, "prompt_style": "chat", "samples": 1,
                                  "max_new_tokens": 96, "calibration_n": 0}, "runs": {"base": summary},
                       "comparison": None})
    assert "| calc | 0.0% | 100.0% | 100.0% | 1.00 | 0.0% |" in report


def test_evaluate_py_with_tools_writes_both_columns(tmp_path):
    """The command line: --tools calculator on a saved tiny model (Qwen2.5's template): eval.json holds the
    side-by-side figures and every answer's calls (none, from a random model), eval.md the table."""
    model, tokenizer = offline.tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    evaluate.main(["--model-name", str(tmp_path / "model"), "--dataset", "gsm8k_sample/train.jsonl", "--split",
                   "train", "--n", "2", "--calibration-n", "0", "--agents", "calculator", "--tools", "calculator",
                   "--max-new-tokens", "8", "--no-ensemble", "--no-perplexity", "--out", str(out)])
    result = json.loads((out / "eval.json").read_text())["runs"]["base"]
    assert set(result["tools"]["agents"]) == set(AGENT_SETS["calculator"])
    assert all(set(q["agents_with_tools"]) == set(AGENT_SETS["calculator"]) for q in result["questions"])
    assert all("tool_calls" in a for q in result["questions"] for a in q["agents_with_tools"].values())
    assert "| calc_every_step |" in (out / "eval.md").read_text()


@pytest.mark.parametrize("limit", [1, 2])
def test_the_call_limit_stops_a_model_that_keeps_calling(limit):
    """--max-tool-calls N on a model that calls after every result: N calls are run, and the answer ends
    at the call past the limit, which is not run. 400 tokens hold 4 rounds, so only the limit stops it."""
    tokenizer = tools.check_tokenizer(qwen_tokenizer(), "Qwen2.5 (test)")
    model = scripted_model(tokenizer, "6*7", "2", keep_calling=True)
    prompt = chat_prompt("Use the calculator.", QUESTION["question"])
    [(text, written, calls)] = tools.answer_with_tools(model, tokenizer, [prompt], [calculator], 400, max_calls=limit)
    assert calls == [{"name": "calculator", "arguments": {"expression": "6*7"}, "result": "42"}] * limit
    assert text == "" and written > 0  # the last message is the call past the limit: no answer text


def write_model_without_tools(path):
    """A model folder whose chat template has no tool support: plain ChatML."""
    model, tokenizer = offline.tiny_model_and_tokenizer()
    tokenizer.chat_template = offline.CHATML_TEMPLATE
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("script", ["train_gsm8k", "evaluate"])
def test_a_template_without_tools_is_refused_before_the_model_loads(script, tmp_path, monkeypatch):
    """One line (a SystemExit, so no traceback), and neither model nor folder: the check reads the tokenizer."""
    folder = write_model_without_tools(tmp_path / "chatml-model")
    refuse_load = lambda *a, **k: pytest.fail("the model was loaded")  # noqa: E731
    monkeypatch.setattr(models, "load_model", refuse_load)
    monkeypatch.setattr(evaluate, "load_pretrained", refuse_load)
    if script == "evaluate":
        main, flags = evaluate.main, ["--model-name", folder, "--dataset", "gsm8k_sample/train.jsonl", "--split",
                                      "train", "--n", "2", "--calibration-n", "0", "--out", str(tmp_path / "eval")]
    else:
        main, flags = train_gsm8k.main, ["--smoke", "--model-name", folder, "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--tools", "calculator"])
    message = str(exc.value.code)
    assert message.startswith("--tools: the chat template of") and "cannot show tools to the model" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flags, message", [
    (["--tools", "abacus"], "--tools: unknown tool abacus; the tools are calculator"),
    (["--tools", "calculator", "--prompt-style", "xml"], "--tools needs --prompt-style chat"),
    (["--agents", "calculator"], "--agents calculator asks the model to call the calculator tool: add --tools"),
    (["--tools", "calculator", "--max-tool-calls", "0"], "--max-tool-calls must be at least 1"),
])
def test_tool_flags_that_cannot_work_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", *flags], train_gsm8k.add_args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--agents", "calculator"], "--agents calculator asks the model to call the calculator tool: add --tools"),
    (["--tools", "calculator", "--samples", "2"], "--tools compares greedy answers"),
])
def test_evaluate_refuses_tool_flags_that_cannot_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model-name", "m", "--out", str(tmp_path / "eval"), *flags])
    assert message in capsys.readouterr().err


def test_a_smoke_run_with_the_calculator_logs_tool_use(tmp_path):
    """The whole recipe with --tools calculator on the tiny model (the Qwen2.5 template, its own tokenizer):
    the progress line, training_stats.json and the quick evaluation carry the tool figures."""
    out = tmp_path / "run"
    proc = run_script("train_gsm8k.py", "--smoke", "--tools", "calculator", "--agents", "calculator", "--max-steps",
                      "2", "--output-dir", str(out))
    with open(out / "training_stats.json") as f:
        stats = [e for e in json.load(f) if "reward" in e]
    assert [e["step"] for e in stats] == [1, 2]
    assert all("tools/call_frequency" in e and "tools/failure_frequency" in e for e in stats)
    assert "| tools " in proc.stdout and "/answer, failed" in proc.stdout
    with open(out / "eval.json") as f:
        assert all("tool_calls" in r for r in json.load(f)["records"])
    with open(out / "config.json") as f:
        assert json.load(f)["settings"]["tools"] == "calculator"
    assert (out / "rewards.png").stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth is not installed (.ci/run installs it for the CPU tests)")
def test_unsloths_trainer_calls_the_tool_and_its_loss_leaves_the_result_out(tmp_path):
    """The same step on the unsloth backend (tests/unsloth_tools_cpu.py): Unsloth's generated trainer runs
    TRL's tool loop, and the mask its own loss (unsloth_zoo's grpo_accumulated_loss) trained with leaves
    out exactly the tool's result turn."""
    need_qwen_tokenizer()  # the harness needs it too: skip here (fail under .ci/run) where it is absent
    # forked from the server where Unsloth was imported as the harness imports it (its compile on, the default)
    proc = forks(unsloth="on").run(["tests/unsloth_tools_cpu.py", "--gpu", "ampere", "--out", tmp_path / "run"]
                                   ).result(timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["trainer_bases"][0] == "UnslothGRPOTrainer"
    assert result["tool_results"] == ["42"] * 8 and result["log"]["tools/call_frequency"] == 1.0
    assert result["tool_mask_zeros"] == [result["suffix_tokens"]] * 8  # TRL's mask reached Unsloth's loss
    assert "<tool_response>\n42\n</tool_response>" in result["suffix"]
    assert result["left_out"] == [result["suffix"]] * 8  # and the loss left out that turn, no more
    assert all(t.startswith("<tool_call>") and "tool_response" not in t and "<SOLUTION>4" in t for t in result["trained"])
    assert result["log"]["grad_norm"] > 0


def test_unsloth_with_tools_refuses_a_tokenizer_that_pads_with_its_end_of_turn():
    tokenizer = qwen_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(SystemExit, match="pads with its end-of-turn token.*rl_replacements.py:2430-2433"):
        tools.check_tokenizer(tokenizer, "m", ["calculator"], "unsloth")
    assert tools.check_tokenizer(tokenizer, "m", ["calculator"], "trl") is tokenizer  # TRL's loss keeps its own mask

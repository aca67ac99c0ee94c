"""The prompt budget (grpo_math/prompt_budget.py): measured on the rendered prompts before the model loads.

Unsloth gives vLLM a context of max_seq_length tokens; a prompt longer than assumed would be refused by
vLLM, or leave its tool results no room. With --tools calculator the tools' schemas sit in the system
prompt, and GSM8K's prompts pass the 256 tokens the kit once assumed: so the context is the longest
prompt + --max-completion-length, or --max-prompt-length leaves the longer prompts out."""

import re

import pytest

import train_gsm8k
import train_synthetic
from agents import expand_agents
from data import load_gsm8k, synthetic_problems
from grpo_math import models, settings
from grpo_math.prompt_budget import fit_prompts, prompt_lengths
from grpo_math.tools import get_tools
from test_tools import qwen_tokenizer

CALCULATOR = ["--tools", "calculator", "--agents", "calculator", "--max-completion-length", "256"]


def parse(*flags):
    return settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", *flags], train_gsm8k.add_args)


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()  # Qwen2.5-Instruct's chat template, the default model's


@pytest.fixture(scope="module")
def calculator_rows(gsm8k_rows):
    return expand_agents(gsm8k_rows, "calculator", "random", seed=0, style="chat")


@pytest.fixture(scope="module")
def gsm8k_rows():
    from conftest import need_gsm8k

    return load_gsm8k(need_gsm8k(), "train", limit=1000, seed=0).to_list()


def qwen3_current_tokenizer():
    """The Qwen tokenizer with the chat template Qwen3's hub repositories carry now, as TRL ships it: not
    prefix-preserving, so with tools TRL's GRPOTrainer renders with its own training version of it."""
    from trl.chat_template_utils import qwen3_chat_template

    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


@pytest.fixture(scope="module")
def trainers(tokenizer, tmp_path_factory):
    """{(template, tools): a real TRL GRPOTrainer} on a tiny model: its __init__ picks the chat template it
    renders prompts with, and the kit's prompt_lengths must count what it renders."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo_math.families import chat_kwargs
    from grpo_math.offline import tiny_model_and_tokenizer

    made = {}
    for template, processing_class in (("qwen2.5", tokenizer), ("qwen3", qwen3_current_tokenizer())):
        model, _ = tiny_model_and_tokenizer(tokenizer=processing_class)
        for tools in ("", "calculator"):
            args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trainer")), use_cpu=True, bf16=False,
                              per_device_train_batch_size=2, num_generations=2, max_completion_length=8,
                              chat_template_kwargs=chat_kwargs(), report_to=[])
            made[template, tools] = GRPOTrainer(
                model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                train_dataset=Dataset.from_list([{"prompt": "2 + 2?"}] * 2), processing_class=processing_class,
                tools=get_tools(tools) or None)
    return made


@pytest.mark.parametrize("template, style, tools, examples", [
    ("qwen2.5", "chat", "calculator", 0),  # the tools' schemas rendered into the system prompt
    ("qwen2.5", "chat", "calculator", 2),  # worked examples as earlier turns
    ("qwen2.5", "chat", "", 0),
    ("qwen2.5", "xml", "", 1),  # plain text, encoded as it is
    ("qwen3", "chat", "calculator", 2),  # TRL swaps in its training template for tools
    ("qwen3", "chat", "", 2),  # ...and keeps the tokenizer's own without them
])
def test_lengths_are_those_trl_renders(trainers, gsm8k_rows, template, style, tools, examples):
    agents = "calculator" if tools else "core"
    prompts = [r["prompt"] for r in expand_agents(gsm8k_rows[:12], agents, "all", style=style, examples=examples)]
    trainer = trainers[template, tools]
    ours = prompt_lengths(prompts, trainer.processing_class, get_tools(tools))
    assert ours == [len(ids) for ids in trainer._tokenize_prompts(prompts)[0]]  # TRL's own rendering


def test_calculator_prompts_set_the_context(tokenizer, calculator_rows, capsys):
    """The longest calculator prompt passes the 256 tokens once assumed; it, not a guess, sizes the context."""
    lengths = prompt_lengths([r["prompt"] for r in calculator_rows], tokenizer, get_tools("calculator"))
    longest = max(lengths)
    assert longest > 256
    s = parse(*CALCULATOR)
    assert fit_prompts(s, calculator_rows, tokenizer) == calculator_rows  # no cap: every prompt kept
    assert s["max_seq_length"] == longest + 256
    assert capsys.readouterr().out.splitlines()[-1] == f"prompts: longest {longest} tokens; context {longest + 256} = " \
                                                       f"{longest} + 256 completion tokens"


def test_a_cap_leaves_the_longer_prompts_out_and_counts_them(tokenizer, calculator_rows, capsys):
    lengths = prompt_lengths([r["prompt"] for r in calculator_rows], tokenizer, get_tools("calculator"))
    cap = sorted(lengths)[len(lengths) // 2]  # the median: about half are longer
    longer = sum(n > cap for n in lengths)
    s = parse(*CALCULATOR, "--max-prompt-length", str(cap))
    kept = fit_prompts(s, calculator_rows, tokenizer)
    assert kept == [r for r, n in zip(calculator_rows, lengths) if n <= cap]
    assert 0 < longer == len(calculator_rows) - len(kept)
    assert s["max_seq_length"] == cap + 256  # the median is a prompt's length, so the longest kept is the cap
    _, first, second = capsys.readouterr().out.splitlines()  # after the model line (families.describe)
    assert first == (f"prompts: {longer:,} of {len(calculator_rows):,} are longer than --max-prompt-length {cap} "
                     f"tokens and are left out (the longest is {max(lengths)})")
    assert second.startswith(f"prompts: longest {cap} tokens; context {cap + 256} = ")


def test_a_cap_that_no_prompt_fits_is_refused_in_one_line(tokenizer, calculator_rows):
    shortest = min(prompt_lengths([r["prompt"] for r in calculator_rows], tokenizer, get_tools("calculator")))
    with pytest.raises(SystemExit) as exc:
        fit_prompts(parse(*CALCULATOR, "--max-prompt-length", "100"), calculator_rows, tokenizer)
    message = str(exc.value.code)
    assert "\n" not in message
    assert message == (f"--max-prompt-length 100: all {len(calculator_rows):,} prompts are longer (the shortest is "
                       f"{shortest} tokens); give at least {shortest}, or leave it out to keep every prompt")


def test_xml_prompts_are_counted_as_plain_text(tokenizer):
    rows = expand_agents(synthetic_problems(20, "hard", seed=0), "core", "all", style="xml")
    s = parse("--prompt-style", "xml")
    fit_prompts(s, rows, tokenizer)
    longest = max(len(tokenizer(r["prompt"])["input_ids"]) for r in rows)
    assert s["max_seq_length"] == longest + s["max_completion_length"]


def test_a_cap_below_one_is_refused_with_the_settings(capsys):
    with pytest.raises(SystemExit):
        parse("--max-prompt-length", "0")
    assert "--max-prompt-length must be at least 1, got 0" in capsys.readouterr().err


class ModelLoading(Exception):
    """Raised in place of loading the model: the test has seen what it needs."""


@pytest.mark.parametrize("script", [train_gsm8k, train_synthetic], ids=["gsm8k", "synthetic"])
def test_the_scripts_print_the_budget_before_the_model_loads(script, monkeypatch, tmp_path, capsys):
    """Both recipes measure their prompts (the tiny smoke tokenizer's tokens) and hand the context to load_model."""
    seen = {}

    def load_model(s, backend, tokenizer=None):
        seen.update(s)
        raise ModelLoading

    monkeypatch.setattr(models, "load_model", load_model)
    with pytest.raises(ModelLoading):
        script.main(["--smoke", "--output-dir", str(tmp_path / "run")])
    line = re.search(r"(?m)^prompts: longest (\d+) tokens; context (\d+) = \1 \+ 24 completion tokens$",
                     capsys.readouterr().out)
    assert line and seen["max_seq_length"] == int(line[2]) == int(line[1]) + 24

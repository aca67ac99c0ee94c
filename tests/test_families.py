"""The model families users switch --model-name to: Qwen2.5, Qwen3, Llama 3 and Gemma 3, each a tiny random
model of its real architecture class with its real tokenizer and chat template (tests/families.py), through
the trl backend: both prompt styles, training, evaluate.py, export.py --merged and --tools. What differs
between them is in grpo_math/families.py; the unsloth backend's run of each is in test_unsloth.py, vLLM's
in test_vllm.py.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import evaluate
import export
import train_synthetic
from agents import build_prompt, get_agents
from families import FAMILIES, family_tokenizer, save_family
from grpo_math import families, models, settings, tools
from grpo_math.evaluation import render
from grpo_math.prompt_budget import fit_prompts, prompt_lengths
from conftest import stats_of

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
INSTRUCTION = next(iter(get_agents("core").values()))
# The start-up line's notes, where the family differs from ChatML's defaults.
NOTES = {"qwen2.5": ["end of turn <|im_end|>", "pad <|endoftext|>"],
         "qwen3": ["end of turn <|im_end|>", "thinking off (enable_thinking=False"],
         "llama3": ["end of turn <|eot_id|>", "pad <|reserved_special_token_0|> (the tokenizer has none)"],
         "gemma3": ["end of turn <end_of_turn>", "no system role: the template puts the system prompt at the head"]}


def parse(*argv):
    return settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", *argv], train_synthetic.add_args)


@pytest.fixture(scope="module")
def tokenizers():
    return {family: family_tokenizer(family) for family in FAMILIES}


def trainer_prompt_ids(tokenizer, config, prompt):
    """``prompt``'s tokens as TRL's GRPOTrainer makes them: its own _tokenize_prompts, with ``config``'s
    chat_template_kwargs, on a stand-in for the trainer holding what that method reads."""
    import trl

    trainer = SimpleNamespace(processing_class=tokenizer, chat_template=None, tools=None, _is_vlm=False,
                              environment_factories=None, chat_template_kwargs=config.chat_template_kwargs)
    [ids], _, _ = trl.GRPOTrainer._tokenize_prompts(trainer, [prompt])
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_renders_both_prompt_styles_as_the_trainer_does(family, tokenizers, capsys):
    """The start-up line names what differs; the prompt evaluate.py renders is, token for token, the one TRL's
    trainer renders (its own _tokenize_prompts, with the GRPOConfig the kit builds), in both styles."""
    tokenizer = tokenizers[family]
    for style in ("chat", "xml"):
        s = parse("--prompt-style", style, "--model-name", family)
        rows = [{"prompt": build_prompt(INSTRUCTION, QUESTION, style)}]
        fit_prompts(s, rows, tokenizer)
        ids = trainer_prompt_ids(tokenizer, train_synthetic.grpo_config(s, "trl", tokenizer), rows[0]["prompt"])
        text = render(tokenizer, INSTRUCTION, QUESTION, style)
        assert tokenizer.decode(ids) == text and prompt_lengths([rows[0]["prompt"]], tokenizer) == [len(ids)]
        if tokenizer.bos_token:  # one BOS, never two (the template's and the tokenizer's)
            assert text.startswith(tokenizer.bos_token) and ids.count(tokenizer.bos_token_id) == 1
    printed = capsys.readouterr().out
    assert all(note in printed for note in NOTES[family]), printed
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # padding never reads as the end of a turn


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_thinking_is_the_same_in_training_evaluation_and_vllm(thinking, tokenizers):
    """Off by default: every Qwen3 prompt ends with the template's empty <think></think>, so the answer comes
    at once. --thinking leaves the generation prompt open; the grading reads what follows </think>."""
    tokenizer = tokenizers["qwen3"]
    s = parse("--prompt-style", "chat", *(["--thinking"] if thinking else []))
    config = train_synthetic.grpo_config(s, "trl", tokenizer)
    assert config.chat_template_kwargs == {"enable_thinking": thinking}
    prompt = build_prompt(INSTRUCTION, QUESTION, "chat")
    ids = trainer_prompt_ids(tokenizer, config, prompt)
    text = render(tokenizer, INSTRUCTION, QUESTION, "chat", thinking=thinking)  # evaluate.py, and vLLM's prompts
    assert tokenizer.decode(ids) == text
    assert prompt_lengths([prompt], tokenizer, thinking=thinking) == [len(ids)]
    assert text.endswith("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"))


def test_the_grading_reads_what_follows_the_thinking():
    from rewards import correctness_reward, format_exact_reward

    answer = "<start_working_out>3 + 4 = 7<end_working_out><SOLUTION>7</SOLUTION>"
    thought = "<think>\nMaybe <SOLUTION>8</SOLUTION>? No: 3 + 4 is 7.\n</think>\n\n"
    completions = [thought + answer, answer, "<think>\nStill counting: <SOLUTION>7</SOLUTION>"]
    assert correctness_reward(completions, answer=["7"] * 3) == [1.0, 1.0, 0.0]  # an unclosed think: no answer
    assert format_exact_reward(completions) == [3.0, 3.0, 0.0]
    assert evaluate.grade(thought + answer, "7", "chat", 40)["strict_answer"] == "7"


def test_settings_a_family_cannot_run_are_refused_in_one_line(tokenizers):
    with pytest.raises(SystemExit) as exc:  # no thinking switch to turn on
        families.describe(tokenizers["llama3"], "llama", "chat", thinking=True)
    assert str(exc.value.code).startswith("--thinking: the chat template of llama has no thinking switch")
    no_system = family_tokenizer("gemma3")
    no_system.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no') }}" \
                              "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(SystemExit) as exc:
        families.describe(no_system, "strict", "chat")
    assert "refuses a system turn" in str(exc.value.code) and "--prompt-style xml" in str(exc.value.code)


def test_a_tokenizer_whose_eos_is_not_its_end_of_turn_stops_at_the_end_of_turn():
    """Gemma 3 as Google's tokenizer files name it: eos <eos>, while a turn ends with <end_of_turn>."""
    tokenizer = family_tokenizer("gemma3")
    tokenizer.eos_token = "<eos>"
    assert "end of turn <end_of_turn> (its eos was <eos>)" in families.describe(tokenizer, "gemma", "chat")
    assert tokenizer.eos_token == "<end_of_turn>"


@pytest.mark.parametrize("family, verdict", [
    ("qwen2.5", None),
    ("qwen3", "TRL reads tool calls back only from the chat templates it knows"),  # an older revision of Qwen3's
    ("qwen3-current", None),  # the template Qwen3's hub repositories carry now, as TRL ships it
    ("llama3", "cannot show tools to the model"),  # Llama 3 Instruct's template here: no tool section
    ("gemma3", "cannot show tools to the model"),
])
def test_tools_where_the_template_can_show_them(family, verdict, tokenizers):
    from trl.chat_template_utils import qwen3_chat_template

    tokenizer = family_tokenizer("qwen3") if family == "qwen3-current" else tokenizers[family]
    if family == "qwen3-current":
        tokenizer.chat_template = qwen3_chat_template
    if verdict:
        with pytest.raises(SystemExit) as exc:
            tools.check_tokenizer(tokenizer, family)
        assert verdict in str(exc.value.code) and "\n" not in str(exc.value.code)
        return
    tools.check_tokenizer(tokenizer, family)
    result = {"role": "tool", "name": "calculator", "content": "7"}
    suffix = tokenizer.decode(tools.tool_suffix_ids(tokenizer, [result]))  # what follows a call, in training too
    assert "7" in suffix and suffix.endswith("assistant\n" + ("<think>\n\n</think>\n\n" if "qwen3" in family else ""))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_evaluates_and_exports(family, tmp_path):
    """Two steps on the trl backend with grad_norm > 0, evaluate.py in both prompt styles on the trained run,
    then export.py --merged: a plain model that reloads and gives the trained model's logits, which the adapter
    moved well past the merge's tolerance (a learning rate of 0.05 for its one step: step 1's is 0 under warm-up)."""
    from transformers import AutoModelForCausalLM

    folder = save_family(family, tmp_path / family)
    run = str(tmp_path / "run")
    train_synthetic.main(["--smoke", "--model-name", folder, "--prompt-style", "chat", "--max-steps", "2",
                          "--learning-rate", "0.05", "--max-completion-length", "12", "--select-examples", "0",
                          "--eval-examples", "0", "--output-dir", run])
    steps = [e for e in stats_of(run) if e["step"] > 0]  # after any held-out baseline (step 0)
    assert len(steps) == 2 and all(e["grad_norm"] > 0 for e in steps), steps
    for style in ("chat", "xml"):
        out = tmp_path / f"eval-{style}"
        evaluate.main(["--model-name", folder, "--adapter", run, "--checkpoint", "last", "--dataset", "synthetic:easy",
                       "--n", "2", "--calibration-n", "0", "--agents", "1", "--max-new-tokens", "4", "--no-ensemble",
                       "--no-perplexity", "--prompt-style", style, "--out", str(out)])
        result = json.load(open(out / "eval.json"))
        assert len(result["runs"]["trained"]["questions"]) == 2
    export.main([run, "--merged"])
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run, export.MERGED_DIR))
    assert type(merged).__name__ == FAMILIES[family][0]
    base, _ = models.load_pretrained(folder)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        before = base(ids).logits.float()
        trained = models.load_adapter(base, run)(ids).logits.float()
        after = merged(ids).logits.float()
    assert (trained - before).abs().max() > 1e-2  # the adapter changes the logits: a merge that dropped it fails
    assert torch.allclose(after, trained, atol=1e-4)

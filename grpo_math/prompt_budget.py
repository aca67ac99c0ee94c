"""The prompt budget: the prompts' length in tokens, measured on the data before the model loads.

On the unsloth backend, max_seq_length is vLLM's context (max_model_len): vLLM refuses a longer prompt,
and TRL's tool loop drops a tool result that would pass it. TRL never cuts a prompt (its GRPOConfig has
no max_prompt_length), and --max-completion-length holds a completion and its tool results together. So
the context is the longest prompt, rendered as the trainer renders it (chat template, tool schemas and
worked examples included), plus --max-completion-length. --max-prompt-length N instead leaves out the
prompts longer than N tokens, as Unsloth's GRPO notebooks do.

    prompt_lengths(prompts, tokenizer, tools)  each prompt's tokens, as TRL's GRPOTrainer renders it
    fit_prompts(s, rows, tokenizer=None)       the rows that fit, and s["max_seq_length"]; one line each
"""

from grpo_math import distributed, families, models
from grpo_math.tools import get_tools


def trainer_chat_template(tokenizer, tools):
    """The chat template TRL's GRPOTrainer renders prompts with (its __init__): with tools, TRL's training
    version of a template that is not prefix-preserving; otherwise the tokenizer's own (None)."""
    if not tools:
        return None
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    if is_chat_template_prefix_preserving(tokenizer):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # a template TRL cannot patch: its trainer refuses it when it starts
        return None


def prompt_lengths(prompts, tokenizer, tools=(), thinking=False):
    """Each prompt's length in tokens, as TRL's GRPOTrainer._tokenize_prompts makes it: a conversation
    through the chat template, with the generation prompt and the tools' schemas; a plain-text prompt
    (--prompt-style xml) as the tokenizer encodes it."""
    if not prompts:
        return []
    if isinstance(prompts[0], str):
        return [len(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]
    encoded = tokenizer.apply_chat_template(
        conversation=list(prompts), tools=list(tools) or None, chat_template=trainer_chat_template(tokenizer, tools),
        add_generation_prompt=True, tokenize=True, return_dict=True, **families.chat_kwargs(thinking))
    return [len(ids) for ids in encoded["input_ids"]]


def fit_prompts(s, rows, tokenizer=None):
    """The rows (each with a ``prompt``) within --max-prompt-length, all of them without it, and
    s["max_seq_length"] = the longest of them + --max-completion-length. ``tokenizer``: by default
    --model-name's, loaded alone. Refuses (SystemExit, one line) a --max-prompt-length no prompt fits."""
    tokenizer = tokenizer or models.load_tokenizer(s["model_name"])
    line = families.describe(tokenizer, s["model_name"], s["prompt_style"], s["thinking"], s["max_completion_length"])
    lengths = prompt_lengths([r["prompt"] for r in rows], tokenizer, get_tools(s["tools"]), s["thinking"])
    cap, completion = s["max_prompt_length"], s["max_completion_length"]
    kept = [(r, n) for r, n in zip(rows, lengths) if cap is None or n <= cap]
    if rows and not kept:
        raise SystemExit(f"--max-prompt-length {cap}: all {len(rows):,} prompts are longer (the shortest is "
                         f"{min(lengths)} tokens); give at least {min(lengths)}, or leave it out to keep every prompt")
    longest = max((n for _, n in kept), default=0)
    s["max_seq_length"] = longest + completion
    if rows and distributed.is_main():
        print(line)
        if len(kept) < len(rows):
            print(f"prompts: {len(rows) - len(kept):,} of {len(rows):,} are longer than --max-prompt-length {cap} "
                  f"tokens and are left out (the longest is {max(lengths)})")
        print(f"prompts: longest {longest} tokens; context {s['max_seq_length']} = {longest} + {completion} "
              "completion tokens")
    return [r for r, _ in kept]

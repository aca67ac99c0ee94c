"""What differs between the model families --model-name may name, read from the tokenizer and its chat
template: Qwen2.5, Qwen3, Llama 3 and Gemma 3 differ exactly where the kit is sensitive.

    end of turn   the token the template closes a turn with (<|im_end|>, <|eot_id|>, <end_of_turn>). It is
                  the eos that generation stops at and that TRL cuts a completion after; a tokenizer whose
                  eos is another token (Gemma's <eos>) would write past the end of its answer.
    pad           Llama 3 has none. An unused reserved token pads instead, so that padding never reads as
                  the end of a turn (Unsloth's GRPO loss finds padding by its id); the eos, where there is
                  no such token.
    system role   Gemma 3 has none: its template puts the system prompt at the head of the first user
                  turn, which the model then reads as the user's words. A template that refuses a system
                  turn is refused for --prompt-style chat, before the model loads.
    thinking      Qwen3 writes a <think> block before its answer unless its template's enable_thinking is
                  false. The kit's default is off: every prompt, in training (GRPOConfig's
                  chat_template_kwargs), in the evaluation and in vLLM, ends with Qwen3's empty
                  <think></think>, and the answer comes at once, within --max-completion-length. --thinking
                  turns it on; the rewards and the evaluation then grade only what follows </think>
                  (answers.answer_part), and a completion still thinking when its budget runs out has none.

    fix_special_tokens(model, tokenizer)   the end of turn as eos, a pad, both agreed with the model's configs
    describe(tokenizer, name, style, thinking, completion_length)
                                           the start-up line of what differs, or SystemExit (one line) for a
                                           family the settings cannot run
    chat_kwargs(thinking)                  the chat template's variables: the same for every render
"""

import re

THINKING_BUDGET = 1024  # completion tokens under which --thinking leaves Qwen3 little room to answer


def chat_kwargs(thinking=False):
    """The variables every chat-template render passes. A template without the switch ignores it."""
    return {"enable_thinking": bool(thinking)}


def has_thinking_switch(tokenizer):
    return "enable_thinking" in (tokenizer.chat_template or "")


def end_of_turn(tokenizer):
    """The special token the chat template closes an assistant turn with, or None (no template, or
    none found): the first special token after the assistant's words."""
    if not tokenizer.chat_template:
        return None
    marker = "ANSWER_END_MARK"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant",
                                              "content": marker}], tokenize=False, **chat_kwargs())
    except Exception:  # a template that renders no such conversation
        return None
    tail = text.split(marker, 1)[-1] if marker in text else ""
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                    if t.special}
    found = [(tail.index(t), t) for t in specials if t and t in tail]
    return min(found)[1] if found else None


def spare_pad(tokenizer):
    """An unused special token to pad with: one named as a pad (Llama 3.1's <|finetune_right_pad_id|>), else
    the lowest reserved one (<|reserved_special_token_0|>); None where the vocabulary has neither. The
    vision pads of multimodal vocabularies (<|vision_pad|>, <|image_pad|>) are not unused."""
    names = [t.content for t in tokenizer.added_tokens_decoder.values()]
    pads = [n for n in names if "pad" in n.lower() and not re.search(r"vision|image|video", n)]
    reserved = sorted((int(m[1]), n) for n in names if (m := re.fullmatch(r"<\|reserved_special_token_(\d+)\|>", n)))
    return pads[0] if pads else reserved[0][1] if reserved else None


def fix_special_tokens(model, tokenizer):
    """The end of turn as the eos where the tokenizer names another; a pad where it has none (spare_pad,
    else the eos); and the model's config and generation config agreeing with both. Returns them."""
    turn_end = end_of_turn(tokenizer)
    if turn_end and turn_end != tokenizer.eos_token:
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = spare_pad(tokenizer) or tokenizer.eos_token
    if model is not None:
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = tokenizer.eos_token_id
            cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def system_role(tokenizer):
    """'own' (a turn of its own), 'merged' (the template puts it into the first user turn, as Gemma's
    does) or 'refused' (the template raises on a system turn)."""
    user = {"role": "user", "content": "USER"}
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": "SYSTEM"}, user], tokenize=False)
    except Exception:
        return "refused"
    merged = tokenizer.apply_chat_template([{"role": "user", "content": "SYSTEM\n\nUSER"}], tokenize=False)
    return "merged" if with_system == merged else "own"


def describe(tokenizer, name, style, thinking=False, completion_length=None):
    """One start-up line: the eos, the pad and, for chat prompts, the system role and the thinking, where
    the family differs from the default. Refuses (SystemExit, one line) what the settings cannot run:
    --thinking on a template without the switch, chat prompts on a template that refuses a system turn.
    Gives ``tokenizer`` (as loaded, before any fix) fix_special_tokens' eos and pad."""
    eos, pad = tokenizer.eos_token, tokenizer.pad_token
    fix_special_tokens(None, tokenizer)
    notes = [f"end of turn {tokenizer.eos_token}" + ("" if eos == tokenizer.eos_token else f" (its eos was {eos})"),
             f"pad {tokenizer.pad_token}" + ("" if pad else " (the tokenizer has none)")]
    if thinking and not has_thinking_switch(tokenizer):
        raise SystemExit(f"--thinking: the chat template of {name} has no thinking switch (enable_thinking, as "
                         "Qwen3's has); leave --thinking out")
    if style == "chat":
        if not tokenizer.chat_template:
            raise SystemExit(f"--prompt-style chat: {name} has no chat template; use --prompt-style xml")
        role = system_role(tokenizer)
        if role == "refused":
            raise SystemExit(f"--prompt-style chat: the chat template of {name} refuses a system turn, which holds "
                             "the answer format; use --prompt-style xml")
        if role == "merged":
            notes.append("no system role: the template puts the system prompt at the head of the first user turn")
        if has_thinking_switch(tokenizer):
            if not thinking:
                notes.append("thinking off (enable_thinking=False; --thinking turns it on)")
            elif completion_length is not None and completion_length < THINKING_BUDGET:
                notes.append(f"thinking on (--thinking): at --max-completion-length {completion_length}, most "
                             f"completions end inside <think> with no answer; give {THINKING_BUDGET} or more")
            else:
                notes.append("thinking on (--thinking): the rewards grade what follows </think>")
    return "model: " + "; ".join(notes)

"""The answers both evaluations grade: evaluate.py's, and training's held-out check (held_out.py and the
quick evaluation after training).

    render(tokenizer, instruction, question, style, examples, thinking)
        the prompt text the model sees: the chat template applied (with the same enable_thinking as
        training: families.chat_kwargs), or the xml form
    generate_answers(model, tokenizer, prompts, max_new_tokens, ...)
        completions from transformers' generate(), cut after the first stop (STOPS: the closed answer)
        and their token counts; vllm_engine.py returns the same from vLLM
    stop_criteria(tokenizer, stop)
        generate()'s matcher of the stop strings, made once per tokenizer (generate makes it at every call)
    quick_eval(model, tokenizer, rows, agents, style, max_new_tokens, engine=None)
        the training scripts' check of a run: the first agent's greedy answers on held-out rows, graded
        as evaluate.py grades (rewards.is_correct, as the training reward), with no votes; from vLLM
        where ``engine`` is the training's own (vllm_engine.training_engine), else from generate() in
        batches of EVAL_BATCH (the fastest on a CPU, the largest that fits on a GPU)

They live here, not in evaluate.py, so that training reaches them without importing a command.
"""

import functools

import torch

from agents import build_prompt, get_agents
from grpo_math import tools as tool_calls
from grpo_math.answers import grade
from grpo_math.families import chat_kwargs
from rewards import SOLUTION_END, STOP_TAG

# Generation stops once the answer is closed: nothing after it is graded.
STOPS = {"chat": (SOLUTION_END,), "xml": (STOP_TAG,)}
# quick_eval's batch for generate(). On a CPU the fastest measured (SmolLM2-135M, 2 cores: 141, 118, 121 and 195 s
# per 100 questions in batches of 8, 16, 32 and 64; BENCHMARKS.md, "What an evaluation costs"). On a GPU the largest
# that fits, since each decoding step reads all the weights once for the whole batch; a batch that does not fit is
# halved until one does. The GPU's figure by batch size is not measured yet (bench.gpu_check's generation batches).
EVAL_BATCH = {"cpu": 16, "gpu": 256}


def render(tokenizer, instruction, question, style, examples=0, thinking=False):
    """The prompt text the model sees: the chat template applied, or the xml form after any BOS."""
    prompt = build_prompt(instruction, question, style, examples)
    if style == "chat":
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **chat_kwargs(thinking))
    return (tokenizer.bos_token or "") + prompt


_STOP_CRITERIA = {}  # (id(tokenizer), stop strings) -> (the tokenizer, kept alive so its id stays its own, criteria)


def stop_criteria(tokenizer, stop):
    """generate()'s ``stopping_criteria`` for the stop strings ``stop`` (None where there are none), made once
    per tokenizer. generate(stop_strings=...) makes them again at every call, from the whole vocabulary:
    transformers caches them by the vocabulary's order, which a fast tokenizer's get_vocab() shuffles at each
    call, so its cache never hits. That is 1.5 s a call for Qwen's 151,665 tokens on a CPU, at every
    training step and every batch of an evaluation (BENCHMARKS.md, "Stop strings")."""
    if not stop:
        return None
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    key = (id(tokenizer), tuple(stop))
    if key not in _STOP_CRITERIA:
        _STOP_CRITERIA[key] = tokenizer, StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop))])
    return _STOP_CRITERIA[key][1]


def cut_at_stop(text, stop):
    """``text`` up to and including its first stop string."""
    hits = [text.index(s) + len(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=16, samples=1, temperature=0.0,
                     stop=(), seed=0):
    """``samples`` (text, token count) completions per rendered prompt, greedy at temperature 0."""
    rows = [p for p in prompts for _ in range(samples)]
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    torch.manual_seed(seed)
    done = []
    while len(done) < len(rows):
        batch = rows[len(done) : len(done) + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)  # the prompts are fully rendered
        try:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 stopping_criteria=stop_criteria(tokenizer, stop), **sampling)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            del enc
            torch.cuda.empty_cache()
            batch_size //= 2
            print(f"out of GPU memory generating {len(batch)} answers at once: {batch_size} a batch from here",
                  flush=True)
            continue
        for ids in out[:, enc["input_ids"].shape[1] :].tolist():
            length = next((i for i, t in enumerate(ids) if t in ends), len(ids))  # then eos or padding
            done.append((cut_at_stop(tokenizer.decode(ids[:length], skip_special_tokens=True), stop), length))
    return [done[j * samples : (j + 1) * samples] for j in range(len(prompts))]


def quick_eval(model, tokenizer, rows, agents, style, max_new_tokens, examples=0, tools=(), max_tool_calls=3,
               thinking=False, engine=None, batch_size=None):
    """Greedy answers of the first agent on held-out rows, generated and graded as evaluate.py does
    (rewards.extract_answer and is_correct): accuracy and format compliance. With ``tools``, the model
    may call them, as in training (--tools), and each record keeps its calls (generate() answers then).
    ``engine``: vLLM's answers() (vllm_engine.training_engine) in place of generate()'s."""
    instruction = next(iter(get_agents(agents).values()))
    if tools:
        answers = tool_calls.answer_with_tools(model, tokenizer, [build_prompt(instruction, r["question"], style,
                                               examples) for r in rows], tools, max_new_tokens, max_tool_calls,
                                               stop=STOPS[style], thinking=thinking)
    else:
        prompts = [render(tokenizer, instruction, r["question"], style, examples, thinking) for r in rows]
        if batch_size is None:
            batch_size = EVAL_BATCH["cpu" if next(model.parameters()).device.type == "cpu" else "gpu"]
        answer = engine.answers if engine is not None else functools.partial(generate_answers, model, tokenizer,
                                                                            batch_size=batch_size)
        answers = [(text, tokens, None) for [(text, tokens)] in answer(prompts, max_new_tokens, stop=STOPS[style])]
    records = [{"question": r["question"], "gold": r["answer"], **grade(text, r["answer"], style, tokens),
                **({"tool_calls": calls} if tools else {})} for r, (text, tokens, calls) in zip(rows, answers)]
    n = len(records)
    return {"n": n, "agent": instruction, "accuracy": sum(r["correct"] for r in records) / n,
            "format_compliance": sum(r["strict_answer"] is not None for r in records) / n, "records": records}

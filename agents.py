"""Multi-agent prompting and ensembling.

An "agent" is an instruction variant ("Solve step by step.", "Be concise but correct.") of one
shared policy. Each question is asked once per agent; GRPO then trains the one model on all of
them, and at evaluation the agents' answers are pooled:

    agents = get_agents("core")                       # {name: instruction}
    train = expand_agents(dataset, agents)            # one row per (question, agent)
    vote = majority_vote([extract_answer(c) for c in completions_for_one_question])

Two prompt forms:
  chat  system prompt asking for <start_working_out>...<end_working_out><SOLUTION>N</SOLUTION>,
        then the instruction and the question as the user turn (for instruct models);
  xml   "<instruction>...</instruction><question>...</question><response>", which the model
        closes with "... </response>" (for base models, or the seeds' original form).

Either form can open with worked examples (``examples=N``, the first N of WORKED_EXAMPLES): the
same instruction on a solved question, answered in the required form. A small model that ignores
the system prompt's request copies the form from them (SmolLM2-135M: 0% of greedy answers in the
form without examples, 79% with two; BENCHMARKS.md).
"""

import random

import torch

from rewards import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, STOP_TAG, normalize_number

# Documented sets of four agents. Users may pass their own dict, list or "a|b|c" string.
AGENT_SETS = {
    "core": {
        "step_by_step": "Solve step by step.",
        "concise": "Be concise but correct.",
        "verify": "Solve the problem, then check your answer before giving it.",
        "teacher": "Explain your reasoning clearly, as a teacher would.",
    },
    "strategies": {
        "equation": "Write an equation for the problem, then solve it.",
        "backwards": "Work backwards from what the question asks.",
        "units": "Keep track of the units of every quantity.",
        "estimate": "Estimate the answer first, then compute it exactly.",
    },
    "personas": {
        "accountant": "You are a careful accountant. Double-check every sum.",
        "engineer": "You are an engineer. Break the problem into small calculations.",
        "student": "You are a top student. Show each step of your work.",
        "skeptic": "You are a skeptic. Question every assumption before answering.",
    },
    # For --tools calculator (grpo_math/calculator.py): when to call it. The chat template shows the model
    # the tool and how to call it; these say when.
    "calculator": {
        "calc_every_step": "Use the calculator for every calculation, then give the final answer.",
        "calc_hard_parts": "Do easy sums in your head; use the calculator for large numbers, decimals and division.",
        "calc_check": "Solve it yourself, then check your final calculation with the calculator.",
        "calc_one_expression": "Write the whole solution as one expression and evaluate it with the calculator.",
    },
}
DEFAULT_AGENT_SET = "core"
TOOL_AGENT_SETS = {"calculator": "calculator"}  # an agent set that asks for a tool, and the tool: --tools must give it

SYSTEM_PROMPT = (
    "You are given a math problem. Think about it and show your working out between "
    f"{REASONING_START} and {REASONING_END}. Then give your final answer, a number only, "
    f"between {SOLUTION_START} and {SOLUTION_END}."
)


def get_agents(spec=None):
    """Resolve an agent spec to an ordered {name: instruction} dict.

    spec: None (the default set), a set name ("core", "strategies", "personas", "calculator"), a
    count "N" (the first N of the sets in order, those asking for a tool left out), instructions separated by "|", a list of
    instructions, or a dict.
    """
    if spec is None:
        return dict(AGENT_SETS[DEFAULT_AGENT_SET])
    is_count = (isinstance(spec, int) and not isinstance(spec, bool)) or (
        isinstance(spec, str) and spec.strip().isascii() and spec.strip().isdigit()
    )
    if isinstance(spec, dict):
        agents = dict(spec)
    elif isinstance(spec, (list, tuple)):
        agents = {f"agent{i}": str(text) for i, text in enumerate(spec)}
    elif is_count:
        every = {k: v for name, s in AGENT_SETS.items() if name not in TOOL_AGENT_SETS for k, v in s.items()}
        n = int(spec)
        if not 1 <= n <= len(every):
            raise ValueError(f"agent count must be between 1 and {len(every)}, got {n}")
        agents = dict(list(every.items())[:n])
    elif isinstance(spec, str) and spec in AGENT_SETS:
        agents = dict(AGENT_SETS[spec])
    elif isinstance(spec, str) and "|" in spec:
        agents = {f"agent{i}": s.strip() for i, s in enumerate(spec.split("|"))}
    else:
        raise ValueError(
            f"unknown agent set {spec!r}: give one of {', '.join(AGENT_SETS)}, a count such as 4, "
            "instructions separated by '|', a list of instructions or a {name: instruction} dict"
        )
    if not agents or not all(isinstance(v, str) and v.strip() for v in agents.values()):
        raise ValueError(f"every agent needs a non-empty instruction, got {agents}")
    return agents


# Solved questions shown before the real one: (question, working, answer).
WORKED_EXAMPLES = [
    ("Kai starts the day with 34 marbles. Kai loses 6 marbles. How many marbles does Kai have now?",
     "34 - 6 = 28", "28"),
    ("A baker fills 7 trays. Each tray holds 4 muffins. How many muffins does the baker have?",
     "7 * 4 = 28", "28"),
    ("Mia has 45 stickers. She shares them equally among 5 friends. How many stickers does each friend get?",
     "45 / 5 = 9", "9"),
]


def _examples(examples):
    if not 0 <= examples <= len(WORKED_EXAMPLES):
        raise ValueError(f"worked examples must be between 0 and {len(WORKED_EXAMPLES)}, got {examples}")
    return WORKED_EXAMPLES[:examples]


def xml_prompt(instruction, question, examples=0):
    """The XML-tag prompt; the model is expected to answer and close with </response>."""
    shown = "".join(f"<instruction>{instruction}</instruction>\n<question>{q}</question>\n"
                    f"<response>{work}\n#### {answer} {STOP_TAG}\n\n" for q, work, answer in _examples(examples))
    return f"{shown}<instruction>{instruction}</instruction>\n<question>{question}</question>\n<response>"


def chat_prompt(instruction, question, system_prompt=SYSTEM_PROMPT, examples=0):
    """Chat messages: the structured-format system prompt, any worked examples as earlier turns,
    then instruction and question."""
    shown = [turn for q, work, answer in _examples(examples) for turn in (
        {"role": "user", "content": f"{instruction}\n\n{q}"},
        {"role": "assistant", "content": f"{REASONING_START}{work}{REASONING_END}{SOLUTION_START}{answer}{SOLUTION_END}"},
    )]
    return [
        {"role": "system", "content": system_prompt},
        *shown,
        {"role": "user", "content": f"{instruction}\n\n{question}"},
    ]


PROMPT_BUILDERS = {"chat": chat_prompt, "xml": xml_prompt}


def build_prompt(instruction, question, style="chat", examples=0):
    if style not in PROMPT_BUILDERS:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {list(PROMPT_BUILDERS)}")
    return PROMPT_BUILDERS[style](instruction, question, examples=examples)


def expand_agents(dataset, agents=None, sampling="all", seed=0, style="chat", examples=0):
    """Add a ``prompt`` and an ``agent`` column: one row per agent ("all"), or one random agent
    per question ("random"), each prompt opening with ``examples`` worked examples. Works on a
    datasets.Dataset or a list of dicts with ``question``."""
    agents = get_agents(agents)
    if sampling not in ("all", "random"):
        raise ValueError(f"agent sampling must be 'all' or 'random', got {sampling!r}")
    rng = random.Random(seed)
    names = list(agents)

    def expand(row):
        chosen = names if sampling == "all" else [rng.choice(names)]
        return [
            {**row, "prompt": build_prompt(agents[n], row["question"], style, examples), "agent": n}
            for n in chosen
        ]

    if isinstance(dataset, list):
        return [new for row in dataset for new in expand(row)]

    from datasets import Dataset

    return Dataset.from_list([new for row in dataset for new in expand(row)])


def _vote_key(answer):
    """Answers that normalize alike vote together: '1,000' and '1000.0'."""
    return normalize_number(answer) if answer is not None else None


def majority_vote(answers, weights=None):
    """The answer with the most (weighted) votes; ties go to the one seen first. None never wins."""
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    tally, first_seen = {}, {}
    for i, answer in enumerate(answers):
        key = _vote_key(answer)
        if key is None:
            continue
        tally[key] = tally.get(key, 0.0) + (1.0 if weights is None else float(weights[i]))
        first_seen.setdefault(key, i)
    if not tally:
        return None
    return max(tally, key=lambda k: (tally[k], -first_seen[k]))


def consistency(answers):
    """Mean pairwise agreement of the answers, in [0, 1]; None agrees with nothing; 1.0 for < 2."""
    keys = [_vote_key(a) for a in answers]
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    if not pairs:
        return 1.0
    return sum(a is not None and a == b for a, b in pairs) / len(pairs)


def aggregate_hidden_states(states, weights=None):
    """Mean (or weighted mean) of per-agent [L, d] or [B, L, d] tensors, zero-padded to the longest L."""
    if not states:
        raise ValueError("aggregate_hidden_states needs at least one tensor")
    ndim = states[0].dim()
    if ndim not in (2, 3) or any(s.dim() != ndim for s in states):
        raise ValueError(f"expected all [L, d] or all [B, L, d] tensors, got {[tuple(s.shape) for s in states]}")
    if len({(s.shape[:-2], s.shape[-1]) for s in states}) > 1:
        raise ValueError(f"the tensors differ in batch or hidden size: {[tuple(s.shape) for s in states]}")
    length = max(s.shape[-2] for s in states)
    padded = torch.stack(
        [torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[-2])) for s in states]
    )
    if weights is None:
        return padded.mean(dim=0)
    w = torch.as_tensor(weights, dtype=padded.dtype, device=padded.device)
    if w.shape != (len(states),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {len(states)} non-negative weights with a positive sum, got {weights}")
    return torch.einsum("k,k...->...", w / w.sum(), padded)


# ---------------------------------------------------------------------------- hidden-state ensemble

def _eos_ids(model, tokenizer):
    """Every token id that ends a completion: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return ids - {None}


@torch.no_grad()
def _ensemble_ids(model, tokenizer, prompts, max_new_tokens, weights=None, stop=(), temperature=0.0, seed=None):
    """ensemble_generate's loop: (the consensus token ids, the completion text cut after a stop string)."""
    if not prompts:
        raise ValueError("ensemble_generate needs at least one prompt")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    # The prompts are already rendered (chat template included), so no special tokens are added.
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    # Left padding: positions count real tokens only, as model.generate does; pads get position 0.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = _eos_ids(model, tokenizer)
    _check_linear_head(model)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    past, tokens, text = None, [], ""
    try:
        for _ in range(max_new_tokens):
            # return_dict: Unsloth's patched forward returns a tuple on its one-token decode path otherwise.
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, return_dict=True, logits_to_keep=1)
            past = out.past_key_values
            # The LM head is linear and the weights sum to 1, so the weighted mean of the agents' logits
            # is the head applied to the weighted mean of their last hidden states (after the final
            # norm). Taking the logits needs no hidden states, which Unsloth's decode path leaves empty.
            last = out.logits[:, -1:, :].float()  # [K, 1, vocab], one row per agent
            logits = aggregate_hidden_states(list(last), weights)[-1]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            if token in eos:
                break
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.index(s) + len(s) for s in stop if s and s in text]
            if hits:
                return tokens, text[: min(hits)]
            # Every agent continues with the consensus token.
            ids = torch.full((len(prompts), 1), token, dtype=ids.dtype, device=device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=-1)
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    return tokens, text


def _check_linear_head(model):
    """The ensemble combines logits in place of last hidden states, which is exact only for a linear head."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits, so the mean of its agents' logits is not the "
                         "head of their mean hidden state; ensemble_generate supports models with a linear LM head")


def ensemble_generate(model, tokenizer, prompts, max_new_tokens, weights=None, stop=(STOP_TAG,),
                      temperature=0.0, seed=None):
    """One consensus completion for K agent prompts of one question, decoded from their mean hidden state.

    prompts are the K rendered prompt strings (chat template already applied). They run as one
    left-padded batch with a KV cache. At each step the agents' last-layer hidden states at the
    last position (after the final norm) are averaged (or weighted by ``weights``) and the LM head
    turns the mean into logits; the token is picked greedily (temperature 0) or sampled (seeded
    with ``seed``). Since the head is linear, this is computed as the same weighted mean of the
    agents' logits (aggregate_hidden_states over them), which every forward returns, Unsloth's
    patched one included. The token is appended to all K sequences, so one token costs one
    batched forward of K rows. It stops at EOS or once the text contains a string of ``stop``,
    and cuts the text just after it.

    With one prompt this is greedy decoding (model.generate(do_sample=False)); with K copies of
    one prompt it gives the same text. Works on PEFT-wrapped models and on models whose class
    Unsloth has patched; refuses models with soft-capped logits (Gemma 2), where the two differ.
    """
    return _ensemble_ids(model, tokenizer, prompts, max_new_tokens, weights, stop, temperature, seed)[1]

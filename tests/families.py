"""Tiny random models of the families users switch --model-name to, each with its family's real tokenizer.

    FAMILIES                      family -> (architecture class, tokenizer folder, chat template or None)
    save_family(family, folder)   a model folder, as save_pretrained writes a downloaded one: config,
                                  random weights, tokenizer and chat template; --model-name FOLDER loads it

Each model is of the family's real architecture class, two layers of four heads of 32 (vLLM's CPU attention
takes head sizes of 32 and more), with the real vocabulary: 151,665 tokens for Qwen, 128,256 for Llama 3.1,
262,145 for Gemma 3. The tokenizers come from ../shared/data (tokenizers/NOTICE.md gives their sources and
licenses); Qwen2.5 takes Qwen's vocabulary with Qwen2.5's template, as TRL ships it.
"""

import os

import torch

from conftest import SHARED_DATA, need_shared

TOKENIZERS = os.path.join(SHARED_DATA, "tokenizers")
FAMILIES = {
    "qwen2.5": ("Qwen2ForCausalLM", os.path.join(SHARED_DATA, "qwen-tokenizer"), "qwen2_5"),
    "qwen3": ("Qwen3ForCausalLM", os.path.join(SHARED_DATA, "qwen-tokenizer"), None),
    "llama3": ("LlamaForCausalLM", os.path.join(TOKENIZERS, "llama3_1"), None),
    "gemma3": ("Gemma3ForCausalLM", os.path.join(TOKENIZERS, "gemma3"), None),
}


def family_tokenizer(family):
    """The family's real tokenizer, or a skip (a failure under .ci/run) where ../shared/data lacks it."""
    from transformers import AutoTokenizer

    from grpo_math.offline import qwen2_5_template

    _, folder, template = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(need_shared(folder, ("tokenizer.json", "tokenizer_config.json"),
                                                          f"the {family} tokenizer"))
    if template == "qwen2_5":
        tokenizer.chat_template = qwen2_5_template()
    return tokenizer


def tiny_family_model(family, tokenizer, seed=0):
    import transformers

    config = family_config(family, tokenizer)
    torch.manual_seed(seed)
    return getattr(transformers, config.architectures[0])(config)


def family_config(family, tokenizer):
    """The tiny model's config, of the family's real class."""
    import transformers

    architecture = FAMILIES[family][0]
    shape = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    config_class = {"Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                    "LlamaForCausalLM": "LlamaConfig", "Gemma3ForCausalLM": "Gemma3TextConfig"}[architecture]
    if architecture == "Gemma3ForCausalLM":
        shape.update(sliding_window=64, query_pre_attn_scalar=32)
    config = getattr(transformers, config_class)(**shape)
    config.architectures = [architecture]
    return config


def save_family(family, folder, seed=0):
    """A model folder of ``family``: its tiny random model and its real tokenizer. Returns the folder."""
    tokenizer = family_tokenizer(family)
    model = tiny_family_model(family, tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

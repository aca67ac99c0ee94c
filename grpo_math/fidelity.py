"""Does an export still answer like the trained adapter? export.py --check measures it.

The adapter, the merged model and each GGUF file answer the same held-out questions the same way:
the run's report questions (eval.json, never trained on nor selected on), the first agent's prompt,
greedy, graded as evaluate.py grades. For each export:

    accuracy      with its Wilson 95% interval
    difference    from the adapter, question by question, with a paired bootstrap 95% interval
    agreement     the share of questions on which its final answer is exactly the adapter's

A merge in 16-bit should agree almost everywhere; a q4_k_m file of a small model can lose points,
and a wrong chat template or a missed merge loses everything, which this shows at once. A GGUF is
read by llama.cpp's runtime where it is at hand (llama-cpp-python, or the kit's build of llama.cpp,
grpo_math/llama_cpp.py); otherwise by transformers' GGUF loader, which dequantizes the weights into
float32: the same weights, but not llama.cpp's arithmetic. fidelity.json says which was used.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

from agents import get_agents
from grpo_math import intervals, llama_cpp, runs
from grpo_math.answers import grade
from grpo_math.evaluation import STOPS, cut_at_stop, quick_eval, render

FIDELITY_FILE = "fidelity.json"
KIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_CPP = "llama.cpp (llama-cpp-python)"
TRANSFORMERS = "transformers' GGUF loader (dequantized to float32)"


def held_out_rows(run_dir):
    """The run's report questions, from eval.json: [{"question", "answer"}]."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--check needs {path}, the held-out questions the run was scored on; this run skipped "
                         "its evaluation (--skip-evaluation or --eval-examples 0)")
    with open(path) as f:
        return [{"question": r["question"], "answer": r["gold"]} for r in json.load(f)["records"]]


def score_transformers(model, tokenizer, rows, s):
    """quick_eval's records: the first agent, greedy, as training's evaluation scores the run."""
    return quick_eval(model, tokenizer, rows, s["agents"], s["prompt_style"], s["max_completion_length"],
                      examples=s["worked_examples"], thinking=s.get("thinking", False))["records"]


def score_llama_cpp(gguf_file, tokenizer, rows, s):
    """The same prompts, rendered by the run's tokenizer, answered greedily by llama.cpp's runtime."""
    instruction = next(iter(get_agents(s["agents"]).values()))
    llm = llama_cpp.load(gguf_file)
    records = []
    for r in rows:
        prompt = render(tokenizer, instruction, r["question"], s["prompt_style"], s["worked_examples"],
                        s.get("thinking", False))
        out = llm.create_completion(prompt, max_tokens=s["max_completion_length"], temperature=0.0, top_k=1,
                                    stop=list(STOPS[s["prompt_style"]]))
        text = cut_at_stop(out["choices"][0]["text"], STOPS[s["prompt_style"]])
        # llama.cpp drops the stop string from the text; the graded form ends with it, as generate()'s does
        if out["choices"][0]["finish_reason"] == "stop" and not text.endswith(STOPS[s["prompt_style"]]):
            text += STOPS[s["prompt_style"]][0]
        records.append({"question": r["question"], "gold": r["answer"],
                        **grade(text, r["answer"], s["prompt_style"], out["usage"]["completion_tokens"])})
    llm.close()
    return records


def score_gguf(gguf_file, tokenizer, rows, s, run_dir):
    """(records, runtime) for one GGUF file: llama.cpp's runtime where at hand, in a process of its own (a
    crash of its CPU kernels, seen on some CPUs, cannot take this one down), else transformers' loader."""
    if llama_cpp.runtime_available():
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "records.json")
            proc = subprocess.run([sys.executable, "-m", "grpo_math.fidelity", gguf_file, run_dir, out],
                                  cwd=KIT_DIR, capture_output=True, text=True)
            if proc.returncode == 0:
                with open(out) as f:
                    return json.load(f), LLAMA_CPP
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else last
        print(f"llama.cpp's runtime failed on {os.path.basename(gguf_file)} ({why}): reading it with {TRANSFORMERS}")
    return score_transformers(load_gguf(gguf_file, run_dir), tokenizer, rows, s), TRANSFORMERS


def load_gguf(gguf_file, run_dir):
    """``gguf_file`` in transformers, dequantized. The architecture comes from RUN/merged's config where it
    exists: the GGUF's own would be read by parsing its whole metadata a second time (the vocabulary
    included: 15 s for a 151k-token one on a small CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    merged = os.path.join(run_dir, "merged")
    config = {"config": AutoConfig.from_pretrained(merged)} if os.path.isfile(os.path.join(merged, "config.json")) else {}
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file),
                                                **config).eval()


def compare(name, records, reference):
    """One export's line: accuracy and interval, and against the adapter's ``reference`` records."""
    correct = [r["correct"] for r in records]
    line = {"name": name, "accuracy": sum(correct) / len(correct),
            "interval": list(intervals.wilson(sum(correct), len(correct))),
            "difference": None, "difference_interval": None, "agreement": None}
    if reference is not records:
        d = intervals.paired_difference([r["correct"] for r in reference], correct)
        line.update(difference=d["difference"], difference_interval=[d["low"], d["high"]],
                    agreement=sum(a["answer"] == b["answer"] for a, b in zip(reference, records)) / len(records))
    return line


def check(run_dir, adapter_model, tokenizer, merged_loader=None):
    """Score the adapter (``adapter_model``), RUN/merged (``merged_loader()`` loads it) and each RUN/gguf file;
    write RUN/fidelity.json and return it."""
    with open(os.path.join(run_dir, runs.CONFIG_FILE)) as f:
        s = json.load(f)["settings"]
    rows = held_out_rows(run_dir)
    first_agent = next(iter(get_agents(s["agents"]).values()))
    print(f"fidelity: {len(rows)} held-out questions (eval.json), the first agent, greedy")
    reference = score_transformers(adapter_model, tokenizer, rows, s)
    lines = [compare("adapter", reference, reference)]
    merged = os.path.join(run_dir, "merged")
    if merged_loader and os.path.isfile(os.path.join(merged, "config.json")):
        lines.append(compare("merged", score_transformers(merged_loader(), tokenizer, rows, s), reference))
    for path in sorted(glob.glob(os.path.join(run_dir, "gguf", "*.gguf"))):
        records, used = score_gguf(path, tokenizer, rows, s, run_dir)
        name = os.path.basename(path).removeprefix("model-").removesuffix(".gguf").lower()
        lines.append({**compare(name, records, reference), "file": os.path.relpath(path, run_dir), "runtime": used})
    used = list(dict.fromkeys(line["runtime"] for line in lines if "runtime" in line))
    result = {"questions": len(rows), "agent": first_agent, "runtime": {"gguf": " and ".join(used)} if used else {},
              "exports": lines}
    runs.write_json_atomic(os.path.join(run_dir, FIDELITY_FILE), result)
    print(table(result))
    return result


def table(result):
    """fidelity.json as the lines export.py prints and BENCHMARKS.md shows."""
    rows = [f"{'export':<10}{'accuracy [95%]':>24}{'vs adapter [95%]':>28}{'same answer':>13}  read by"]
    for e in result["exports"]:
        lo, hi = e["interval"]
        diff = "" if e["difference"] is None else \
            f"{e['difference']:+.3f} [{e['difference_interval'][0]:+.3f}, {e['difference_interval'][1]:+.3f}]"
        same = "" if e["agreement"] is None else f"{e['agreement']:.2f}"
        reader = e.get("runtime", "transformers (safetensors)").split(" (")[0]
        rows.append(f"{e['name']:<10}{e['accuracy']:>8.3f} [{lo:.3f}, {hi:.3f}]{diff:>28}{same:>13}  {reader}")
    if result["runtime"].get("gguf"):
        rows.append(f"GGUF files read by {result['runtime']['gguf']}")
    return "\n".join(rows)


if __name__ == "__main__":  # score_gguf's worker: GGUF RUN_DIR OUT.json, the records of llama.cpp's answers
    from transformers import AutoTokenizer

    gguf_file, run_dir, out = sys.argv[1:]
    with open(os.path.join(run_dir, runs.CONFIG_FILE)) as f:
        settings = json.load(f)["settings"]
    records = score_llama_cpp(gguf_file, AutoTokenizer.from_pretrained(run_dir), held_out_rows(run_dir), settings)
    runs.write_json_atomic(out, records)

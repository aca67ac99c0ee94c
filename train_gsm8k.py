# /// script
# requires-python = ">=3.10"
# dependencies = ["trl==1.14.0", "transformers==5.17.0", "datasets==4.8.5", "peft", "accelerate", "matplotlib"]
# ///
"""Train a small instruct model to solve GSM8K math word problems with GRPO.

Each question is asked by several "agents" (instruction variants of the one model), and the
completions are scored by correctness, format and partial-credit rewards (rewards.py).

On a 12-24 GB GPU (Colab, Kaggle, a consumer card), with the unsloth backend:
    pip install -r requirements.txt
    python train_gsm8k.py                                  # Qwen2.5-1.5B-Instruct, 1000 questions
    python train_gsm8k.py --max-steps 500 --output-dir outputs/gsm8k-500
    python train_gsm8k.py --resume --max-steps 1000 --output-dir outputs/gsm8k-500

Quick check of the whole pipeline on a CPU (tiny offline model and the 48 GSM8K rows in
gsm8k_sample/, under a minute; --overwrite replaces the previous smoke run, kept aside):
    python train_gsm8k.py --smoke --overwrite

Ctrl-C stops after the current step, with a checkpoint, and prints the command that continues.
Outputs (one run folder): the LoRA adapter and tokenizer, config.json, training_stats.json,
rewards.png, the two newest checkpoint-N/ folders and eval.json. Reload the adapter with
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), RUN_DIR)
Export it with --save-merged or --save-gguf q4_k_m, or later: python export.py RUN_DIR --merged
Expect a reward near the format terms only for the first tens of steps; correctness comes later.
"""

import training
from data import GSM8K_HUB_ID, GSM8K_SAMPLE, load_gsm8k

# ---- settings: edit here, or pass the flags (python train_gsm8k.py --help) ----
DEFAULTS = dict(
    model_name="Qwen/Qwen2.5-1.5B-Instruct",
    dataset=GSM8K_HUB_ID,            # or a local .jsonl/.json/.parquet file, or a folder with train.jsonl
    max_examples=1000,               # questions to train on (each asked by every agent)
    max_steps=250,
    learning_rate=5e-6,
    batch_size=None,                 # None = num_generations: one question's group per device step
    gradient_accumulation_steps=1,   # raise this, not batch_size, for bigger updates on a small GPU
    num_generations=8,               # completions per question; decrease if out of memory
    max_completion_length=256,       # tokens; decrease if out of memory (GSM8K needs ~200)
    lora_rank=16,                    # decrease to 8 if out of memory; larger learns more, slower
    # reward:weight, see rewards.GSM8K_REWARD_WEIGHTS for why these weights
    rewards="correctness_reward:2,format_exact_reward:0.25,format_approx_reward:0.25,partial_credit_reward:0.5",
    agents="core",                   # agents.AGENT_SETS: core, strategies, personas; or "a|b|c"
    agent_sampling="all",            # every question once per agent
    prompt_style="chat",             # system prompt asking for <SOLUTION>N</SOLUTION>
    output_dir="outputs/gsm8k",
)
SMOKE = dict(dataset=GSM8K_SAMPLE)   # --smoke: the GSM8K rows shipped in gsm8k_sample/, no network


def add_args(add):
    add("--dataset", "hub id (openai/gsm8k) or a local .jsonl/.json/.parquet file or folder", type=str)


def load_data(s):
    """(train rows, held-out rows): the held-out questions are never trained on."""
    rows = load_gsm8k(s["dataset"], "train", limit=s["max_examples"] + s["eval_examples"], seed=s["seed"])
    rows = rows.to_list()
    return rows[s["eval_examples"]:], rows[: s["eval_examples"]]


if __name__ == "__main__":
    training.main(__doc__, DEFAULTS, load_data, extra_args=add_args, smoke=SMOKE)

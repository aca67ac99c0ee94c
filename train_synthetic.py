# /// script
# requires-python = ">=3.10"
# dependencies = ["trl==1.14.0", "transformers==5.17.0", "datasets==4.8.5", "peft", "accelerate", "matplotlib"]
# ///
"""Learn the mechanics of multi-agent GRPO on generated math problems.

Problems come from data.synthetic_problems (1 arithmetic step when easy, 2 medium, 3-4 hard),
so nothing needs downloading but the model. Four instruction "agents" ask each problem in the
XML-tag form, and the model closes its answer with </response>, where generation stops.

The educational default rewards the number of distinct characters (unique_chars_reward): a
dummy that shows GRPO pushing a measurable property up within a few dozen steps. Swap in the
real signal with --rewards correctness_reward,stop_tag_bonus.

On a 12-24 GB GPU:
    pip install -r requirements.txt
    python train_synthetic.py
    python train_synthetic.py --rewards correctness_reward,stop_tag_bonus --curriculum

Quick check of the whole pipeline on a CPU (tiny offline model, under a minute; --overwrite
replaces the previous smoke run, kept aside):
    python train_synthetic.py --smoke --overwrite

Ctrl-C stops after the current step, with a checkpoint, and prints the command that continues.

Outputs: as train_gsm8k.py (adapter, config.json, training_stats.json, rewards.png, checkpoints).
"""

import training
from data import synthetic_problems

# ---- settings: edit here, or pass the flags (python train_synthetic.py --help) ----
DEFAULTS = dict(
    model_name="Qwen/Qwen2.5-1.5B-Instruct",
    difficulty="easy",               # easy (1 step), medium (2), hard (3-4)
    curriculum=False,                # train easy, then medium, then hard, in order
    max_examples=600,
    max_steps=100,
    learning_rate=5e-6,
    batch_size=None,                 # None = num_generations
    gradient_accumulation_steps=1,
    num_generations=8,               # decrease if out of memory
    max_completion_length=200,       # tokens; decrease if out of memory
    lora_rank=16,                    # decrease to 8 if out of memory
    rewards="unique_chars_reward",   # the seeds' dummy; try correctness_reward,stop_tag_bonus
    agents="core",                   # four instruction variants
    agent_sampling="all",
    prompt_style="xml",              # <instruction>..</instruction><question>..</question><response>
    output_dir="outputs/synthetic",
)


def add_args(add):
    add("--difficulty", "problem difficulty", choices=["easy", "medium", "hard"])
    add("--curriculum", "easy, then medium, then hard problems, in that order", action="store_true")


def load_data(s):
    """(train rows, held-out rows); held-out problems come from another seed."""
    levels = ["easy", "medium", "hard"] if s["curriculum"] else [s["difficulty"]]
    n = max(1, s["max_examples"] // len(levels))
    train = [row for level in levels for row in synthetic_problems(n, level, seed=s["seed"])]
    held_out = synthetic_problems(s["eval_examples"], levels[-1], seed=s["seed"] + 1).to_list()
    return train, held_out


if __name__ == "__main__":
    training.main(__doc__, DEFAULTS, load_data, extra_args=add_args)

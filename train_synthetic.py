# /// script
# requires-python = ">=3.10,<3.13"
# dependencies = [
#     # A GPU run needs all of these: without unsloth (or on a machine without CUDA) the script falls back
#     # to plain transformers + PEFT, several times slower, and says so at start-up ("backend: trl (...)").
#     "unsloth==2026.10.7", "unsloth_zoo==2026.10.7", "bitsandbytes==0.50.2",
#     "vllm==0.26.0", "torch==2.11.0",  # vLLM's fast generation; this torch is a CUDA 13 build (NVIDIA driver 580+)
#     "trl==1.14.0", "transformers==5.17.0", "datasets==4.8.5", "peft==0.21.2", "accelerate==1.15.0",
#     "matplotlib",
# ]
# ///
"""Learn the mechanics of multi-agent GRPO on generated math problems.

Problems come from data.synthetic_problems (1 arithmetic step when easy, 2 medium, 3-4 hard),
so nothing needs downloading but the model. Four instruction "agents" ask each problem in the
XML-tag form, and the model closes its answer with </response>, where generation stops.

The educational default rewards the number of distinct characters (unique_chars_reward): a
dummy that shows GRPO pushing a measurable property up within a few dozen steps. Swap in the
real signal with --rewards correctness_reward,stop_tag_bonus.

On a 12-24 GB GPU:
    pip install -r requirements.txt                        # or: uv run train_synthetic.py
    python train_synthetic.py
    python train_synthetic.py --rewards correctness_reward,stop_tag_bonus --curriculum
    torchrun --nproc_per_node 2 train_synthetic.py         # two GPUs: README, "More than one GPU"

Quick check of the whole pipeline on a CPU (tiny offline model, under a minute; --overwrite
replaces the previous smoke run, kept aside):
    python train_synthetic.py --smoke --overwrite

In a notebook whose working folder is the kit's (or with that folder on sys.path, for grpo_math/):
paste this file into a cell, edit DEFAULTS and run it; the kernel's own arguments are ignored.
smoke=True in DEFAULTS is --smoke; main(["--resume"]) in a later cell continues the run.

Ctrl-C stops after the current step, with a checkpoint, and prints the command that continues.
Outputs: as train_gsm8k.py (adapter, config.json, training_stats.json, rewards.png, checkpoints).
"""

import os
import time

from datasets import Dataset

# The kit's files beside this one: those to edit (agents, data, rewards) and the commands run after training.
import export
from agents import expand_agents
from data import synthetic_held_out, synthetic_problems
from rewards import STOP_TAG, get_reward_funcs

# The plumbing, in grpo_math/: its __init__ says what each module holds.
from grpo_math import best, distributed, families, held_out, models, progress, runs, tools
from grpo_math.evaluation import quick_eval
from grpo_math.grpo_trainer import generation_args, make_trainer_class
from grpo_math.prompt_budget import fit_prompts
from grpo_math.settings import bad_input_refused, check_enough_data, parse_settings

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
    tools="",                        # "calculator", with prompt_style="chat": the model may call it (README, "Tools")
    output_dir="outputs/synthetic",
)


def add_args(add):
    add("--difficulty", "problem difficulty", choices=["easy", "medium", "hard"])
    add("--curriculum", "easy, then medium, then hard problems, in that order", action="store_true")


def grpo_config(s, backend, tokenizer, vllm=False):
    """TRL's GRPOConfig: the GRPO recipe. Every value is set here, because Unsloth's config has
    other defaults (weight decay 0.001, an emptied CUDA cache every 250 steps)."""
    from trl import GRPOConfig  # here: on a GPU, unsloth was imported first and has patched trl

    gpu = models.gpu_capability() is not None
    bf16 = models.bf16_supported()  # from Ampere (8.0) on; a T4 or V100 trains in fp16, as Unsloth loads it
    return GRPOConfig(
        output_dir=s["output_dir"],
        max_steps=s["max_steps"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=max(1, s["max_steps"] // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,                     # lower it (0.1) if the loss turns NaN or inf
        optim="adamw_8bit" if gpu else "adamw_torch",  # 8-bit Adam states save memory on a GPU
        per_device_train_batch_size=s["batch_size"],  # completions per step; lower it if out of memory
        gradient_accumulation_steps=s["gradient_accumulation_steps"],  # raise it instead of the batch
        # Rollouts: each prompt's group of completions, sampled and scored together.
        num_generations=s["num_generations"],  # the group; lower it if out of memory, raise it if zero_std is high
        generation_batch_size=s["generation_batch_size"],  # sampled together: larger is faster on a GPU
        max_completion_length=s["max_completion_length"],  # lower it if out of memory
        temperature=s["temperature"],
        top_p=1.0,
        **generation_args(s, backend, tokenizer, vllm),  # vLLM where installed; the xml form stops at </response>
        chat_template_kwargs=families.chat_kwargs(s["thinking"]),  # Qwen3: no <think> block unless --thinking
        # The loss: GRPO's group-relative advantages, with DAPO's token-level normalization.
        loss_type="dapo",                      # or "grpo", "bnpo", "dr_grpo" (with scale_rewards="none")
        scale_rewards="group",                 # divide advantages by the group's std; "none" as in Dr. GRPO
        beta=0.0,                              # no KL term, so no reference model: one copy of the weights
        epsilon=0.2,                           # the clip range below 1 ...
        epsilon_high=0.2,                      # ... and above; DAPO uses 0.28, which Unsloth sets if this is None
        num_iterations=1,                      # one gradient step per batch of rollouts
        top_entropy_quantile=1.0,              # train on every token; 0.2 keeps the 20% of highest entropy
        mask_truncated_completions=False,      # True drops completions cut at max_completion_length
        reward_weights=list(s["reward_weights"].values()),
        # Precision and memory follow the hardware.
        use_cpu=not gpu,
        bf16=gpu and bf16,
        fp16=gpu and not bf16,
        gradient_checkpointing=gpu and backend == "trl",  # unsloth checkpoints its own way; the tiny CPU model needs none
        torch_empty_cache_steps=None,
        ddp_find_unused_parameters=False,      # several processes: every LoRA weight gets a gradient each step
        # Logging and checkpoints.
        logging_steps=1,
        save_steps=s["save_steps"],
        save_total_limit=2,                    # checkpoints hold the optimizer state: several times the adapter
        report_to=[] if s["report_to"] == "none" else [s["report_to"]],
        project=s["project_name"],
        disable_tqdm=False,
        seed=s["seed"],
        shuffle_dataset=not s["curriculum"],  # a curriculum keeps its easy-to-hard order
    )


@progress.ctrl_c_before_training
def main(argv=None):
    """The recipe, top to bottom. ``argv``: flags as on the command line; None takes the command
    line's, or none in a notebook, where DEFAULTS above are the settings."""
    # 1. Settings: DEFAULTS, then --smoke's, then a resumed run's config.json, then the flags. All that
    #    can be checked is checked now, before the run folder is touched or a model loads. Under torchrun
    #    or accelerate launch, the first process decides what to do with the run folder and writes it.
    distributed.start()  # with one process, nothing
    s = parse_settings(__doc__, DEFAULTS, argv, add_args)
    plan = distributed.decide(runs.inspect_run, s)  # start, resume, overwrite...: refuses a folder it must not touch
    if plan["action"] == "finished":
        print(runs.describe(s, plan))
        return s
    t0 = time.time()
    backend, reason = models.pick_backend(s)  # imports unsloth on a GPU, before anything imports trl
    print(f"backend: {backend} ({reason})")
    # Exports and the push: the GGUF types, llama.cpp (fetched once), the Hub token, all before training.
    repo_id = export.check_exports(s["model_name"], s["save_merged"], s["save_gguf"], backend, reason,
                                   s["push_to_hub"], s["private"])
    with bad_input_refused():  # a hub id the hub cannot be asked about: one line, at once
        models.check_source(s["model_name"])
    tools.check_model(s["model_name"], s["tool_names"])  # --tools: a chat template that can show them

    # 2. Data: generated problems, nothing to download; the held-out ones come from another seed.
    levels = ["easy", "medium", "hard"] if s["curriculum"] else [s["difficulty"]]
    per_level = max(1, s["max_examples"] // len(levels))
    train_rows = [row for level in levels for row in synthetic_problems(per_level, level, seed=s["seed"])]
    # Two held-out sets, neither among the training problems: --eval-examples for the figure reported after
    # training, --select-examples for choosing, during training, the adapter the run keeps.
    with bad_input_refused():
        eval_rows, select_rows = synthetic_held_out(s["eval_examples"], s["select_examples"], levels[-1],
                                                    s["seed"] + 1, [row["question"] for row in train_rows])

    # 3. The agents' prompts: each problem once per agent, in the XML-tag form.
    prompts = expand_agents(train_rows, s["agents"], s["agent_sampling"], s["seed"], style=s["prompt_style"],
                            examples=s["worked_examples"])
    # Their length in tokens, as the trainer renders them: the longest (within --max-prompt-length, which leaves
    # longer ones out) + --max-completion-length is the context Unsloth gives vLLM (s["max_seq_length"]).
    tokenizer = models.load_tokenizer(s["model_name"])  # loaded once: it measures the prompts, and the model keeps it
    prompts = fit_prompts(s, prompts, tokenizer)
    dataset = Dataset.from_list(prompts)
    check_enough_data(s, len(train_rows), len(eval_rows) + len(select_rows), len(dataset))

    # 4. Model and LoRA: Unsloth's 4-bit model (vLLM generates where installed), or transformers + PEFT.
    runs.prepare_run(s, plan)  # only now is an old run moved aside (--overwrite)
    model, tokenizer, vllm = models.load_model(s, backend, tokenizer)
    tools.check_tokenizer(tokenizer, s["model_name"], s["tool_names"], backend)  # and TRL's parser for the calls
    runs.write_config(s, backend, reason, vllm, len(dataset))
    stats = runs.load_stats(s["output_dir"], plan["step"])  # the steps so far, on --resume

    # 5. Rewards, summed with their weights (--rewards): the unique_chars_reward dummy by default.
    reward_funcs = get_reward_funcs(list(s["reward_weights"]))

    # 6. The trainer: TRL's GRPOTrainer (Unsloth's, on its backend) that also logs each agent's reward.
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_config(s, backend, tokenizer, vllm),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_weights=s["reward_weights"],
        stop_strings=[STOP_TAG] if s["prompt_style"] == "xml" else None,
        tools=tools.get_tools(s["tools"]) or None,  # --tools: the model may call them while it answers
    )

    # 7. Train: one line per step, training_stats.json as it goes, a checkpoint every --save-steps.
    #    Ctrl-C stops after the step under way, with a checkpoint, and prints the command that continues.
    with progress.resumable(s, stats):
        if plan["action"] == "finish":  # trained to the end before a kill: take the last checkpoint
            step = runs.load_checkpoint_weights(model, plan)
        else:
            # Every --eval-every steps and before the first, the held-out questions are scored as in step 9:
            # a reward that rises while their accuracy falls is the reward being gamed, not learning.
            evaluation = held_out.evaluation(model, tokenizer, select_rows, s, backend)
            with progress.watch(trainer, s, stats, evaluation):
                trainer.train(resume_from_checkpoint=plan["checkpoint"])
            step = trainer.state.global_step
        if not distributed.is_main():
            return s  # the first process writes the outputs

        # 8. Save the last step's LoRA adapter and tokenizer (PeftModel.from_pretrained(base, RUN) reloads them).
        model.save_pretrained(s["output_dir"])
        tokenizer.save_pretrained(s["output_dir"])
        if stats:
            progress.plot_rewards(stats, os.path.join(s["output_dir"], "rewards.png"))

        # 9. The model users get: the adapter kept in RUN/best/, the last unless the base model or the
        #    highest-scoring step was clearly better on the selection questions (grpo_math/best.py). An
        #    evaluation scores it, and the last adapter where that is another, on the --eval-examples
        #    questions, which the selection never saw: greedy, graded as evaluate.py grades.
        kept = best.read(s["output_dir"])  # None when nothing was selected (--eval-every 0)
        if eval_rows and not s["skip_evaluation"]:
            model = models.for_inference(model, backend)
            best.evaluate_kept(model, s["output_dir"], kept, step, lambda m: quick_eval(
                m, tokenizer, eval_rows, s["agents"], s["prompt_style"], s["max_completion_length"],
                examples=s["worked_examples"], tools=tools.get_tools(s["tools"]), max_tool_calls=s["max_tool_calls"],
                thinking=s["thinking"]))
        else:
            best.load_kept(model, s["output_dir"], kept, step)
        print(best.closing_line(s["output_dir"], kept, step))
        runs.mark_finished(s["output_dir"], step, kept)

    # 10. Exports of the kept adapter last (--save-merged, --save-gguf), then the push (--push-to-hub): a failed
    #     one costs nothing saved above, and its message gives the command that tries it again. A run that kept
    #     the base model exports nothing: one line says why and gives the command that takes the last adapter.
    failed = export.export_run(model, tokenizer, s["output_dir"], backend, s["model_name"],
                               merged=s["save_merged"], gguf=s["save_gguf"], kept=kept,
                               push_to_hub=repo_id, private=s["private"])
    print(f"done in {time.time() - t0:.1f} s; run folder: {s['output_dir']}")
    if failed:
        raise SystemExit(f"training and evaluation are saved, but {' and '.join(failed)} "
                         f"{'was' if len(failed) == 1 else 'were'} not done (see above)")
    return s


if __name__ == "__main__":
    main()

"""The training wiring that train_gsm8k.py and train_synthetic.py share.

    settings  parse_settings(): the script's DEFAULTS, then --smoke's, then the flags given;
              values that cannot work are refused here, before any model loads
    model     pick_backend(), then load_model(): the unsloth or trl backend (models.py), or the
              tiny --smoke model; the exports are checked in between (export.check_exports)
    trainer   KitGRPOTrainer: TRL's GRPOTrainer (or Unsloth's rewrite of it) plus per-agent
              reward logging and stop strings; grpo_config(): the recipe, the same on both backends
    outputs   one run folder (runs.py: never silently overwritten, resumed from its newest complete
              checkpoint): adapter + tokenizer, config.json, training_stats.json (per step, written
              atomically), rewards.png, checkpoints, eval.json, then the exports (export.py)
    Ctrl-C    stops after the current step, with a checkpoint, and prints the --resume command

A script supplies its DEFAULTS, its SMOKE overrides and a ``load_data(settings)`` that returns
(train rows, held-out rows), each with ``question`` and ``answer``; main() does the rest.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
from collections import defaultdict

import torch

import export
import models
import runs
from agents import expand_agents, get_agents
from rewards import GSM8K_REWARD_WEIGHTS, STOP_TAG, completion_text, get_reward_funcs
from runs import CONFIG_FILE, STATS_FILE, write_json_atomic

# Each tracker, and the packages that provide it (transformers takes either for tensorboard).
TRACKERS = {"none": (), "trackio": ("trackio",), "wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
REPORT_TO = tuple(TRACKERS)

# Plumbing settings both scripts share; each script's DEFAULTS holds its recipe.
COMMON_DEFAULTS = dict(
    backend="auto",           # auto: unsloth on a CUDA machine where it imports, else trl
    temperature=1.0,          # rollout sampling temperature
    seed=3407,
    max_prompt_length=256,    # tokens; sizes Unsloth's max_seq_length together with completions
    output_dir=None,
    resume=False,
    overwrite=False,
    save_steps=50,            # checkpoint every N steps (optimizer state included, for --resume)
    save_merged=False,
    save_gguf=None,
    skip_evaluation=False,
    eval_examples=8,          # held-out questions for the quick evaluation after training
    report_to="none",         # trackers are opt-in
    project_name="grpo-math",
    sample_every=10,          # print a sample completion every N steps
    smoke=False,
)

# The tiny CPU run behind --smoke: every part of the pipeline, in well under a minute.
SMOKE = dict(
    model_name="tiny", backend="trl", max_steps=4, batch_size=None, gradient_accumulation_steps=1,
    num_generations=4, max_completion_length=24, max_examples=8, lora_rank=4, learning_rate=5e-4,
    save_steps=2, eval_examples=2, sample_every=2,
)


# ---------------------------------------------------------------------------- settings

def build_parser(description, defaults, extra_args=None):
    """argparse with help on every flag. Defaults come from the script's DEFAULTS block;
    ``extra_args(group_adder)`` adds a script's own flags."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # so that only the flags given are set
    )

    def add(group, flag, help, **kw):
        key = flag.lstrip("-").replace("-", "_")
        group.add_argument(flag, help=f"{help} (default: {defaults.get(key)})", **kw)

    m = p.add_argument_group("model")
    add(m, "--model-name", "hub id or local folder; 'tiny' = the offline smoke model", type=str)
    add(m, "--backend", "unsloth (4-bit, fast) or trl (transformers + PEFT); auto picks", choices=["auto", "unsloth", "trl"])
    add(m, "--lora-rank", "LoRA rank; lower it (8) if out of memory", type=int)
    g = p.add_argument_group("GRPO")
    add(g, "--max-steps", "optimizer steps", type=int)
    add(g, "--learning-rate", "AdamW learning rate", type=float)
    add(g, "--batch-size", "completions per device step, a multiple of --num-generations; '' (empty) = "
        "num_generations", type=whole_number_or_empty)
    add(g, "--gradient-accumulation-steps", "steps per optimizer update; raise it instead of --batch-size if out of memory", type=int)
    add(g, "--num-generations", "completions per prompt (the GRPO group); lower it if out of memory", type=int)
    add(g, "--max-completion-length", "tokens per completion; lower it if out of memory", type=int)
    add(g, "--temperature", "sampling temperature for the rollouts", type=float)
    add(g, "--seed", "random seed for data, agents and LoRA init", type=int)
    d = p.add_argument_group("data and agents")
    add(d, "--max-examples", "questions to train on", type=int)
    add(d, "--rewards", "comma-separated reward names from rewards.REWARDS, each optionally name:weight", type=str)
    add(d, "--agents", "agent set (core, strategies, personas), a count, or instructions split by '|'", type=str)
    add(d, "--agent-sampling", "'all': every question once per agent; 'random': one agent per question", choices=["all", "random"])
    add(d, "--prompt-style", "chat (structured <SOLUTION> format) or xml (answer closed by </response>)", choices=["chat", "xml"])
    o = p.add_argument_group("outputs")
    add(o, "--output-dir", "run folder; refused if it exists, unless --resume or --overwrite", type=str)
    add(o, "--resume", "continue from the newest complete checkpoint in --output-dir, with its saved settings; "
        "a larger --max-steps extends a finished run", action="store_true")
    add(o, "--overwrite", "move an existing --output-dir aside (to NAME.old-TIME) and start afresh", action="store_true")
    add(o, "--save-steps", "write a checkpoint every N steps and at the last; the two newest are kept", type=int)
    add(o, "--save-merged", "after training, also save a merged 16-bit model in RUN/merged", action="store_true")
    add(o, "--save-gguf", "after training, also save a GGUF file in RUN/gguf with this quantization, e.g. q4_k_m "
        "(unsloth backend, llama.cpp)", type=str)
    add(o, "--skip-evaluation", "skip the quick held-out evaluation after training", action="store_true")
    add(o, "--eval-examples", "held-out questions for the quick evaluation, never trained on (0 = none)", type=int)
    lg = p.add_argument_group("logging")
    add(lg, "--report-to", "experiment tracker", choices=list(REPORT_TO))
    add(lg, "--project-name", "tracker project name", type=str)
    add(lg, "--sample-every", "print a sample completion every N steps (0 = never)", type=int)
    add(lg, "--smoke", "tiny offline model on CPU, a few steps: checks the whole pipeline", action="store_true")
    if extra_args:
        extra_args(lambda flag, help, **kw: add(d, flag, help, **kw))
    return p


def whole_number_or_empty(value):
    """--batch-size's type: a whole number, or '' for None (num_generations)."""
    if not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, or '' for --num-generations; got {value!r}") from None


def in_notebook():
    """True inside a Jupyter/Colab/Kaggle kernel, whose own argv must not reach the parser."""
    return "ipykernel" in sys.modules or os.path.basename(sys.argv[0]).startswith("ipykernel")


def parse_settings(description, defaults, argv=None, extra_args=None, smoke=None):
    """DEFAULTS, then --smoke's overrides (SMOKE, then the script's ``smoke``), then the saved config
    on --resume, then the flags given."""
    defaults = {**COMMON_DEFAULTS, **defaults}
    parser = build_parser(description, defaults, extra_args)
    if argv is None:
        argv = [] if in_notebook() else sys.argv[1:]
    given = vars(parser.parse_args(argv))
    settings = {**defaults, **({**SMOKE, **(smoke or {})} if given.get("smoke") else {})}
    if given.get("smoke"):
        settings["output_dir"] += "-smoke"  # a smoke run never takes the real run's folder
    saved = os.path.join(given.get("output_dir", settings["output_dir"]), CONFIG_FILE)
    if given.get("resume") and os.path.exists(saved):
        with open(saved) as f:
            settings.update(json.load(f)["settings"])
        settings["resume"] = settings["overwrite"] = False
    settings.update(given)
    try:
        return validate(settings)
    except ValueError as e:
        parser.error(str(e))


def parse_reward_spec(spec):
    """'correctness_reward:2,format_exact_reward' -> {'correctness_reward': 2.0, 'format_exact_reward': 1.0}."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        try:
            weights[name] = float(weight) if weight else GSM8K_REWARD_WEIGHTS.get(name, 1.0)
        except ValueError:
            raise ValueError(f"--rewards: weight {weight!r} of {name} is not a number") from None
    get_reward_funcs(list(weights))  # raises on an unknown name
    if not weights:
        raise ValueError("--rewards: give at least one reward name")
    return weights


def validate(s):
    """Refuse settings that cannot work, with the reason; fix the batch only where unambiguous."""
    for key in ("max_steps", "num_generations", "max_completion_length", "lora_rank", "max_examples",
                "gradient_accumulation_steps", "save_steps"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {s[key]}")
    if s["num_generations"] < 2:
        raise ValueError("--num-generations must be at least 2: GRPO compares completions within a group")
    for key in ("eval_examples", "sample_every"):
        if s[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be 0 or more, got {s[key]}")
    if not s["learning_rate"] > 0 or not math.isfinite(s["learning_rate"]):
        raise ValueError(f"--learning-rate must be a positive number, got {s['learning_rate']}")
    if not s["temperature"] > 0 or not math.isfinite(s["temperature"]):
        raise ValueError(f"--temperature must be above 0, got {s['temperature']}: GRPO learns from the differences "
                         "between sampled completions, and 0 would make them all the same; 1.0 is usual")
    if s["batch_size"] is None:
        s["batch_size"] = s["num_generations"]  # one prompt's group per step: the unambiguous choice
    per_generation = s["batch_size"] * s["gradient_accumulation_steps"]
    if s["batch_size"] < 1 or per_generation % s["num_generations"]:
        raise ValueError(
            f"--batch-size x --gradient-accumulation-steps = {per_generation} must be a multiple of "
            f"--num-generations = {s['num_generations']} (each prompt's group of completions is scored "
            f"together); for example --batch-size {s['num_generations']}"
        )
    s["reward_weights"] = parse_reward_spec(s["rewards"])
    get_agents(s["agents"])  # raises on a bad spec
    if s["report_to"] not in TRACKERS:
        raise ValueError(f"--report-to must be one of {REPORT_TO}")
    packages = TRACKERS[s["report_to"]]
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ValueError(f"--report-to {s['report_to']}: the {packages[0]} package is not installed; "
                         f"pip install {packages[0]}, or leave --report-to at none")
    if os.path.exists(s["output_dir"]) and not os.path.isdir(s["output_dir"]):
        raise ValueError(f"--output-dir {s['output_dir']!r} is a file; give the path of a folder for the run")
    if s["resume"] and s["overwrite"]:
        raise ValueError("--resume and --overwrite contradict each other; give one")
    if s["model_name"] == models.DEFAULT_MODEL and not s["smoke"] and models.gpu_capability() is None:
        raise SystemExit(
            f"{models.DEFAULT_MODEL} needs a CUDA GPU, so nothing was downloaded: {models.no_gpu_reason()}.\n"
            "  Check the pipeline on this machine:  python " + os.path.basename(sys.argv[0]) + " --smoke\n"
            "  Train for real on a GPU (Colab, Kaggle or a 12-24 GB card), or pick a small --model-name."
        )
    return s


# ---------------------------------------------------------------------------- model

def pick_backend(s):
    """(backend, reason). Imports unsloth when it is used, before anything imports trl."""
    if s["model_name"] == "tiny":
        return "trl", "--smoke: tiny offline model on CPU"
    backend, reason = models.choose_backend(s["backend"])
    if backend == "unsloth" and not models.unsloth_patched_trl():
        print("Unsloth did not patch trl's GRPOTrainer (its warning above says why): this run trains with "
              "trl's own GRPOTrainer on the Unsloth model, without Unsloth's GRPO code and without vLLM.")
    return backend, reason


def load_model(s, backend):
    """(model with LoRA, tokenizer, vllm): vllm is True when the rollouts are generated with vLLM."""
    if s["model_name"] == "tiny":
        model, tokenizer = models.tiny_model_and_tokenizer(seed=s["seed"])
        # The random base lives only in this process: save it, so that the adapter can be reloaded.
        # The same seed makes the same model, so a resumed run writes the same files again.
        base_dir = os.path.abspath(os.path.join(s["output_dir"], "base-model"))
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        model.config._name_or_path = base_dir
        return models.add_lora(model, s["lora_rank"], s["seed"]), tokenizer, False
    if backend == "unsloth":
        return models.load_unsloth(
            s["model_name"], max_seq_length=s["max_seq_length"], lora_rank=s["lora_rank"], seed=s["seed"],
            fast_inference=models.vllm_available() and models.unsloth_patched_trl(),
        )
    gpu = models.gpu_capability() is not None
    model, tokenizer = models.load_pretrained(s["model_name"], quantize=gpu)
    model = models.add_lora(model, s["lora_rank"], s["seed"], gradient_checkpointing=gpu)
    return model, tokenizer, False


# ---------------------------------------------------------------------------- trainer

def make_trainer_class():
    """Subclass of whichever GRPOTrainer is current (Unsloth patches trl's on import)."""
    from trl import GRPOTrainer

    class KitGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that also logs the mean reward of each agent as agents/<name>/reward."""

        def __init__(self, *args, reward_weights=None, stop_strings=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kit_reward_weights = reward_weights
            self.agent_rewards = defaultdict(list)
            self.last_sample = None
            if stop_strings and not getattr(self, "use_vllm", False):
                # transformers' generate() needs the tokenizer to match stop strings; TRL doesn't pass it.
                generate, tokenizer = self.model.generate, self.processing_class

                def generate_with_tokenizer(*args, **kwargs):
                    kwargs.setdefault("tokenizer", tokenizer)
                    return generate(*args, **kwargs)

                self.model.generate = generate_with_tokenizer

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            n = len(inputs)
            logged = getattr(self, "_logs", {}).get("rewards", {})
            if "agent" in inputs[0] and logged:
                totals = torch.zeros(n)
                for name, weight in self.kit_reward_weights.items():
                    totals += weight * torch.tensor(list(logged[name])[-n:], dtype=torch.float).nan_to_num()
                for row, total in zip(inputs, totals.tolist()):
                    self.agent_rewards[row["agent"]].append(total)
                completion = list(self._logs["completion"])[-1]
                self.last_sample = (inputs[-1]["agent"], inputs[-1].get("answer"), completion, totals[-1].item())
            return out

        def log(self, logs, start_time=None):
            if self.model.training and self.agent_rewards:
                for agent, values in sorted(self.agent_rewards.items()):
                    logs[f"agents/{agent}/reward"] = sum(values) / len(values)
                self.agent_rewards.clear()
            super().log(logs, start_time)

    return KitGRPOTrainer


def make_progress(s, stats):
    """The progress bar with one fixed-format line per logging step, stats writing, the checkpoint at
    the last step, and the stop after a step that Ctrl-C asks for (``stop_requested``)."""
    from transformers import ProgressCallback

    stats_path = os.path.join(s["output_dir"], STATS_FILE)
    correct_key = next((f"rewards/{n}/mean" for n in s["reward_weights"] if "correct" in n), None)

    class KitProgress(ProgressCallback):
        def __init__(self):
            super().__init__()
            self.trainer = None  # set once the trainer exists, for its sample completions
            self.step_start = time.perf_counter()
            self.step_seconds = 0.0
            self.stop_requested = False

        def on_step_begin(self, args, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_seconds = time.perf_counter() - self.step_start
            super().on_step_end(args, state, control, **kw)
            if state.global_step >= state.max_steps:
                control.should_save = True  # always leave a checkpoint at the last step, for --resume
            if self.stop_requested:
                control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if "reward" not in logs:
                return
            entry = {"step": state.global_step, "step_time": round(self.step_seconds, 3), **logs}
            stats[:] = [e for e in stats if e["step"] < state.global_step] + [entry]
            write_json_atomic(stats_path, stats)
            fmt = lambda k, spec: format(logs[k], spec) if logs.get(k) is not None else "-"
            line = (
                f"step {state.global_step:>4}/{state.max_steps} | reward {fmt('reward', '.3f')} ± "
                f"{fmt('reward_std', '.3f')} | correct {fmt(correct_key, '.3f')} | "
                f"len {fmt('completions/mean_length', '.1f')} | zero_std {fmt('frac_reward_zero_std', '.2f')} | "
                f"{self.step_seconds:.2f} s/step"
            )
            write = self.training_bar.write if self.training_bar is not None else print
            write(line)
            sample = getattr(self.trainer, "last_sample", None)
            if s["sample_every"] and sample and state.global_step % s["sample_every"] == 0:
                agent, gold, completion, reward = sample
                write(f"  sample [{agent}] gold={gold} reward={reward:.2f}: {completion_text(completion)[:300]!r}")

    return KitProgress()


def grpo_config_kwargs(s, backend, tokenizer, vllm=False):
    """GRPOConfig's arguments. Precision and optimizer follow the GPU (models.gpu_capability()); the
    recipe is written out in full, so that Unsloth's config, which has other defaults, trains the same."""
    gpu = models.gpu_capability() is not None
    bf16 = models.bf16_supported()  # fp16 below Ampere, as Unsloth loads those cards
    kwargs = dict(
        output_dir=s["output_dir"],
        max_steps=s["max_steps"],
        learning_rate=s["learning_rate"],
        weight_decay=0.0,             # trl's default; Unsloth's config would make it 0.001
        torch_empty_cache_steps=None,  # trl's default; Unsloth's config would empty the CUDA cache every 250 steps
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=s["temperature"],
        reward_weights=list(s["reward_weights"].values()),
        beta=0.0,  # no KL term, so no reference model: one copy of the weights in memory
        logging_steps=1,
        save_steps=s["save_steps"],
        save_total_limit=2,
        report_to=[] if s["report_to"] == "none" else [s["report_to"]],
        project=s["project_name"],
        seed=s["seed"],
        use_cpu=not gpu,
        bf16=gpu and bf16,
        fp16=gpu and not bf16,
        # unsloth checkpoints its own way (use_gradient_checkpointing="unsloth"); the tiny CPU model needs none
        gradient_checkpointing=gpu and backend == "trl",
        lr_scheduler_type="cosine",
        warmup_steps=max(1, s["max_steps"] // 10),
        optim="adamw_8bit" if gpu else "adamw_torch",  # 8-bit Adam states save memory on a GPU
        disable_tqdm=False,
        shuffle_dataset=not s.get("curriculum", False),  # a curriculum keeps its easy-to-hard order
    )
    if s["prompt_style"] == "xml":
        if vllm:
            from vllm import SamplingParams

            kwargs["vllm_sampling_params"] = SamplingParams(stop=[STOP_TAG], include_stop_str_in_output=True)
        else:
            # After a stop string, transformers pads the row; padding with eos lets TRL mask it out.
            kwargs["generation_kwargs"] = {"stop_strings": [STOP_TAG], "pad_token_id": tokenizer.eos_token_id}
    return kwargs


def grpo_config(s, backend, tokenizer, vllm=False):
    from trl import GRPOConfig

    return GRPOConfig(**grpo_config_kwargs(s, backend, tokenizer, vllm))


# ---------------------------------------------------------------------------- outputs

def plot_rewards(stats, path):
    """rewards.png: the mean reward and each reward component over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in stats]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [e.get("reward") for e in stats], lw=2.5, color="black", label="reward (weighted sum)")
    for key in sorted({k for e in stats for k in e if k.startswith("rewards/") and k.endswith("/mean")}):
        ax.plot(steps, [e.get(key) for e in stats], lw=1, label=key.split("/")[1])
    ax.set(xlabel="step", ylabel="mean reward", title="GRPO rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path[:-4] + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def quick_eval(model, tokenizer, rows, agents, style, max_new_tokens):
    """Greedy answers of the first agent on held-out rows, generated and graded as evaluate.py does
    (rewards.extract_answer and is_correct): accuracy and format compliance."""
    from evaluate import STOPS, generate_answers, grade, render

    instruction = next(iter(get_agents(agents).values()))
    prompts = [render(tokenizer, instruction, r["question"], style) for r in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=8, stop=STOPS[style])
    records = [{"question": r["question"], "gold": r["answer"], **grade(text, r["answer"], style, tokens)}
               for r, [(text, tokens)] in zip(rows, answers)]
    n = len(records)
    return {"n": n, "agent": instruction, "accuracy": sum(r["correct"] for r in records) / n,
            "format_compliance": sum(r["strict_answer"] is not None for r in records) / n, "records": records}


# ---------------------------------------------------------------------------- main

def main(description, defaults, load_data, argv=None, extra_args=None, smoke=None):
    """Parse settings, check the run folder, data and model name, load the model, train with GRPO,
    save, evaluate, export. ``smoke``: the script's own overrides for --smoke."""
    try:
        return run_recipe(description, defaults, load_data, argv, extra_args, smoke)
    except KeyboardInterrupt:  # once training has begun, run_recipe says how to continue
        print("stopped by Ctrl-C before training began", flush=True)
        raise SystemExit(130) from None


def run_recipe(description, defaults, load_data, argv, extra_args, smoke):
    """main()'s steps. Everything that can be checked is checked before the run folder is touched."""
    from datasets import Dataset

    s = parse_settings(description, defaults, argv, extra_args, smoke)
    plan = runs.inspect_run(s)  # refuses a folder it must not touch; touches nothing
    if plan["action"] == "finished":
        print(runs.describe(s, plan))
        return s
    s["max_seq_length"] = s["max_prompt_length"] + s["max_completion_length"]
    backend, reason = pick_backend(s)  # imports unsloth, when used, before trl
    print(f"backend: {backend} ({reason})")
    export.check_exports(s["model_name"], s["save_merged"], s["save_gguf"], backend, reason)
    t0 = time.time()
    try:
        models.check_source(s["model_name"])  # fails fast when the hub cannot be asked
        train_rows, eval_rows = load_data(s)
    except (ValueError, OSError) as e:  # the loaders name the file, row or flag, and the fix
        raise SystemExit(str(e)) from None
    dataset = Dataset.from_list(
        expand_agents(list(train_rows), s["agents"], s["agent_sampling"], s["seed"], style=s["prompt_style"])
    )
    check_enough_data(s, len(train_rows), len(eval_rows), len(dataset))

    runs.prepare_run(s, plan)  # only now is an old run moved aside (--overwrite)
    what = runs.describe(s, plan)
    if what:
        print(what)
    model, tokenizer, vllm = load_model(s, backend)
    if backend == "unsloth":
        print("generation: " + ("vLLM" if vllm else "Unsloth's own generate (no vLLM)"))
    settings = {k: v for k, v in s.items() if k not in ("reward_weights", "max_seq_length")}
    write_json_atomic(os.path.join(s["output_dir"], CONFIG_FILE), {
        "settings": settings, "backend": backend, "backend_reason": reason, "vllm": vllm,
        "precision": str(models.compute_dtype()).removeprefix("torch."),
        "reward_weights": s["reward_weights"], "agents": get_agents(s["agents"]),
        "train_prompts": len(dataset), "versions": package_versions(),
    })
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

    resumed = plan["action"] in ("resume", "finish")
    stats = runs.load_stats(s["output_dir"], plan["step"]) if resumed else []
    try:
        step = train(s, plan, backend, model, tokenizer, vllm, dataset, stats)
        write_outputs(s, backend, model, tokenizer, stats, eval_rows)
        runs.mark_finished(s["output_dir"], step)
    except KeyboardInterrupt:  # a second Ctrl-C, or one after training: stop at once
        stop_message(s, stats, f"stopped by Ctrl-C at step {len(stats)}/{s['max_steps']}")
    # Exports come last: each can fail (hub, disk, llama.cpp) without costing what is saved above.
    failed = export.export_run(model, tokenizer, s["output_dir"], backend, s["model_name"],
                               merged=s["save_merged"], gguf=s["save_gguf"])
    print(f"done in {time.time() - t0:.1f} s; run folder: {s['output_dir']}")
    if failed:
        raise SystemExit(f"training and evaluation are saved, but {' and '.join(failed)} failed (see above)")
    return s


def check_enough_data(s, n_train, n_held_out, n_prompts):
    """Refuse, before the model loads, data too small for one GRPO step."""
    needed = s["batch_size"] * s["gradient_accumulation_steps"] // s["num_generations"]
    if n_prompts < needed:
        raise SystemExit(
            f"too little data to train on: {n_train} training questions ({n_prompts} prompts over the agents) "
            f"after {n_held_out} held out for the evaluation (--eval-examples {s['eval_examples']}); one GRPO step "
            f"needs {needed}. Give more rows (--dataset, --max-examples) or lower --eval-examples."
        )


def train(s, plan, backend, model, tokenizer, vllm, dataset, stats):
    """GRPO from step 0 or from the plan's checkpoint; returns the step reached. A run that reached
    --max-steps before it stopped ("finish") only takes its checkpoint's weights."""
    if plan["action"] == "finish":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(os.path.join(plan["checkpoint"], runs.ADAPTER_FILE)))
        return plan["step"]
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=get_reward_funcs(list(s["reward_weights"])),
        args=grpo_config(s, backend, tokenizer, vllm),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=None,
        reward_weights=s["reward_weights"],
        stop_strings=[STOP_TAG] if s["prompt_style"] == "xml" else None,
    )
    from transformers import ProgressCallback

    progress = make_progress(s, stats)
    progress.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    try:
        with ctrl_c_stops_after_step(progress):
            trainer.train(resume_from_checkpoint=plan["checkpoint"])
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(
            "CUDA out of memory. Lower, in this order: --num-generations, --max-completion-length, "
            "--batch-size (raise --gradient-accumulation-steps to compensate), --lora-rank."
        ) from None
    step = trainer.state.global_step
    if progress.stop_requested and step < s["max_steps"]:
        stop_message(s, stats, f"stopped by Ctrl-C at step {step}/{s['max_steps']}, checkpoint-{step} saved")
    return step


@contextlib.contextmanager
def ctrl_c_stops_after_step(progress):
    """The first Ctrl-C asks for a stop after the current step, with a checkpoint; a second one
    raises KeyboardInterrupt as usual. A notebook's interrupt button sends the same signal."""

    def request_stop(signum, frame):
        progress.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: stopping after this step, with a checkpoint; Ctrl-C again stops at once", flush=True)

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread, where only the default handling works
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def stop_message(s, stats, what):
    """Leave the plot of the steps so far, say how to continue, and exit 130 (as Ctrl-C does)."""
    if stats:
        plot_rewards(stats, os.path.join(s["output_dir"], "rewards.png"))
    checkpoint = runs.last_checkpoint(s["output_dir"])
    where = f"it continues from {os.path.basename(checkpoint)}" if checkpoint else "with no checkpoint yet it starts again"
    print(f"{what}; {where} with: {runs.resume_command(s['output_dir'])}", flush=True)
    raise SystemExit(130)


def write_outputs(s, backend, model, tokenizer, stats, eval_rows):
    """The adapter and tokenizer, rewards.png and the quick evaluation (eval.json)."""
    model.save_pretrained(s["output_dir"])  # the LoRA adapter: adapter_config.json + adapter_model.safetensors
    tokenizer.save_pretrained(s["output_dir"])
    if stats:
        plot_rewards(stats, os.path.join(s["output_dir"], "rewards.png"))
    if not s["skip_evaluation"] and eval_rows:
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            FastLanguageModel.for_inference(model)
        result = quick_eval(model, tokenizer, eval_rows, s["agents"], s["prompt_style"], s["max_completion_length"])
        write_json_atomic(os.path.join(s["output_dir"], "eval.json"), result)
        print(f"quick evaluation on {result['n']} held-out questions: accuracy {result['accuracy']:.3f}, "
              f"format compliance {result['format_compliance']:.3f}")


def package_versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "unsloth", "vllm", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out

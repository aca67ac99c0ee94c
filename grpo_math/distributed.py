"""More than one process (torchrun, accelerate launch): which one writes, and how the others follow.

    processes(), rank()   from the launcher's environment (WORLD_SIZE, RANK): 1 and 0 when run alone;
    local_rank()          LOCAL_RANK, the card of this process on its machine
    launch(n)             how to start this script on n processes: python SCRIPT, or torchrun ... SCRIPT
    is_main()             rank 0, the one process that decides what to do with the run folder, writes
                          it (config.json, training_stats.json, rewards.png, eval.json, the adapter,
                          the exports) and prints; the Trainer writes the checkpoints as it always does
    start()               joins the process group, before the run folder is decided (gloo on a CPU,
                          NCCL on GPUs); the others' output is silenced, their errors too until
                          show_errors(), so that a refusal is printed once
    decide(fn, *args)     fn(*args) on rank 0, its result (or its refusal) on every rank
    together()            every rank waits here for the others, with no time limit: rank 0 evaluates
                          alone while the others wait (a held-out evaluation can take minutes)
    anyone(flag)          True on every rank if it is True on any: a stop asked for by Ctrl-C or
                          SIGTERM ends every rank after the same step
    finish()              leaves the process group as the process ends (a process that exits inside
                          one aborts)

Run alone, every function is a no-op that returns what one process would: the scripts read the
same with one process or eight.
"""

import datetime
import os
import sys

import torch

# The ranks' own channel, on the CPU: gloo, whose waits outlast any evaluation. NCCL's collectives
# have a watchdog that ends the job after its timeout; nothing of ours waits on them.
NO_LIMIT = datetime.timedelta(days=7)
_state = {"group": None, "stderr": None}


def processes():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def local_rank():
    """This process's card on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch(n):
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "train_gsm8k.py"
    return f"python {script}" if n == 1 else f"torchrun --nproc_per_node {n} {script}"


def is_main():
    return rank() == 0


def start():
    """Join the launcher's process group now, the one the Trainer will use, and open the ranks' channel."""
    if processes() == 1 or _state["group"] is not None:
        return
    from accelerate import PartialState  # torch and accelerate only: nothing that Unsloth patches

    PartialState(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        # accelerate places each CPU process on the device "cpu:0", so the Trainer resumes with
        # torch.load(..., map_location="cpu:0"), whose location torch cannot restore ("don't know how
        # to restore data location ... (tagged with cpu:0)"): an indexed CPU is the CPU.
        torch.serialization.register_package(9, lambda obj: None, _indexed_cpu)  # 9: before the CPU's own 10
    _state["group"] = torch.distributed.new_group(backend="gloo", timeout=NO_LIMIT)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the settings, the progress and the samples
        _state["stderr"], sys.stderr = sys.stderr, open(os.devnull, "w")


def _indexed_cpu(storage, location):
    return storage if location.startswith("cpu:") else None


def show_errors():
    """From here on, every rank's errors are printed: past the refusals, an error is this rank's own."""
    if _state["stderr"] is not None:
        sys.stderr, _state["stderr"] = _state["stderr"], None


def decide(fn, *args):
    """fn(*args) on rank 0, and its result on every rank; a refusal (SystemExit) ends every rank, and
    only rank 0 prints it."""
    if processes() == 1:
        return fn(*args)
    box = [None]
    if is_main():
        try:
            box[0] = ("result", fn(*args))
        except SystemExit as e:
            box[0] = ("exit", e.code)
    torch.distributed.broadcast_object_list(box, src=0, group=_state["group"])
    kind, value = box[0]
    if kind == "exit":
        raise SystemExit(value if is_main() else 1)
    return value


def together():
    if processes() > 1:
        torch.distributed.barrier(group=_state["group"])


def anyone(flag):
    if processes() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_state["group"])
    return bool(t.item())


def finish():
    if processes() > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _state["group"] = None

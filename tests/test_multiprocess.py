"""More than one process: torchrun and accelerate launch, two processes on the CPU, over gloo on 127.0.0.1.

One process decides and writes (config.json, training_stats.json, the adapter, eval.json) and
prints; every process trains; a stop reaches them all after the same step; a kill of one leaves a
run that --resume continues; the global batch is checked before anything loads. The runs go side
by side, each process on one thread, to keep CI short.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SCRIPT_ENV, forks, stats_of
from forks import CLIENT

PY = sys.executable
# gloo binds where the host name resolves, which can be another interface: keep every process on loopback
ENV = {**SCRIPT_ENV, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
SMOKE = ["--smoke", "--max-steps", "3", "--num-generations", "4", "--batch-size", "2"]  # a group spans both
STEP_LINE = "step    {}/{} | reward"


# Each launcher's rendezvous binds port 0 on 127.0.0.1, so the kernel picks a free port as it binds: no
# number is chosen first and handed on later, when a launch beside it may have taken it.
RENDEZVOUS = ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]


# The launcher and each of its workers are clients of a fork server (tests/forks.py): each is started as a
# process of its own, which the server stands in for with a fork that skips importing the libraries.
def torchrun(*args):
    return [PY, *CLIENT, "-m", "torch.distributed.run", "--nproc_per_node", "2", *RENDEZVOUS, *CLIENT, *args]


def accelerate_launch(*args):
    # --multi_gpu is how a GPU user asks for several processes; on a machine without CUDA they train on
    # the CPU over gloo. (accelerate's --cpu flag starts one process unless MPI is set up.) With the c10d
    # rendezvous, accelerate makes 127.0.0.1:0 its endpoint, as above.
    return [PY, *CLIENT, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--rdzv_backend", "c10d",
            "--main_process_ip", "127.0.0.1", "--main_process_port", "0", *CLIENT, *args]


class Launch:
    """A launcher started in a session of its own (as a terminal's job), its output in a file."""

    def __init__(self, command, log, env=None, server=None):
        self.log = log
        env = {**os.environ, **ENV, "FORKS_SOCKET": (server or forks()).socket, **(env or {})}
        with open(log, "w") as f:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True, env=env)

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait(self, timeout=420):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:  # the launcher ends its processes (each in a session of its own) on
                os.kill(self.proc.pid, signal.SIGTERM)  # SIGTERM, within its 30 s shutdown timeout
                try:
                    self.proc.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode, self.output()


def all_side_by_side(tmp):
    """Every launch of the module, started together; each scenario's first runs, then their --resumes."""
    out = {name: str(tmp / name) for name in ("torchrun", "accelerate", "kill", "ctrl-c", "sigterm", "unsloth")}
    faults = os.path.join(ROOT, "tests", "faults.py")
    harness = os.path.join(ROOT, "tests", "unsloth_cpu.py")
    (tmp / "scratch").mkdir()
    first = {
        "torchrun": Launch(torchrun("train_synthetic.py", *SMOKE, "--output-dir", out["torchrun"]), tmp / "1.log"),
        "accelerate": Launch(accelerate_launch("train_gsm8k.py", *SMOKE, "--rewards", "unique_chars_reward",
                                               "--output-dir", out["accelerate"]), tmp / "2.log"),
        "kill": Launch(torchrun(faults, "kill-rank-1-after-step-3", "train_synthetic.py", *SMOKE, "--max-steps", "5",
                                "--output-dir", out["kill"]), tmp / "3.log"),
        "ctrl-c": Launch(torchrun(faults, "ctrl-c-after-step-2", "train_synthetic.py", *SMOKE, "--max-steps", "6",
                                  "--output-dir", out["ctrl-c"]), tmp / "4.log"),
        "sigterm": Launch(torchrun("train_synthetic.py", *SMOKE, "--max-steps", "400", "--save-steps", "1000",
                                   "--skip-evaluation", "--output-dir", out["sigterm"]), tmp / "5.log"),
        "unsloth": Launch(torchrun(harness, "train", "--gpu", "ampere", "--out", str(tmp / "scratch"), "--",
                                   *SMOKE, "--backend", "unsloth", "--model-name", "stand-in/tiny-qwen2",
                                   "--learning-rate", "5e-3", "--output-dir", out["unsloth"]), tmp / "6.log",
                          # ACCELERATE_USE_CPU: the harness's card is simulated, so the Trainer would ask
                          # accelerate for CUDA processes; this gives it gloo's, on the CPU. The server imported
                          # Unsloth with its compile off, as --max-steps 3 asks (conftest.forks).
                          env={"ACCELERATE_USE_CPU": "1"}, server=forks(unsloth="off")),
    }
    try:
        # SIGTERM to the launcher (a scheduler's, or `kill`), once the run has trained a few steps
        sigterm, deadline = first["sigterm"], time.monotonic() + 300
        while STEP_LINE.format(3, 400) not in sigterm.output() and sigterm.proc.poll() is None:
            assert time.monotonic() < deadline, sigterm.output()[-3000:]
            time.sleep(0.2)
        os.kill(sigterm.proc.pid, signal.SIGTERM)
    finally:  # every launch ends here, also when the wait above fails
        done = {name: launch.wait() for name, launch in first.items()}
    after = {name: {"stats": stats_of(out[name]) if os.path.exists(os.path.join(out[name], "training_stats.json"))
                    else [], "checkpoints": sorted(f for f in os.listdir(out[name]) if f.startswith("checkpoint-"))}
             for name in ("kill", "ctrl-c", "sigterm")}
    resumed = {
        "kill": Launch(torchrun("train_synthetic.py", "--resume", "--output-dir", out["kill"]), tmp / "7.log"),
        "ctrl-c": Launch(torchrun("train_synthetic.py", "--resume", "--output-dir", out["ctrl-c"]), tmp / "8.log"),
    }
    one = forks().run(["train_synthetic.py", "--resume", "--output-dir", out["torchrun"], "--max-steps", "5"])
    return {"out": out, "first": done, "after": after, "resumed": {n: r.wait() for n, r in resumed.items()},
            "one_process_resume": one.result(timeout=300), "scratch": tmp / "scratch"}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    return all_side_by_side(tmp_path_factory.mktemp("multiprocess"))


def reloads(run):
    """The run's adapter, loaded onto its base as a user would, equals the file it was saved to."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(run, "base-model")), run)
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    return saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_with_one_writer(launched, launcher):
    code, output = launched["first"][launcher]
    run = launched["out"][launcher]
    assert code == 0, output[-4000:]
    stats = stats_of(run)
    assert [e["step"] for e in stats] == [0, 1, 2, 3]  # once each: one process wrote them
    assert all(e["grad_norm"] > 0 for e in stats[1:])  # both trained: the group's completions differ
    for step in (1, 2, 3):
        assert output.count(STEP_LINE.format(step, 3)) == 1, output[-4000:]
    assert output.count("settings: ") == 1 and "processes=2, global_batch=4" in output
    assert output.count("quick evaluation of the kept adapter (step 3)") == 1 and output.count("backend: trl") == 1
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["settings"]["processes"] == 2 and config["finished_step"] == 3
    # each process's random state, as the Trainer writes them: the checkpoint continues on two processes
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(os.path.join(run, "checkpoint-3")))
    assert os.path.exists(os.path.join(run, "eval.json")) and os.path.exists(os.path.join(run, "rewards.png"))
    assert reloads(run)


def test_a_kill_of_one_process_leaves_a_run_that_resume_continues(launched):
    code, output = launched["first"]["kill"]
    assert code != 0
    after = launched["after"]["kill"]
    assert after["checkpoints"] == ["checkpoint-2"], output[-4000:]
    assert [e["step"] for e in after["stats"]][-1] in (2, 3)
    code, output = launched["resumed"]["kill"]
    assert code == 0, output[-4000:]
    assert "resuming from checkpoint-2 (step 2/5)" in output
    assert [e["step"] for e in stats_of(launched["out"]["kill"])] == [0, 1, 2, 3, 4, 5]


def test_ctrl_c_to_one_process_stops_both_after_the_same_step(launched):
    """SIGINT reaches the first process after step 2's line (as faults.py sends it): both processes
    stop after step 3, the step under way, with one checkpoint, as a single process does."""
    code, output = launched["first"]["ctrl-c"]
    assert code != 0 and output.count("stopped by Ctrl-C at step 3/6, checkpoint-3 saved") == 1, output[-4000:]
    after = launched["after"]["ctrl-c"]
    assert after["checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    assert [e["step"] for e in after["stats"]] == [0, 1, 2, 3]
    code, output = launched["resumed"]["ctrl-c"]
    assert code == 0 and "resuming from checkpoint-3 (step 3/6)" in output, output[-4000:]
    assert [e["step"] for e in stats_of(launched["out"]["ctrl-c"])] == [0, 1, 2, 3, 4, 5, 6]


def test_sigterm_to_the_launcher_stops_every_process_after_one_step(launched):
    code, output = launched["first"]["sigterm"]
    after = launched["after"]["sigterm"]
    assert code != 0 and len(after["checkpoints"]) == 1, output[-4000:]
    step = int(after["checkpoints"][0].removeprefix("checkpoint-"))
    assert 3 <= step < 400 and [e["step"] for e in after["stats"]] == list(range(1, step + 1))  # no step 0:
    # --skip-evaluation
    assert output.count(f"stopped by SIGTERM at step {step}/400, checkpoint-{step} saved") == 1, output[-4000:]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(os.path.join(
        launched["out"]["sigterm"], after["checkpoints"][0])))


def test_resume_with_another_process_count_is_refused(launched):
    proc = launched["one_process_resume"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--resume: this run trained with 2 processes and this launch has 1. Resume it with 2 (torchrun " \
           "--nproc_per_node 2 train_synthetic.py --resume ...)" in proc.stderr
    assert "backend:" not in proc.stdout  # before anything loads


def test_unsloths_trainer_syncs_gradients_across_two_processes(launched):
    """Unsloth's GRPO loss runs the unwrapped model, so DDP's own all-reduce never fires; Unsloth's
    wrapper of training_step (unsloth/models/rl.py, _wrap_grpo_ddp_gradient_sync) averages the
    gradients instead. Both processes end with the same LoRA weights, moved from the start."""
    from safetensors.torch import load_file

    code, output = launched["first"]["unsloth"]
    assert code == 0, output[-4000:]
    result = json.loads([line for line in output.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    assert result["trainer_bases"] == ["KitGRPOTrainer", "UnslothGRPOTrainer"] and result["ddp_sync_wrapped"]
    assert result["lora"]["b_moved"] == result["lora"]["b_tensors"] > 0
    rank0, rank1 = (load_file(launched["scratch"] / f"lora-rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    stats = stats_of(launched["out"]["unsloth"])
    assert [e["step"] for e in stats] == [0, 1, 2, 3] and all(e["grad_norm"] > 0 for e in stats[1:])
    assert "processes=2, global_batch=4" in output


@pytest.mark.parametrize("flags, numbers", [
    (["--num-generations", "4", "--batch-size", "3"],
     "--batch-size 3 x 2 processes x --gradient-accumulation-steps 1 = 6"),
    (["--num-generations", "8", "--batch-size", "2", "--gradient-accumulation-steps", "3"],
     "--batch-size 2 x 2 processes x --gradient-accumulation-steps 3 = 12"),
])
def test_a_global_batch_that_splits_a_group_is_refused_before_loading(flags, numbers):
    proc = subprocess.run(torchrun("train_synthetic.py", "--smoke", *flags, "--output-dir", "/nonexistent/run"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV, "FORKS_SOCKET": forks().socket})
    assert proc.returncode != 0
    line = f"error: the global batch, {numbers} must be a multiple of --num-generations"
    assert (proc.stdout + proc.stderr).count(line) == 1, proc.stderr[-3000:]  # printed once, by the first process
    assert "backend:" not in proc.stdout and "Traceback (most recent call last):\n  File \"/" not in proc.stdout


def test_each_process_loads_onto_its_own_card(monkeypatch):
    """The trl backend's 4-bit load used to put every process on card 0."""
    from grpo_math import models

    monkeypatch.setattr(models, "gpu_capability", lambda: (8, 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    kwargs = models.load_kwargs(quantize=True)
    assert kwargs["device_map"] == {"": 1} and kwargs["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    # under ZeRO-3 DeepSpeed places the weights, and shards the 4-bit ones stored in the compute dtype
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    kwargs = models.load_kwargs(quantize=True)
    assert "device_map" not in kwargs
    assert kwargs["quantization_config"].bnb_4bit_quant_storage == kwargs["dtype"] == torch.bfloat16


def test_deepspeed_takes_the_trl_backend_and_refuses_unsloth(monkeypatch):
    from grpo_math import models

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(models, "gpu_capability", lambda: (8, 0))
    backend, reason = models.choose_backend("auto")
    assert backend == "trl" and reason.startswith("DeepSpeed: the kit runs Unsloth on several GPUs with plain data")
    with pytest.raises(SystemExit, match="--backend unsloth under DeepSpeed: .* Or use --backend trl"):
        models.choose_backend("unsloth")


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_the_accelerate_configs_load(name):
    """accelerate reads each shipped config as the launcher would (DeepSpeed itself is not installed here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "accelerate_configs", f"{name}.yaml"))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp" else "DEEPSPEED")
    if name != "ddp":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])

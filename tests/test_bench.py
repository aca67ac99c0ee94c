"""bench/bench.py: the --smoke run end to end on the CPU (its child, bench_worker.py, included), and the
arithmetic behind its figures."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import bench, bench_worker
from conftest import forks
from grpo_math import models

FIGURES = ("step_s", "generation_s", "train_s", "tokens_per_s", "decode_tokens_per_s",
           "decode_bound_tokens_per_s", "decode_efficiency", "weight_mib", "kv_cache_mib")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `python -m bench.bench --smoke --json` run, shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("bench") / "x.json"
    # forked from the session's server, and so is each backend's worker process (tests/forks.py)
    proc = forks().run(["-m", "bench.bench", "--smoke", "--json", path], launches_forked=True).result(timeout=300)
    assert proc.returncode == 0, f"bench.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(path) as f:
        return proc.stdout, json.load(f)


def test_smoke_writes_every_figure_as_a_finite_positive_number(smoke):
    _, result = smoke
    trl = result["backends"]["trl"]
    for key in FIGURES:
        assert isinstance(trl[key], float) and math.isfinite(trl[key]) and trl[key] > 0, (key, trl[key])
    assert trl["generation_s"] < trl["step_s"]  # generation is one part of the step
    # 1 warm-up + 2 timed steps, each with one generation call of G = 4 completions of at most 16 tokens
    assert len(trl["steps"]) == 3
    assert all(0 < step["tokens"] <= 4 * 16 for step in trl["steps"])
    assert trl["generation_timer"] == "_generate_single_turn"  # the innermost call, not scoring


def test_smoke_says_unsloth_was_skipped_and_memory_is_not_applicable(smoke):
    stdout, result = smoke
    assert "unsloth: skipped (unsloth needs a CUDA GPU; --smoke runs on the CPU)" in stdout
    assert "skipped" in result["backends"]["unsloth"]
    assert result["backends"]["trl"]["peak_allocated_gib"] is None  # no CUDA device: "n/a"
    assert "peak GPU memory: n/a" in stdout
    assert "step time, median (s)" in stdout  # the table was printed
    from bench.gpu_check import BENCH_FIGURES

    for key in BENCH_FIGURES:  # each row names its figure as the JSON and the GPU check do
        assert f" {key} " in stdout, key
    # where it ran and with what
    assert "device: CPU" in stdout and "versions: torch" in stdout
    assert result["settings"]["smoke"] and result["versions"]["trl"]
    if not models.vllm_available():
        assert "vLLM: not installed" in stdout


def test_smoke_prints_each_step_as_it_ends(smoke):
    # a run stopped at its time limit (the GPU check's parts) shows in its log how far it got, and when
    stdout, result = smoke
    assert "trl imported: " in stdout and "model loaded: " in stdout
    for step in (1, 2, 3):
        assert f"step {step}: " in stdout, step
    assert result["finished"] is True


def test_a_run_killed_in_its_second_backend_keeps_the_first_ones_figures(tmp_path, monkeypatch):
    path, seen, real_run = tmp_path / "x.json", {}, subprocess.run

    def run(cmd, **kw):  # the unsloth child: read what is on disk, then stop as a time limit would
        if "unsloth" not in cmd:
            return real_run(cmd, **kw)
        with open(path) as f:
            seen.update(json.load(f))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "plan_backends", lambda a, cuda: (["trl", "unsloth"], {}))
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(subprocess, "Popen", forks().popen())  # the trl worker, forked
    monkeypatch.setattr(sys, "argv", ["bench.py", "--smoke", "--json", str(path)])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    assert seen["finished"] is False
    assert seen["backends"]["trl"]["step_s"] > 0 and "unsloth" not in seen["backends"]


@pytest.mark.parametrize("values, warmup, expected, why", [
    ([10.0, 9.0, 1.0, 2.0, 3.0], 2, 2.0, "the two slow warm-up steps are left out"),
    ([5.0, 1.0, 2.0, 3.0, 4.0], 1, 2.5, "an even count of timed steps: the mean of the middle two"),
    ([7.0], 0, 7.0, "no warm-up"),
])
def test_median_timed_leaves_out_the_warmup(values, warmup, expected, why):
    assert bench_worker.median_timed(values, warmup) == expected, why


def test_median_timed_refuses_a_run_with_no_timed_step():
    with pytest.raises(ValueError, match="no timed steps"):
        bench_worker.median_timed([1.0, 2.0], warmup=2)


def test_kv_cache_bytes_of_the_default_workload():
    # Qwen2.5-1.5B: 28 layers, 2 kv heads, head_dim 1536 / 12 = 128; G = 8 sequences at the average
    # context 150 + 256 / 2 = 278 tokens, bf16 (2 bytes):
    # 2 (k and v) * 28 * 2 * 128 * 278 * 8 * 2 = 63,766,528 bytes, about 60.8 MiB
    assert bench_worker.kv_cache_bytes(28, 2, 128, 150 + 256 / 2, 8, 2) == 63_766_528


def test_weight_bytes_counts_storage_and_quantization_scales():
    # nn.Linear(4, 3) in fp32: (4 * 3 weights + 3 biases) * 4 bytes = 60; in bf16, half of it
    assert bench_worker.weight_bytes(torch.nn.Linear(4, 3)) == 60
    assert bench_worker.weight_bytes(torch.nn.Linear(4, 3).to(torch.bfloat16)) == 30
    # a bitsandbytes-style 4-bit weight: 16 weights packed in 8 uint8 bytes, 2 fp32 block scales and,
    # with double quantization, 1 more fp32 scale: 8 + 2 * 4 + 1 * 4 = 20 bytes
    module = torch.nn.Module()
    packed = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(absmax=torch.zeros(2), state2=SimpleNamespace(absmax=torch.zeros(1)))
    module.register_parameter("weight", packed)
    assert bench_worker.weight_bytes(module) == 20


def test_summarize_decode_efficiency_by_hand():
    records = [{"step_s": 9.0, "generation_s": 8.0, "tokens": 2048}] + [
        {"step_s": 3.0, "generation_s": 2.0, "tokens": 2048}] * 3
    out = bench_worker.summarize(records, warmup=1, batch=8, completion_length=256, weights=0.9e9, kv_bytes=0.1e9,
                          bandwidth=2e12)
    assert (out["step_s"], out["generation_s"], out["train_s"]) == (3.0, 2.0, 1.0)  # the warm-up step is left out
    assert out["tokens_per_s"] == 1024.0  # 2048 tokens / 2 s
    assert out["decode_tokens_per_s"] == 1024.0  # 8 sequences * 256 tokens / 2 s
    # 1e9 bytes read per decode step at 2e12 B/s: 2,000 steps/s of 8 tokens = 16,000 tokens/s
    assert out["decode_bound_tokens_per_s"] == pytest.approx(16_000)
    assert out["decode_efficiency"] == pytest.approx(1024 / 16_000)  # 6.4%


def test_each_agent_sets_median_leaves_the_warm_up_out():
    steps = [9.0, 2.0, 3.0, 4.0, 5.0, 1.0]  # step 1 (the warm-up) is the first set's and the slowest
    records = [{"step_s": s, "agents": ("core", "1")[i % 2]} for i, s in enumerate(steps)]
    assert bench_worker.by_agents(records, warmup=1) == {"1": 2.0, "core": 4.0}  # medians of 2, 4, 1 and 3, 5


def test_a_generation_batch_is_timed_on_its_second_call():
    # 32 completions, 8 a step: 8 steps, a generation call at steps 1 and 5; the first call warms up
    records = ([{"step_s": 20.0, "generation_s": 19.0, "tokens": 8192}] + [{"step_s": 1.0, "generation_s": 0.0,
               "tokens": 0}] * 3) * 2
    records[4] = {"step_s": 12.0, "generation_s": 11.0, "tokens": 8192}
    out = bench_worker.generation_batch_figures(records, 32)
    assert (out["generation_s"], out["tokens"], out["steps"], out["window_s"]) == (11.0, 8192, 4, 15.0)
    assert out["tokens_per_s"] == pytest.approx(8192 / 11)
    assert out["s_per_completion"] == pytest.approx(15 / 32)  # generation and training of the 32, per completion


@pytest.mark.parametrize("a, b, expected", [
    (3.0, 1.5, 2.0),  # unsloth takes twice as long as trl
    (1.0, 4.0, 0.25),
    (None, 1.0, None),  # a backend that did not run
    (1.0, None, None),
    (1.0, 0.0, None),  # no division by zero
])
def test_ratio(a, b, expected):
    assert bench.ratio(a, b) == expected


def test_the_timed_generation_method_exists_in_this_trl():
    # The timer wraps the first of GENERATION_METHODS the trainer has; the innermost must be there,
    # or generation time would silently include scoring after a trl upgrade.
    from trl import GRPOTrainer

    assert hasattr(GRPOTrainer, next(iter(bench_worker.GENERATION_METHODS)))

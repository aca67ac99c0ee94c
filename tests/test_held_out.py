"""Held-out accuracy during training (--eval-every, grpo_math/held_out.py): when it runs, where its
figures go (training_stats.json, the progress line, the trainer's log that the trackers read,
rewards.png), that it leaves training as it found it, that --resume keeps it, and the
reward-hacking warning."""

import json
import os
import time
import types

import pytest

from conftest import run_script, side_by_side, stats_of
from grpo_math import best, held_out, progress

SCRIPT = "train_synthetic.py"
EVAL_KEYS = {held_out.ACCURACY, held_out.FORMAT, held_out.SECONDS}


def evaluated_steps(stats):
    return [e["step"] for e in stats if EVAL_KEYS <= set(e)]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Side by side, on the tiny model (4 steps, a checkpoint every 2): --eval-every 2, --eval-every 0,
    and --eval-every 2 killed once step 3's stats are written; then --resume of the killed run."""
    base = tmp_path_factory.mktemp("held-out")
    out = {name: str(base / name) for name in ("every-2", "off", "killed")}
    commands = [[SCRIPT, "--smoke", "--eval-every", "2", "--output-dir", out["every-2"]],
                [SCRIPT, "--smoke", "--eval-every", "0", "--output-dir", out["off"]],
                [os.path.join("tests", "faults.py"), "kill-after-step-3", SCRIPT, "--smoke", "--eval-every", "2",
                 "--output-dir", out["killed"]]]
    first = side_by_side(commands)
    for proc in first[:2]:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert first[2].returncode == -9, first[2].stderr[-3000:]
    killed_stats = stats_of(out["killed"])
    resumed = run_script(SCRIPT, "--resume", "--output-dir", out["killed"])
    return {"out": out, "every-2": first[0], "off": first[1], "killed_stats": killed_stats, "resumed": resumed}


def test_eval_every_2_scores_at_step_0_then_every_2_steps(smoke_runs):
    out, proc = smoke_runs["out"]["every-2"], smoke_runs["every-2"]
    stats = stats_of(out)
    assert [e["step"] for e in stats] == [0, 1, 2, 3, 4]
    assert evaluated_steps(stats) == [0, 2, 4]  # the baseline, every 2 steps, and the last
    assert "reward" not in stats[0]  # the baseline is an entry of its own, before any training
    assert all("reward" in e for e in stats[1:])  # logged as training steps, back in training mode
    assert all(0 <= e[k] <= 1 for e in stats for k in (held_out.ACCURACY, held_out.FORMAT) if k in e)
    lines = {line.split("|")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith("step ")}
    baseline = lines["step    0/4"]
    assert baseline.startswith("step    0/4 | eval acc ") and baseline.endswith("| before training")
    assert "| eval acc " in lines["step    2/4"] and "| eval acc " in lines["step    4/4"]
    assert "eval acc" not in lines["step    1/4"] + lines["step    3/4"]
    assert os.path.exists(os.path.join(out, "rewards.png"))
    # the evaluations score the selection questions, the quick evaluation after training others
    quick = json.load(open(os.path.join(out, "eval.json")))
    selected = best.read(out)["questions"]
    assert quick["n"] == 2 and len(selected) == 8 and not {r["question"] for r in quick["records"]} & set(selected)


def test_the_results_go_through_the_trainers_log(smoke_runs):
    """The trackers (--report-to) receive what the trainer logs; log_history, saved in each checkpoint,
    holds the same records."""
    state = json.load(open(os.path.join(smoke_runs["out"]["every-2"], "checkpoint-4", "trainer_state.json")))
    assert [e["step"] for e in state["log_history"] if held_out.ACCURACY in e] == [0, 2, 4]
    step_2 = next(e for e in state["log_history"] if e["step"] == 2)
    assert "reward" in step_2 and held_out.FORMAT in step_2  # one log for the step and its evaluation


def test_eval_every_0_scores_nothing_during_training(smoke_runs):
    stats = stats_of(smoke_runs["out"]["off"])
    assert [e["step"] for e in stats] == [1, 2, 3, 4] and evaluated_steps(stats) == []
    assert "eval acc" not in smoke_runs["off"].stdout
    # nothing selected: no RUN/best/, the run says so, and the quick evaluation scores the last adapter
    assert best.read(smoke_runs["out"]["off"]) is None
    assert "no adapter was selected (held-out evaluation during training was off" in smoke_runs["off"].stdout
    assert "quick evaluation of the last adapter (step 4)" in smoke_runs["off"].stdout


def test_evaluations_leave_training_as_it_was(smoke_runs):
    """Back in training mode, and the random state restored (the greedy generation reseeds torch): the
    run samples the same rollouts and takes the same steps as one without evaluations."""
    every_2, off = (stats_of(smoke_runs["out"][name]) for name in ("every-2", "off"))
    trained = [e for e in every_2 if "reward" in e]
    assert [e["reward"] for e in trained] == [e["reward"] for e in off]
    assert [e["grad_norm"] for e in trained] == pytest.approx([e["grad_norm"] for e in off])


def test_resume_keeps_the_evaluations_and_does_not_redo_the_baseline(smoke_runs):
    killed, resumed = smoke_runs["killed_stats"], stats_of(smoke_runs["out"]["killed"])
    assert evaluated_steps(killed) == [0, 2]  # killed after step 3, checkpoint-2 is the newest
    assert "resuming from checkpoint-2" in smoke_runs["resumed"].stdout
    assert [e["step"] for e in resumed] == [0, 1, 2, 3, 4] and evaluated_steps(resumed) == [0, 2, 4]
    assert resumed[:3] == killed[:3]  # the baseline and step 2's evaluation, as first written (seconds too)
    assert "before training" not in smoke_runs["resumed"].stdout
    straight = stats_of(smoke_runs["out"]["every-2"])
    assert [e.get(held_out.ACCURACY) for e in resumed] == [e.get(held_out.ACCURACY) for e in straight]


def test_generation_mid_training_with_gradient_checkpointing(tmp_path, monkeypatch, capsys):
    """The trl backend on a GPU trains with gradient checkpointing (grpo_config), which must neither
    break an evaluation between steps nor be lost by it. Each evaluation generates in eval mode, with
    the KV cache (after the prompt, one new token per forward pass); then training goes on in training
    mode, checkpointing still on. An evaluation made to take 100 s shows in eval/seconds, not in the
    progress line's s/step."""
    from datasets import Dataset

    import train_synthetic
    from agents import expand_agents
    from data import synthetic_problems
    from grpo_math import grpo_trainer, models, settings
    from rewards import STOP_TAG, get_reward_funcs

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", "--max-steps", "2", "--eval-every", "1",
                                "--output-dir", str(tmp_path)], train_synthetic.add_args)
    model, tokenizer = models.tiny_model_and_tokenizer()
    model = models.add_lora(model, s["lora_rank"])
    args = train_synthetic.grpo_config(s, "trl", tokenizer)
    args.gradient_checkpointing = True  # as grpo_config sets it on a GPU
    rows = synthetic_problems(8, "easy", seed=s["seed"]).to_list()
    trainer = grpo_trainer.make_trainer_class()(
        model=model, reward_funcs=get_reward_funcs(list(s["reward_weights"])), args=args,
        train_dataset=Dataset.from_list(expand_agents(rows, s["agents"], "all", s["seed"], style="xml")),
        processing_class=tokenizer, reward_weights=s["reward_weights"], stop_strings=[STOP_TAG],
    )
    seen, lengths, offset = [], [], [0.0]
    model.get_input_embeddings().register_forward_pre_hook(lambda module, a: lengths.append(a[0].shape[1]))
    clock, quick_eval = time.perf_counter, held_out.quick_eval
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + offset[0])

    def observed_quick_eval(m, *a, **kw):
        lengths.clear()
        seen.append({"training": m.training})
        result = quick_eval(m, *a, **kw)
        seen[-1]["lengths"] = list(lengths)
        offset[0] += 100.0  # the clock jumps: an evaluation of 100 s
        return result

    monkeypatch.setattr(held_out, "quick_eval", observed_quick_eval)
    evaluation = held_out.evaluation(model, tokenizer, synthetic_problems(2, "easy", seed=s["seed"] + 1).to_list(),
                                     s, "trl")
    stats = []
    with progress.watch(trainer, s, stats, evaluation):
        trainer.train()

    assert trainer.model.base_model.model.is_gradient_checkpointing
    assert len(seen) == 3  # steps 0, 1 and 2
    for evaluated in seen:
        assert not evaluated["training"]
        prompt, *decode = evaluated["lengths"]
        assert prompt > 1 and decode and set(decode) == {1}  # the cache holds the prefix
    assert model.training  # back in training mode
    assert evaluated_steps(stats) == [0, 1, 2]
    assert all(e["eval/seconds"] >= 100 for e in stats)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    seconds_per_step = [float(line.split(" s/step")[0].rsplit("| ", 1)[1]) for line in lines[1:]]
    assert len(seconds_per_step) == 2 and max(seconds_per_step) < 100  # the steps' own time
    assert [e["step"] for e in trainer.state.log_history if "reward" in e] == [1, 2]  # logged as training steps


def test_help_says_what_the_default_costs(capsys):
    """The cost in --eval-every's help is the measured one of the default N (the module docstring of
    grpo_math/held_out.py and the README give the figures); a new default needs a new figure."""
    import train_synthetic
    from grpo_math import settings

    with pytest.raises(SystemExit) as exc:
        settings.parse_settings("test", train_synthetic.DEFAULTS, ["--help"], train_synthetic.add_args)
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = settings.COMMON_DEFAULTS
    assert (defaults["eval_every"], defaults["select_examples"]) == (20, 200)  # the measured ones
    assert f"there is one, else generate(): {' '.join(settings.EVAL_COST.split())}" in help_text
    assert "118 s per 100 questions with generate() and 21 s with vLLM" in help_text
    assert "ships a 10-point loss in under 2%" in help_text


def stats_with(accuracies, rewards):
    """An evaluation at steps 0, 2, 4, ... (``accuracies``) and the mean reward of steps 1, 2, 3, ..."""
    stats = [{"step": 0, held_out.ACCURACY: accuracies[0]}]
    for step, reward in enumerate(rewards, start=1):
        stats.append({"step": step, "reward": reward})
        if step % 2 == 0 and step // 2 < len(accuracies):
            stats[-1][held_out.ACCURACY] = accuracies[step // 2]
    return stats


@pytest.mark.parametrize("accuracies, rewards, warned", [
    # reward up ((0.4 + 0.42) / 2 = 0.41 to (0.8 + 0.94) / 2 = 0.87), accuracy down: the reward is being gamed
    ([0.5, 0.375, 0.25], [0.4, 0.42, 0.8, 0.94], True),
    ([0.25, 0.375, 0.5], [0.4, 0.42, 0.8, 0.94], False),  # both up: learning
    ([0.5, 0.375, 0.25], [0.9, 0.8, 0.5, 0.4], False),  # both down: worse, but not by gaming the reward
    ([0.5, 0.5, 0.5], [0.4, 0.42, 0.8, 0.94], False),  # accuracy unchanged has not fallen
    ([0.5, 0.25], [0.4, 0.9], False),  # two evaluations: no "before" window to compare with
    ([1.0, 0.25, 0.375, 0.5], [0.1, 0.2, 0.4, 0.42, 0.8, 0.94], False),  # only the last 3 count: up from 0.25
])
def test_reward_hacking_rule(accuracies, rewards, warned):
    warning = held_out.reward_hacking_warning(stats_with(accuracies, rewards))
    assert (warning is not None) == warned


def test_reward_hacking_warning_gives_the_figures():
    assert held_out.reward_hacking_warning(stats_with([0.5, 0.375, 0.25], [0.4, 0.42, 0.8, 0.94])) == (
        "warning: the reward rose from 0.41 to 0.87 over the last 3 evaluations (steps 0-4) while held-out "
        "accuracy fell from 0.50 to 0.25: the policy may be exploiting the reward; check the sample completions")


def test_progress_prints_the_figures_and_the_warning_once(tmp_path, capsys):
    s = {"output_dir": str(tmp_path), "reward_weights": {"correctness_reward": 1.0}, "sample_every": 0}
    stats = []
    callback = progress.make_progress(s, stats)
    state = types.SimpleNamespace(global_step=0, max_steps=8)
    # accuracy falls at every evaluation while the reward climbs: the rule holds at steps 4, 6 and 8
    for entry in stats_with([0.5, 0.375, 0.25, 0.125, 0.0], [0.4, 0.42, 0.8, 0.94, 1.0, 1.1, 1.2, 1.3]):
        state.global_step = entry.pop("step")
        logs = {**entry, held_out.FORMAT: 1.0, held_out.SECONDS: 2.0} if held_out.ACCURACY in entry else entry
        callback.on_log(None, state, None, logs=logs)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "step    0/8 | eval acc 0.500 fmt 1.00 (2.0 s) | before training"
    assert printed[1].startswith("step    1/8 | reward 0.400 ± - |") and "eval" not in printed[1]
    assert printed[2].endswith("s/step | eval acc 0.375 fmt 1.00 (2.0 s)")
    assert [line for line in printed if line.startswith("warning:")] == [printed[5]]  # once, after step 4's line
    assert printed[4].startswith("step    4/8")
    assert [e["step"] for e in json.load(open(tmp_path / "training_stats.json"))] == list(range(9))


def test_a_held_out_prompt_too_long_for_the_training_engine_is_answered_by_generate():
    """The engine that samples the rollouts has a context of the longest training prompt + the completion
    (prompt_budget.fit_prompts); a held-out prompt beyond it goes to generate(), in its place in the answers."""
    from types import SimpleNamespace

    from grpo_math import models, vllm_engine
    from grpo_math.evaluation import generate_answers

    model, tokenizer = models.tiny_model_and_tokenizer()
    model.eval()
    short, long = "Maya has 3 apples.", "Maya has 3 apples. " * 20
    context = len(tokenizer(short, add_special_tokens=False)["input_ids"]) + 4

    class Engine(vllm_engine._TrainingEngine):
        def generate(self, prompts, max_new_tokens, **kwargs):
            self.asked = prompts
            return [[("from the engine", 1)] for _ in prompts]

    engine = Engine(model, tokenizer, SimpleNamespace(llm_engine=SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=context))))
    out = engine.answers([short, long, short], 4)
    assert engine.asked == [short, short]
    assert out[0] == out[2] == [("from the engine", 1)]
    assert out[1] == generate_answers(model, tokenizer, [long], 4)[0] and out[1] != out[0]

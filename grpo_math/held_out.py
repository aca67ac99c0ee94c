"""Held-out accuracy during training (--eval-every N): a rising reward is no proof of learning.

    evaluation(model, tokenizer, rows, s, backend)
        the trainer callback that scores the held-out rows (--eval-examples of them, never trained on)
        before the first step of a fresh run (step 0, the baseline), every N optimizer steps, and at
        the last step. It scores them as evaluate.quick_eval does after training: the first agent's
        greedy answers, graded with rewards.is_correct. Off with --eval-every 0, --eval-examples 0 or
        --skip-evaluation.
    reward_hacking_warning(stats)
        the line to print when, over the last 3 evaluations, the mean reward rose while held-out
        accuracy fell: the policy may be exploiting the reward rather than learning the task

Each result (eval/accuracy, eval/format_compliance, and eval/seconds, the evaluation's wall time)
goes through the trainer's log, so that the trackers (--report-to) receive it like TRL's metrics;
progress.py puts it on the step's entry in training_stats.json and on its progress line. An
evaluation after step N joins step N's own log; the baseline is logged on its own, as the entry
{"step": 0, "eval/accuracy": ...}, which has no reward.

An evaluation leaves training as it found it: the model goes back to training mode (on the unsloth
backend with FastLanguageModel.for_training, which turns its gradient checkpointing back on), and
the random state is restored, so that the rollouts sampled after it are those of a run without it.
It runs after the step's time is taken: s/step on the progress line is the step's own time.

What it costs: quick_eval generates --eval-examples greedy answers in batches of 8, where a step
samples --num-generations completions and trains on them. Measured in the learning check
(BENCHMARKS.md, with its command: SmolLM2-135M on a 2-core CPU, 16 questions, 8 completions a step):
the evaluations after step 0 took 22-25 s against about 19 s a step, and the four of the 60-step run
cost 9.1% of its training time, the first of them slowed by another job. On a 20-step --smoke run:
9.5%. The evaluations at step 0 and at the last step are fixed costs, so longer runs pay less. Where
vLLM samples the rollouts, the steps are faster and the share larger.
"""

import contextlib
import time

import torch

from evaluate import quick_eval
from grpo_math import distributed, tools

ACCURACY, FORMAT, SECONDS = "eval/accuracy", "eval/format_compliance", "eval/seconds"


def evaluation(model, tokenizer, rows, s, backend):
    """The trainer callback that scores the held-out rows at step 0 (a fresh run), every s["eval_every"]
    steps and at the last. transformers is imported here, not at the top: on a GPU, unsloth must be
    imported before it (models.pick_backend), or it patches too late and warns."""
    from transformers import TrainerCallback

    class Evaluation(TrainerCallback):
        def __init__(self):
            self.model, self.tokenizer, self.rows, self.s, self.backend = model, tokenizer, rows, s, backend
            self.every = 0 if s["skip_evaluation"] or not rows else s["eval_every"]
            self.trainer = None  # set by progress.watch: the results are logged through it

        def on_train_begin(self, args, state, control, **kwargs):
            if self.every and state.global_step == 0:  # a resumed run has its baseline already
                result = self.evaluate(args)
                if result:
                    self.trainer.log(result)

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if self.every and (step % self.every == 0 or step >= state.max_steps):
                self.trainer.extra_logs.update(self.evaluate(args))  # joins this step's log
                control.should_log = True

        def evaluate(self, args):
            """The figures, on the first process; with several, the others wait for it (and get {})."""
            result = self.score(args) if distributed.is_main() else {}
            distributed.together()
            return result

        def score(self, args):
            start = time.perf_counter()
            with torch.random.fork_rng(), generating(self.model, self.backend, args.gradient_checkpointing):
                result = quick_eval(self.model, self.tokenizer, self.rows, s["agents"], s["prompt_style"],
                                    s["max_completion_length"], examples=s["worked_examples"],
                                    tools=tools.get_tools(s["tools"]), max_tool_calls=s["max_tool_calls"])
            return {ACCURACY: result["accuracy"], FORMAT: result["format_compliance"],
                    SECONDS: round(time.perf_counter() - start, 3)}

    return Evaluation()


@contextlib.contextmanager
def generating(model, backend, gradient_checkpointing):
    """The model set for generation (eval mode: the KV cache on, gradient checkpointing idle), then
    back to training. Unsloth switches its own fast paths, as after training (models.for_inference)."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    else:
        model.eval()
    try:
        yield
    finally:
        if backend == "unsloth":
            # The checkpointing chosen when the LoRA was added, as Unsloth's GRPO trainer restores it.
            checkpointing = getattr(model, "_unsloth_gradient_checkpointing", gradient_checkpointing)
            FastLanguageModel.for_training(model, use_gradient_checkpointing=checkpointing)
        else:
            model.train()


def reward_hacking_warning(stats):
    """The warning line when the mean reward rose while held-out accuracy fell over the last 3
    evaluations, else None. With evaluations a, b, c (the last three entries holding eval/accuracy),
    the reward "before" is the mean reward of the steps after a up to b, "after" that of the steps
    after b up to c; it warns when after > before and c's accuracy is below a's."""
    evals = [e for e in stats if e.get(ACCURACY) is not None][-3:]
    if len(evals) < 3:
        return None
    a, b, c = (e["step"] for e in evals)
    before = [e["reward"] for e in stats if a < e["step"] <= b and e.get("reward") is not None]
    after = [e["reward"] for e in stats if b < e["step"] <= c and e.get("reward") is not None]
    if not before or not after:
        return None
    reward_before, reward_after = sum(before) / len(before), sum(after) / len(after)
    accuracy_before, accuracy_after = evals[0][ACCURACY], evals[-1][ACCURACY]
    if reward_after <= reward_before or accuracy_after >= accuracy_before:
        return None
    return (f"warning: the reward rose from {reward_before:.2f} to {reward_after:.2f} over the last 3 evaluations "
            f"(steps {a}-{c}) while held-out accuracy fell from {accuracy_before:.2f} to {accuracy_after:.2f}: "
            "the policy may be exploiting the reward; check the sample completions")

"""Held-out accuracy during training (--eval-every N): a rising reward is no proof of learning.

    due(step, N, max_steps)
        whether a step is scored: step 0 (a fresh run's baseline), N/4 and N/2 (steps 5 and 10 for
        N = 20: a collapse can come early), every N steps, and the last
    evaluation(model, tokenizer, rows, s, backend)
        the trainer callback that scores the selection rows (--select-examples of them, never trained
        on, apart from the --eval-examples of the quick evaluation after training) at those steps:
        the first agent's greedy answers (evaluation.quick_eval), graded with rewards.is_correct as
        evaluate.py grades. Where vLLM samples the rollouts (TRL's colocate mode, or Unsloth's
        fast_inference), that engine answers, with the weights of the step just trained
        (vllm_engine.training_engine); no second engine is started. Elsewhere generate() does.
        Each result goes to best.Keeper, which applies the rule (the last adapter, unless an earlier
        model is clearly better), saves the kept adapter in RUN/best/ and counts the evaluations at
        which an earlier model won, for --stop-after-worse. Off with --eval-every 0,
        --select-examples 0 or --skip-evaluation.
    reward_hacking_warning(stats)
        the line to print when, over the last 3 evaluations, the mean reward rose while held-out
        accuracy fell: the policy may be exploiting the reward rather than learning the task

Each result (eval/accuracy, eval/format_compliance, eval/seconds, the evaluation's wall time, and
eval/best_step, the step kept so far) goes through the trainer's log, so that the trackers
(--report-to) receive it like TRL's metrics; progress.py puts it on the step's entry in
training_stats.json and on its progress line. An evaluation after step N joins step N's own log;
the baseline is logged on its own, as the entry {"step": 0, "eval/accuracy": ...}, which has no
reward. The kept step and its accuracy also go into the trainer's state (best_global_step,
best_metric), saved in each checkpoint's trainer_state.json.

An evaluation leaves training as it found it: the model goes back to training mode (on the unsloth
backend with FastLanguageModel.for_training, which turns its gradient checkpointing back on), and
the random state is restored, so that the rollouts sampled after it are those of a run without it.
It runs after the step's time is taken: s/step on the progress line is the step's own time.

What it costs (BENCHMARKS.md, "What an evaluation costs"): an evaluation answers --select-examples
questions (200), greedily. SmolLM2-135M on a 2-core CPU, answers of up to 48 tokens: 118 s per 100
questions with generate() in batches of 16, 21 s with vLLM in float32. At the default N = 20 a run
pays for 0, 5, 10, every 20 and the last: 16 evaluations in 250 steps. On a GPU, generate() takes
them in one batch, estimated (not measured) at about one step's generation each, 6-8% of a run; on a
CPU they cost more than the training, and --select-examples or --eval-every are what to lower.
"""

import contextlib
import time

import torch

from grpo_math import best, distributed, tools, vllm_engine
from grpo_math.evaluation import quick_eval

ACCURACY, FORMAT, SECONDS = "eval/accuracy", "eval/format_compliance", "eval/seconds"
BEST_STEP = "eval/best_step"  # the step kept so far (best.py), 0 for the base model


def due(step, every, max_steps):
    """True when step ``step`` is evaluated: every ``every`` steps, at the last, and twice early, at a
    quarter and half of ``every`` (steps 5 and 10 for 20): the learning check's collapse happened within
    its first 20 steps, and a step scored only at 20 is seen after the fall."""
    if not every:
        return False
    return step % every == 0 or step >= max_steps or (every >= 4 and step in (every // 4, every // 2))


def evaluation(model, tokenizer, rows, s, backend):
    """The trainer callback that scores the selection rows at step 0 (a fresh run), at the steps due()
    names, and at the last; each result goes to best.Keeper, which saves the kept adapter in RUN/best/.
    transformers is imported here, not at the top: on a GPU, unsloth must be imported before it
    (models.pick_backend), or it patches too late and warns."""
    from transformers import TrainerCallback

    class Evaluation(TrainerCallback):
        def __init__(self):
            self.model, self.tokenizer, self.rows, self.s, self.backend = model, tokenizer, rows, s, backend
            self.every = 0 if s["skip_evaluation"] or not rows else s["eval_every"]
            self.trainer = None  # set by progress.watch: the results are logged through it
            self.keeper = best.Keeper(s["output_dir"], model, tokenizer)
            self.said = False  # which engine answers: said at the first evaluation

        def on_train_begin(self, args, state, control, **kwargs):
            if not self.every:
                return
            if state.global_step == 0:
                result = self.evaluate(args, state)
                if result:
                    self.trainer.log(result)
            elif distributed.is_main():  # a resumed run has its baseline already, and its best so far
                self.keeper.resume()

        def on_step_end(self, args, state, control, **kwargs):
            if due(state.global_step, self.every, state.max_steps):
                self.trainer.extra_logs.update(self.evaluate(args, state))  # joins this step's log
                control.should_log = True
                if self.s["stop_after_worse"] and self.stop(state):
                    control.should_training_stop = control.should_save = True

        def evaluate(self, args, state):
            """The figures, on the first process; with several, the others wait for it (and get {})."""
            result = distributed.decide(self.score, args, state)
            # The kept step on every process: the Trainer's checkpoint save waits for the others where it is set.
            state.best_global_step, state.best_metric = result.pop("kept")
            return result if distributed.is_main() else {}

        def score(self, args, state):
            start = time.perf_counter()
            # vLLM answers where it samples the rollouts; with --tools, generate() runs the kit's tool loop
            engine = vllm_engine.training_engine(self.trainer, self.model, self.tokenizer) \
                if self.trainer and not s["tools"] else None
            if not self.said:
                print(f"held-out evaluation: {len(self.rows)} questions, answered by "
                      f"{'vLLM, the engine that samples the rollouts' if engine else 'generate()'}", flush=True)
                self.said = True
            with torch.random.fork_rng(), generating(self.model, self.backend, args.gradient_checkpointing):
                result = quick_eval(self.model, self.tokenizer, self.rows, s["agents"], s["prompt_style"],
                                    s["max_completion_length"], examples=s["worked_examples"],
                                    tools=tools.get_tools(s["tools"]), max_tool_calls=s["max_tool_calls"],
                                    thinking=s["thinking"], engine=engine)
            seconds = round(time.perf_counter() - start, 3)
            kept = self.keeper.update(state.global_step, result)  # what it keeps is saved before training goes on
            return {ACCURACY: result["accuracy"], FORMAT: result["format_compliance"], SECONDS: seconds,
                    BEST_STEP: kept["step"], "kept": (kept["step"], kept["accuracy"])}  # in trainer_state.json

        def stop(self, state):
            """--stop-after-worse K: True on every process once K evaluations in a row found an earlier model
            clearly better than the latest step (best.Keeper.worse_in_a_row)."""
            k = self.s["stop_after_worse"]
            if not distributed.anyone(distributed.is_main() and self.keeper.worse_in_a_row >= k):
                return False
            if distributed.is_main():
                kept = self.keeper.best["step"]
                print(f"stopped early at step {state.global_step}: {k} evaluation{'s' * (k > 1)} in a row clearly "
                      f"below an earlier model; the kept one is {f'step {kept}' if kept else 'the base model'} "
                      f"(--stop-after-worse {k})", flush=True)
            return True

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

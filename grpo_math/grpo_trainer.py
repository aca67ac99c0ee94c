"""KitGRPOTrainer: TRL's GRPOTrainer, or Unsloth's rewrite of it, plus what the kit needs on top.

    per-agent rewards  each agent's mean reward is logged as agents/<name>/reward, beside TRL's
                       rewards/<name>/mean, reward, reward_std and frac_reward_zero_std
    tool use           with tools (--tools), beside TRL's tools/call_frequency (calls per completion)
                       and tools/failure_frequency (failed calls per call, where a tool's error string
                       counts as a failure too, not only an exception): the share of correct answers
                       among completions that called a tool, tools/accuracy_with_call, and among those
                       that did not, tools/accuracy_without_call
    a sample           the last completion of each step, for the progress line's sample
    fp16 training      the trainable weights stay fp32 (T4, V100), where TRL casts a quantized model's to bf16
    extra_logs         metrics that join the next log, and so the trackers: the held-out
                       evaluation of held_out.py
    the rollouts       generation_args(): GRPOConfig's arguments for whoever samples them, and the
                       XML prompt form's stop at </response>. Unsloth's vLLM takes the stop in its
                       vllm_sampling_params field; TRL's colocate mode (vLLM in this process, on the
                       same device) in generation_kwargs, which TRL hands to vLLM's SamplingParams;
                       transformers' generate() as stopping_criteria, made once (evaluation.stop_criteria)
    vLLM on a CPU      sync_vllm_weights(): the trained weights reach vLLM through its own reload
                       path, because vLLM's CPU kernels repack its weights and TRL's sync cannot
                       load into them

The class is made by make_trainer_class() when it is needed, not on import: Unsloth replaces trl's
GRPOTrainer when it is imported, and the kit's class must subclass whichever is current.
"""

import functools
from collections import defaultdict

import torch

from grpo_math import tools
from grpo_math.answers import completion_text, extract_answer, is_correct
from grpo_math.calculator import ERROR_PREFIX
from grpo_math.evaluation import stop_criteria
from rewards import STOP_TAG


def make_trainer_class():
    """Subclass of whichever GRPOTrainer is current (Unsloth patches trl's on import)."""
    from accelerate.utils import gather_object
    from trl import GRPOTrainer

    class KitGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that also logs the mean reward of each agent as agents/<name>/reward."""

        def __init__(self, *args, reward_weights=None, stop_strings=None, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.fp16 and not self.args.bf16:
                # TRL casts a 4-bit or 8-bit model's trainable (LoRA) weights to bf16 whatever the precision,
                # and fp16's GradScaler cannot unscale bf16 gradients: the first optimizer step would fail.
                # Under fp16 autocast they stay fp32 master weights, as add_lora made them. The optimizer
                # is built in train(), from the weights as they are now.
                for param in self.model.parameters():
                    if param.requires_grad and param.dtype != torch.float32:
                        param.data = param.data.float()
            self.kit_reward_weights = reward_weights
            self.agent_rewards = defaultdict(list)
            self.last_sample = None
            self.tool_outcomes = []  # (called a tool, correct) per completion, until the next log
            self.tool_completions = None  # the last batch's completions, as the tool loop left them
            self.extra_logs = {}  # added to the next log (held_out.evaluation puts its results here)
            trl_colocate = getattr(self, "vllm_generation", None) is not None and self.args.vllm_mode == "colocate"
            if trl_colocate and GRPOTrainer.__name__ == "GRPOTrainer" and not torch.cuda.is_available():  # not Unsloth's
                self.vllm_generation.sync_weights = functools.partial(sync_vllm_weights, self.vllm_generation)
            self.stop_criteria = None
            if stop_strings and not getattr(self, "use_vllm", False):
                # transformers' generate() takes the stop strings' matcher, made once for the run: given the
                # strings instead, it would make it again at every step (evaluation.stop_criteria says why).
                generate = self.model.generate
                self.stop_criteria = stop_criteria(self.processing_class, stop_strings)

                def generate_with_stop(*args, **kwargs):
                    kwargs.setdefault("stopping_criteria", self.stop_criteria)
                    return generate(*args, **kwargs)

                self.model.generate = generate_with_stop

        def _tool_call_loop(self, *args, **kwargs):
            out = list(super()._tool_call_loop(*args, **kwargs))
            completions = out[1]
            # TRL counts a tool that raised; the kit's tools answer an error string instead, which fails too.
            out[5] += sum(str(m.get("content")).startswith(ERROR_PREFIX) for c in completions for m in c
                          if m.get("role") == "tool")
            self.tool_completions = completions
            return tuple(out)

        def _generate_and_score_completions(self, inputs):
            self.tool_completions = None
            out = super()._generate_and_score_completions(inputs)
            if self.tool_completions is not None and "answer" in inputs[0]:
                self.tool_outcomes += gather_object([
                    (tools.outcome(c)[0] > 0, is_correct(extract_answer(completion_text(c)), row["answer"]))
                    for c, row in zip(self.tool_completions, inputs)])
            logged = getattr(self, "_logs", {}).get("rewards", {})
            if "agent" in inputs[0] and logged:
                # TRL logs every process's rewards, gathered in process order: gather the rows the same way.
                rows = gather_object([(row["agent"], row.get("answer")) for row in inputs])
                n = len(rows)
                totals = torch.zeros(n)
                for name, weight in self.kit_reward_weights.items():
                    totals += weight * torch.tensor(list(logged[name])[-n:], dtype=torch.float).nan_to_num()
                for (agent, _), total in zip(rows, totals.tolist()):
                    self.agent_rewards[agent].append(total)
                completion = list(self._logs["completion"])[-1]
                self.last_sample = (*rows[-1], completion, totals[-1].item())
            return out

        def log(self, logs, start_time=None):
            if self.model.training and self.agent_rewards:
                for agent, values in sorted(self.agent_rewards.items()):
                    logs[f"agents/{agent}/reward"] = sum(values) / len(values)
                self.agent_rewards.clear()
            if self.model.training and self.tool_outcomes:
                for key, called in (("tools/accuracy_with_call", True), ("tools/accuracy_without_call", False)):
                    correct = [ok for c, ok in self.tool_outcomes if c == called]
                    if correct:  # none called (or all did): no figure, rather than a 0
                        logs[key] = sum(correct) / len(correct)
                self.tool_outcomes.clear()
            logs.update(self.extra_logs)
            self.extra_logs.clear()
            super().log(logs, start_time)

    return KitGRPOTrainer


def generation_args(s, backend, tokenizer, vllm=False):
    """GRPOConfig's arguments for the rollouts: who samples them, the xml form's stop at </response>
    (chat answers end with the end-of-turn token), and with --tools, the rounds of tool calls."""
    args = _sampler_args(s, backend, tokenizer, vllm)
    if s.get("tool_names"):
        args["max_tool_calling_iterations"] = s["max_tool_calls"]
    return args


# vLLM samples with its own kernels (and in bf16 on a CPU), so its token probabilities differ a little from
# the trained model's. Each token's loss is reweighted by the trained model's probability over vLLM's, the
# ratio capped at 2: truncated importance sampling (TIS, fengyao.notion.site/off-policy-rl), per token.
# Not TRL 1.14's default, "sequence_mask" (cap 3), which multiplies the ratios over the whole completion and
# drops a completion whose product passes the cap: over a few hundred tokens small differences add up, and a
# dropped completion takes its share of the group's advantage with it. Nor Unsloth's default, no correction.
# Set on both backends, so that they train alike and both log TRL's sampling/ figures (progress.sampler_drift).
IMPORTANCE_SAMPLING = dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
                           vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=2.0)


def _sampler_args(s, backend, tokenizer, vllm):
    stop = s["prompt_style"] == "xml"
    if vllm and backend == "unsloth":  # Unsloth started vLLM with the model (fast_inference=True)
        args = dict(IMPORTANCE_SAMPLING)
        if stop:
            from vllm import SamplingParams

            args["vllm_sampling_params"] = SamplingParams(stop=[STOP_TAG], include_stop_str_in_output=True)
        return args
    if vllm:  # TRL's colocate mode: vLLM in this process, loaded from model.name_or_path
        args = dict(
            use_vllm=True, vllm_mode="colocate",
            # Its share of the GPU's memory, for its weights and KV cache; lower it if out of memory. On a
            # CPU, its KV cache takes VLLM_CPU_KVCACHE_SPACE GiB instead (models.prepare_vllm).
            vllm_gpu_memory_utilization=s.get("gpu_memory_utilization") or 0.3,
            # Its context: the longest prompt + --max-completion-length (prompt_budget.fit_prompts), as on unsloth.
            vllm_max_model_length=s.get("max_seq_length"),
            **IMPORTANCE_SAMPLING,
        )
        if stop:
            args["generation_kwargs"] = {"stop": [STOP_TAG], "include_stop_str_in_output": True}
        return args
    if not stop:
        return {}
    # After a stop string, transformers pads the row; padding with eos lets TRL mask it out. The stop itself
    # reaches generate() from KitGRPOTrainer(stop_strings=...), as its stopping_criteria.
    return {"generation_kwargs": {"pad_token_id": tokenizer.eos_token_id}}


def sync_vllm_weights(generation):
    """TRL's colocate sync of the trained weights (LoRA merged) into vLLM, for vLLM on a CPU.
    There, vLLM's UnquantizedLinearMethod.process_weights_after_loading repacks each linear layer's
    weight for its CPU kernels and drops the original parameter, so TRL's per-tensor
    model.load_weights() fails ('Parameter' object has no attribute 'weight_loader'). vLLM's own
    reload_weights restores the layers, loads the same tensors and repacks them."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params())
    generation.llm.reset_prefix_cache()

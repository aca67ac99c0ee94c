"""KitGRPOTrainer: TRL's GRPOTrainer, or Unsloth's rewrite of it, plus what the kit needs on top.

    per-agent rewards  each agent's mean reward is logged as agents/<name>/reward, beside TRL's
                       rewards/<name>/mean, reward, reward_std and frac_reward_zero_std
    a sample           the last completion of each step, for the progress line's sample
    extra_logs         metrics that join the next log, and so the trackers: the held-out
                       evaluation of held_out.py
    stop strings       the XML prompt form ends its answer at </response>: vLLM stops there through
                       its SamplingParams, transformers' generate() through stop_strings
                       (stop_at(): the GRPOConfig arguments for either)

The class is made by make_trainer_class() when it is needed, not on import: Unsloth replaces trl's
GRPOTrainer when it is imported, and the kit's class must subclass whichever is current.
"""

from collections import defaultdict

import torch

from rewards import STOP_TAG


def make_trainer_class():
    """Subclass of whichever GRPOTrainer is current (Unsloth patches trl's on import)."""
    from trl import GRPOTrainer

    class KitGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that also logs the mean reward of each agent as agents/<name>/reward."""

        def __init__(self, *args, reward_weights=None, stop_strings=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kit_reward_weights = reward_weights
            self.agent_rewards = defaultdict(list)
            self.last_sample = None
            self.extra_logs = {}  # added to the next log (held_out.evaluation puts its results here)
            if stop_strings and not getattr(self, "use_vllm", False):
                # transformers' generate() needs the tokenizer to match stop strings; TRL doesn't pass it.
                generate, tokenizer = self.model.generate, self.processing_class

                def generate_with_tokenizer(*args, **kwargs):
                    kwargs.setdefault("tokenizer", tokenizer)
                    return generate(*args, **kwargs)

                self.model.generate = generate_with_tokenizer

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            n = len(inputs)
            logged = getattr(self, "_logs", {}).get("rewards", {})
            if "agent" in inputs[0] and logged:
                totals = torch.zeros(n)
                for name, weight in self.kit_reward_weights.items():
                    totals += weight * torch.tensor(list(logged[name])[-n:], dtype=torch.float).nan_to_num()
                for row, total in zip(inputs, totals.tolist()):
                    self.agent_rewards[row["agent"]].append(total)
                completion = list(self._logs["completion"])[-1]
                self.last_sample = (inputs[-1]["agent"], inputs[-1].get("answer"), completion, totals[-1].item())
            return out

        def log(self, logs, start_time=None):
            if self.model.training and self.agent_rewards:
                for agent, values in sorted(self.agent_rewards.items()):
                    logs[f"agents/{agent}/reward"] = sum(values) / len(values)
                self.agent_rewards.clear()
            logs.update(self.extra_logs)
            self.extra_logs.clear()
            super().log(logs, start_time)

    return KitGRPOTrainer


def stop_at(style, tokenizer, vllm=False):
    """GRPOConfig's arguments that end the XML prompt form's answers at </response>; none for chat,
    whose answers end with the end-of-turn token."""
    if style != "xml":
        return {}
    if vllm:
        from vllm import SamplingParams

        return {"vllm_sampling_params": SamplingParams(stop=[STOP_TAG], include_stop_str_in_output=True)}
    # After a stop string, transformers pads the row; padding with eos lets TRL mask it out.
    return {"generation_kwargs": {"stop_strings": [STOP_TAG], "pad_token_id": tokenizer.eos_token_id}}

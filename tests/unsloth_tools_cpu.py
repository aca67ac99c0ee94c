"""--tools calculator on the unsloth backend: one GRPO step of the kit's trainer over Unsloth's generated
UnslothGRPOTrainer, on a CPU, in a process of its own (Unsloth patches trl for the whole process).

    python tests/unsloth_tools_cpu.py --gpu ampere --out SCRATCH

Unsloth is imported and patches trl as on a GPU, and the GPU is simulated, as tests/unsloth_cpu.py does
(its docstring lists the stand-ins; this file uses 1, the simulated card, 4, PEFT's LoRA with
Unsloth's for_training and for_inference attached, and 11, the loss's output head in fp32). The model
is the scripted one of tests/test_tools.py: a calculator call, then the answer. Unsloth keeps TRL's tool loop
(_tool_call_loop and _get_tool_suffix_ids are TRL's), and its own loss takes TRL's tool_mask:
unsloth/models/rl_replacements.py compute_loss hands it to unsloth_zoo's grpo_accumulated_loss, which
multiplies it into the mask it repacks (align_completion_tool_mask). This run records that loss's
arguments and the mask it used, and prints "RESULT <json>" last.
"""

import argparse
import functools
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from unsloth_cpu import import_unsloth, simulate_gpu  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", choices=["t4", "ampere"], default="ampere")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import_unsloth(patch_trl=True)
    simulate_gpu(args.gpu)

    import trl
    from datasets import Dataset
    from unsloth.models.llama import FastLlamaModel

    import train_gsm8k
    from agents import expand_agents
    from grpo_math import grpo_trainer, models, settings, tools
    from rewards import correctness_reward
    from test_tools import QUESTION, qwen_tokenizer, scripted_model

    s = settings.parse_settings("test", train_gsm8k.DEFAULTS, [
        "--smoke", "--tools", "calculator", "--agents", "calculator", "--max-steps", "1", "--num-generations", "8",
        "--max-completion-length", "96", "--rewards", "correctness_reward", "--output-dir", args.out],
        train_gsm8k.add_args)
    tokenizer = tools.check_tokenizer(qwen_tokenizer(), "Qwen2.5 (test)", True, "unsloth")
    # Half the tiny model's width (heads of 16): the step computes its logits over Qwen's 151,665 tokens, in bf16
    # but for the loss's output head (tests/unsloth_cpu.py, stand-in 11); nothing here reads the model's width.
    model = scripted_model(tokenizer, "6*7", "21", hidden_size=64)
    model = models.add_lora(model.to(models.compute_dtype()), s["lora_rank"])
    model.for_training = functools.partial(FastLlamaModel.for_training, model)  # what get_peft_model attaches
    model.for_inference = functools.partial(FastLlamaModel.for_inference, model)
    dataset = Dataset.from_list(expand_agents([QUESTION], {"calc": "Use the calculator."}, "all", style="chat"))
    module = sys.modules[trl.GRPOTrainer.__module__]  # the generated UnslothGRPOTrainer's
    seen, loss = {}, module.grpo_accumulated_loss

    def recording(*a, **kw):
        out = loss(*a, **kw)
        seen.update(tool_mask=kw.get("tool_mask"), input_ids=kw["input_ids"].clone(), final_mask=out[6].detach())
        return out

    module.grpo_accumulated_loss = recording
    trainer = grpo_trainer.make_trainer_class()(
        model=model, reward_funcs=[correctness_reward], args=train_gsm8k.grpo_config(s, "unsloth", tokenizer),
        train_dataset=dataset, processing_class=tokenizer, reward_weights={"correctness_reward": 1.0},
        tools=tools.get_tools(s["tools"]))
    trainer.train()
    log = trainer.state.log_history[0]
    # What the loss trained on: Unsloth moves padding to the left and keeps the last columns, as its mask.
    packed = module.left_pack_padding(seen["input_ids"], tokenizer.pad_token_id)[:, -seen["final_mask"].shape[1]:]
    rows = [(tokenizer.decode(ids[m.bool()]), tokenizer.decode(ids[~m.bool() & (ids != tokenizer.pad_token_id)]))
            for ids, m in zip(packed, seen["final_mask"])]
    suffix = tools.tool_suffix_ids(tokenizer, [{"role": "tool", "name": "calculator", "content": "42"}])
    return {"trainer_bases": [c.__name__ for c in type(trainer).__mro__[1:3]],
            "tool_mask_zeros": None if seen["tool_mask"] is None else (seen["tool_mask"] == 0).sum(1).tolist(),
            "suffix_tokens": len(suffix), "suffix": tokenizer.decode(suffix), "trained": [t for t, _ in rows],
            "left_out": [d for _, d in rows], "tool_results": [c[1]["content"] for c in trainer.tool_completions],
            "log": {k: v for k, v in log.items() if isinstance(v, (int, float))}}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(), default=str), flush=True)

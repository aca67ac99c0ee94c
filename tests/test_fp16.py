"""fp16 training (T4, V100) of a quantized model's LoRA, checked on the CPU: the weights the optimizer gets."""

import pytest
import torch

import train_synthetic
from agents import expand_agents
from grpo_math import grpo_trainer, models, settings


# TRL's GRPOTrainer casts the trainable weights of a 4-bit or 8-bit model to bf16, whatever the
# precision. The tiny model passes for a 4-bit one by the flag TRL reads, so the cast happens here as
# on a GPU, and the recipe's GRPOConfig is built for the card: the kit's and transformers' questions
# about it answered as that card answers them (both cards say bf16 works; a T4 emulates it).
@pytest.mark.parametrize("capability, precision, lora_dtype", [
    # A T4 or V100 trains in fp16, whose GradScaler cannot unscale bf16 gradients: the first optimizer
    # step would fail. The kit keeps LoRA in fp32, as add_lora made it.
    ((7, 5), "fp16", torch.float32),
    # Ampere on trains in bf16: TRL's cast is left as it is, and shows that the stand-in triggers it.
    ((8, 0), "bf16", torch.bfloat16),
])
def test_lora_of_a_quantized_model_in_the_cards_precision(tmp_path, monkeypatch, capability, precision, lora_dtype):
    import transformers.training_args
    from datasets import Dataset
    from rewards import get_reward_funcs

    s = settings.parse_settings("test", train_synthetic.DEFAULTS, ["--smoke", "--output-dir", str(tmp_path)],
                                train_synthetic.add_args)
    model, tokenizer = models.tiny_model_and_tokenizer()
    model = models.add_lora(model, s["lora_rank"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.is_loaded_in_4bit = True  # as a 4-bit load sets it
    monkeypatch.setattr(models, "gpu_capability", lambda: capability)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    args = train_synthetic.grpo_config(s, "trl", tokenizer)
    assert (args.fp16, args.bf16) == (precision == "fp16", precision == "bf16")
    rows = [{"question": "How many?", "answer": "7"}] * 2
    trainer = grpo_trainer.make_trainer_class()(
        model=model, reward_funcs=get_reward_funcs(list(s["reward_weights"])), args=args,
        train_dataset=Dataset.from_list(expand_agents(rows, "core", "all", style="xml")), processing_class=tokenizer,
        reward_weights=s["reward_weights"],
    )
    assert trainer.optimizer is None  # built in train(), from the weights as they are now
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {lora_dtype}

"""vLLM's answers, in the form evaluation.generate_answers returns them: evaluate.py's --engine vllm
(VLLMEngine, over a merged copy of the model), and the held-out evaluation during training
(training_engine: the engine that already samples the rollouts, with the weights being trained).

The model reaches vLLM as a merged copy: the LoRA adapter merged into a copy of the weights, saved
with the tokenizer to a temporary folder that vLLM loads, deleted on close(). A merged copy rather
than a LoRARequest because it is one path for a base model, an adapter and the GGUF SmolLM2 (which
vLLM cannot load from its package), with no max_lora_rank to match to the adapter and no LoRA
kernels, which vLLM's CPU build may lack. It costs one save of the weights per evaluated model.

vLLM runs in the model's own dtype (float32 on a CPU, as transformers does there; vLLM would
otherwise take bf16), so greedy answers differ from generate()'s only where the two engines'
kernels round a near-tie differently. bench/vllm_agreement.py measures how often.
"""

import contextlib
import copy
import gc
import shutil
import tempfile

import torch

from grpo_math.evaluation import cut_at_stop, generate_answers
from grpo_math.models import prepare_vllm


def answers(generate, tokenizer, prompts, max_new_tokens, samples=1, temperature=0.0, stop=(), seed=0, **kwargs):
    """``samples`` (text, token count) completions per rendered prompt from vLLM's ``generate`` (an LLM's,
    given ``kwargs`` too), greedy at temperature 0. As generate_answers reads them: the tokens up to the
    first eos or padding token, decoded, and cut after the first stop string."""
    from vllm import SamplingParams

    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed,
                            stop=list(stop) or None, include_stop_str_in_output=True)
    ids = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    done = []
    for request in generate(ids, params, use_tqdm=False, **kwargs):
        row = []
        for out in request.outputs:
            tokens = list(out.token_ids)
            length = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
            row.append((cut_at_stop(tokenizer.decode(tokens[:length], skip_special_tokens=True), stop), length))
        done.append(row)
    return done


def training_engine(trainer, model, tokenizer):
    """The vLLM engine that samples the rollouts, as an object with answers() (VLLMEngine's), or None where
    vLLM does not generate in training (then generate() answers). No second engine is started.

    TRL's colocate mode: the engine holds the weights of its last sync, made before a step's rollouts; the
    trained weights are synced first, as TRL syncs them (VLLMGeneration.sync_weights, and the step it was
    made at, so that the next rollouts do not sync again). Unsloth (fast_inference=True): its engine shares
    the base weights, and the LoRA reaches it with each call, built from the live tensors as Unsloth's GRPO
    trainer builds it (model.load_lora(name, load_tensors=True))."""
    if getattr(model, "vllm_engine", None) is not None and hasattr(model, "load_lora"):  # Unsloth's, first
        return _Shared(model, tokenizer)
    generation = getattr(trainer, "vllm_generation", None)
    if generation is not None and getattr(trainer.args, "vllm_mode", None) == "colocate" and \
            getattr(generation, "llm", None) is not None and not getattr(generation, "enable_sleep_mode", False):
        return _Colocated(trainer, generation, tokenizer)
    return None  # no vLLM in training, its server mode (another process's GPU), or its sleep mode


class _TrainingEngine:
    """answers() from the engine that samples the rollouts. Its context fits the longest training prompt and
    --max-completion-length (prompt_budget.fit_prompts); a held-out prompt too long for it is answered by
    generate() instead, so that the same question goes to the same engine at every evaluation."""

    def __init__(self, model, tokenizer, llm):
        self.model, self.tokenizer, self.llm = model, tokenizer, llm

    def answers(self, prompts, max_new_tokens, **kwargs):
        context = self.llm.llm_engine.model_config.max_model_len
        fits = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) + max_new_tokens <= context
                for p in prompts]
        inside = self.generate([p for p, f in zip(prompts, fits) if f], max_new_tokens, **kwargs) if any(fits) else []
        outside = generate_answers(self.model, self.tokenizer, [p for p, f in zip(prompts, fits) if not f],
                                   max_new_tokens, **kwargs) if not all(fits) else []
        inside, outside = iter(inside), iter(outside)
        return [next(inside) if f else next(outside) for f in fits]


class _Colocated(_TrainingEngine):
    def __init__(self, trainer, generation, tokenizer):
        super().__init__(generation.model, tokenizer, generation.llm)
        self.trainer, self.generation = trainer, generation

    def generate(self, prompts, max_new_tokens, **kwargs):
        step = self.trainer.state.global_step
        if getattr(self.trainer, "_last_loaded_step", None) != step:
            self.generation.sync_weights()
            self.trainer._last_loaded_step = step
        return answers(self.llm.generate, self.tokenizer, prompts, max_new_tokens, **kwargs)


class _Shared(_TrainingEngine):
    LORA_NAME = "grpo_trainer_lora_model"  # the name Unsloth's GRPO trainer loads its LoRA under

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, model.vllm_engine)

    def generate(self, prompts, max_new_tokens, **kwargs):
        lora = self.model.load_lora(self.LORA_NAME, load_tensors=True)
        return answers(self.llm.generate, self.tokenizer, prompts, max_new_tokens, lora_request=lora, **kwargs)


def save_merged(model, tokenizer, folder):
    """The model, its LoRA adapter (if any) merged in, saved with the tokenizer as a plain model."""
    if hasattr(model, "merge_and_unload"):  # a PeftModel: merge into a copy, the model stays as it is
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class VLLMEngine:
    """vLLM over a merged copy of ``model``; answers() returns what generate_answers returns."""

    def __init__(self, model, tokenizer, max_model_len, seed=0, dtype=None, max_num_seqs=256):
        prepare_vllm()
        from vllm import LLM

        self.tokenizer = tokenizer
        self.folder = tempfile.mkdtemp(prefix="grpo-math-vllm-")
        save_merged(model, tokenizer, self.folder)
        dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")  # the model's own
        self.llm = LLM(model=self.folder, dtype=dtype,
                       max_model_len=max_model_len, seed=seed, max_num_seqs=max_num_seqs,
                       gpu_memory_utilization=0.4)  # beside the transformers model; lower it if out of memory

    def answers(self, prompts, max_new_tokens, samples=1, temperature=0.0, stop=(), seed=0):
        """``samples`` (text, token count) completions per rendered prompt, greedy at temperature 0."""
        return answers(self.llm.generate, self.tokenizer, prompts, max_new_tokens, samples, temperature, stop, seed)

    def close(self):
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def answer_engine(kind, model, tokenizer, prompts, max_new_tokens, seed=0, samples=1):
    """evaluate.py's --engine: None for generate(), or a VLLMEngine whose context fits the longest of
    ``prompts`` and ``max_new_tokens``, closed on exit."""
    if kind != "vllm":
        yield None
        return
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    # vLLM warms its sampler up on max_num_seqs rows of the whole vocabulary (256 by default): on a CPU, 10 to 20 s
    # for a vocabulary of 150k-262k tokens. No call holds more sequences than there are prompts, times samples.
    engine = VLLMEngine(model, tokenizer, max_model_len=longest + max_new_tokens, seed=seed,
                        max_num_seqs=min(256, len(prompts) * samples))
    try:
        yield engine
    finally:
        engine.close()

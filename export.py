"""Exports of a trained run, and sharing it: a merged 16-bit model, GGUF files for llama.cpp and Ollama,
their fidelity to the adapter, and a push to the Hugging Face Hub.

    python export.py outputs/gsm8k --merged           # RUN/merged: base + adapter in 16-bit (transformers, vLLM)
    python export.py outputs/gsm8k --gguf q4_k_m,q8_0  # RUN/gguf/model-Q4_K_M.gguf ... and an Ollama Modelfile
    python export.py outputs/gsm8k --check            # do the exports answer like the adapter? (fidelity.json)
    python export.py outputs/gsm8k --push-to-hub you/gsm8k-grpo   # the adapter, and merged/GGUF where made

The training scripts call the same functions with --save-merged, --save-gguf and --push-to-hub, last,
once the adapter, stats, plot and evaluation are saved: a failed export or push loses none of them,
and its message gives the command above to try again. A run that kept the base model (no trained step
beat it on the held-out questions) exports and pushes nothing: the script, or export.py, exits non-zero
with one line that says why and gives the command that takes the last adapter, --checkpoint last.

What an export needs, checked before training where it can be (check_exports):
  both   the base model's 16-bit weights. Unsloth trains on a 4-bit copy, so it fetches the 16-bit
         weights from the hub to merge into (about 3 GB for a 1.5B model), unless the base is a
         local folder.
  GGUF   llama.cpp's own converter, at one pinned version (grpo_math/llama_cpp.py): fetched once into
         a cache (76 MB), offline after that; the k-quants (q4_k_m...) also need llama-quantize, built
         there once with cmake. Either backend: the GGUF is converted from the merged model.
  push   a Hugging Face token that can write (HF_TOKEN or `hf auth login`), and the Hub (HF_ENDPOINT).
"""

import argparse
import copy
import functools
import json
import os
import shutil

MERGED_DIR = "merged"
GGUF_DIR = "gguf"


def hub_model(name):
    """True when ``name`` is fetched from the hub, not read from a local folder or a bundled model."""
    from grpo_math.models import SMOLLM2

    return name not in ("tiny", SMOLLM2) and not os.path.isdir(name)


def check_exports(model_name, save_merged, save_gguf, backend, reason, push_to_hub=None, private=False, training=True):
    """Refuse, before any model loads, an export or push this run cannot make; say what the others will need.
    Returns the full repo id --push-to-hub will push to (the user's namespace added), or None."""
    from grpo_math import llama_cpp

    flag, nothing = ("--save-gguf", "Nothing was trained.") if training else ("--gguf", "Nothing was exported.")
    if save_gguf:
        try:
            quants = llama_cpp.check_quants(save_gguf, flag)
            llama_cpp.source()  # the pinned llama.cpp, fetched into the cache the first time: now, not after training
        except ValueError as e:
            raise SystemExit(f"{e}. {nothing}") from None
        except llama_cpp.LlamaCppMissing as e:
            raise SystemExit(f"{flag}: {e}. {nothing}") from None
        if any(q in llama_cpp.K_QUANTS for q in quants) and not os.path.isfile(llama_cpp.quantize_binary()):
            missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
            if missing:
                raise SystemExit(f"{flag} {save_gguf}: a k-quant needs llama-quantize, built with cmake and a C++ "
                                 f"compiler, and {' and '.join(missing)} is missing (apt install cmake build-essential); "
                                 f"or ask for f16 or q8_0, which need no build. {nothing}")
            print(f"{flag} {save_gguf}: llama-quantize is built once, after the merge, into {llama_cpp.build_dir()} "
                  "(minutes; python -m grpo_math.llama_cpp build does it ahead of time)")
    if (save_merged or save_gguf) and backend == "unsloth" and hub_model(model_name):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        print(f"--save-merged/--save-gguf: after training, the 16-bit weights of {model_name} are fetched from the hub "
              "to merge the adapter into" + (", and HF_HUB_OFFLINE is set: that fails unless they are cached" if offline else "."))
    if push_to_hub:
        from grpo_math import push

        return push.check(push_to_hub, private)
    return None


def _refuse_existing(path, overwrite):
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise SystemExit(f"{path} already holds an export; pass --overwrite to replace it")


def save_merged(model, tokenizer, run_dir, backend, model_name, adapter_dir=None, out=None):
    """RUN/merged (or ``out``): the base model with the adapter merged in, in 16-bit. Returns its path.
    ``adapter_dir``: where ``model``'s adapter is saved (RUN/best/ for a kept one; default RUN)."""
    from grpo_math import models

    out = out or os.path.join(run_dir, MERGED_DIR)
    if backend == "unsloth":
        model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit")
        return out
    base = None
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model, "is_loaded_in_4bit", False):
        base, _ = models.load_pretrained(model_name, quantize=False)  # a 4-bit base cannot be merged into
        base = models.load_adapter(base, adapter_dir or run_dir)
    # merge_and_unload changes the model it is given: a copy is merged, so that ``model`` stays the adapter
    (base or copy.deepcopy(model)).merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_gguf(model, tokenizer, run_dir, backend, model_name, quants, adapter_dir=None):
    """RUN/gguf/: a GGUF file per type in ``quants`` ("q4_k_m,q8_0"), made by llama.cpp's own converter and
    llama-quantize from the merged model, and an Ollama Modelfile. Returns their paths. RUN/merged is
    the converter's input where it exists; otherwise a merge is made in RUN/gguf-work and deleted after."""
    from grpo_math import llama_cpp

    quants = llama_cpp.check_quants(quants)
    merged = os.path.join(run_dir, MERGED_DIR)
    work = os.path.join(run_dir, "gguf-work")
    if not os.path.isfile(os.path.join(merged, "config.json")):
        shutil.rmtree(work, ignore_errors=True)
        merged = save_merged(model, tokenizer, run_dir, backend, model_name, adapter_dir, out=work)
    out = os.path.join(run_dir, GGUF_DIR)
    paths = llama_cpp.write_ggufs(merged, out, quants)
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(run_dir, "config.json")) as f:
        settings = json.load(f)["settings"]
    paths.append(os.path.join(out, "Modelfile"))
    with open(paths[-1], "w") as f:
        f.write(modelfile(tokenizer, settings, os.path.basename(paths[0])))
    return paths


def modelfile(tokenizer, s, gguf_name):
    """An Ollama Modelfile for ``gguf_name``: the prompt the run trained on (the chat template rendered with the
    first agent's instruction and any worked examples) around the user's question, greedy, and stopping
    where the kit's answer ends, or at the end of the turn."""
    from agents import get_agents
    from grpo_math import families
    from grpo_math.evaluation import STOPS, render

    marker = "QUESTION_GOES_HERE"
    instruction = next(iter(get_agents(s["agents"]).values()))
    template = render(tokenizer, instruction, marker, s["prompt_style"], s["worked_examples"], s.get("thinking", False))
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    if adds_bos and template.startswith(tokenizer.bos_token):
        template = template[len(tokenizer.bos_token):]  # llama.cpp adds it, as the tokenizer does (Llama 3's)
    stops = [*STOPS[s["prompt_style"]], families.end_of_turn(tokenizer), tokenizer.eos_token]
    lines = ["# ollama create NAME -f Modelfile; then: ollama run NAME \"A question\"",
             f"FROM ./{gguf_name}",
             'TEMPLATE """' + template.replace(marker, "{{ .Prompt }}") + '"""',
             "PARAMETER temperature 0",
             *(f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(filter(None, stops)))]
    return "\n".join(lines) + "\n"


def retry_command(run_dir, merged=False, gguf=None, checkpoint="best"):
    return (f"python export.py {run_dir}" + (" --merged" if merged else "") + (f" --gguf {gguf}" if gguf else "")
            + (" --checkpoint last" if checkpoint == "last" else ""))


def export_run(model, tokenizer, run_dir, backend, model_name, merged=False, gguf=None, kept=None,
               checkpoint="best", push_to_hub=None, private=False):
    """Every export asked for, of ``model``: the adapter the run kept (``kept``, best.json's record), or the
    last where ``kept`` is None; then the push (``push_to_hub``: the repo id push.check returned). A failure
    is reported with how to retry (``checkpoint``: the flag that loaded it), and the next one still runs.
    Returns the flags that failed or were not done.

    When the run kept the base model, none is done: one line says why and gives the export.py command that
    takes the last adapter, and the flags asked for are returned, so that the script exits non-zero. The
    base is kept only when the trained steps measured worse than it on held-out questions: exporting or
    pushing the last adapter anyway would ship a model measured worse under a name that passes for the run's
    result, and an exit of 0 would hide that nothing was exported. The run folder is whole, and the command
    exports the last adapter on purpose."""
    from grpo_math import best, push

    if (merged or gguf or push_to_hub) and kept is not None and not kept["adapter"]:
        push_flags = ["--push-to-hub", push_to_hub] + (["--private"] if private else [])
        asked = {"--save-merged": ["--merged"] if merged else [], "--save-gguf": ["--gguf", gguf] if gguf else [],
                 "--push-to-hub": push_flags if push_to_hub else []}  # each one's flags in export.py's command
        not_done = [flag for flag, flags in asked.items() if flags]
        print(push.kept_base_line(run_dir, sum(asked.values(), []), not_done))
        return not_done
    adapter_dir = run_dir if kept is None else os.path.join(run_dir, best.BEST_DIR)
    retry = functools.partial(retry_command, run_dir, checkpoint=checkpoint)
    lost_nothing = f"Nothing else was lost: the adapter, stats, plot and evaluation are in {run_dir}."
    failed = []
    if merged:
        try:
            print(f"merged 16-bit model: {save_merged(model, tokenizer, run_dir, backend, model_name, adapter_dir)}")
        except Exception as e:
            failed.append("--save-merged")
            print(f"--save-merged failed ({type(e).__name__}: {e}). {lost_nothing} Try again with: {retry(merged=True)}")
    if gguf:
        try:
            for path in save_gguf(model, tokenizer, run_dir, backend, model_name, gguf, adapter_dir):
                print(f"GGUF ({gguf}): {path}")
            print(f"does each export answer like the adapter? python export.py {run_dir} --check")
        except Exception as e:
            failed.append("--save-gguf")
            print(f"--save-gguf failed ({type(e).__name__}: {e}). {lost_nothing} Try again with: {retry(gguf=gguf)}")
    if push_to_hub:
        failed += push_run(run_dir, push_to_hub, private, adapter_dir, checkpoint)
    return failed


def push_run(run_dir, repo_id, private, adapter_dir, checkpoint):
    """push.push_run, with the line that says what went where, or what failed and how to push later."""
    from grpo_math import push

    try:
        for url in push.push_run(run_dir, repo_id, private, adapter_dir, checkpoint):
            print(f"pushed: {url}")
        return []
    except Exception as e:
        print(f"--push-to-hub failed ({type(e).__name__}: {e}). Nothing was lost: the run in {run_dir} is whole. "
              f"Push it later with: {push.retry_command(run_dir, repo_id, private, checkpoint)}")
        return ["--push-to-hub"]


def load_run(run_dir, backend, model_name, adapter_dir=None):
    """The trained model of a run folder: its base ``model_name`` with the adapter saved in ``adapter_dir``
    (RUN/best/ for the kept one; default RUN, the last)."""
    from grpo_math import models

    adapter_dir = adapter_dir or run_dir
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.from_pretrained(adapter_dir, load_in_4bit=True)  # base + adapter
    base = os.path.join(run_dir, "base-model") if model_name == "tiny" else model_name
    model, tokenizer = models.load_pretrained(base)
    return models.load_adapter(model, adapter_dir), tokenizer


def _flags(args):
    """export.py's flags in ``args``, as a command gives them, but the run folder and --checkpoint."""
    given = (("--merged", args.merged), ("--gguf", args.gguf), ("--check", args.check),
             ("--push-to-hub", args.push_to_hub), ("--private", args.private),
             ("--backend", None if args.backend == "auto" else args.backend), ("--overwrite", args.overwrite))
    return [part for flag, value in given if value for part in ([flag] if value is True else [flag, value])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a run folder written by train_gsm8k.py or train_synthetic.py")
    p.add_argument("--merged", action="store_true", help=f"write RUN/{MERGED_DIR}: base + adapter in 16-bit")
    p.add_argument("--gguf", metavar="QUANTS", help=f"write RUN/{GGUF_DIR}/model-QUANT.gguf for each, comma-separated: "
                   "f16, bf16, q8_0 (llama.cpp's converter) or a k-quant such as q4_k_m (llama-quantize, built once)")
    p.add_argument("--check", action="store_true", help="score the adapter, RUN/merged and each RUN/gguf file on the "
                   "run's held-out questions, the first agent, greedy: accuracy, difference and agreement "
                   "(RUN/fidelity.json)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="push the adapter to REPO_ID, and RUN/merged and RUN/gguf "
                   "to REPO_ID-merged and REPO_ID-GGUF where they exist, each with a model card")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repos private")
    p.add_argument("--backend", choices=["auto", "unsloth", "trl"], default="auto",
                   help="unsloth or trl, to load and merge the adapter; auto takes the run's own")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best: the adapter the run kept in RUN/best/ (on its held-out selection questions; "
                        "README, 'Which adapter you get'), or the last where it selected none; a run that kept the base "
                        "model exports nothing, and says so; last: the last step's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)
    if not (args.merged or args.gguf or args.check or args.push_to_hub):
        p.error("say what to do: --merged, --gguf QUANTS, --check, --push-to-hub REPO_ID, or several")
    if args.private and not args.push_to_hub:
        p.error("--private goes with --push-to-hub REPO_ID")
    if not os.path.isfile(os.path.join(args.run_dir, "adapter_config.json")):
        p.error(f"{args.run_dir!r} holds no adapter (adapter_config.json); pass a finished run folder")
    if not os.path.isfile(os.path.join(args.run_dir, "config.json")):
        p.error(f"{args.run_dir!r} has no config.json, so its base model is unknown; pass a run folder of this kit")
    if args.merged:
        _refuse_existing(os.path.join(args.run_dir, MERGED_DIR), args.overwrite)
    if args.gguf:
        _refuse_existing(os.path.join(args.run_dir, GGUF_DIR), args.overwrite)

    from grpo_math import best, models, push

    adapter_dir, which = best.adapter_to_load(args.run_dir, args.checkpoint)
    if adapter_dir is None:  # the run kept the base model: one line, why and the command that takes the last adapter
        raise SystemExit(push.kept_base_line(args.run_dir, _flags(args)))
    print(which)
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = json.load(f)
    model_name = config["settings"]["model_name"]
    requested = config.get("backend", "trl") if args.backend == "auto" else args.backend
    backend, reason = ("trl", "--smoke run") if model_name == "tiny" else models.choose_backend(requested)
    repo_id = check_exports(model_name, args.merged, args.gguf, backend, reason, args.push_to_hub, args.private,
                            training=False)
    kept = best.read(args.run_dir) if adapter_dir != args.run_dir else None
    if args.merged or args.gguf or args.check:
        model, tokenizer = load_run(args.run_dir, backend, model_name, adapter_dir)
        if export_run(model, tokenizer, args.run_dir, backend, model_name, args.merged, args.gguf, kept, args.checkpoint):
            raise SystemExit(1)  # each failure is named above, with the command that tries it again
        if args.check:
            from grpo_math import fidelity

            fidelity.check(args.run_dir, models.for_inference(model, backend), tokenizer,
                           lambda: models.load_pretrained(os.path.join(args.run_dir, MERGED_DIR), tokenizer=tokenizer)[0])
    if repo_id and push_run(args.run_dir, repo_id, args.private, adapter_dir, args.checkpoint):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

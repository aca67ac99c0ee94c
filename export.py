"""Exports of a trained run: a merged 16-bit model, and GGUF files for llama.cpp and Ollama.

    python export.py outputs/gsm8k --merged          # RUN/merged: base + adapter in 16-bit (transformers, vLLM)
    python export.py outputs/gsm8k --gguf q4_k_m     # RUN/gguf/*.gguf and an Ollama Modelfile (unsloth backend)

The training scripts call the same functions with --save-merged and --save-gguf, last, once the
adapter, stats, plot and evaluation are saved: a failed export loses none of them, and its message
gives the command above to try again.

What an export needs, checked before training where it can be (check_exports):
  both   the base model's 16-bit weights. Unsloth trains on a 4-bit copy, so it fetches the 16-bit
         weights from the hub to merge into (about 3 GB for a 1.5B model), unless the base is a
         local folder.
  GGUF   the unsloth backend, and llama.cpp: Unsloth looks in UNSLOTH_LLAMA_CPP_PATH, else
         ~/.unsloth/llama.cpp, and otherwise downloads and builds it there (internet, minutes).
"""

import argparse
import functools
import glob
import json
import os
import shutil

MERGED_DIR = "merged"
GGUF_DIR = "gguf"


def hub_model(name):
    """True when ``name`` is fetched from the hub, not read from a local folder or a bundled model."""
    from grpo_math.models import SMOLLM2

    return name not in ("tiny", SMOLLM2) and not os.path.isdir(name)


def check_exports(model_name, save_merged, save_gguf, backend, reason):
    """Refuse, before any model loads, an export this run cannot make; say what the others will need."""
    if save_gguf:
        if backend != "unsloth":
            raise SystemExit(
                f"--save-gguf needs the unsloth backend, and this run would use trl ({reason}), so nothing was "
                "trained. Use --save-merged instead, and convert RUN/merged with llama.cpp's convert_hf_to_gguf.py."
            )
        from unsloth.save import ALLOWED_QUANTS

        if save_gguf.lower() not in ALLOWED_QUANTS:
            raise SystemExit(f"--save-gguf {save_gguf!r} is not a quantization Unsloth knows; choose one of: "
                             + ", ".join(ALLOWED_QUANTS))
        from unsloth_zoo.llama_cpp import LLAMA_CPP_DEFAULT_DIR, check_llama_cpp

        try:
            check_llama_cpp(LLAMA_CPP_DEFAULT_DIR)
        except Exception:
            print(f"--save-gguf: no working llama.cpp in {LLAMA_CPP_DEFAULT_DIR}. After training, Unsloth downloads "
                  "and builds it there, which needs internet access and some minutes; to use a build you have, "
                  "set UNSLOTH_LLAMA_CPP_PATH to its folder.")
    if (save_merged or save_gguf) and backend == "unsloth" and hub_model(model_name):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        print(f"--save-merged/--save-gguf: after training, the 16-bit weights of {model_name} are fetched from the hub "
              "to merge the adapter into" + (", and HF_HUB_OFFLINE is set: that fails unless they are cached" if offline else "."))


def _refuse_existing(path, overwrite):
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise SystemExit(f"{path} already holds an export; pass --overwrite to replace it")


def save_merged(model, tokenizer, run_dir, backend, model_name, adapter_dir=None):
    """RUN/merged: the base model with the adapter merged in, in 16-bit. Returns its path. ``adapter_dir``:
    where ``model``'s adapter is saved (RUN/best/ for a kept one; default RUN)."""
    from grpo_math import models

    out = os.path.join(run_dir, MERGED_DIR)
    if backend == "unsloth":
        model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit")
        return out
    base = model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model, "is_loaded_in_4bit", False):
        base, _ = models.load_pretrained(model_name, quantize=False)  # a 4-bit base cannot be merged into
        base = models.load_adapter(base, adapter_dir or run_dir)
    base.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_gguf(model, tokenizer, run_dir, quantization):
    """RUN/gguf/: the GGUF file(s) and Unsloth's Ollama Modelfile. Returns their paths.

    Unsloth writes a 16-bit merge into the folder it is given and the GGUF files into a sibling
    folder named after it plus "_gguf"; the files are moved to RUN/gguf and the merge, the
    converter's input only, is deleted (--save-merged keeps one in RUN/merged)."""
    work = os.path.join(run_dir, "gguf-work")
    result = model.save_pretrained_gguf(work, tokenizer, quantization_method=quantization)
    made = os.path.normpath(result["gguf_directory"]) if isinstance(result, dict) else f"{work}_gguf"
    out = os.path.join(run_dir, GGUF_DIR)
    os.makedirs(out, exist_ok=True)
    paths = []
    for path in sorted(glob.glob(os.path.join(made, "*.gguf")) + glob.glob(os.path.join(made, "Modelfile"))):
        target = os.path.join(out, os.path.basename(path))
        os.replace(path, target)
        paths.append(target)
    if not any(p.endswith(".gguf") for p in paths):
        raise RuntimeError(f"Unsloth's GGUF export wrote no .gguf file into {made}")
    shutil.rmtree(work, ignore_errors=True)
    if os.path.isdir(made) and not os.listdir(made):
        os.rmdir(made)
    return paths


def retry_command(run_dir, merged=False, gguf=None, checkpoint="best"):
    return (f"python export.py {run_dir}" + (" --merged" if merged else "") + (f" --gguf {gguf}" if gguf else "")
            + (" --checkpoint last" if checkpoint == "last" else ""))


def export_run(model, tokenizer, run_dir, backend, model_name, merged=False, gguf=None, kept=None,
               checkpoint="best"):
    """Every export asked for, of ``model``: the adapter the run kept (``kept``, best.json's record), or the
    last where ``kept`` is None. A failure is reported with how to retry (``checkpoint``: the flag that
    loaded it), and the next one still runs. Returns the flags that failed. When the base model was kept,
    there is nothing trained to export."""
    from grpo_math import best

    if (merged or gguf) and kept is not None and not kept["adapter"]:
        print(f"no export: no step beat the base model on the held-out questions, so the run kept the base model "
              f"and has no trained weights to merge. {retry_command(run_dir, merged, gguf, 'last')} exports the "
              "last adapter")
        return []
    adapter_dir = run_dir if kept is None else os.path.join(run_dir, best.BEST_DIR)
    retry = functools.partial(retry_command, run_dir, checkpoint=checkpoint)
    failed = []
    if merged:
        try:
            print(f"merged 16-bit model: {save_merged(model, tokenizer, run_dir, backend, model_name, adapter_dir)}")
        except Exception as e:
            failed.append("--save-merged")
            print(f"--save-merged failed ({type(e).__name__}: {e}). Nothing else was lost: the adapter, stats, plot "
                  f"and evaluation are in {run_dir}. Try again with: {retry(merged=True)}")
    if gguf:
        try:
            for path in save_gguf(model, tokenizer, run_dir, gguf):
                print(f"GGUF ({gguf}): {path}")
        except Exception as e:
            failed.append("--save-gguf")
            print(f"--save-gguf failed ({type(e).__name__}: {e}). Nothing else was lost: the adapter, stats, plot "
                  f"and evaluation are in {run_dir}. Try again with: {retry(gguf=gguf)}")
    return failed


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a run folder written by train_gsm8k.py or train_synthetic.py")
    p.add_argument("--merged", action="store_true", help=f"write RUN/{MERGED_DIR}: base + adapter in 16-bit")
    p.add_argument("--gguf", metavar="QUANT", help=f"write RUN/{GGUF_DIR}/*.gguf in this quantization, e.g. q4_k_m")
    p.add_argument("--backend", choices=["auto", "unsloth", "trl"], default="auto",
                   help="unsloth (needed for --gguf) or trl; auto takes the run's own")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="best: the adapter the run kept in RUN/best/ (the best on its held-out selection questions; "
                        "README, 'Which adapter you get'), or the last where it kept none; last: the last step's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)
    if not (args.merged or args.gguf):
        p.error("say what to export: --merged, --gguf QUANT or both")
    if not os.path.isfile(os.path.join(args.run_dir, "adapter_config.json")):
        p.error(f"{args.run_dir!r} holds no adapter (adapter_config.json); pass a finished run folder")
    if not os.path.isfile(os.path.join(args.run_dir, "config.json")):
        p.error(f"{args.run_dir!r} has no config.json, so its base model is unknown; pass a run folder of this kit")
    if args.merged:
        _refuse_existing(os.path.join(args.run_dir, MERGED_DIR), args.overwrite)
    if args.gguf:
        _refuse_existing(os.path.join(args.run_dir, GGUF_DIR), args.overwrite)

    from grpo_math import models

    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = json.load(f)
    model_name = config["settings"]["model_name"]
    requested = config.get("backend", "trl") if args.backend == "auto" else args.backend
    backend, reason = ("trl", "--smoke run") if model_name == "tiny" else models.choose_backend(requested)
    check_exports(model_name, args.merged, args.gguf, backend, reason)
    from grpo_math import best

    adapter_dir, which = best.adapter_to_load(args.run_dir, args.checkpoint)
    print(which)
    if adapter_dir is None:
        raise SystemExit("nothing to export: the run kept the base model, so it has no trained weights to merge; "
                         f"{retry_command(args.run_dir, args.merged, args.gguf, 'last')} exports the last adapter")
    model, tokenizer = load_run(args.run_dir, backend, model_name, adapter_dir)
    kept = best.read(args.run_dir) if adapter_dir != args.run_dir else None
    if export_run(model, tokenizer, args.run_dir, backend, model_name, args.merged, args.gguf, kept, args.checkpoint):
        raise SystemExit(1)  # each failure is named above, with the command that tries it again


if __name__ == "__main__":
    main()

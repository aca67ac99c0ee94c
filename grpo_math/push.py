"""Push a trained run to the Hugging Face Hub: its adapter, and the merged model and GGUF files where it has them.

    check(repo_id, private)        before training or loading a model: the full repo id, or one line that
                                   says what stands in the way (the id, the hub, the token) and the fix
    push_run(run_dir, repo_id)     one repo per part, each with its model card; returns their addresses
    model_card(run_dir, kind, repo_id, checkpoint)
                                   a repo's README.md, from the template model_card.md beside this file
    retry_command(run_dir, repo_id)  the export.py command that pushes the run again
    kept_base_line(run_dir, flags)   for a run that kept the base model: why an export or push is not done,
                                     and the export.py command that takes the last adapter instead

Each part goes to its own repo, at the root, where the tool that loads it looks by default:
    REPO         the LoRA adapter and its tokenizer: PeftModel.from_pretrained(base, "REPO"); the run's
                 records (config.json, eval.json, best.json, training_stats.json, rewards.png) under run/
    REPO-merged  RUN/merged, the full model: AutoModelForCausalLM.from_pretrained("REPO-merged"),
                 vllm serve REPO-merged
    REPO-GGUF    RUN/gguf's .gguf files and Modelfile: ollama run hf.co/REPO-GGUF:Q4_K_M, llama-cli -hf
                 REPO-GGUF:Q4_K_M (the tag picks the file by its quantization)
One repo for all would put the adapter beside the merged weights, and the kit's config.json (its settings) at
the root, where transformers would read it as a broken model config: it goes under run/.

Each repo gets one commit, so a failure leaves it as it was; the run folder is only read. Errors reach the
caller, which says that nothing was lost and gives retry_command(). A repo that exists keeps its visibility.
"""

import glob
import json
import os
import re
import shlex

from grpo_math import best, hub, intervals, runs

SUFFIXES = {"adapter": "", "merged": "-merged", "gguf": "-GGUF"}
MERGED_DIR, GGUF_DIR = "merged", "gguf"  # as export.py writes them
LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
RECORDS = ("config.json", "eval.json", "training_stats.json", "rewards.png", "fidelity.json")  # pushed under run/
NOT_THE_ADAPTER = {*RECORDS, best.BEST_FILE, "README.md"}  # files beside the adapter that are not part of it
BASE_MODELS = {"smollm2-135m-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the kit's offline copies
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md")
DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
# The settings that make the recipe, in the order the command gives them; the switches are flags alone.
RECIPE = ("model_name", "dataset", "difficulty", "max_examples", "max_steps", "learning_rate", "batch_size",
          "gradient_accumulation_steps", "num_generations", "max_completion_length", "max_prompt_length", "lora_rank",
          "temperature", "seed", "rewards", "agents", "agent_sampling", "prompt_style", "worked_examples", "tools",
          "eval_examples", "select_examples", "eval_every")
SWITCHES = ("smoke", "curriculum", "thinking")


def endpoint():
    """The hub's address, read from HF_ENDPOINT now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def check(repo_id, private=False):
    """The full id of ``repo_id`` (the token's user prefixed to a bare name), once the hub answers and the token
    can write there; else SystemExit with one line. With ``private``, a repo of that name must not be public."""
    import httpx
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    flag = f"--push-to-hub {repo_id}"
    for name in (repo_id + suffix for suffix in SUFFIXES.values()):
        try:
            validate_repo_id(name)
        except HFValidationError:
            where = "" if name == repo_id else f" (for {name}, where the merged model or the GGUF files go)"
            raise SystemExit(f"{flag}: not a valid repo id{where}. Give NAME or NAMESPACE/NAME: letters, digits, "
                             "'-', '_' and '.', not at either end '-' or '.', at most 96 characters") from None
    reason = hub.unavailable_reason()
    if reason:
        raise SystemExit(f"{flag}: pushing needs the Hugging Face Hub, and {reason}. Fix that, or leave out "
                         f"--push-to-hub and push the run later: python export.py RUN --push-to-hub {repo_id}")
    token = get_token()
    if token is None:
        raise SystemExit(f"{flag}: no Hugging Face token found. Log in with `hf auth login` (a token with write "
                         f"access, from {TOKENS_PAGE}) or set HF_TOKEN, then run again")
    api = _api()
    try:
        who = api.whoami(token=token)
        full = repo_id if "/" in repo_id else f"{who['name']}/{repo_id}"
        _check_can_write(who, full, flag)
        if private:
            _check_not_public(api, full, flag)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the token saved by `hf auth login`"
            raise SystemExit(f"{flag}: the Hub refused {source} as invalid (401). Create a write token at "
                             f"{TOKENS_PAGE} and set HF_TOKEN to it, or run `hf auth login --force`") from None
        raise SystemExit(f"{flag}: the Hub could not check the token ({str(e).splitlines()[0]}); "
                         "try again later") from None
    except httpx.HTTPError as e:
        raise SystemExit(f"{flag}: the Hub stopped answering ({type(e).__name__}: {e}); try again later") from None
    return full


def _check_can_write(who, full, flag):
    """Refuse a read token, a fine-grained one that shows no write access to the namespace, and an org the
    user is not in. What the whoami data does not show is let through: the Hub has the last word."""
    namespace = full.split("/")[0]
    token = (who.get("auth") or {}).get("accessToken") or {}
    if token.get("role") == "read":
        raise SystemExit(f"{flag}: the token of {who['name']} can only read (role 'read'). Create one with write "
                         f"access at {TOKENS_PAGE}, then set HF_TOKEN to it or run `hf auth login --force`")
    grants = token.get("fineGrained") or {}
    writes = grants.get("global", []) + [p for scope in grants.get("scoped", [])  # to the namespace or this repo
                                         if scope.get("entity", {}).get("name") in (namespace, full)
                                         for p in scope.get("permissions", [])]
    if token.get("role") == "fineGrained" and "scoped" in grants and "repo.write" not in writes:
        raise SystemExit(f"{flag}: this fine-grained token has no write access (repo.write) to {namespace}. Grant it "
                         f"write access to {namespace}'s repos at {TOKENS_PAGE}, or use a token with the write role")
    orgs = [org.get("name") for org in who.get("orgs") or []]
    if namespace != who["name"] and "orgs" in who and namespace not in orgs:
        raise SystemExit(f"{flag}: {who['name']} is not a member of {namespace!r}, so the token cannot create repos "
                         f"there. Push to {who['name']}/{full.split('/')[1]}, or join {namespace} first")


def _check_not_public(api, full, flag):
    """--private: a repo that exists stays as it is, so one that is public would take the files in the open."""
    from huggingface_hub.errors import RepositoryNotFoundError

    for name in (full + suffix for suffix in SUFFIXES.values()):
        try:
            public = not api.repo_info(name).private
        except RepositoryNotFoundError:
            continue
        if public:
            raise SystemExit(f"{flag} --private: {name} exists and is public, and a push does not change a repo's "
                             "visibility. Make it private in its settings on the Hub, or choose another name")


def retry_command(run_dir, repo_id, private=False, checkpoint="best"):
    """The export.py command that pushes the run again, with the same repo, visibility and adapter."""
    return (f"python export.py {shlex.quote(run_dir)} --push-to-hub {repo_id}" + (" --private" if private else "")
            + (" --checkpoint last" if checkpoint == "last" else ""))


VERBS = {"--merged": "export", "--gguf": "export", "--check": "check", "--push-to-hub": "push"}  # export.py's asks


def kept_base_line(run_dir, flags, not_done=None):
    """One line for an export, check or push asked of a run that kept the base model (best.json, step 0): that
    ``not_done`` (default: the export.py flags in ``flags`` that ask for something) was not done, why, and the
    export.py command, ``flags`` and --checkpoint last, that does it with the last adapter. The base is kept
    only when the trained steps measured worse than it on held-out questions: the last adapter, shared under
    the run's name, would pass for its result: sharing it takes that command, on purpose."""
    asked = [flag for flag in flags if flag in VERBS]
    not_done = not_done or asked
    verbs = " and ".join(dict.fromkeys(VERBS[flag] for flag in asked))
    last = best.last_step(run_dir)
    record = os.path.join(run_dir, best.BEST_DIR, best.BEST_FILE)
    command = "python export.py " + shlex.join([run_dir, *flags, "--checkpoint", "last"])
    return (f"{' and '.join(not_done)} {'was' if len(not_done) == 1 else 'were'} not done: the run kept the base "
            f"model (clearly better than its trained steps on the held-out questions, {record}), so it has no trained weights to "
            f"{verbs}. To {verbs} the last adapter{'' if last is None else f', step {last},'} anyway: {command}")


def push_run(run_dir, repo_id, private=False, adapter_dir=None, checkpoint="best"):
    """Push the run in ``run_dir``: the adapter in ``adapter_dir`` (default: best.adapter_to_load's for
    ``checkpoint``) to ``repo_id``, RUN/merged to REPO-merged and RUN/gguf to REPO-GGUF where they exist.
    Returns the repos' addresses. Every card is made before the first upload."""
    from huggingface_hub import CommitOperationAdd

    if adapter_dir is None:
        adapter_dir, _ = best.adapter_to_load(run_dir, checkpoint)
    if adapter_dir is None:  # the run kept the base model
        raise SystemExit(kept_base_line(run_dir, ["--push-to-hub", repo_id, *(["--private"] if private else [])]))
    kept_dir = os.path.join(run_dir, best.BEST_DIR)
    checkpoint = "best" if os.path.abspath(adapter_dir) == os.path.abspath(kept_dir) else "last"
    api = _api()
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    parts = {kind: files for kind, files in _parts(run_dir, adapter_dir).items() if files}
    cards = {kind: str(model_card(run_dir, kind, repo_id, checkpoint)).encode() for kind in parts}
    urls, name = [], os.path.basename(os.path.abspath(run_dir))
    for kind, files in parts.items():
        target = repo_id + SUFFIXES[kind]
        url = api.create_repo(target, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path, local) for path, local in files]
        operations.append(CommitOperationAdd("README.md", cards[kind]))
        api.create_commit(target, operations, commit_message=f"grpo-math: the {kind} of the run {name}")
        urls.append(str(url))
    return urls


def _parts(run_dir, adapter_dir):
    """{kind: [(path in the repo, local file)]}: what each repo receives. checkpoint-N/, best/, base-model/ and
    the other folders are left out, as are the records, which go under run/ only."""
    def files(folder, keep):
        return [(name, os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if keep(name) and
                os.path.isfile(os.path.join(folder, name)) and not name.startswith(".") and not name.endswith(".tmp")]

    adapter = files(adapter_dir, lambda name: name not in NOT_THE_ADAPTER)
    adapter += [(f"run/{name}", path) for name, path in files(run_dir, lambda name: name in RECORDS)]
    kept = os.path.join(run_dir, best.BEST_DIR, best.BEST_FILE)
    if os.path.isfile(kept):
        adapter.append((f"run/{best.BEST_FILE}", kept))
    merged, gguf = os.path.join(run_dir, MERGED_DIR), os.path.join(run_dir, GGUF_DIR)
    merged = files(merged, lambda name: name != "README.md") if os.path.isdir(merged) else []
    has_gguf = bool(glob.glob(os.path.join(gguf, "*.gguf")))
    gguf = files(gguf, lambda name: name.endswith(".gguf") or name == "Modelfile") if has_gguf else []
    return {"adapter": adapter, "merged": merged, "gguf": gguf}


def _read(*path):
    try:
        with open(os.path.join(*path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def base_model(name):
    """The hub id of a run's base model, or None for the tiny smoke model and a local folder."""
    name = BASE_MODELS.get(name, name)
    local = name == "tiny" or os.path.isdir(name) or name.startswith((".", "/", "~")) or name.count("/") != 1
    return None if local else name


def dataset_id(settings):
    """The hub id of a GSM8K run's data set, or None for a local file and for generated problems."""
    data = settings.get("dataset")
    return data if data and base_model(data) and not os.path.exists(data) else None


def reproduce_command(settings):
    """The command that trains the run again, from its saved settings."""
    n = settings.get("processes", 1)
    words = [f"torchrun --nproc_per_node {n}" if n > 1 else "python",
             "train_gsm8k.py" if "dataset" in settings else "train_synthetic.py"]
    words += [f"--{key}" for key in SWITCHES if settings.get(key)]
    for key in RECIPE:
        if settings.get(key) not in (None, ""):
            words += [f"--{key.replace('_', '-')}", shlex.quote(str(settings[key]))]
    return " ".join(words)


def _row(model, step, k, n, questions, form=None, pushed=False):
    low, high = intervals.wilson(k, n)
    return {"model": model, "step": step, "questions": questions, "pushed": pushed, "accuracy": k / n,
            "figure": f"{k / n:.1%} [{low:.1%}, {high:.1%}]", "format": "" if form is None else f"{form:.1%}"}


def results(run_dir, step):
    """The table of held-out accuracies, each on the questions it was measured on, the model pushed (at
    ``step``) marked: best.json holds the base model (step 0) and the kept step on the selection questions,
    eval.json the kept model (its "last": the last adapter) on the report questions."""
    rows, kept, ev = [], _read(run_dir, best.BEST_DIR, best.BEST_FILE), _read(run_dir, "eval.json")
    if kept:
        selection, b = f"{kept['n']} selection questions", kept.get("base")
        if b:  # none where a resumed run found no best saved
            rows.append(_row("the base model", 0, round(b["accuracy"] * b["n"]), b["n"], selection,
                             b["format_compliance"]))
        if kept["adapter"]:
            rows.append(_row("the kept adapter", kept["step"], round(kept["accuracy"] * kept["n"]), kept["n"],
                             selection, kept["format_compliance"], pushed=kept["step"] == step))
    if ev and ev.get("n"):
        report = f"{ev['n']} report questions"
        right = sum(bool(r["correct"]) for r in ev["records"]) if ev.get("records") else round(ev["accuracy"] * ev["n"])
        model = ev.get("model", "the last adapter")
        rows.append(_row(model, ev.get("step", step), right, ev["n"], report, ev["format_compliance"],
                         pushed=ev.get("step", step) == step and model != "the base model"))
        if ev.get("last"):
            last = ev["last"]
            rows.append(_row("the last adapter", last["step"], round(last["accuracy"] * last["n"]), last["n"], report,
                             last["format_compliance"], pushed=last["step"] == step))
    return rows


def _fidelity(run_dir):
    """fidelity.json's table as strings, or None where the run has none."""
    fid = _read(run_dir, "fidelity.json")
    if not fid:
        return None

    def span(value, interval, sign=""):
        return "" if value is None else f"{value:{sign}.1%} [{interval[0]:{sign}.1%}, {interval[1]:{sign}.1%}]"

    rows = [{"name": e["name"] + (f" (`{e['file']}`)" if e.get("file") else ""),
             "accuracy": span(e["accuracy"], e["interval"]),
             "difference": span(e.get("difference"), e.get("difference_interval"), "+"),
             "agreement": "" if e.get("agreement") is None else f"{e['agreement']:.1%}"} for e in fid["exports"]]
    return {"questions": fid["questions"], "agent": fid.get("agent"), "runtime": fid.get("runtime", {}), "rows": rows}


def model_card(run_dir, kind, repo_id, checkpoint="best"):
    """The ModelCard of the ``kind`` repo ("adapter", "merged", "gguf") of the run pushed to ``repo_id`` (the
    adapter's repo), built from the run's records and the template model_card.md."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = runs.read_config(run_dir)
    s = config.get("settings", {})
    kept, last = _read(run_dir, best.BEST_DIR, best.BEST_FILE), config.get("finished_step")
    selected = checkpoint == "best" and kept is not None and kept["adapter"]
    step = kept["step"] if selected else last
    rows = results(run_dir, step)
    mine = [r for r in rows if r["pushed"]]
    after = ([r for r in mine if "report" in r["questions"]] or mine or [None])[0]
    bases = [r for r in rows if r["model"] == "the base model"]
    before = next((r for r in bases if after and r["questions"] == after["questions"]), bases[0] if bases else None)
    report = _read(run_dir, "eval.json")
    data = dataset_id(s)
    eval_results = None
    if after and "report" in after["questions"]:
        name = f"GSM8K ({data}), held-out questions of the train split" if data else "held-out math word problems"
        eval_results = [EvalResult(task_type="text-generation", task_name="Math word problems",
                                   dataset_type=data or "synthetic-math-word-problems", dataset_name=name,
                                   dataset_split="train" if data else None, metric_type="accuracy",
                                   metric_name=f"accuracy on {report['n']} held-out questions, greedy",
                                   metric_value=round(after["accuracy"], 4))]
    tags = ["grpo", "trl", "math", "grpo-math"] + (["gsm8k"] if "dataset" in s else [])
    tags += {"adapter": ["lora"], "merged": [], "gguf": ["llama.cpp", "ollama"]}[kind]
    base = base_model(s.get("model_name", ""))
    card_data = ModelCardData(base_model=base, datasets=[data] if data else None,
                              library_name=LIBRARIES[kind], tags=tags, pipeline_tag="text-generation",
                              model_name=(repo_id + SUFFIXES[kind]).split("/")[-1], eval_results=eval_results)
    gguf = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, GGUF_DIR, "*.gguf")))
    quants = [m.group(0).upper() for m in (re.search(r"(?i)(i?q\d\w*|bf16|f16|f32)(?=\.gguf$)", f) for f in gguf) if m]
    siblings = [(k, repo_id + SUFFIXES[k]) for k, files in _parts(run_dir, run_dir).items() if files and k != kind]
    which = ("the adapter the run kept on its held-out selection questions" if selected else
             "the last adapter (--checkpoint last)" if kept is not None else
             "the last adapter: the run selected none (held-out evaluation during training was off)")
    if kind != "adapter":
        which += ", merged into the base model"
    if kind != "adapter" and kept and kept["adapter"] and kept["step"] != last:  # RUN/merged and RUN/gguf say no step
        which += (". The export does not record which adapter it merged: export.py and --save-merged take the kept "
                  f"one (step {kept['step']}), or with --checkpoint last the last (step {last})")
    return ModelCard.from_template(
        card_data, template_path=TEMPLATE, kind=kind, repo_id=repo_id + SUFFIXES[kind], adapter_repo=repo_id,
        endpoint=endpoint(), settings=s, config=config, step=step, which=which, rows=rows, before=before,
        after=after, base=base, dataset=data, command=reproduce_command(s),
        fidelity=_fidelity(run_dir), gguf_files=gguf, quants=quants, siblings=siblings,
        rewards=", ".join(f"{name} x{w:g}" for name, w in config.get("reward_weights", {}).items()),
        agents=config.get("agents", {}), versions=config.get("versions", {}))

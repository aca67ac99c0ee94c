"""grpo_math/push.py against a stand-in Hub (tests/hub_server.py) driven by the real huggingface_hub client: what
each repo receives, byte for byte, the model card, check()'s one-line refusals, and a push that fails halfway.

One smoke run serves the module: the tiny model, step 2 rigged to be the best (tests/faults.py), with
--save-merged, so that it has a kept adapter in best/, the last one at its root and RUN/merged.
"""

import hashlib
import json
import os
import shutil

import pytest
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError

from conftest import keep_the_base, run_script
from grpo_math import intervals, push
from hub_server import ORG, USER, hub  # noqa: F401 (hub is the fixture)

REPO = f"{USER}/run"
RECORDS = {"run/config.json", "run/eval.json", "run/best.json", "run/training_stats.json", "run/rewards.png"}
ADAPTER = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "README.md"}
FIDELITY = {"questions": 100, "agent": "Solve step by step.", "runtime": {"gguf": "llama.cpp (llama-cpp-python)"},
            "exports": [{"name": "adapter", "accuracy": 0.27, "interval": [0.19, 0.36], "difference": None,
                         "difference_interval": None, "agreement": None},
                        {"name": "q4_k_m", "file": "gguf/model-Q4_K_M.gguf", "accuracy": 0.25, "interval": [0.18, 0.34],
                         "difference": -0.02, "difference_interval": [-0.06, 0.02], "agreement": 0.95}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The module's smoke run (about 10 s): kept adapter, last adapter and RUN/merged, as the scripts write them."""
    out = str(tmp_path_factory.mktemp("push") / "run")
    run_script("tests/faults.py", "rig-best-step-2", "train_synthetic.py", "--smoke", "--max-steps", "2",
               "--save-merged", "--output-dir", out)
    return out


@pytest.fixture(scope="module")
def gsm8k_run(run, tmp_path_factory):
    """The run as a GSM8K run of a hub model would leave it, with GGUF files and fidelity.json: its config.json
    names Qwen and openai/gsm8k (the weights stay the tiny model's: the push only reads files)."""
    out = str(tmp_path_factory.mktemp("push-gsm8k") / "run")
    shutil.copytree(run, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["settings"] = {k: v for k, v in config["settings"].items() if k not in ("difficulty", "curriculum")}
    config["settings"].update(model_name="Qwen/Qwen2.5-1.5B-Instruct", dataset="openai/gsm8k", smoke=False)
    os.makedirs(os.path.join(out, "gguf"))
    gguf = {"model-Q4_K_M.gguf": b"GGUF" + bytes(range(256)) * 4, "Modelfile": b"FROM ./model-Q4_K_M.gguf\n"}
    for name, data in gguf.items():
        with open(os.path.join(out, "gguf", name), "wb") as f:
            f.write(data)
    for name, obj in (("config.json", config), ("fidelity.json", FIDELITY)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)
    return out


def sha(data):
    return hashlib.sha256(data).hexdigest()


def snapshot(folder):
    """Every file and folder under ``folder``, with each file's size, modification time and sha256."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = "folder"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, sha(f.read()))
    return found


def figure(k, n):
    low, high = intervals.wilson(k, n)
    return f"{k / n:.1%} [{low:.1%}, {high:.1%}]"


@pytest.mark.parametrize("checkpoint, adapter_folder, private", [
    ("best", "best", False),  # the kept adapter, from RUN/best/
    ("last", "", True),       # the last one, from the run folder's root; --private reaches create_repo
])
def test_each_part_goes_to_its_repo_byte_for_byte(hub, run, checkpoint, adapter_folder, private):
    """The adapter at REPO and the merged model at REPO-merged, where PeftModel and from_pretrained look, each
    file as it is in the run; the records under run/, never a root config.json (transformers would read the
    kit's settings as a model config), nothing from checkpoint-N/ or base-model/; LFS files take the basic
    transfer."""
    urls = push.push_run(run, REPO, private=private, checkpoint=checkpoint)
    assert urls == [f"{hub.url}/{REPO}", f"{hub.url}/{REPO}-merged"]
    assert set(hub.repos) == {REPO, f"{REPO}-merged"}
    assert hub.private == {REPO: private, f"{REPO}-merged": private}
    pushed = hub.repos[REPO]
    assert set(pushed) == ADAPTER | RECORDS
    for name in ADAPTER - {"README.md"}:
        with open(os.path.join(run, adapter_folder, name), "rb") as f:
            assert sha(pushed[name]) == sha(f.read()), name
    for name in RECORDS:
        source = os.path.join(run, "best", "best.json") if name == "run/best.json" else os.path.join(run, name[4:])
        with open(source, "rb") as f:
            assert pushed[name] == f.read(), name
    merged = os.listdir(os.path.join(run, "merged"))
    assert set(hub.repos[f"{REPO}-merged"]) == {*merged, "README.md"}
    for name in merged:
        with open(os.path.join(run, "merged", name), "rb") as f:
            assert sha(hub.repos[f"{REPO}-merged"][name]) == sha(f.read()), name
    with open(os.path.join(run, adapter_folder, "adapter_model.safetensors"), "rb") as f:
        assert f"PUT /lfs/{sha(f.read())}" in hub.requests  # the LFS basic transfer, not Xet
    assert f"POST /{REPO}.git/info/lfs/objects/batch" in hub.requests


def test_the_card_gives_the_figures_and_the_model_card_metadata(hub, gsm8k_run):
    """The README.md that arrives: before and after with their intervals, each on the questions it was measured
    on, the base model and the checkpoint lines, the command that trains it again, the fidelity table; its YAML
    header, read back by huggingface_hub, names the base model, the data set and the held-out accuracy."""
    push.push_run(gsm8k_run, REPO)
    assert set(hub.repos) == {REPO, f"{REPO}-merged", f"{REPO}-GGUF"}
    assert set(hub.repos[f"{REPO}-GGUF"]) == {"model-Q4_K_M.gguf", "Modelfile", "README.md"}
    assert "run/fidelity.json" in hub.repos[REPO]
    with open(os.path.join(gsm8k_run, "best", "best.json")) as f:
        kept = json.load(f)
    with open(os.path.join(gsm8k_run, "eval.json")) as f:
        report = json.load(f)
    base = kept["base"]
    text = hub.repos[REPO]["README.md"].decode()
    before = figure(round(base["accuracy"] * base["n"]), base["n"])
    assert f"before training (the base model) {before} on the 8 selection questions" in text
    right = sum(r["correct"] for r in report["records"])
    assert f"after (this model, step 2) {figure(right, report['n'])} on the 2 report questions" in text
    assert f"| the kept adapter (**this one**) | 2 | 8 selection questions | {figure(8, 8)} |" in text
    assert "**Base model:** [Qwen/Qwen2.5-1.5B-Instruct]" in text
    assert "**Checkpoint:** step 2 of 2, the adapter the run kept" in text
    assert 'PeftModel.from_pretrained(base, "alice/run")' in text
    assert "python train_gsm8k.py --model-name Qwen/Qwen2.5-1.5B-Instruct --dataset openai/gsm8k" in text
    assert "| q4_k_m (`gguf/model-Q4_K_M.gguf`) | 25.0% [18.0%, 34.0%] | -2.0% [-6.0%, +2.0%] | 95.0% |" in text
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B-Instruct" and card.data.datasets == ["openai/gsm8k"]
    assert card.data.library_name == "peft" and "grpo" in card.data.tags and "gsm8k" in card.data.tags
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", report["accuracy"])
    assert result.dataset_type == "openai/gsm8k"
    gguf_card = hub.repos[f"{REPO}-GGUF"]["README.md"].decode()
    assert "ollama run hf.co/alice/run-GGUF:Q4_K_M" in gguf_card
    assert ModelCard(gguf_card).data.library_name == "gguf"
    assert ModelCard(hub.repos[f"{REPO}-merged"]["README.md"].decode()).data.library_name == "transformers"


@pytest.mark.parametrize("name, base", [
    ("tiny", None),                                                    # the smoke model: not on the Hub
    ("smollm2-135m-gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),      # the kit's offline copy of a hub model
    ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("./models/qwen", None),                                           # a local folder, here or not
    ("/data/models/qwen", None),
])
def test_base_model_on_the_hub(name, base):
    """The card's base_model links the model on the Hub; a model that is not there gets none, not a dead link."""
    assert push.base_model(name) == base


def test_a_run_that_kept_the_base_model_pushes_nothing(hub, run, tmp_path):
    """No step beat the base: there are no trained weights to push. push_run and export.py --push-to-hub stop
    before the Hub is asked anything, with one line that gives the command that pushes the last adapter."""
    import export

    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    keep_the_base(out)
    why = (f"the run kept the base model (clearly better than its trained steps on the held-out questions, {out}/best/best.json), "
           f"so it has no trained weights to push. To push the last adapter, step 2, anyway: python export.py {out}")
    with pytest.raises(SystemExit) as library:
        push.push_run(out, REPO)
    assert library.value.code == f"--push-to-hub was not done: {why} --push-to-hub {REPO} --checkpoint last"
    with pytest.raises(SystemExit) as command:
        export.main([out, "--push-to-hub", "run", "--private"])
    assert command.value.code == f"--push-to-hub was not done: {why} --push-to-hub run --private --checkpoint last"
    assert hub.requests == [] and not hub.repos


def fine_grained(*permissions):
    """whoami-v2's fineGrained block of a token with ``permissions`` on the user's own repos."""
    return {"global": [], "scoped": [{"entity": {"type": "user", "name": USER}, "permissions": list(permissions)}]}


@pytest.mark.parametrize("case, repo_id, words", [
    ("no token", "run", "no Hugging Face token found. Log in with `hf auth login`"),
    ("invalid token", "run", "the Hub refused HF_TOKEN as invalid (401)"),
    ("read token", "run", f"the token of {USER} can only read (role 'read')"),
    ("fine-grained, no write", "run", f"this fine-grained token has no write access (repo.write) to {USER}"),
    ("hub unreachable", "run", "pushing needs the Hugging Face Hub, and http://127.0.0.1:9 cannot be reached"),
    ("offline", "run", "pushing needs the Hugging Face Hub, and offline mode is set (HF_HUB_OFFLINE=1)"),
    ("valid token", "bad name!", "not a valid repo id. Give NAME or NAMESPACE/NAME"),
    ("valid token", "someone-else/run", f"{USER} is not a member of 'someone-else'"),
    ("public repo exists", "run", f"--private: {REPO} exists and is public"),
])
def test_check_refuses_in_one_line(hub, monkeypatch, tmp_path, case, repo_id, words):
    """Before training, each thing that would make the push fail hours later: one line that names the flag,
    the problem and the fix, and no traceback."""
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no `hf auth login` either
    elif case == "invalid token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_token_the_hub_knows")
    elif case == "read token":
        hub.role = "read"
    elif case == "fine-grained, no write":
        hub.role, hub.fine_grained = "fineGrained", fine_grained("repo.content.read")
    elif case == "hub unreachable":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    elif case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "public repo exists":
        hub.repos[REPO], hub.private[REPO] = {}, False
    with pytest.raises(SystemExit) as e:
        push.check(repo_id, private=True)
    message = str(e.value.code)
    assert message.startswith(f"--push-to-hub {repo_id}") and "\n" not in message
    assert words in message


@pytest.mark.parametrize("repo_id, role, fine_grained, full", [
    ("run", "write", None, REPO),                     # a bare name goes to the token's user
    (f"{ORG}/run", "write", None, f"{ORG}/run"),      # an org the user is in
    ("run", "fineGrained", fine_grained("repo.write"), REPO),  # write access to the user's repos
    ("run", "fineGrained", None, REPO),               # permissions not shown: the Hub decides at the push
])
def test_check_returns_the_full_repo_id(hub, repo_id, role, fine_grained, full):
    """A token that can write passes, and the id comes back whole: the repos are named before training starts."""
    hub.role, hub.fine_grained = role, fine_grained
    assert push.check(repo_id) == full
    assert hub.repos == {}  # a check creates nothing


def test_a_push_that_fails_halfway_changes_nothing_in_the_run(hub, run):
    """The merged model's commit answers 500 after the adapter went up: the error reaches the caller, the run
    folder is as it was (file by file, bytes and times), and retry_command pushes the whole run again."""
    before = snapshot(run)
    hub.fail_commit = f"{REPO}-merged"
    with pytest.raises(HfHubHTTPError, match="500"):
        push.push_run(run, REPO, checkpoint="last")
    assert snapshot(run) == before
    assert "adapter_model.safetensors" in hub.repos[REPO] and hub.repos[f"{REPO}-merged"] == {}
    assert push.retry_command(run, REPO, private=True, checkpoint="last") == \
        f"python export.py {run} --push-to-hub {REPO} --private --checkpoint last"
    assert push.retry_command(run, REPO) == f"python export.py {run} --push-to-hub {REPO}"

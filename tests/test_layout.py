"""The shape of the kit: at the top level only what a user runs or edits, the plumbing in grpo_math/
and the benchmarks in bench/; modules small enough to read in one sitting; and entry scripts whose
PEP 723 header installs the same GPU stack as requirements.txt, so that `uv run` does not quietly
train on the slower backend."""

import ast
import glob
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

MAX_LINES = 350
SCRIPTS = ("train_gsm8k.py", "train_synthetic.py")
# The top level: the recipes, the files users edit, the commands run after training.
TOP_LEVEL = {*SCRIPTS, "rewards.py", "agents.py", "data.py", "evaluate.py", "export.py"}
# The commands run after training: the plumbing never imports them.
COMMANDS = ("evaluate", "export")


def pep723_dependencies(path):
    """The ``dependencies`` of a script's ``# /// script`` block (PEP 723's reference reading)."""
    with open(path) as f:
        text = f.read()
    block = re.search(r"(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$", text)
    assert block, f"{path} has no PEP 723 block"
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in block["content"].splitlines(keepends=True))
    return tomllib.loads(content)["dependencies"]


def pins(lines):
    """{name: 'name==version'} of each pinned requirement, comments and markers dropped."""
    found = {}
    for line in lines:
        spec = line.split("#")[0].split(";")[0].strip()
        if "==" in spec:
            found[spec.split("==")[0].lower().replace("_", "-")] = spec.replace("_", "-").lower()
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_header_asks_for_the_gpu_stack(script):
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = pins(f)
    declared = pins(pep723_dependencies(os.path.join(ROOT, script)))
    assert declared == required  # the same packages at the same versions, unsloth and vllm included
    assert {"unsloth", "unsloth-zoo", "bitsandbytes", "vllm"} <= set(declared)


def test_top_level_holds_only_what_users_run_or_edit():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))} == TOP_LEVEL


@pytest.mark.parametrize("package", ["grpo_math", "bench"])
def test_the_package_map_names_every_module(package):
    """A package's __init__ docstring is its map: one line per module, and no stale line."""
    folder = os.path.join(ROOT, package)
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(folder, "*.py"))} - {"__init__"}
    with open(os.path.join(folder, "__init__.py")) as f:
        mapped = set(re.findall(r"(?m)^    (\w+)  ", ast.get_docstring(ast.parse(f.read()))))
    assert mapped == modules


def imported_modules(path):
    """Every module a file imports by absolute name, at its top or inside a function."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_plumbing_imports_no_command():
    """Imports run one way: the commands import grpo_math/, never the reverse. What a command shares
    with training (evaluate.py's generation and grading, quick_eval) lives in the package."""
    found = {os.path.relpath(p, ROOT): sorted(name for name in imported_modules(p) if name.split(".")[0] in COMMANDS)
             for p in glob.glob(os.path.join(ROOT, "grpo_math", "*.py"))}
    assert "grpo_math/held_out.py" in found
    assert {path: names for path, names in found.items() if names} == {}


def test_no_module_is_over_350_lines():
    paths = [p for folder in ("", "grpo_math", "bench") for p in glob.glob(os.path.join(ROOT, folder, "*.py"))]
    sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p)) for p in paths}
    assert set(SCRIPTS) <= set(sizes) and "grpo_math/models.py" in sizes and "bench/bench.py" in sizes
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_run_by_its_path_finds_the_package_from_any_folder(tmp_path, script):
    """`uv run train_gsm8k.py`, like `python ~/kit/train_gsm8k.py`, runs the script by its path from
    whatever folder the user is in: grpo_math/ is found beside the script, not in the working folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--max-steps" in proc.stdout


@pytest.mark.parametrize("name", ["bench", "bench_rewards", "learning_study"])
def test_a_benchmark_run_by_its_path_names_the_command_that_works(tmp_path, name):
    """The benchmarks run as modules from the kit's folder; run by their path, they say so in one line."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"run it from the kit's folder as a module: python -m bench.{name} [flags]"


def test_ci_stops_before_installing_when_the_data_is_missing(tmp_path):
    """.ci/run in a clone with no ../shared/data beside it: exit 1 at once, naming the missing file,
    before it removes or builds any virtual environment."""
    os.makedirs(tmp_path / "repo" / ".ci")
    with open(os.path.join(ROOT, ".ci", "run")) as f, open(tmp_path / "repo" / ".ci" / "run", "w") as g:
        g.write(f.read())
    proc = subprocess.run(["bash", ".ci/run"], cwd=tmp_path / "repo", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "../shared/data/gsm8k/train.jsonl is missing" in proc.stderr
    assert os.listdir(tmp_path / "repo" / ".ci") == ["run"]  # no venv made


@pytest.mark.parametrize("required, outcome", [("1", "1 failed"), ("", "1 skipped")])
def test_a_test_that_needs_the_data_fails_under_ci_and_skips_by_hand(tmp_path, required, outcome):
    (tmp_path / "test_needs_data.py").write_text(
        "import conftest\n\n"
        "def test_needs_gsm8k(monkeypatch, tmp_path):\n"
        "    monkeypatch.setattr(conftest, 'GSM8K_DIR', str(tmp_path / 'no-data'))\n"
        "    conftest.need_gsm8k()\n")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests"), "GRPO_MATH_REQUIRE_DATA": required}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(tmp_path / "test_needs_data.py")], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert "GSM8K files not found" in proc.stdout

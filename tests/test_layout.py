"""The shape of the kit: modules small enough to read in one sitting, and entry scripts whose PEP 723
header installs the same GPU stack as requirements.txt, so that `uv run` does not quietly train on
the slower backend."""

import glob
import os
import re
import tomllib

import pytest

from conftest import ROOT

MAX_LINES = 350
SCRIPTS = ("train_gsm8k.py", "train_synthetic.py")


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


def test_no_module_is_over_350_lines():
    sizes = {os.path.basename(p): sum(1 for _ in open(p)) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert set(SCRIPTS) <= set(sizes)
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}

"""The kit in a real Jupyter kernel (nbclient + ipykernel), as on Colab or Kaggle, on the smoke settings:
notebooks/train_gsm8k.ipynb from top to bottom, and each entry script pasted into a cell and edited
in its settings block. A kernel starts with its own arguments (-f kernel.json), has no __file__ and
runs the cell as __main__."""

import json
import os

import jupyter_client.launcher
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, SCRIPT_ENV, forks, keep_the_base, side_by_side, stats_of
from grpo_math import best

NOTEBOOK = os.path.join(ROOT, "notebooks", "train_gsm8k.ipynb")


def execute(notebook, cwd):
    """Run every cell in a fresh python3 kernel started in ``cwd``; a cell's error fails the test. The kernel
    (``python -m ipykernel_launcher -f kernel.json``) is forked from the session's server (tests/forks.py)."""
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}})
    with pytest.MonkeyPatch.context() as forked:
        forked.setattr(jupyter_client.launcher, "Popen", forks().popen())
        client.execute(env={**os.environ, **SCRIPT_ENV})
    return notebook


def outputs(cell):
    """A cell's text streams, joined, and the MIME types of what it displayed."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    shown = {mime for o in cell.outputs if o.output_type == "display_data" for mime in o.data}
    return text, shown


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_the_smoke_settings(tmp_path):
    """Without a GPU the notebook takes the smoke settings: install skipped, training with the plot
    shown inline, the evaluation table, and the merged export, or, where the run kept the base model,
    the line that gives the command that exports the last adapter."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(c for c in notebook.cells if "DEFAULTS.update(" in c.source)
    assert 'output_dir="outputs/gsm8k",' in settings.source
    run = str(tmp_path / "gsm8k")
    settings.source = settings.source.replace('output_dir="outputs/gsm8k",', f"output_dir={run!r},")  # as a user edits it
    execute(notebook, os.path.join(ROOT, "notebooks"))

    train = next(c for c in notebook.cells if "train_gsm8k.main(FLAGS)" in c.source)
    text, shown = outputs(train)
    assert "backend: trl (--smoke: tiny offline model on CPU)" in text and "step    4/4 | reward" in text
    assert "image/png" in shown  # rewards.png, inline
    evaluation = next(c for c in notebook.cells if "evaluate.main(" in c.source)
    assert "text/markdown" in outputs(evaluation)[1]
    table = next(o.data["text/markdown"] for o in evaluation.outputs if o.output_type == "display_data")
    assert "| majority vote |" in table and "| agent step_by_step |" in table
    export = next(c for c in notebook.cells if c.cell_type == "code" and "export.main(" in c.source)
    smoke = run + "-smoke"
    kept = best.read(smoke)
    if kept is not None and not kept["adapter"]:  # the selection rule kept the base model: nothing to merge
        assert f"python export.py {smoke} --merged --overwrite --checkpoint last" in outputs(export)[0]
        assert not os.path.exists(os.path.join(smoke, "merged"))
    else:
        assert "model.safetensors" in outputs(export)[0]
        assert os.path.exists(os.path.join(smoke, "merged", "config.json"))

    assert [e["step"] for e in stats_of(smoke)] == [0, 1, 2, 3, 4]  # step 0: the held-out baseline
    for name in ("adapter_model.safetensors", "rewards.png", "eval.json", "eval/eval.md"):
        assert os.path.exists(os.path.join(smoke, name)), name


def test_export_cell_on_a_run_that_kept_the_base_and_on_one_that_selected_none(tmp_path):
    """The notebook's export cell on two 2-step smoke runs: one made to keep the base model, where it exports
    nothing and prints the line with the command that exports the last adapter; one that selected none
    (--eval-every 0), where it merges the last adapter. Neither raises."""
    base, last = str(tmp_path / "base"), str(tmp_path / "last")
    for proc in side_by_side([["train_synthetic.py", "--smoke", "--max-steps", "2", "--output-dir", base],
                              ["train_synthetic.py", "--smoke", "--max-steps", "2", "--eval-every", "0",
                               "--output-dir", last]]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    keep_the_base(base)
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if c.cell_type == "code" and "export.main(" in c.source)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import os\ns = {{'output_dir': {base!r}}}"), cell,
        nbformat.v4.new_code_cell(f"s = {{'output_dir': {last!r}}}"), nbformat.v4.new_code_cell(cell.source),
    ])
    execute(notebook, ROOT)

    text = outputs(notebook.cells[1])[0]
    assert text.startswith("--merged was not done: the run kept the base model")
    assert text.strip().endswith(f"anyway: python export.py {base} --merged --overwrite --checkpoint last")
    assert not os.path.exists(os.path.join(base, "merged"))
    assert "model.safetensors" in outputs(notebook.cells[3])[0]
    assert os.path.isfile(os.path.join(last, "merged", "config.json"))


@pytest.mark.parametrize("script, output_dir", [
    ("train_gsm8k.py", 'output_dir="outputs/gsm8k",'),
    ("train_synthetic.py", 'output_dir="outputs/synthetic",'),
])
def test_script_pasted_into_a_cell_runs_its_settings_block(tmp_path, script, output_dir):
    """The whole script as one cell, its settings block edited (smoke=True, another folder), run from
    another working folder with only the kit on sys.path: the kernel's own arguments are ignored."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    assert output_dir in source
    run = str(tmp_path / "run")
    source = source.replace(output_dir, f"output_dir={run!r}, smoke=True,")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import sys\nsys.path.insert(0, {ROOT!r})"),
        nbformat.v4.new_code_cell(source),
    ])
    work = tmp_path / "work"
    work.mkdir()
    execute(notebook, str(work))

    text, _ = outputs(notebook.cells[1])
    assert "step    4/4 | reward" in text and "done in" in text and "on 2 held-out questions: accuracy" in text
    smoke = run + "-smoke"
    assert [e["step"] for e in stats_of(smoke)] == [0, 1, 2, 3, 4]  # step 0: the held-out baseline
    with open(os.path.join(smoke, "config.json")) as f:
        assert json.load(f)["settings"]["smoke"] is True
    assert not os.listdir(work)  # nothing written beside the notebook: the run folder is the one set

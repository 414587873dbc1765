"""Every notebook runs headless without an error cell and renders to HTML with its figures."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_notebooks  # noqa: E402
import render_notebooks  # noqa: E402

NOTEBOOKS = [py.with_suffix(".ipynb").name for py in make_notebooks.sources()]


def test_every_notebook_is_a_pair_and_the_committed_ipynb_is_what_its_py_makes():
    assert len(NOTEBOOKS) == 8, NOTEBOOKS
    res = subprocess.run([sys.executable, "tools/make_notebooks.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    import nbformat
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        text = " ".join(c.source for c in nb.cells)
        if name.startswith(("01", "02", "03", "04", "06", "07")):
            assert "## Exercises" in text and "check(" in text, name


def test_a_pair_out_of_step_fails_the_check_with_the_command_to_fix_it(tmp_path):
    for name in NOTEBOOKS[:2]:
        for suffix in (".py", ".ipynb"):
            shutil.copy(ROOT / "notebooks" / name.replace(".ipynb", suffix), tmp_path)
    shutil.copy(ROOT / "notebooks" / "jupytext.toml", tmp_path)
    py = tmp_path / NOTEBOOKS[1].replace(".ipynb", ".py")
    py.write_text(py.read_text().replace("## Where does FP16 range break?", "## Where does FP16 break?"))
    check = [sys.executable, str(ROOT / "tools" / "make_notebooks.py"), "--check", "--dir", str(tmp_path)]
    res = subprocess.run(check, capture_output=True, text=True)
    assert res.returncode == 1
    assert f"{NOTEBOOKS[1]} cell " in res.stdout and NOTEBOOKS[0] not in res.stdout, res.stdout
    assert "run `python tools/make_notebooks.py`" in res.stdout and "--from-ipynb" in res.stdout
    # the fix the message names: write the .ipynb from the .py; then the edit is in the notebook
    assert make_notebooks.main(["--dir", str(tmp_path)]) == 0
    assert subprocess.run(check, capture_output=True).returncode == 0
    import nbformat
    assert "## Where does FP16 break?" in {c.source for c in nbformat.read(py.with_suffix(".ipynb"), 4).cells}
    # and the other way: an edit made in the notebook flows back into the .py, header and cells intact
    nb = nbformat.read(py.with_suffix(".ipynb"), 4)
    nb.cells[0].source += "\nedited in Jupyter"
    nbformat.write(nb, py.with_suffix(".ipynb"))
    assert subprocess.run(check, capture_output=True).returncode == 1
    assert make_notebooks.main(["--from-ipynb", "--dir", str(tmp_path)]) == 0
    assert "# edited in Jupyter" in py.read_text() and py.read_text().startswith("# ---\n# jupyter:\n#   kernelspec:")
    assert subprocess.run(check, capture_output=True).returncode == 0
    # an .ipynb without a .py source is named too
    py.unlink()
    res = subprocess.run(check, capture_output=True, text=True)
    assert res.returncode == 1 and f"{NOTEBOOKS[1]} has no .py source" in res.stdout


# The exercise notebooks (01-04, 06, 07) run in make test-slow: about 110 s of make test's budget; the quickstart
# (00), the bring-your-own notebook (05) and the pairing check stay in make test.
SLOW_NOTEBOOKS = ("01", "02", "03", "04", "06", "07")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith(SLOW_NOTEBOOKS) else n
                                  for n in NOTEBOOKS])
def test_notebook_executes_and_renders_with_figures(name, tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    shutil.copy(ROOT / "notebooks" / name, src / name)
    html = render_notebooks.render(src / name, tmp_path / "reports")
    page = html.read_text()
    assert "Traceback (most recent call last)" not in page
    assert page.count("data:image/png;base64") >= 1, "figures are embedded"
    if name.startswith(("01", "02", "03", "04", "05", "06", "07")):
        assert "make your prediction" in page, "exercise check cells ran and gave feedback"
    if name.startswith("00"):
        assert "application/vnd.jupyter.widget-state+json" in page, "widget state is saved"
        # the widget manager is inside the page, not fetched (tests/test_browser.py opens it offline)
        assert "embed-amd.js" not in page and "require.min.js" not in page
        assert "renderWidgets" in page or "_jupyter_widget_embedder" in page
        assert page.count("data:font/woff2;base64,") == 3


def test_vendored_widget_manager_is_the_file_its_readme_records():
    vendor = ROOT / "tools" / "vendor" / "jupyter-widgets-html-manager"
    readme = (vendor / "README.md").read_text()
    files = sorted(p for p in vendor.iterdir() if p.name != "README.md")
    assert {p.name for p in files} >= {"embed.js", "embed.js.LICENSE.txt"}
    for path in files:
        assert f"| `{path.name}` | `{hashlib.sha256(path.read_bytes()).hexdigest()}` |" in readme, path.name
    assert f"html-manager {render_notebooks.WIDGET_MANAGER_VERSION}," in readme
    html = render_notebooks.widget_manager_html()
    assert "//# sourceMappingURL" not in html and html.count("data:font/woff2;base64,") == 3


def test_make_report_writes_one_html_per_notebook(tmp_path):
    """`make report` runs tools/render_notebooks.py over a folder: one HTML per notebook, errors fail it."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    src = tmp_path / "nbs"
    src.mkdir()
    for i in range(2):
        nb = new_notebook(cells=[new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, src / f"n{i}.ipynb")
    assert render_notebooks.main([str(src), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["n0.html", "n1.html"]
    bad = new_notebook(cells=[new_code_cell("raise RuntimeError('boom')")])
    bad.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(bad, src / "n2.ipynb")
    assert render_notebooks.main([str(src), str(tmp_path / "out2")]) == 1
    assert "tools/render_notebooks.py notebooks reports" in (ROOT / "Makefile").read_text()

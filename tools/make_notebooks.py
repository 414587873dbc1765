"""Keep each notebook pair in step: notebooks/NN_name.py (jupytext percent format, the source) and NN_name.ipynb.

    python tools/make_notebooks.py               # write every .ipynb from its .py (no outputs, stable cell ids)
    python tools/make_notebooks.py --check       # exit 1 naming each pair that differs (run by the tests)
    python tools/make_notebooks.py --from-ipynb  # the other way: rewrite each .py from its .ipynb

The .py files are reviewed and linted like any code. In JupyterLab with jupytext installed (a dev
dependency) saving a notebook writes both files (the pairing is set in notebooks/jupytext.toml);
after editing a .ipynb without jupytext, run ``--from-ipynb`` before the .py overwrites your edits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
COMMAND = "python tools/make_notebooks.py"


def sources(nb_dir: Path = NB_DIR) -> list[Path]:
    return sorted(nb_dir.glob("[0-9][0-9]_*.py"))


def notebook_text(py: Path) -> str:
    """The .ipynb that ``py`` makes: its cells, no outputs, ids c00, c01, ... (regenerating gives the same file)."""
    nb = jupytext.read(py, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"
    return nbformat.writes(nb)


def source_text(ipynb: Path) -> str:
    """The percent-format source of ``ipynb`` (header filtered as notebooks/jupytext.toml says)."""
    nb = nbformat.read(ipynb, as_version=4)
    return jupytext.writes(nb, fmt="py:percent", config=load_jupytext_config(str(ipynb)))


def differences(py: Path) -> str | None:
    """None when the committed .ipynb is what ``py`` makes, else what differs."""
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        return f"{ipynb.name} is missing"
    want, have = nbformat.reads(notebook_text(py), as_version=4), nbformat.read(ipynb, as_version=4)
    for i, (a, b) in enumerate(zip(want.cells, have.cells)):
        if (a.cell_type, a.source) != (b.cell_type, b.source):
            return f"{ipynb.name} cell {i} differs from {py.name}"
    if len(want.cells) != len(have.cells):
        return f"{ipynb.name} has {len(have.cells)} cells, {py.name} makes {len(want.cells)}"
    if ipynb.read_text() != nbformat.writes(want):
        return f"{ipynb.name} has outputs, cell ids or metadata that {py.name} does not make"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a .ipynb differs from its .py")
    mode.add_argument("--from-ipynb", action="store_true", help="rewrite each .py from its .ipynb")
    ap.add_argument("--dir", type=Path, default=NB_DIR, help="the notebooks folder (default: notebooks/)")
    args = ap.parse_args(argv)
    if args.from_ipynb:
        for ipynb in sorted(args.dir.glob("[0-9][0-9]_*.ipynb")):
            ipynb.with_suffix(".py").write_text(source_text(ipynb))
    pys = sources(args.dir)
    orphans = sorted(p.name for p in args.dir.glob("[0-9][0-9]_*.ipynb") if not p.with_suffix(".py").exists())
    if not args.check:
        for py in pys:
            py.with_suffix(".ipynb").write_text(notebook_text(py))
        return 0
    problems = [f"{name} has no .py source" for name in orphans] + [d for d in map(differences, pys) if d]
    for problem in problems:
        print(problem)
    if problems:
        print(f"notebooks out of step with their .py sources: run `{COMMAND}` to rewrite the .ipynb from the .py, "
              f"or `{COMMAND} --from-ipynb` if you edited the notebook in Jupyter")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Execute every notebook headless and write rendered HTML that reads offline (figures, widget state and manager inside).

    python tools/render_notebooks.py notebooks reports

Used by ``make report`` and the notebook tests. Fails (exit 1) on the first error cell, naming
the notebook and the cell. The pages need no network: figures are embedded PNG, and the widget
manager that draws the saved panel (ipywidgets' html-manager, vendored in
tools/vendor/jupyter-widgets-html-manager) is inlined instead of loaded from a CDN.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

TOOLS = Path(__file__).resolve().parent
WIDGET_MANAGER_VERSION = "1.0.15"  # @jupyter-widgets/html-manager: see tools/vendor/jupyter-widgets-html-manager
WIDGET_MANAGER = TOOLS / "vendor" / "jupyter-widgets-html-manager" / "embed.js"


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh kernel (working directory: the notebook's folder); raises on error cells."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def widget_manager_html() -> str:
    """Script elements that draw the saved widgets with no network: the vendored manager inline, its icon fonts inside.

    The manager (a webpack bundle) derives its asset URLs from a script's ``src``; an inline script has
    none, so a never-fetched ``<script type="text/x-...">`` names its origin, and the woff2 icon fonts
    (the only assets a browser picks) go in as data URLs.
    """
    code = WIDGET_MANAGER.read_text()
    for font in sorted(WIDGET_MANAGER.parent.glob("*.woff2")):
        ref = f'n.p+"{font.name}"'
        if code.count(ref) != 1:
            raise RuntimeError(f"{WIDGET_MANAGER.name} does not load {font.name}: the vendored files are out of step")
        code = code.replace(ref, json.dumps("data:font/woff2;base64," + base64.b64encode(font.read_bytes()).decode()))
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    code = code.replace("</script", "<\\/script")  # (none today) would end the inline script early
    origin = f"https://cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager@{WIDGET_MANAGER_VERSION}/dist/embed.js"
    return (f'<script type="text/x-jupyter-widgets-origin" src="{origin}"></script>\n'
            f"<script>\n{code}\n</script>")


def to_html(nb: nbformat.NotebookNode) -> str:
    """An executed notebook as one self-contained page (nbconvert's lab template, offline variant)."""
    exporter = HTMLExporter(extra_template_basedirs=[str(TOOLS / "templates")], template_name="offline")
    body, _ = exporter.from_notebook_node(nb, resources={"widget_manager_html": widget_manager_html()})
    return body


def render(path: Path, out_dir: Path) -> Path:
    nb = execute(path)
    body = to_html(nb)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (path.stem + ".html")
    target.write_text(body)
    return target


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    src = Path(argv[0] if argv else "notebooks")
    out = Path(argv[1] if len(argv) > 1 else "reports")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for nb_path in sorted(src.glob("*.ipynb")):
        start = time.perf_counter()
        try:
            target = render(nb_path, out)
        except CellExecutionError as exc:
            print(f"FAILED {nb_path.name}: {str(exc)[:2000]}", file=sys.stderr)
            return 1
        print(f"{nb_path.name} -> {target} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

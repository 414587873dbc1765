"""Generated docs are up to date with the code (coverage table, device profiles)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_docs_are_current():
    res = subprocess.run([sys.executable, "tools/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_coverage_table_lists_every_coremltools_op():
    sys.path.insert(0, str(ROOT / "tools"))
    from gen_docs import coverage_markdown

    from coreml_lab.emulator import coverage_rows

    text = coverage_markdown()
    for row in coverage_rows():
        assert f"`{row['op_type']}`" in text

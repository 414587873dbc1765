"""`make lab` starts JupyterLab (on a free port, checked that it answers, stopped); `make test` gets its browser."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_make_lab_starts_jupyterlab_on_notebooks(tmp_path):
    port = free_port()
    args = (f"--no-browser --port={port} --ip=127.0.0.1 --ServerApp.token= --ServerApp.password= "
            )
    env = {**os.environ, "PYTHON": sys.executable, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS={args}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        info = None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        assert info is not None, proc.stdout.read().decode(errors="replace")[-2000:] if proc.poll() is not None \
            else "JupyterLab did not answer"
        assert "version" in info
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5) as r:
            listing = json.loads(r.read())
        names = {c["name"] for c in listing["content"]}
        assert any(n.endswith(".ipynb") for n in names) or listing["path"] == "", names
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
        # the server (and so every kernel it starts) keeps freed memory for reuse (bench/README.md: Allocator)
        servers = list((tmp_path / "runtime").glob("jpserver-*.json"))
        assert len(servers) == 1, servers
        pid = json.loads(servers[0].read_text())["pid"]
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
        assert environ.get("MALLOC_TRIM_THRESHOLD_") and environ.get("MALLOC_MMAP_THRESHOLD_"), sorted(environ)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


FAKE_APT = """#!/bin/sh
echo "$@" >> "$FAKE_APT_LOG"
case "$1" in install) [ -n "$FAKE_APT_FAIL" ] && exit 100; printf '#!/bin/sh\\n' > "$FAKE_CHROMIUM"; chmod +x "$FAKE_CHROMIUM";; esac
"""


def make_chromium(tmp_path, fail: bool = False, **overrides):
    """`make chromium` (the browser step of `make test`) with a stand-in apt-get that records its calls."""
    apt = tmp_path / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    log, target = tmp_path / "apt.log", tmp_path / "bin" / "chromium"
    target.parent.mkdir(exist_ok=True)
    variables = {"CHROMIUM": str(target), "APT_GET": str(apt), "AS_ROOT": "0", **overrides}
    env = {**os.environ, "FAKE_APT_LOG": str(log), "FAKE_CHROMIUM": str(target), "FAKE_APT_FAIL": "1" if fail else ""}
    res = subprocess.run(["make", "-s", "chromium", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, calls, target


def test_make_test_installs_debians_chromium_when_root_and_missing(tmp_path):
    res, calls, target = make_chromium(tmp_path)
    assert res.returncode == 0, res.stderr
    assert calls == ["update -qq", "install -y -qq chromium"]
    assert target.exists() and "installing Debian's chromium" in res.stdout
    # present: nothing to do, nothing said
    res, calls, _ = make_chromium(tmp_path)
    assert res.returncode == 0 and res.stdout == res.stderr == "" and calls == ["update -qq", "install -y -qq chromium"]


def test_make_test_stops_when_chromium_cannot_be_installed_and_names_the_command(tmp_path):
    res, calls, target = make_chromium(tmp_path, AS_ROOT="")  # not root: apt-get is not called
    assert res.returncode != 0 and calls == [] and not target.exists()
    assert "sudo apt-get install -y chromium" in res.stderr and f"{target} is missing" in res.stderr
    res, calls, _ = make_chromium(tmp_path, APT_GET=str(tmp_path / "no-apt-get"))  # not Debian
    assert res.returncode != 0 and "make test CHROMIUM=/path/to/chromium" in res.stderr
    res, calls, target = make_chromium(tmp_path, fail=True)  # apt-get itself fails: so does make
    assert res.returncode != 0 and calls[-1] == "install -y -qq chromium" and not target.exists()


def test_make_test_runs_the_browser_step_before_pytest_and_lab_does_not_need_it():
    def dry(target):
        res = subprocess.run(["make", "-n", target, "CHROMIUM=/opt/x/chromium"], cwd=ROOT, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    plan = dry("test")
    assert plan.index('[ -x "/opt/x/chromium" ]') < plan.index("ruff check") < plan.index("-m pytest")
    assert "COREML_LAB_CHROMIUM=/opt/x/chromium" in plan
    assert "chromium" not in dry("lab") and "chromium" not in dry("report")

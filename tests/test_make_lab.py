"""`make lab` starts JupyterLab: started on a free port, checked that it answers, stopped."""

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
        # the server (and so every kernel it starts) keeps freed memory for reuse (README: Speed)
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

"""`torchgraft serve` as a process: prints its URL and a ready line, binds 127.0.0.1 by default, logs
one JSON line per request, and on SIGTERM finishes the stream in flight before exiting 0; bad
options are one `error:` line with exit code 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import invoke_cli
from serve_util import tiny_lm_dir

REPO = Path(__file__).resolve().parent.parent


def _start(args, log: Path):
    """The server process and its stdout lines up to the ready line; stderr (the access log) goes
    to the file `log`, so a full pipe never blocks the server."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchgraft", "serve", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("ready: "):
            return proc, lines
    proc.kill()
    raise AssertionError(f"no ready line: {lines} {log.read_text()}")


def test_ready_line_access_log_and_sigterm_drains(tmp_path):
    d = tiny_lm_dir(tmp_path / "drain", block_size=512)
    proc, lines = _start([d, "--port", "0", "--max-tokens", "300", "--max-batch", "2"], tmp_path / "log")
    try:
        assert lines[-2].startswith("serving 'drain' (decoder, 2 slots, context 512) at http://127.0.0.1:")
        url = lines[-1].removeprefix("ready: ").removesuffix("/health")
        assert lines[-2].endswith(f"{url}/v1") and httpx.get(url + "/health").json()["status"] == "ok"
        received, after_term = [], []
        first = threading.Event()

        def read_stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"model": "drain", "prompt": "Go", "max_tokens": 300, "temperature": 0,
                                    "stream": True, "stream_options": {"include_usage": True}}) as r:
                for line in r.iter_lines():
                    if line:
                        (after_term if proc.poll() is None and first.is_set() else received).append(line)
                        first.set()

        t = threading.Thread(target=read_stream)
        t.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        out, _ = proc.communicate(timeout=60)
        err = (tmp_path / "log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = received + after_term
    assert lines[-1] == "data: [DONE]" and len(after_term) > 1  # the stream went on after SIGTERM
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 300  # ...to its end
    assert "stopped" in out
    log = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert any(e["path"] == "/v1/completions" and e["status"] == 200 and e["method"] == "POST" for e in log)
    assert all({"ts", "request_id", "client", "ms", "bytes"} <= set(e) for e in log)
    assert "Traceback" not in err


def test_bad_options_are_one_line(tmp_path, capsys):
    d = tiny_lm_dir(tmp_path / "m")
    code, _, err = invoke_cli(["serve", d, "--max-batch", "0"], capsys)[:3]
    assert code == 2 and err.strip() == "error: --max-batch must be >= 1, got 0"
    code, _, err = invoke_cli(["serve", tmp_path / "nope"], capsys)[:3]
    assert code == 2 and err.startswith("error: artifact not found") and len(err.strip().splitlines()) == 1
    code, _, err = invoke_cli(["serve", d, "--api-key", " "], capsys)[:3]
    assert code == 2 and "--api-key is empty" in err

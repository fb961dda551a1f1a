"""Soak (slow): a `torchgraft serve` process takes 500 requests from 32 concurrent clients, 10% of
them bad payloads and some abandoned mid-way (streams closed early, non-streamed requests timed out
by the client). Then: no 5xx answer and the process alive (0 crashes), every good request answered
in full, the health endpoint back to all slots free (0 leaked slots), and the server's RSS within
10% of what it was after warm-up (memory flat). Loopback only, bounded in count and time."""
from __future__ import annotations

import json
import random
import threading
import time

import httpx
import psutil
import pytest

from serve_util import tiny_lm_dir
from test_serve_cli import _start

pytestmark = pytest.mark.slow

N_REQUESTS, N_CLIENTS, SLOTS = 500, 32, 8
BAD = [b"{oops", b"[]", json.dumps({"model": "soak", "prompt": "x", "max_tokens": -3}).encode(),
       json.dumps({"model": "nope", "prompt": "x"}).encode(),
       json.dumps({"model": "soak", "prompt": "y" * 200, "max_tokens": 8}).encode(),
       json.dumps({"model": "soak", "messages": [{"role": "robot", "content": "x"}]}).encode(),
       json.dumps({"model": "soak", "prompt": "x", "temperature": "hot"}).encode()]


def _one(url, rng, results):
    kind = rng.random()
    headers = {"content-type": "application/json"}
    if kind < 0.10:  # bad payload: must be a 4xx with an error object
        r = httpx.post(url + "/v1/completions", content=rng.choice(BAD), headers=headers, timeout=60)
        ok = 400 <= r.status_code < 500 and "error" in r.json()
        results.append(("bad", r.status_code, ok))
        return
    body = {"model": "soak", "prompt": rng.choice(["Hi", "The end", "Once upon", "abc def"]),
            "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 9)}
    if kind < 0.20:  # disconnect mid-stream
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
        results.append(("gone", r.status_code, r.status_code == 200))
        return
    if kind < 0.25:  # a client that gives up on a non-streamed answer
        try:
            httpx.post(url + "/v1/completions", json={**body, "max_tokens": 40}, timeout=0.02)
        except httpx.TimeoutException:
            pass
        results.append(("timeout", 0, True))
        return
    if kind < 0.60:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            lines = [x for x in r.iter_lines() if x]
        ok = r.status_code in (200, 429) and (r.status_code == 429 or lines[-1] == "data: [DONE]")
        results.append(("stream", r.status_code, ok))
        return
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={**{k: v for k, v in body.items() if k != "prompt"},
                         "messages": [{"role": "user", "content": body["prompt"]}]})
    ok = r.status_code == 429 or (r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= body["max_tokens"])
    results.append(("chat", r.status_code, ok))


def test_soak(tmp_path):
    d = tiny_lm_dir(tmp_path / "soak", block_size=128)
    proc, lines = _start([d, "--port", "0", "--max-batch", SLOTS, "--max-tokens", "64"], tmp_path / "log")
    url = lines[-1].removeprefix("ready: ").removesuffix("/health")
    server = psutil.Process(proc.pid)
    results: list[tuple[str, int, bool]] = []
    rss: dict[str, int] = {}
    counter = iter(range(N_REQUESTS))
    lock = threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        while True:
            with lock:
                i = next(counter, None)
                if i == 100:
                    rss["warm"] = server.memory_info().rss
            if i is None:
                return
            try:
                _one(url, rng, results)
            except httpx.HTTPError as e:  # a refused or reset connection would be a crash
                results.append(("transport", -1, False))
                print("transport error:", e)

    t0 = time.time()
    try:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(N_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        deadline = time.time() + 20
        while time.time() < deadline:
            health = httpx.get(url + "/health").json()
            if health["slots_free"] == SLOTS and health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.1)
        rss["end"] = server.memory_info().rss
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        err = (tmp_path / "log").read_text()
    elapsed = time.time() - t0
    assert len(results) == N_REQUESTS
    failures = [r for r in results if not r[2] or r[1] >= 500]
    assert not failures, failures[:10]
    assert health["slots_free"] == SLOTS and health["running"] == 0 and health["waiting"] == 0
    assert rss["end"] <= 1.10 * rss["warm"], rss
    assert "Traceback" not in err and proc.returncode == 0
    kinds = {k: sum(1 for r in results if r[0] == k) for k in ("bad", "gone", "timeout", "stream", "chat")}
    print(f"soak: {N_REQUESTS} requests in {elapsed:.1f}s {kinds}; RSS warm {rss['warm'] / 2**20:.0f} MiB, "
          f"end {rss['end'] / 2**20:.0f} MiB")

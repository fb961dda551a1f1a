"""`torchgraft serve` through the real `openai` client on a loopback port: completions and chat equal
`generate` (greedy, and seeded sampling), streaming concatenates to the non-streamed text, stop
strings, n, usage numbers; bad requests get OpenAI error objects (401, 400, 413) and the server stays
up; continuous batching gives every request its solo greedy output, a short request does not wait
for a long one, and a client that leaves frees its slot."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from serve_util import client, served, tiny_lm_dir
from torchgraft.data.chat_template import chat_prompt
from torchgraft.generation import generate

KEY = "test-key-123"
PROMPTS = ["Hello there", "The cat sat", "Once upon a time", "abc", "Zebra crossing", "1 2 3", "Why?", "ok"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    d = tiny_lm_dir(tmp_path_factory.mktemp("serve") / "tiny-llama")
    with served(d, api_key=KEY, max_batch=4, max_tokens=48, max_body=64 * 1024) as (url, app, art):
        yield url, app, art


def ref(art, prompt, n=24, **kw):
    """What `generate` gives for one prompt alone."""
    res = generate(art.model, [prompt], art.tokenizer, max_new_tokens=n, **{"temperature": 0.0, **kw})
    return res.texts[0], res.finish_reasons[0], len(res.tokens[0])


def finish(reason):  # generate's "eos" is OpenAI's "stop"
    return "stop" if reason == "eos" else reason


def test_models_and_health(server):
    url, app, art = server
    c = client(url, KEY)
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    h = httpx.get(url + "/health").json()
    assert h == {"status": "ok", "model": "tiny-llama", "kind": "decoder", "slots_total": 4, "slots_free": 4,
                 "waiting": 0, "running": 0}


def test_completion_equals_generate_with_usage(server):
    url, _, art = server
    c = client(url, KEY)
    for p in PROMPTS[:3]:
        text, reason, n = ref(art, p)
        r = c.completions.create(model="tiny-llama", prompt=p, max_tokens=24, temperature=0)
        assert r.choices[0].text == text and r.choices[0].finish_reason == finish(reason)
        assert r.usage.prompt_tokens == len(art.tokenizer.encode(p))
        assert r.usage.completion_tokens == n and r.usage.total_tokens == n + r.usage.prompt_tokens


def test_chat_uses_the_template_and_equals_generate(server):
    url, _, art = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    text = art.template.render(messages, add_generation_prompt=True)
    assert text == chat_prompt(art.template, "Say hi", "Be brief.")
    want, reason, n = ref(art, text, 20, add_bos=False)
    r = client(url, KEY).chat.completions.create(model="tiny-llama", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish(reason)
    assert r.usage.prompt_tokens == len(art.tokenizer.encode(text)) and r.usage.completion_tokens == n


@pytest.mark.parametrize("chat", [False, True])
def test_stream_concatenates_to_the_full_text(server, chat):
    url, _, art = server
    c = client(url, KEY)
    kw = dict(model="tiny-llama", max_tokens=30, temperature=0, n=2)
    if chat:
        kw["messages"] = [{"role": "user", "content": "Tell me a story"}]
        full = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = {0: "", 1: ""}
        for ch in chunks[:-1]:
            pieces[ch.choices[0].index] += ch.choices[0].delta.content or ""
        texts = [ch.message.content for ch in full.choices]
    else:
        kw["prompt"] = "Tell me a story"
        full = c.completions.create(**kw)
        chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = {0: "", 1: ""}
        for ch in chunks[:-1]:
            pieces[ch.choices[0].index] += ch.choices[0].text
        texts = [ch.text for ch in full.choices]
    assert [pieces[0], pieces[1]] == texts and texts[0] == texts[1]  # greedy: both choices alike
    closing = [ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason]
    assert closing == [full.choices[0].finish_reason] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_sse_wire_format_ends_with_done(server):
    url, _, _ = server
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 5, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_stop_strings(server):
    url, _, art = server
    c = client(url, KEY)
    prompt = next(p for p in PROMPTS if len(ref(art, p, 30)[0]) >= 12)
    text, _, _ = ref(art, prompt, 30)
    stop = text[6:9]
    cut = text.index(stop)
    want, reason, _ = ref(art, prompt, 30, stop=[stop])
    assert want == text[:cut] and reason == "stop"
    r = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == want


def test_seeded_sampling_equals_generate_and_n_choices_differ(server):
    url, _, art = server
    c = client(url, KEY)
    opts = dict(temperature=0.9, top_p=0.95, top_k=20)
    r = c.completions.create(model="tiny-llama", prompt="Once", max_tokens=20, n=3, seed=7,
                             temperature=0.9, top_p=0.95, extra_body={"top_k": 20})
    again = c.completions.create(model="tiny-llama", prompt="Once", max_tokens=20, n=3, seed=7,
                                 temperature=0.9, top_p=0.95, extra_body={"top_k": 20})
    texts = [ch.text for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and texts == [ch.text for ch in again.choices]
    for i in range(3):  # choice i samples with seed + i
        assert texts[i] == ref(art, "Once", 20, seed=7 + i, **opts)[0]
    assert len(set(texts)) > 1
    assert r.usage.prompt_tokens == 3 * len(art.tokenizer.encode("Once"))


def test_errors_have_the_openai_shape_and_the_server_stays_up(server):
    url, _, art = server
    c = client(url, KEY)
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "wrong").completions.create(model="tiny-llama", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401  # no key at all
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="gpt-9", prompt="x")
    assert e.value.body["code"] == "model_not_found" and "tiny-llama" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "y" * 100}])
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length is 96" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # prompt fits, prompt + max_tokens does not
        c.completions.create(model="tiny-llama", prompt="z" * 60, max_tokens=40)
    assert "100 tokens (60 in the prompt, 40 in the completion)" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-llama", prompt="x", max_tokens=49)
    assert "--max-tokens" in e.value.body["message"]
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    bad = [(b"{not json", 400, "malformed JSON"), (b"[1, 2]", 400, "malformed JSON"),
           (json.dumps({"model": "tiny-llama", "prompt": "x", "temprature": 1}).encode(), 400, "unknown field 'temprature'"),
           (json.dumps({"model": "tiny-llama", "prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
           (json.dumps({"model": "tiny-llama", "prompt": [[5, 10_000]]}).encode(), 400, "token ids"),
           (b"{" + b" " * 70_000 + b"}", 413, "request body over 65536 bytes")]
    for body, status, words in bad:
        r = httpx.post(url + "/v1/completions", content=body, headers=auth)
        err = r.json()["error"]
        assert r.status_code == status and words in err["message"], (body[:40], r.text)
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    r = httpx.get(url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    ok = c.completions.create(model="tiny-llama", prompt="still up", max_tokens=3, temperature=0)
    assert ok.choices[0].text == ref(art, "still up", 3)[0]
    assert httpx.get(url + "/health").json()["slots_free"] == 4


def test_batched_greedy_equals_solo_and_short_requests_do_not_wait(server):
    url, app, art = server
    c = client(url, KEY)
    lengths = [40, 8, 30, 12, 25, 5, 35, 16]  # 8 requests on 4 slots: admissions while others decode
    solo = [ref(art, p, n)[0] for p, n in zip(PROMPTS, lengths)]
    out = [None] * len(PROMPTS)
    steps0 = app.service.scheduler.steps
    barrier = threading.Barrier(len(PROMPTS))

    def work(i):
        barrier.wait()
        r = c.completions.create(model="tiny-llama", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        out[i] = r.choices[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == solo
    steps = app.service.scheduler.steps - steps0
    assert steps < sum(lengths) * 0.6  # decode steps were shared between requests


def test_a_short_request_does_not_wait_for_a_running_long_one(server):
    """Admitted while a long request decodes, a short one finishes first (no request waits for
    another to finish). The long one is held in a slot before the short one is sent, and each decode
    step is slowed to 5 ms, so the order does not depend on thread start-up or machine speed."""
    url, app, art = server
    c = client(url, KEY)
    sched = app.service.scheduler
    step = sched.decoder.step
    done_at = {}

    def slow_step(*a, **kw):
        time.sleep(0.005)
        return step(*a, **kw)

    def work(name, prompt, n):
        r = c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=n, temperature=0)
        done_at[name] = (time.perf_counter(), r.usage.completion_tokens)

    sched.decoder.step = slow_step
    try:
        long = threading.Thread(target=work, args=("long", PROMPTS[0], 40))
        long.start()
        deadline = time.monotonic() + 60
        while sched.stats()["running"] == 0 and "long" not in done_at and time.monotonic() < deadline:
            time.sleep(0.001)
        work("short", PROMPTS[5], 5)
        long.join()
    finally:
        sched.decoder.step = step
    assert done_at["long"][1] > done_at["short"][1]  # the long request really is longer
    assert done_at["short"][0] < done_at["long"][0]


def test_client_disconnect_frees_the_slot(tmp_path, one_thread):
    d = tiny_lm_dir(tmp_path / "long", block_size=512)
    with served(d, max_batch=2, max_tokens=500) as (url, app, _):
        sched = app.service.scheduler
        step = sched.decoder.step

        def slow_step(*a, **kw):  # 5 ms a step: 500 tokens would take 2.5 s
            time.sleep(0.005)
            return step(*a, **kw)

        sched.decoder.step = slow_step
        body = {"model": "long", "prompt": "Go", "max_tokens": 500, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert httpx.get(url + "/health").json()["slots_free"] == 1
        t0 = sched.steps
        try:  # a non-streamed request abandoned by its client
            httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass
        deadline = time.time() + 10
        while httpx.get(url + "/health").json()["slots_free"] != 2 and time.time() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json() | {"slots_free": 2, "running": 0} == httpx.get(url + "/health").json()
        assert sched.steps - t0 < 300  # both were stopped long before their 500 tokens


def test_full_queue_is_429_and_timeout_is_504():
    from torchgraft.serve.completions import Job
    from torchgraft.serve.errors import APIError
    from torchgraft.serve.scheduler import Scheduler
    from torchgraft.serve.sequence import SamplingParams, Sequence

    class NoDecoder:  # the scheduler thread is never started: only the queue is exercised
        n_slots, device = 1, "cpu"

    sched = Scheduler(None, NoDecoder(), max_queue=2)
    seqs = [Sequence([1], SamplingParams(4, temperature=0), None, lambda ev: None) for _ in range(3)]
    sched.submit(seqs[:2])
    with pytest.raises(APIError) as e:
        sched.submit(seqs[2:])
    assert e.value.status == 429 and e.value.body()["error"]["type"] == "rate_limit_error"

    async def wait_for_nothing():
        job = Job(False, "m", 1, seqs[:1], asyncio.Queue(), sched, timeout=0.1)
        return await job.collect()

    with pytest.raises(APIError) as e:
        asyncio.run(wait_for_nothing())
    assert e.value.status == 504 and seqs[0].cancelled  # the timed-out sequence gives its slot back

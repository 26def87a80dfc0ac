"""Conformance of an Ollama-compatible server, driven by the official Python client.

    OLLAMA_URL=http://127.0.0.1:11434 python ollama_api.py

Runs against any server: ollama-sim (the project's tests do), or a real Ollama, to check that
the sim still behaves like it. Every check is run and reported; none is skipped. The models come
from OLLAMA_MODEL (a small chat model, default smollm2:135m) and OLLAMA_EMBED_MODEL (an
embedding model, default all-minilm:22m); both are pulled. Exit status 0 when every check
passed, 1 otherwise.

The client is PyPI's `ollama` (hack/python-client.sh installs the pinned version); the
OpenAI-compatible routes are checked with plain HTTP, as an OpenAI client would send them.
"""

import importlib.metadata
import json
import os
import sys
import traceback
import urllib.error
import urllib.request

import ollama

URL = os.environ.get("OLLAMA_URL", "http://127.0.0.1:11434").rstrip("/")
MODEL = os.environ.get("OLLAMA_MODEL", "smollm2:135m")
EMBED = os.environ.get("OLLAMA_EMBED_MODEL", "all-minilm:22m")
DERIVED = "conformance-derived:latest"
COPY = "conformance-copy:latest"

client = ollama.Client(host=URL, timeout=300)
results = []


def check(name):
    def run(fn):
        try:
            fn()
            results.append((name, None))
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results.append((name, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        return fn

    return run


def same(a, b):
    """Model names as Ollama compares them: `m` is `m:latest`, case-insensitively."""

    def norm(n):
        n = n.lower()
        return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"

    return norm(a) == norm(b)


def names(listing):
    return [m.model for m in listing.models]


def http(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@check("pull (stream): progress, then success")
def _():
    statuses = [p.status for p in client.pull(MODEL, stream=True)]
    assert statuses and statuses[-1] == "success", statuses
    assert client.pull(EMBED).status == "success"


@check("list: the pulled models")
def _():
    listed = names(client.list())
    assert any(same(n, MODEL) for n in listed), listed
    assert any(same(n, EMBED) for n in listed), listed


@check("show: details, parameters, capabilities")
def _():
    s = client.show(MODEL)
    assert s.details is not None and s.modelfile, s
    assert "completion" in (s.capabilities or []), s.capabilities
    e = client.show(EMBED)
    assert "embedding" in (e.capabilities or []), e.capabilities


@check("generate: one answer")
def _():
    r = client.generate(model=MODEL, prompt="Say hi.", options={"num_predict": 4})
    assert r.done and isinstance(r.response, str) and r.eval_count, r


@check("generate (stream): chunks, the last one done")
def _():
    chunks = list(client.generate(model=MODEL, prompt="Say hi.", stream=True, options={"num_predict": 4}))
    assert len(chunks) >= 2 and chunks[-1].done and not chunks[0].done, chunks


@check("generate with keep_alive -1: loaded, listed by ps")
def _():
    client.generate(model=MODEL, prompt="", keep_alive=-1)
    running = [m.model for m in client.ps().models]
    assert any(same(n, MODEL) for n in running), running


@check("chat: an assistant message")
def _():
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hello"}], options={"num_predict": 4})
    assert r.done and r.message.role == "assistant" and isinstance(r.message.content, str), r


@check("chat (stream): messages, the last one done")
def _():
    chunks = list(
        client.chat(model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True, options={"num_predict": 4})
    )
    assert len(chunks) >= 2 and chunks[-1].done and chunks[0].message.role == "assistant", chunks


@check("embed: a vector per input")
def _():
    r = client.embed(model=EMBED, input=["hello", "world"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) > 0 and isinstance(r.embeddings[0][0], float), r


@check("an embedding model refuses generate (400)")
def _():
    try:
        client.generate(model=EMBED, prompt="hi")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and "does not support generate" in e.error, (e.status_code, e.error)
    else:
        raise AssertionError("generate on an embedding model succeeded")


@check("a missing model is 404")
def _():
    try:
        client.generate(model="no-such-model:1", prompt="hi")
    except ollama.ResponseError as e:
        assert e.status_code == 404, (e.status_code, e.error)
    else:
        raise AssertionError("generate on a missing model succeeded")


@check("create from a model with parameters")
def _():
    r = client.create(model=DERIVED, from_=MODEL, parameters={"num_thread": 2})
    assert r.status == "success", r
    params = client.show(DERIVED).parameters or ""
    assert any(line.split() == ["num_thread", "2"] for line in params.splitlines()), params


@check("copy, then delete the copy")
def _():
    client.copy(DERIVED, COPY)
    assert any(same(n, COPY) for n in names(client.list()))
    client.delete(COPY)
    client.delete(DERIVED)
    listed = names(client.list())
    assert not any(same(n, COPY) or same(n, DERIVED) for n in listed), listed


@check("OpenAI: /v1/models lists the models")
def _():
    status, body = http("GET", "/v1/models")
    assert status == 200, (status, body)
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert any(same(i, MODEL) for i in ids), ids


@check("OpenAI: /v1/chat/completions")
def _():
    status, body = http("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert status == 200, (status, body)
    v = json.loads(body)
    assert v["object"] == "chat.completion" and v["choices"][0]["message"]["role"] == "assistant", v
    assert v["usage"]["completion_tokens"] >= 1, v


@check("OpenAI: /v1/chat/completions (stream): events, then [DONE]")
def _():
    status, body = http("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert status == 200, (status, body)
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk", first


@check("OpenAI: /v1/completions")
def _():
    status, body = http("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert status == 200, (status, body)
    assert json.loads(body)["object"] == "text_completion", body


@check("OpenAI: /v1/embeddings")
def _():
    status, body = http("POST", "/v1/embeddings", {"model": EMBED, "input": ["a", "b"]})
    assert status == 200, (status, body)
    v = json.loads(body)
    assert [d["index"] for d in v["data"]] == [0, 1], v


@check("OpenAI: an unknown model is an error in OpenAI's shape")
def _():
    status, body = http("POST", "/v1/chat/completions", {"model": "no-such-model:1", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "message" in json.loads(body)["error"], (status, body)


failed = [(n, e) for n, e in results if e]
for name, err in results:
    print(("FAIL " if err else "ok   ") + name)
    if err:
        print("     " + err.replace("\n", "\n     "))
print(f"{len(results) - len(failed)} of {len(results)} checks passed against {URL} (ollama client {importlib.metadata.version('ollama')})")
sys.exit(1 if failed else 0)

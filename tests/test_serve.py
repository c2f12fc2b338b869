"""`erniegen serve`: requests that arrive together are decoded as one batch and each gets exactly what it
would get alone; options never mix within a batch; a failing batch fails its requests, not the server; and the
real server answers over HTTP as `generate` does, refusing bad options with a clear 422."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import erniegen  # noqa: E402
from erniegen.decoding import generate_text  # noqa: E402
from erniegen.serve import Batcher  # noqa: E402
from test_cli import ENV, tiny_minilm_dir  # noqa: E402,F401  (a module fixture)

SOURCES = [f"the {w} sat on the mat number {i} [SEP] {w}" for i, w in enumerate(
    ["cat", "dog", "cow", "hen", "fox", "owl", "bee", "elk"])]


@pytest.fixture(scope="module")
def model(tiny_minilm_dir):  # noqa: F811
    return erniegen.load(str(tiny_minilm_dir))


def test_a_request_sets_what_generate_sets():
    from erniegen.cli import build_parser
    from erniegen.search import DecodeOptions
    from erniegen.serve import GenerateRequest
    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    assert set(GenerateRequest.model_fields) == {"sources", *DecodeOptions.USER_SET}
    assert set(DecodeOptions.USER_SET) <= set(DecodeOptions.__dataclass_fields__) & {a.dest for a in generate._actions}


def recording_decoder(model, sizes):
    def decode(sources, options):
        sizes.append(len(sources))
        return generate_text(model, sources, None, 32, **options)
    return decode


def in_threads(batcher, requests):
    """Submit every (sources, options) at once from its own thread; the outputs in request order."""
    out, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def client(i, sources, options):
        barrier.wait()
        out[i] = batcher.submit(sources, options)
    threads = [threading.Thread(target=client, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_requests_that_arrive_together_share_a_batch_and_get_what_they_get_alone(model):
    sizes = []
    batcher = Batcher(recording_decoder(model, sizes), batch_size=32, max_wait_ms=500).start()
    requests = [([s], {"max_length": 6}) for s in SOURCES[:6]]
    got = in_threads(batcher, requests)
    batcher.close()
    assert got == [generate_text(model, s, None, 1, max_length=6) for s, _ in requests]
    assert sum(sizes) == 6 and len(sizes) < 6 and batcher.batches == len(sizes) and batcher.requests == 6


def test_options_never_mix_and_the_batch_size_caps_a_batch(model):
    sizes = []
    batcher = Batcher(recording_decoder(model, sizes), batch_size=4, max_wait_ms=500).start()
    requests = [(SOURCES[0:2], {"max_length": 6}), (SOURCES[2:4], {"max_length": 6}),
                (SOURCES[4:6], {"max_length": 6}), (SOURCES[6:8], {"max_length": 6, "num_beams": 2})]
    got = in_threads(batcher, requests)
    batcher.close()
    assert got == [generate_text(model, s, None, 1, **o) for s, o in requests]
    # three requests of 2 sources with one set of options: 4 fit a batch, 2 go in the next; the beam request alone
    assert sorted(sizes) == [2, 2, 4] and batcher.requests == 4


def test_a_failing_batch_fails_its_requests_and_the_server_goes_on(model):
    def decode(sources, options):
        if "boom" in sources:
            raise ValueError("cannot decode 'boom'")
        return generate_text(model, sources, None, 32, **options)
    batcher = Batcher(decode).start()
    with pytest.raises(ValueError, match="cannot decode 'boom'"):
        batcher.submit(["boom"], {"max_length": 6})
    assert batcher.submit(SOURCES[:1], {"max_length": 6}) == generate_text(model, SOURCES[:1], None, 1, max_length=6)
    batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(SOURCES[:1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_answers_as_generate_does(tiny_minilm_dir, model):  # noqa: F811
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "erniegen.cli", "serve", "--model", str(tiny_minilm_dir),
                               "--port", str(port), "--max-length", "6", "--max-wait-ms", "300",
                               "--max-request-sources", "4"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                status, health = call(f"{base}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.1)
        assert status == 200 and health["status"] == "ok" and health["decoder"] == "infilling"
        assert health["batches"] == 0  # the start-up warm-up decodes are not requests
        status, body = call(f"{base}/generate", {"sources": SOURCES[:3]})
        assert status == 200 and body["predictions"] == generate_text(model, SOURCES[:3], None, 1, max_length=6)
        status, body = call(f"{base}/generate", {"sources": SOURCES[:2], "num_beams": 2, "max_length": 4})
        assert body["predictions"] == generate_text(model, SOURCES[:2], None, 1, num_beams=2, max_length=4)
        # concurrent clients share batches and each still gets its own outputs
        out = [None] * 4

        def client(i):
            out[i] = call(f"{base}/generate", {"sources": [SOURCES[i]]})[1]["predictions"]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert out == [generate_text(model, [s], None, 1, max_length=6) for s in SOURCES[:4]]
        _, health = call(f"{base}/health")
        assert health["requests"] == 6 and health["batches"] < 6
        status, body = call(f"{base}/generate", {"sources": SOURCES[:1], "num_beams": 0})
        assert status == 422 and body["detail"] == "num_beams must be >= 1, got 0"
        status, body = call(f"{base}/generate", {"sources": SOURCES[:1], "min_length": 9})
        assert status == 422 and body["detail"] == "min_length 9 exceeds max_length 6"
        status, body = call(f"{base}/generate", {"sources": []})
        assert status == 422 and "sources" in json.dumps(body["detail"])
        status, body = call(f"{base}/generate", {"sources": SOURCES[:5]})
        assert status == 422 and body["detail"].startswith("sources: 5 in one request, at most 4")
        # a second server on the same port cannot bind it: a clear error and status 2, not a silent exit
        second = subprocess.run([sys.executable, "-m", "erniegen.cli", "serve", "--model", str(tiny_minilm_dir),
                                 "--port", str(port)], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"could not serve on 127.0.0.1:{port}" in second.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0, server.stdout.read()


STOP_SCRIPT = """
import signal, threading, time
from erniegen.serve import Batcher
signal.signal(signal.SIGTERM, signal.default_int_handler)
batcher = Batcher(lambda sources, options: sources)
def stop_from_this_thread():
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # the signal lands on a thread that is not main
threading.Thread(target=stop_from_this_thread).start()
start = time.monotonic()
try:
    batcher.serve_forever()
except KeyboardInterrupt:
    print(f"stopped after {time.monotonic() - start:.1f} s")
"""


def test_an_idle_server_stops_on_a_signal_that_lands_on_another_thread():
    """The kernel hands a process's signal to any of its threads; Python runs the handler on the main thread,
    and only when that thread runs bytecode: an idle batcher must wake up now and then to let it."""
    p = subprocess.run([sys.executable, "-c", STOP_SCRIPT], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("stopped after"), p.stderr
    assert float(p.stdout.split()[2]) < 2.0

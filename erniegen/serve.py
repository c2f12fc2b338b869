"""``erniegen serve``: a model behind HTTP, with requests that arrive together decoded as one batch.

On two CPU cores a batch of 32 greedy decodes is several times the samples a second of one at a time
(BENCHMARKS.md section 3), so a server that decodes each request alone wastes most of the machine under load.
One thread owns the model; it takes every waiting request that asks for the same decoding options, up to
``batch_size`` sources, decodes them together, and hands each request its own outputs. Requests that arrive
while a batch decodes form the next one; ``max_wait_ms`` can hold a lone request back for company.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from .search import DecodeOptions

IDLE_WAKEUP_S = 0.25  # how long an idle server may go before it notices Ctrl-C or SIGTERM


class GenerateRequest(BaseModel):
    """``POST /generate``'s body: the sources, and any decoding option to set for them (JSON null: the server's)."""

    sources: list[str] = Field(min_length=1, description="texts to generate from, formatted as the model was trained")
    num_beams: int | None = None
    max_length: int | None = None
    min_length: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    max_token_run: int | None = None
    block_repeated_words: bool | None = None
    iterations: int | None = None
    length_beam: int | None = None
    dedup: bool | None = None
    exit_threshold: float | None = None
    exit_gate: float | None = None


class GenerateResponse(BaseModel):
    predictions: list[str]
    ms: float  # from the request's arrival at the batcher to its outputs


@dataclass
class _Request:
    sources: list[str]
    options: dict
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[str] | None = None
    error: BaseException | None = None

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.options.items()))


class Batcher:
    """Decodes submitted requests in shared batches on the one thread that runs :meth:`serve_forever`.

    That thread should be the process's main one: PyTorch's OpenMP pool belongs to the thread that first
    ran a parallel operation, and a second thread that decodes gets a second pool, more threads than cores,
    whose workers libgomp then puts to sleep between operations (decoding took 1.4-1.7x as long from another
    thread here, BENCHMARKS.md section 3). ``erniegen serve`` runs the HTTP server on a thread of its own."""

    def __init__(self, decode: Callable[[list[str], dict], list[str]], batch_size: int = 32,
                 max_wait_ms: float = 0.0):
        self.decode, self.batch_size, self.max_wait = decode, batch_size, max_wait_ms / 1000
        self.batches = self.requests = 0  # decode calls and requests served so far
        self._pending: list[_Request] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> "Batcher":
        """Serve on a background thread instead (tests, or a caller whose main thread is taken)."""
        self._thread = threading.Thread(target=self.serve_forever, name="erniegen-batcher", daemon=True)
        self._thread.start()
        return self

    def submit(self, sources: Sequence[str], options: dict | None = None) -> list[str]:
        """The outputs for ``sources``, in order; blocks until the batch holding them is decoded."""
        request = _Request(list(sources), dict(options or {}))
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append(request)
            self._cv.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        """Take no more requests; :meth:`serve_forever` returns once those submitted are answered."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def serve_forever(self) -> None:
        """Decode batches until :meth:`close`, then answer what is still waiting and return."""
        while (batch := self._take()) is not None:
            sources = [s for r in batch for s in r.sources]
            try:
                outputs = self.decode(sources, batch[0].options)
            except BaseException as e:  # every waiting request hears of it; the server goes on unless stopped
                stopped = not isinstance(e, Exception)  # Ctrl-C or SIGTERM during the decode
                for r in batch:
                    r.error = RuntimeError("the server is shutting down") if stopped else e
                    r.done.set()
                if stopped:
                    raise
                continue
            self.batches += 1
            self.requests += len(batch)
            start = 0
            for r in batch:
                r.result, start = outputs[start:start + len(r.sources)], start + len(r.sources)
                r.done.set()

    def _take(self) -> list[_Request] | None:
        """The next batch: the oldest request and, in arrival order, those with its options that fit."""
        with self._cv:
            while not self._pending:
                if self._stopping:
                    return None
                # never block for good: a signal the kernel hands to another thread reaches Python's handler
                # only when the main thread next runs bytecode
                self._cv.wait(timeout=IDLE_WAKEUP_S)
            first = self._pending[0]
            while not self._stopping:
                waiting = sum(len(r.sources) for r in self._pending if r.key == first.key)
                left = first.arrived + self.max_wait - time.monotonic()
                if waiting >= self.batch_size or left <= 0:
                    break
                self._cv.wait(timeout=left)
            batch, size = [], 0
            for r in self._pending:
                if r.key == first.key and (not batch or size + len(r.sources) <= self.batch_size):
                    batch.append(r)
                    size += len(r.sources)
            self._pending = [r for r in self._pending if all(r is not b for b in batch)]
            return batch


def create_app(model, decoder: str, defaults: dict, check: Callable[[dict], None], batch_size: int = 32,
               max_wait_ms: float = 0.0, max_request_sources: int = 256):
    """The FastAPI application: ``POST /generate`` and ``GET /health``. ``defaults`` are the server's
    decoding options, which a request's own override; ``check`` refuses an option out of range (ValueError).
    Its batcher (``app.state.batcher``) is not started: run its ``serve_forever`` on the main thread."""
    from fastapi import FastAPI, HTTPException

    from .decoding import generate_text

    def decode(sources: list[str], options: dict) -> list[str]:
        return generate_text(model, sources, decoder, batch_size, **options)

    batcher = Batcher(decode, batch_size, max_wait_ms)

    name = getattr(model, "name_or_path", "model")

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # requests already taken are answered first

    app = FastAPI(title="erniegen", description=f"{name}: {model.settings.method} model, decoder {decoder}, "
                                                f"{model.precision}", lifespan=lifespan)
    app.state.batcher, app.state.defaults = batcher, defaults

    @app.post("/generate", response_model=GenerateResponse)
    def generate(request: GenerateRequest) -> GenerateResponse:
        if len(request.sources) > max_request_sources:
            raise HTTPException(status_code=422, detail=f"sources: {len(request.sources)} in one request, at most "
                                                        f"{max_request_sources} (erniegen serve --max-request-sources)")
        asked = {k: v for k in DecodeOptions.USER_SET if (v := getattr(request, k)) is not None}
        options = defaults | asked
        try:
            check(options)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        start = time.perf_counter()
        try:
            predictions = batcher.submit(request.sources, options)
        except ValueError as e:  # options that pass one by one but not together, e.g. for this decoder
            raise HTTPException(status_code=422, detail=str(e)) from None
        except RuntimeError as e:  # shutting down
            raise HTTPException(status_code=503, detail=str(e)) from None
        return GenerateResponse(predictions=predictions, ms=(time.perf_counter() - start) * 1000)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name, "method": model.settings.method, "decoder": decoder,
                "precision": model.precision, "batch_size": batch_size, "max_wait_ms": max_wait_ms,
                "batches": batcher.batches, "requests": batcher.requests}

    return app


def run_server(app, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM: HTTP (uvicorn) on a thread of its own, the model's batcher on this
    one, which should be the main thread (:class:`Batcher` says why). What was taken in is answered first."""
    import uvicorn
    batcher: Batcher = app.state.batcher
    # the first decodes are slow (allocation, packing; with --runtime compile the compilation, once for one row
    # and once for more): pay them before the first request does
    start = time.perf_counter()
    for rows in (1, 2):
        batcher.decode(["warm up [SEP] warm"] * rows, app.state.defaults)
    print(f"warmed up in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                          timeout_graceful_shutdown=30))

    def run_http() -> None:
        try:
            server.run()
        finally:  # the server stopped (or never bound its port): this thread stops serving too
            batcher.close()

    http = threading.Thread(target=run_http, name="erniegen-http", daemon=True)
    http.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        batcher.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        batcher.close()
        batcher.serve_forever()  # answer what was already taken in
        http.join(timeout=60)  # open connections get 30 s (timeout_graceful_shutdown), then are dropped
    if not server.started:
        raise ValueError(f"could not serve on {host}:{port} (uvicorn's message is above)")

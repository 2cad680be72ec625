"""Running the app: the listening socket, uvicorn, and a stop that drains.

SIGTERM or Ctrl-C stops taking connections, lets running requests finish for [serve] grace
seconds, cancels what is left (those streams end with an error event), and returns normally,
so `gpt serve` exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import uvicorn

from gpt.config import ServeConfig
from gpt.engine import Engine, EngineThread
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.serve.api import Limits
from gpt.serve.app import create_app
from gpt.serve.guard import is_loopback
from gpt.tokenizer import Tokenizer

log = logging.getLogger("gpt.serve")
API_KEY_ENV = "GPT_API_KEY"


def serve(
    load: Callable[[], GPT],
    tokenizer: Tokenizer,
    model: str,
    settings: ServeConfig,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
) -> None:
    """`gpt serve`: listen on [serve] host and port (a port in use fails before the model
    loads), start the engine on the model `load` gives, and serve it as `model` until SIGTERM
    or Ctrl-C."""
    with bind(settings.host, settings.port) as sock:
        engine = start_engine(load, settings)
        run(sock, engine, tokenizer, model, settings, api_key, cors_origins)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads: a port in use is one line at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise GPTError(f"--host {host!r} is not an address here ({e}); give one such as "
                       "127.0.0.1, ::1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GPTError(f"port {port} on {host} is in use (another gpt serve?); stop that "
                           "program or choose another port with --port") from None
        if e.errno == errno.EACCES:
            raise GPTError(f"no permission to listen on port {port} on {host}; choose a port "
                           "above 1023 with --port") from None
        raise GPTError(f"cannot listen on {host} port {port} ({e.strerror}); choose another "
                       "--host or --port") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server whose first stop signal also starts draining the engine, and which
    returns after it instead of raising the signal again (uvicorn's way), so the exit is 0."""

    def __init__(self, config: uvicorn.Config, on_stop: threading.Thread) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.on_stop.is_alive() and not self.should_exit:
            log.info("stopping: finishing running requests for up to the grace period")
            self.on_stop.start()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run(
    sock: socket.socket,
    engine: EngineThread,
    tokenizer: Tokenizer,
    model: str,
    settings: ServeConfig,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
) -> None:
    """Serve the started `engine` on `sock` until SIGTERM or Ctrl-C, then drain and return."""
    context = engine.engine.context
    limits = Limits(
        model=model, context=context, max_tokens=min(settings.max_tokens, context),
        default_max_tokens=settings.default_max_tokens, max_sequences=settings.max_batch,
        max_batch=settings.max_batch, max_body_bytes=settings.max_body_bytes,
        max_in_flight=settings.max_connections,
    )
    _log_to_stderr()
    host, port = sock.getsockname()[:2]
    app = create_app(engine, tokenizer, limits, api_key, cors_origins,
                     loopback_only=is_loopback(host))

    def drain() -> None:
        app.state.stopping = True
        engine.stop(settings.grace)

    server = _Server(uvicorn_config(app, settings.grace),
                     threading.Thread(target=drain, name="drain", daemon=True))
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model} on http://{shown}:{port} (the page at /, the API at /v1); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    if not is_loopback(host) and api_key is None:
        print(f"note: {host} is reachable from the network and no API key is set; anyone who "
              f"can reach it can use it (set --api-key or {API_KEY_ENV})", file=sys.stderr,
              flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if server.on_stop.is_alive():
            server.on_stop.join()
        elif not app.state.stopping:
            drain()
    print("stopped", file=sys.stderr, flush=True)


def uvicorn_config(app: object, grace: float) -> uvicorn.Config:
    """uvicorn's settings. No `limit_concurrency`: it counts open connections, so idle ones
    (or ones holding half a request: uvicorn has no timeout for reading a request's head) would
    turn everyone away with a plain-text 503; the app bounds requests itself, with OpenAI's
    errors. An idle kept-alive connection is closed after 5 s."""
    return uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off",  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(grace) + 5,  # the engine cancels by then
        timeout_keep_alive=5,
    )


def _log_to_stderr() -> None:
    """The request lines ("gpt.serve") and uvicorn's warnings, on stderr with a timestamp."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name, level in (("gpt.serve", logging.INFO), ("uvicorn.error", logging.WARNING)):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = False


def start_engine(load: Callable[[], GPT], settings: ServeConfig) -> EngineThread:
    """The engine with [serve]'s batch and context, started, its model loaded by `load` in the
    engine's own thread: that thread then does all of the server's torch work, which keeps
    OpenMP's threads spinning at full speed (see EngineThread)."""

    def build() -> Engine:
        model = load()
        block_size = model.config.block_size
        if settings.context is not None and settings.context > block_size:
            raise GPTError(f"[serve] context = {settings.context} is more than the model's "
                           f"block_size ({block_size}); lower it or leave it unset")
        return Engine(model, max_batch=settings.max_batch, context=settings.context,
                      prefill_chunk=settings.prefill_chunk)

    engine = EngineThread(build)
    engine.start()
    return engine

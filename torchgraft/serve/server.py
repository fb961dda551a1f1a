"""Running the app: `serve(path, settings)` for the CLI, `BackgroundServer` for tests and notebooks.

uvicorn serves the app; once its socket is bound the URL and a ready line are printed (port 0
picks a free port: the printed URL has the real one). SIGTERM / SIGINT make uvicorn stop accepting
connections and wait for the requests in flight (streams included) to finish, up to
`drain_timeout` seconds; then the scheduler thread stops and the process exits 0.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.serve.settings import ServeSettings


def _configure_logging() -> None:
    """Access log (JSON lines) and server messages on stderr, once."""
    for name in ("torchgraft.serve", "torchgraft.serve.access"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def _uvicorn_server(app: Any, settings: ServeSettings, drain_timeout: float, on_ready: Any = None) -> Any:
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=drain_timeout, server_header=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.service.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(self)

    return Server(config)


def check_listen(host: str, port: int) -> None:
    """One-line errors for an address this machine cannot listen on (a host name that does not
    resolve, an address that is not this machine's, a port in use or privileged), checked by
    binding a socket once; uvicorn would otherwise log the error and exit 3 after the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address or a host name this machine can resolve "
                          f"({e.strerror}); use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: no TIME_WAIT clash
        try:
            s.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port, "
                              "or a --host of this machine") from None


def bound_url(server: Any) -> str:
    """http://HOST:PORT of a started uvicorn server (the real port when 0 was asked)."""
    sock = server.servers[0].sockets[0]
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def serve(path: str, settings: ServeSettings, drain_timeout: float = 30.0, echo: Any = print) -> None:
    """Load `path`, serve it until SIGTERM / SIGINT, drain, return."""
    from torchgraft.serve.app import create_app
    from torchgraft.serve.artifact import load_artifact

    settings.check()
    check_listen(settings.host, settings.port)  # before loading the model: a typo costs nothing
    _configure_logging()
    artifact = load_artifact(path, settings.device, settings.name, settings.context)
    app = create_app(artifact, settings)
    kind = app.service.kind

    def ready(server: Any) -> None:
        url = bound_url(server)
        detail = (f"{settings.max_batch} slots, context {artifact.context}" if kind == "decoder" else "encoder")
        echo(f"serving {artifact.name!r} ({kind}, {detail}) at {url}/v1")
        echo(f"ready: {url}/health")
        sys.stdout.flush()

    server = _uvicorn_server(app, settings, drain_timeout, ready)
    try:
        with _stop_on_signal_reraise():
            server.run()
    except _Stopped:
        pass
    except OSError as e:  # address in use, permission denied
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror or e}); pick "
                          "another --port") from None
    if not server.started:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}; is the port in use? pick "
                          "another --port")
    echo("stopped")


class _Stopped(Exception):
    """SIGTERM / SIGINT arrived and uvicorn has drained: a normal end."""


@contextlib.contextmanager
def _stop_on_signal_reraise() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it has drained; with our handler in place
    that becomes `_Stopped` (exit 0) instead of death by SIGTERM. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves an app on a free loopback port in a thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 5.0):
        self.app = app
        self.settings = ServeSettings(host=host, port=port)
        self.server = _uvicorn_server(app, self.settings, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, name="torchgraft-serve-http", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            threading.Event().wait(0.02)
        self.url = bound_url(self.server)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

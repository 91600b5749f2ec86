"""Health and metrics endpoints every long-running service serves.

``/healthz`` answers 200 while the process is alive, ``/readyz`` 200 only while
the service's readiness check passes (its dependencies are reachable; a check
that raises :class:`NotReady` puts its reason in the 503's body), and
``/metrics`` is the Prometheus text exposition of the default registry. The
server runs in a daemon thread so it never blocks a service's main loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

ReadyCheck = Callable[[], bool]


class NotReady(Exception):
    """Raised by a readiness check to say why the service is not ready."""


class OpsServer:
    """Serves /healthz, /readyz and /metrics on ``host:port`` until :meth:`close`."""

    def __init__(self, host: str, port: int, ready: ReadyCheck) -> None:
        check = ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif self.path == "/readyz":
                    why = _not_ready(check)
                    body = b"ready\n" if why is None else f"not ready: {why}\n".encode()
                    self._send(200 if why is None else 503, body, "text/plain")
                elif self.path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the structured log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _not_ready(check: ReadyCheck) -> str | None:
    """None when ready, else why not (the exception's class for an unexpected failure,
    whose message may hold addresses or names that do not belong in an HTTP answer)."""
    try:
        return None if check() else "the readiness check failed"
    except NotReady as exc:
        return str(exc)
    except Exception as exc:  # any failure means not ready
        return f"{type(exc).__name__} from the readiness check"

"""moto's S3 server with every write answered in turn, so a conditional write is one atomic step as
it is on S3. moto checks `If-Match` / `If-None-Match` and then stores the object, two steps on a
threaded server: two conditional PUTs racing for one key could both pass the check and both
succeed (seen once in eight contenders for a stale lock in tests/unit/test_locks.py: two holders).
S3 itself answers exactly one of them. Reads stay concurrent.

`python tests/s3_server.py PORT`: serves on 127.0.0.1:PORT until SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

WRITES = frozenset({"PUT", "POST", "DELETE"})


class WritesInTurn:
    """WSGI middleware: a write runs whole (check, store and answer) under one lock."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in WRITES:
            return self.app(environ, start_response)
        with self.lock:
            return list(self.app(environ, start_response))


def main(port: int) -> None:
    os.environ.setdefault("MOTO_PORT", str(port))  # as `python -m moto.server` does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = WritesInTurn(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(int(sys.argv[1]))

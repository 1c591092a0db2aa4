"""An HTTP proxy on 127.0.0.1 that forwards to an S3 endpoint (moto's server) and fails some requests
the way S3 and networks do: every `every`-th request is answered 503 SlowDown (S3's throttling
reply) or has its connection dropped before any answer. Only first attempts count: a retry (the
AWS SDKs number each try in the `amz-sdk-request` header) always passes, so however many
processes share the proxy, a client that retries at all never meets two faults in a row. The
rest pass unchanged, so a client with working retries sees exactly what the endpoint holds."""

from __future__ import annotations

import http.client
import itertools
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_ATTEMPT = re.compile(r"attempt=(\d+)")


class FaultyProxy:
    """`with FaultyProxy(endpoint, every=3, fault="503") as proxy:` then point clients at `proxy.url`.
    `fault`: "503", "drop" or "mixed" (alternating). `delay` (seconds, settable while it runs) holds
    every request that long, to slow a client down enough to interrupt it; after `limit` faults (when
    given) every request passes. `proxy.requests` /
    `proxy.faults` / `proxy.retries` (requests that were a later attempt) count."""

    def __init__(
        self, upstream: str, every: int = 3, fault: str = "mixed", delay: float = 0.0, limit: int | None = None
    ):
        if fault not in ("503", "drop", "mixed"):
            raise ValueError(f"fault must be 503, drop or mixed, got {fault!r}")
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.every, self.fault, self.delay, self.limit = every, fault, delay, limit
        self.requests = self.faults = self.retries = 0
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3-proxy", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _next_fault(self, sdk_request: str) -> str | None:
        attempt = _ATTEMPT.search(sdk_request)
        with self._lock:
            self.requests += 1
            if attempt and int(attempt.group(1)) > 1:
                self.retries += 1
                return None
            n = next(self._counter)
            if n % self.every or (self.limit is not None and self.faults >= self.limit):
                return None
            self.faults += 1
            if self.fault != "mixed":
                return self.fault
            return "503" if (n // self.every) % 2 else "drop"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()  # read first: a dropped request has still been sent in full
                time.sleep(proxy.delay)
                fault = proxy._next_fault(self.headers.get("amz-sdk-request", ""))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body: bytes sent would poison the next
                        self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                # a HEAD answer has no body: its Content-Length is the object's, as upstream said
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler

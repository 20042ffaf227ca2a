"""A real S3-compatible server for the tests (moto's standalone server, over HTTP on localhost)
behind a small proxy of ours that counts what crosses it and injects faults: throttling (503)
bursts, and a server that stops answering."""

from __future__ import annotations

import http.client
import re
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Traffic:
    """What the proxy forwarded: per object key, the body bytes answered to GETs and the
    requests by method."""

    body_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    ranges: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def fetched(self, key: str) -> int:
        return self.body_bytes.get(key, 0)

    def clear(self) -> None:
        self.body_bytes.clear()
        self.requests.clear()
        self.ranges.clear()


class Proxy:
    """Forwards every request to `upstream`, counting and, when told, failing them."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.traffic = Traffic()
        self.lock = threading.Lock()
        self.fail_next = 0  # answer this many requests with 503 SlowDown
        self.down_after: int | None = None  # after this many more requests, stop answering
        self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                key = re.sub(r"\?.*$", "", self.path)
                with proxy.lock:
                    proxy.traffic.requests[(self.command, key)] += 1
                    if self.headers.get("Range"):
                        proxy.traffic.ranges[key].append(self.headers["Range"])
                    if proxy.down_after is not None:
                        if proxy.down_after <= 0:
                            proxy.failed += 1
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        proxy.down_after -= 1
                    if proxy.fail_next > 0:
                        proxy.fail_next -= 1
                        proxy.failed += 1
                        msg = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.traffic.body_bytes[key] += len(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.fail_next = 0
            self.down_after = None
            self.failed = 0
            self.traffic.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

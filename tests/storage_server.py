"""A real S3-compatible server for the tests (moto's standalone server, over HTTP on localhost)
behind a small proxy of ours that counts what crosses it and injects faults: throttling (503)
bursts, and a server that stops answering. The proxy can also serve HTTPS, with a certificate
for 127.0.0.1 signed by a certificate authority made for the test."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import re
import socket
import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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


def certificate_authority(directory: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A new CA's certificate (DIR/NAME-ca.pem) and a server context whose certificate for
    127.0.0.1 it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def signed(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        build = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            build = build.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return build.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = signed(f"{name} CA", ca_key, f"{name} CA", ca_key, True)
    cert = signed("127.0.0.1", key, f"{name} CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (directory / f"{name}-ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / f"{name}-server.pem").write_bytes(
        cert.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / f"{name}-server.pem")
    return directory / f"{name}-ca.pem", context


class Proxy:
    """Forwards every request to `upstream`, counting and, when told, failing them; over HTTPS
    with `tls`."""

    def __init__(self, upstream_port: int, tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
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

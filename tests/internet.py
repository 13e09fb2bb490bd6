"""A small "internet" on other loopback addresses, for the gateway's tests: an HTTPS server with a
test CA's certificate on 127.0.0.2 and a plain HTTP server on 127.0.0.3, each answering every
GET with a body that names it, and recording the headers of what reached it. Nothing here leaves
the machine."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from pathlib import Path
from typing import List, Optional, Tuple


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True
    body = b""
    seen: List[Tuple[str, str, dict]]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        server: Recorder = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else b""
        server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = server.body or (f"hello from {self.server.server_address[0]}\n".encode() + payload)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def make_ca_and_cert(folder: Path, ip: str) -> Tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): a test CA and a certificate it signed for `ip`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "ext.cnf"
    ext.write_text(f"subjectAltName=IP:{ip}\n")
    for argv in (
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=patchwire test CA", "-keyout", str(ca_key), "-out", str(ca_crt)],
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", f"/CN={ip}", "-keyout", str(key), "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt)],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return ca_crt, crt, key


class Internet:
    """Start with `Internet(folder)`; `https` and `http` are (host, port); `ca` the CA file."""

    def __init__(self, folder: Path):
        self.ca, cert, key = make_ca_and_cert(folder, "127.0.0.2")
        self.servers: List[Recorder] = []
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.https = self._start("127.0.0.2", tls)
        self.http = self._start("127.0.0.3", None)

    def _start(self, ip: str, tls: Optional[ssl.SSLContext]) -> Tuple[str, int]:
        server = Recorder((ip, 0), _Handler)
        server.seen = []
        if tls:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return ip, server.server_address[1]

    @property
    def https_seen(self):
        return self.servers[0].seen

    @property
    def http_seen(self):
        return self.servers[1].seen

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

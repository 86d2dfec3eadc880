"""A test KDS: a real HTTP server on 127.0.0.1 serving the real vectors at KDS's paths.

    /vcek/v1/{Milan,Genoa,Turin}/{hwid}?{SPLs}   the vector VCEK whose report has that chip
                                                 id and REPORTED_TCB (exact query only)
    /vcek/v1/{Product}/cert_chain                tests/vectors/<product>_cert_chain.pem
    /vcek/v1/Milan/crl                           tests/vectors/milan_crl.der (real, stale now)

It records every request and can be scripted: ``kds.script(Reply(429), Reply(404), ...)``
makes the next VCEK requests get those answers (then normal service resumes). Everything
else gets 404, as KDS answers unknown chips.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from certd.abi import report as reportmod
from certd.abi.product import Product

VECTORS = Path(__file__).parent / "vectors"

#: (product, report, VCEK) served by default; Genoa is the model A0h (Siena/Bergamo) part.
SERVED = [
    (Product.MILAN, "milan_report.bin", "milan_vcek.der"),
    (Product.GENOA, "genoa_report.bin", "genoa_vcek.der"),
    (Product.TURIN, "turin_report.bin", "turin_vcek.der"),
]


def vector_identity(product: Product, report_file: str):
    """(hwid as KDS wants it, reported TCB) read from a vector report."""
    r = reportmod.parse((VECTORS / report_file).read_bytes())
    return r.hwid(product), r.reported_tcb(product)


def spl_query(tcb) -> str:
    """The query KDS documents (fmcSPL first on Turin), written out independently."""
    parts = [] if tcb.fmc is None else [f"fmcSPL={tcb.fmc}"]
    parts += [f"blSPL={tcb.bl}", f"teeSPL={tcb.tee}", f"snpSPL={tcb.snp}", f"ucodeSPL={tcb.ucode}"]
    return "&".join(parts)


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None      #: None: the normal answer for the path
    headers: dict = field(default_factory=dict)
    slow_s: float | None = None    #: send the body one byte per slow_s seconds
    hold: threading.Event | None = None  #: answer only once this is set

    @classmethod
    def garbage(cls) -> "Reply":
        return cls(200, os.urandom(700))


@dataclass
class Request:
    path: str
    query: str
    at: float

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


class KdsServer:
    def __init__(self, served=SERVED, *, extra: dict[str, bytes] | None = None):
        self.routes: dict[str, bytes] = {}
        for product, report_file, vcek_file in served:
            hwid, tcb = vector_identity(product, report_file)
            self.routes[f"/vcek/v1/{product.value}/{hwid.hex()}?{spl_query(tcb)}"] = \
                (VECTORS / vcek_file).read_bytes()
        for product in Product:
            self.routes[f"/vcek/v1/{product.value}/cert_chain"] = \
                (VECTORS / f"{product.value.lower()}_cert_chain.pem").read_bytes()
        self.routes["/vcek/v1/Milan/crl"] = (VECTORS / "milan_crl.der").read_bytes()
        self.routes.update(extra or {})
        self.requests: list[Request] = []
        self._script: collections.deque[Reply] = collections.deque()
        self._mutex = threading.Lock()
        self.stopping = threading.Event()
        self.first_vcek_request = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "KdsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> "KdsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def script(self, *replies: Reply) -> None:
        """The next VCEK requests get these answers, in order."""
        with self._mutex:
            self._script.extend(replies)

    def vcek_requests(self) -> list[Request]:
        with self._mutex:
            return [r for r in self.requests if r.path.startswith("/vcek/v1/")
                    and not r.path.endswith(("/cert_chain", "/crl"))]

    def _next_reply(self, path: str, target: str) -> Reply:
        with self._mutex:
            is_vcek = path.startswith("/vcek/v1/") and not path.endswith(("/cert_chain", "/crl"))
            if is_vcek and self._script:
                return self._script.popleft()
        return Reply(200) if target in self.routes else Reply(404, b"Not Found")

    def _handler(self):
        kds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                u = urlsplit(self.path)
                target = u.path + (f"?{u.query}" if u.query else "")
                with kds._mutex:
                    kds.requests.append(Request(u.path, u.query, time.monotonic()))
                if u.path.startswith("/vcek/v1/") and not u.path.endswith(("/cert_chain", "/crl")):
                    kds.first_vcek_request.set()
                reply = kds._next_reply(u.path, target)
                if reply.hold is not None:
                    reply.hold.wait(30)
                body = reply.body if reply.body is not None else kds.routes.get(target, b"")
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-cache")  # as KDS sends
                self.end_headers()
                try:
                    if reply.slow_s is None:
                        self.wfile.write(body)
                        return
                    for i in range(len(body)):
                        if kds.stopping.wait(reply.slow_s):
                            return
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeouts do that)

        return Handler

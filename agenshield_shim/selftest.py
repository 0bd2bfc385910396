"""``python -m agenshield_shim.selftest [--json]``: is *this* interpreter guarded and routed?

One line per check, ``PASS``/``FAIL``/``SKIP`` and the reason:

- the shim is active (version, transport, broker);
- the guard refuses a direct TCP connect, a UDP datagram, a DNS query (a ``.invalid`` name) and a
  connect through ``_socket``; each aimed at a loopback socket this test opened itself, which is
  then checked to have received nothing (a refusal is proven, not assumed);
- the configured broker answers ``GET /health``;
- each installed HTTP library among http.client, urllib.request, urllib3, requests, httpx and
  aiohttp fetches a page from a loopback upstream of ours *through the broker* (a library that is
  not installed is skipped, which is not a failure).

When the configured broker is not running, the reference broker is started for the run (on the
configured port: the guard lets this interpreter reach no other) as a subprocess with
``AGENSHIELD_ENABLED=false`` (it must reach the upstream, which the guard would refuse in-process),
and the output says so; without the ``[broker]`` extra it says how to install it.

Why this file is self-contained (standard library only, no import of the shim at module level,
Python 3.8 syntax): ``agenshield-shim verify --python PATH`` runs this very source inside the
*target* interpreter (``PATH -c SOURCE --verify``), where a different version of the shim, or none,
may be installed. ``--verify`` runs the subset the verify command promises (shim, direct connection,
broker health, one routed request) and never starts a broker: it reports on the broker the target
is configured for.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

PASS, FAIL, SKIP, INFO, WARN = "PASS", "FAIL", "SKIP", "INFO", "WARN"
TIMEOUT = 2.0  # every network step here is on loopback: anything slower is a failure
INVALID_NAME = "agenshield-selftest.invalid"  # RFC 6761: never resolves, so a real query proves nothing was refused
BROKER_EXTRA_HINT = 'pip install "agenshield-shim[broker]"'
LIBRARIES = ("http.client", "urllib.request", "urllib3", "requests", "httpx", "aiohttp")
_TOKEN = os.urandom(8).hex()


class Check:
    """One line of the report."""

    def __init__(self, name: str, status: str, detail: str) -> None:
        self.name = name
        self.status = status
        self.detail = detail

    def as_dict(self) -> Dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}

    def line(self) -> str:
        return "%s  %s: %s" % (self.status, self.name, self.detail)


# -- the shim's state ---------------------------------------------------------------------------


class ShimState:
    """What the shim of this interpreter is doing, read without changing anything."""

    def __init__(self, fallback_host: str, fallback_port: int) -> None:
        self.active = False
        self.version: Optional[str] = None
        self.reason = ""
        self.broker_host = fallback_host
        self.broker_port = fallback_port
        self.transport = "auto"
        self.transport_reason = ""
        self.config: Any = None
        self.locked = False
        self.blocked_error: Tuple[Type[BaseException], ...] = ()
        self.tunnels: Optional[bool] = None  # does the broker carry CONNECT? (learned by the transport check)
        self.tunnel_reason = ""
        self._read()

    def _read(self) -> None:
        try:
            import agenshield_shim
        except ImportError:
            self.reason = "agenshield_shim is not installed for %s" % sys.executable
            return
        self.version = getattr(agenshield_shim, "__version__", "unknown")
        self.blocked_error = (agenshield_shim.NetworkBlockedError,)
        site_dir = os.path.dirname(os.path.dirname(os.path.abspath(agenshield_shim.__file__)))
        self.locked = os.path.exists(os.path.join(site_dir, "agenshield_shim.lock"))
        failsafe = getattr(sys, "_agenshield_failsafe", None)
        if failsafe:
            self.reason = "fail-safe active, every connection is blocked: %s" % failsafe
            return
        boot = sys.modules.get("agenshield_shim._boot")
        policy = boot.active_policy() if boot is not None else None
        if boot is None or policy is None:
            enabled = os.environ.get("AGENSHIELD_ENABLED")
            if enabled is not None and enabled.strip().lower() in ("false", "0", "no", "off"):
                self.reason = "AGENSHIELD_ENABLED=%s switched it off" % enabled
            elif not _is_site_dir(site_dir):
                self.version = None
                self.reason = ("agenshield_shim is not installed in this environment (the copy in %s is not in "
                               "site-packages: PYTHONPATH?); install it: agenshield-shim install --python %s"
                               % (site_dir, sys.executable))
            elif not os.path.exists(os.path.join(site_dir, "agenshield_shim.pth")):
                self.reason = "agenshield_shim.pth is missing from %s (install the wheel, not the source tree)" % site_dir
            else:
                self.reason = "installed but not booted (started with -S or -I -S?)"
            return
        if policy[4] is not None:
            self.reason = "failed closed, every connection is blocked: %s" % policy[4]
            return
        config = boot.active_config() if hasattr(boot, "active_config") else None
        if config is not None:
            self.broker_host, self.broker_port = config.broker_host, config.broker_port
            self.transport = config.transport
            self.config = config
        self.active = True

    @property
    def broker(self) -> str:
        host = "[%s]" % self.broker_host if ":" in self.broker_host else self.broker_host
        return "%s:%d" % (host, self.broker_port)

    def describe(self) -> str:
        text = "agenshield-shim %s, transport %s, broker %s" % (self.version, self.transport, self.broker)
        return text + (" (locked by agenshield_shim.lock)" if self.locked else "")


def _is_site_dir(directory: str) -> bool:
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    real = os.path.realpath(directory)
    return any(os.path.realpath(d) == real for d in dirs)


# -- loopback helpers ---------------------------------------------------------------------------


def http_get_raw(host: str, port: int, target: str, timeout: float = TIMEOUT,
                 proxy: bool = False) -> Tuple[int, bytes]:
    """A GET on a plain socket: (status, body). Used for the broker itself, where no hook may interfere.

    ``target`` is the request target: a path, or an absolute URL when talking to a proxy.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        host_header = target.split("/")[2] if proxy else "%s:%d" % (host, port)
        request = "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nAccept: */*\r\n\r\n" % (target, host_header)
        sock.sendall(request.encode("ascii"))
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise OSError("not an HTTP answer: %r" % raw[:60]) from None
    if any(line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower() for line in lines[1:]):
        body = _unchunk(body)
    return status, body


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return b"".join(out)


def broker_health(host: str, port: int) -> Tuple[bool, str]:
    """(ok, reason) for ``GET /health`` on the broker."""
    try:
        status, body = http_get_raw(host, port, "/health")
    except (OSError, ValueError) as exc:
        return False, "%s: %s" % (type(exc).__name__, exc)
    try:
        payload = json.loads(body.decode("utf-8"))
    except ValueError:
        payload = None
    if status == 200 and isinstance(payload, dict) and payload.get("status") == "ok":
        version = payload.get("version")
        return True, "GET /health -> ok" + (" (broker %s)" % version if version else "")
    return False, "GET /health answered %d %r: not an AgenShield broker" % (status, body[:80])


class Upstream:
    """A loopback HTTP server in this process: answers ``/anything`` with a token, counts requests.

    The broker (another process) connects to it; this interpreter never does directly.
    """

    def __init__(self) -> None:
        import http.server
        import socketserver

        hits: List[str] = []
        token = _TOKEN

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hits.append(self.path)
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    _websocket_echo(self, token)
                    return
                body = ("%s %s" % (token, self.path)).encode("ascii")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.hits = hits
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def expect(self, path: str, body: Any) -> bool:
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        return body == "%s %s" % (_TOKEN, path) and path in self.hits

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _websocket_echo(handler: Any, token: str) -> None:
    """Accept a websocket (RFC 6455) and answer its first text message with ``TOKEN message``."""
    import base64
    import hashlib

    key = handler.headers.get("Sec-WebSocket-Key", "")
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    handler.send_response(101)
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept.decode("ascii"))
    handler.end_headers()
    handler.wfile.flush()
    reader = handler.rfile
    head = reader.read(2)
    if len(head) < 2:
        return
    length = head[1] & 127
    if length == 126:
        length = int.from_bytes(reader.read(2), "big")
    elif length == 127:
        length = int.from_bytes(reader.read(8), "big")
    mask = reader.read(4) if head[1] & 128 else b"\0\0\0\0"
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(reader.read(length)))
    answer = ("%s %s" % (token, data.decode("utf-8", "replace"))).encode("utf-8")
    frame = bytes([0x81, 126]) + len(answer).to_bytes(2, "big") if len(answer) > 125 else bytes([0x81, len(answer)])
    handler.wfile.write(frame + answer + b"\x88\x02\x03\xe8")  # the answer, then a normal close
    handler.wfile.flush()
    handler.close_connection = True


class StartedBroker:
    """The reference broker as a subprocess with the shim off, on the configured port."""

    def __init__(self, host: str, port: int) -> None:
        env = dict(os.environ)
        env["AGENSHIELD_ENABLED"] = "false"  # it must reach the upstream; allowed: env= is not os.environ
        listen = "::1" if host in ("::1", "[::1]") else "127.0.0.1"
        cmd = [sys.executable, "-m", "agenshield_shim.broker", "--host", listen, "--port", str(port),
               "--audit", os.devnull, "--shutdown-grace", "0.5"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 10
        assert self.proc.stdout is not None
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line or line.startswith(b"agenshield broker listening on"):
                break
        if not line.startswith(b"agenshield broker listening on"):
            self.stop()
            err = self.proc.stderr.read().decode("utf-8", "replace").strip() if self.proc.stderr else ""
            raise RuntimeError("the reference broker did not start: %s" % (err.splitlines()[-1] if err else "no output"))
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# -- the guard checks ----------------------------------------------------------------------------


def _refused(shim: ShimState, attempt: Callable[[], Any]) -> Tuple[bool, str]:
    """Run ``attempt``; (True, message) when the shim refused it, else (False, what happened)."""
    try:
        attempt()
    except shim.blocked_error as exc:
        return True, str(exc)
    except Exception as exc:  # noqa: BLE001 - any other outcome is what we report
        return False, "not refused by the shim: %s: %s" % (type(exc).__name__, exc)
    return False, "it went through"


def _quiet_refusals() -> Callable[[], None]:
    """Deliberate refusals would each log a warning on stderr: hold them back while we provoke them."""
    import logging

    logger = logging.getLogger("agenshield_shim")

    def drop(record: Any) -> bool:
        return "blocked" not in record.getMessage()

    logger.addFilter(drop)
    return lambda: logger.removeFilter(drop)


def _check_stream(shim: ShimState, name: str, label: str, make: Callable[[], Any]) -> Check:
    """Connect a socket made by ``make`` to a listener of ours; passes if refused and nothing arrived."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = make()
        client.settimeout(TIMEOUT)
        try:
            refused, why = _refused(shim, lambda: client.connect(("127.0.0.1", port)))
        finally:
            client.close()
        received = _pending(listener)
    finally:
        listener.close()
    return _guard_result(name, "%s 127.0.0.1:%d" % (label, port), refused, why, received)


def check_tcp(shim: ShimState) -> Check:
    return _check_stream(shim, "guard: direct TCP", "connect to", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def check_socket_module(shim: ShimState) -> Check:
    import _socket

    return _check_stream(
        shim, "guard: _socket", "_socket connect to", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    )


def check_udp(shim: ShimState) -> Check:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            refused, why = _refused(shim, lambda: sender.sendto(b"agenshield-selftest", ("127.0.0.1", port)))
        finally:
            sender.close()
        receiver.setblocking(False)
        time.sleep(0.01)
        try:
            receiver.recvfrom(64)
            received = True
        except (BlockingIOError, InterruptedError):
            received = False
    finally:
        receiver.close()
    return _guard_result("guard: UDP", "datagram to 127.0.0.1:%d" % port, refused, why, received)


def check_dns(shim: ShimState) -> Check:
    refused, why = _refused(shim, lambda: socket.getaddrinfo(INVALID_NAME, 80))
    if refused:
        return Check("guard: DNS", PASS, "lookup of %s refused before the resolver ran" % INVALID_NAME)
    return Check("guard: DNS", FAIL, "lookup of %s %s" % (INVALID_NAME, why))


def _pending(listener: socket.socket) -> bool:
    """Did anything reach this listening socket? (a loopback connect completes before connect() returns)"""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return False
    conn.close()
    return True


def _guard_result(name: str, what: str, refused: bool, why: str, received: bool) -> Check:
    if received:
        return Check(name, FAIL, "%s reached the listener (%s)" % (what, why))
    if refused:
        return Check(name, PASS, "%s refused, listener received nothing" % what)
    return Check(name, FAIL, "%s %s" % (what, why))


# -- routed requests ----------------------------------------------------------------------------


def _get_http_client(url: str) -> bytes:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError("HTTP %d: %r" % (response.status, body[:80]))
        return body
    finally:
        conn.close()


def _get_urllib(url: str) -> bytes:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the caller's proxies are not under test
    with opener.open(url, timeout=TIMEOUT) as response:
        return response.read()  # type: ignore[no-any-return]


def _get_urllib3(url: str) -> bytes:
    import urllib3

    pool = urllib3.PoolManager()
    try:
        response = pool.request("GET", url, timeout=TIMEOUT, retries=False)
        if response.status != 200:
            raise OSError("HTTP %d" % response.status)
        return response.data  # type: ignore[no-any-return,unused-ignore]
    finally:
        pool.clear()


def _get_requests(url: str) -> bytes:
    import requests

    with requests.Session() as session:
        session.trust_env = False
        response = session.get(url, timeout=TIMEOUT)
        response.raise_for_status()
        return response.content  # type: ignore[no-any-return,unused-ignore]


def _get_httpx(url: str) -> bytes:
    import httpx

    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        response = client.get(url)
        response.raise_for_status()
        return response.content  # type: ignore[no-any-return,unused-ignore]


def _get_aiohttp(url: str) -> bytes:
    import asyncio

    import aiohttp

    async def fetch() -> bytes:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
            async with session.get(url) as response:
                response.raise_for_status()
                return await response.read()

    return asyncio.run(fetch())


def _get_httpx2(url: str) -> bytes:
    import httpx2  # type: ignore[import-not-found]

    with httpx2.Client(timeout=TIMEOUT) as client:  # its defaults: the proxy variables are honoured
        response = client.get(url)
        response.raise_for_status()
        return response.content  # type: ignore[no-any-return]


def _get_websockets(url: str) -> bytes:
    from websockets.sync.client import connect  # type: ignore[import-not-found]

    path = url.split("/", 3)[3]
    with connect("ws" + url[4:], open_timeout=TIMEOUT, close_timeout=1) as ws:
        ws.send("/" + path)
        answer = ws.recv(timeout=TIMEOUT)
    return answer.encode("utf-8") if isinstance(answer, str) else answer  # type: ignore[no-any-return]


FETCHERS: Dict[str, Callable[[str], bytes]] = {
    "httpx2": _get_httpx2,
    "websockets": _get_websockets,
    "http.client": _get_http_client,
    "urllib.request": _get_urllib,
    "urllib3": _get_urllib3,
    "requests": _get_requests,
    "httpx": _get_httpx,
    "aiohttp": _get_aiohttp,
}


def installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_library(name: str, shim: ShimState, upstream: Optional[Upstream], broker_ok: bool) -> Check:
    label = "routed: " + name
    if not installed(name):
        return Check(label, SKIP, "not installed")
    if not shim.active:
        return Check(label, FAIL, "cannot be routed: the shim is not active")
    if upstream is None or not broker_ok:
        return Check(label, FAIL, "no broker to route through")
    path = "/selftest/" + name
    try:
        body = FETCHERS[name](upstream.url(path))
    except shim.blocked_error as exc:
        return Check(label, FAIL, "not routed: the guard refused the direct connection (%s)" % exc)
    except Exception as exc:  # noqa: BLE001
        return Check(label, FAIL, "request failed: %s: %s" % (type(exc).__name__, _first_line(exc)))
    if upstream.expect(path, body):
        return Check(label, PASS, "GET %s through the broker at %s" % (upstream.url(path), shim.broker))
    return Check(label, FAIL, "unexpected answer %r" % (body[:80],))


# -- the HTTP stacks installed here ---------------------------------------------------------------

HOOK, PROXY_ENV, NATIVE, NONE = "hook", "proxy environment", "native", "none"

#: HTTP stacks looked up by distribution (``importlib.metadata``: nothing is imported), in order:
#: (distribution, import name, the modules whose hook routes it, how it goes without a hook, a
#: note). Whether a hook routes it is read from ``agenshield_shim._boot.HOOKS`` at run time, never
#: assumed: a stack is hooked when the table registers one of its modules (or any module of its
#: import name); which releases the hook is for is read from that hook module's ``VERSIONS``.
STACKS = (
    ("urllib3", "urllib3", ("http.client",), NONE, ""),
    ("requests", "requests", ("http.client",), NONE, ""),
    ("httpx", "httpx", ("httpx",), PROXY_ENV, ""),
    ("aiohttp", "aiohttp", ("aiohttp",), NONE, "its trust_env is off by default"),
    ("httpx2", "httpx2", ("httpx2",), PROXY_ENV, ""),
    ("websockets", "websockets", ("websockets.asyncio.client", "websockets.sync.client"), PROXY_ENV, ""),
    ("niquests", "niquests", (), PROXY_ENV, ""),
    ("httplib2", "httplib2", (), PROXY_ENV, ""),
    ("tornado", "tornado", (), NONE, "its default HTTP client has no proxy support"),
    ("pycurl", "pycurl", (), NATIVE, "libcurl"),
    ("curl_cffi", "curl_cffi", (), NATIVE, "libcurl (curl-impersonate)"),
    ("grpcio", "grpc", (), NATIVE, "gRPC's C core"),
)
#: Checked (and reported "not installed") as before this listing existed.
ALWAYS_LISTED = ("urllib3", "requests", "httpx", "aiohttp")

#: (oldest, newest tested or None, why older releases are not routed or None): a hook's ``VERSIONS`` entry.
Versions = Tuple[str, Optional[str], Optional[str]]


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, from its metadata; None when it is not installed."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - 3.8+ has it
        return None
    try:
        return metadata.version(distribution)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or metadata too broken to read
        return None


def hooked_modules() -> List[str]:
    """The modules ``_boot.HOOKS`` registers in the shim of this interpreter (empty without one)."""
    boot = sys.modules.get("agenshield_shim._boot")
    return [name for name, _ in getattr(boot, "HOOKS", ())]


def hook_versions() -> Dict[str, Versions]:
    """Distribution -> its :data:`Versions`, from the ``VERSIONS`` of every hook module ``_boot.HOOKS``
    names (importing a hook module installs nothing); empty for a shim whose hooks have none."""
    import importlib

    boot = sys.modules.get("agenshield_shim._boot")
    found: Dict[str, Versions] = {}
    for _, spec in getattr(boot, "HOOKS", ()):
        name = spec.partition(":")[0] if isinstance(spec, str) else getattr(spec, "__module__", "")
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a hook that cannot load is reported by its own check
            continue
        for entry in getattr(module, "VERSIONS", ()):
            found.setdefault(entry[0], (entry[1], entry[2], entry[3]))
    return found


def release(version: str, length: int = 3) -> Tuple[int, ...]:
    """``3.14.1`` as ``(3, 14, 1)``, cut to ``length`` parts; a part that is not a number ends it."""
    parts: List[int] = []
    for part in version.split(".")[:length]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(parts)


def before(version: str, bound: str) -> bool:
    """Is ``version`` older than the release ``bound`` (``3.9``, ``15``) names?"""
    return release(version) < release(bound)


def after(version: str, bound: str) -> bool:
    """Is ``version`` newer than every release ``bound`` (``3.14``, ``2.x``) covers?"""
    cut = release(bound)
    return release(version, len(cut)) > cut


def range_text(distribution: str, versions: Versions) -> str:
    """``aiohttp 3.9 to 3.14``, ``websockets 15 and later``: how the README states a hook's range."""
    oldest, newest, _ = versions
    return "%s %s %s" % (distribution, oldest, "and later" if newest is None else "to " + newest)


def classify(import_name: str, via: Tuple[str, ...], otherwise: str, version: str,
             versions: Optional[Versions], hooked: List[str]) -> str:
    """HOOK, PROXY_ENV, NATIVE or NONE for one installed stack."""
    if otherwise == NATIVE:
        return NATIVE
    if versions is not None and versions[2] is not None and before(version, versions[0]):
        return NONE  # the hook routes nothing of a release this old
    if any(name in via or name.split(".", 1)[0] == import_name for name in hooked):
        return HOOK
    return otherwise


def check_stack(entry: Tuple[Any, ...], shim: ShimState, upstream: Optional[Upstream], broker_ok: bool,
                hooked: List[str], versions: Optional[Dict[str, Versions]] = None) -> Optional[Check]:
    """One line for an installed stack: how it is routed, checked end to end where it is routed."""
    distribution, import_name, via, otherwise, note = entry
    version = installed_version(distribution)
    label = "routed: " + distribution
    if version is None:
        return Check(label, SKIP, "not installed") if distribution in ALWAYS_LISTED else None
    supported = (versions or {}).get(distribution)
    how = classify(import_name, via, otherwise, version, supported, hooked)
    named = "%s %s" % (distribution, version)
    if how == NATIVE:
        return Check(label, WARN, "not routed: %s is native code (%s): its connections are not seen by the guard; "
                                  "it may follow the proxy variables, and only --sandbox netns confines it" % (named, note))
    if how == NONE:
        if supported is not None and supported[2] is not None and before(version, supported[0]):
            why = supported[2]
        else:
            why = note or "no hook, and it does not use the proxy variables"
        return Check(label, FAIL, "not routed: %s (%s): the guard refuses its connections, so its requests fail"
                                  % (named, why))
    untested = ""
    if how == HOOK and supported is not None:
        oldest, newest, _ = supported
        if before(version, oldest) or (newest is not None and after(version, newest)):
            untested = "; untested: the hook is for %s" % range_text(distribution, supported)
    named += untested
    if how == PROXY_ENV:
        problem = _proxy_environment_problem(shim)
        if problem is not None:
            return Check(label, WARN, "through the proxy environment, which cannot carry it here: %s" % problem)
        if distribution not in FETCHERS:
            return Check(label, PASS, "through the proxy environment (%s honours HTTP(S)_PROXY, which name the "
                                      "broker); not checked end to end here" % named)
    elif distribution not in FETCHERS:
        return Check(label, PASS, "by a hook (%s); not checked end to end here" % named)
    check = check_library(distribution, shim, upstream, broker_ok)
    check.detail = "%s: %s" % ("by a hook" if how == HOOK else "through the proxy environment", check.detail)
    if untested:
        check.detail += " (%s %s%s)" % (distribution, version, untested)
    return check


def proxy_url(shim: ShimState) -> str:
    return "http://" + shim.broker


def _proxy_environment_problem(shim: ShimState) -> Optional[str]:
    """Why the proxy variables cannot carry traffic to the broker here; None when they can."""
    boot = sys.modules.get("agenshield_shim._boot")
    names = getattr(boot, "PROXY_VARIABLES", None)
    if not names:
        return "this version of the shim does not set the proxy variables"
    wrong = [name for name in names if os.environ.get(name) != proxy_url(shim)]
    if wrong:
        return "%s is %r, not the broker (%s)" % (wrong[0], os.environ.get(wrong[0]), proxy_url(shim))
    allow = getattr(shim.config, "allow", ())
    no_proxy_value = getattr(boot, "no_proxy_value", None)
    bypass = no_proxy_value(allow) if allow and no_proxy_value is not None else None
    for name in getattr(boot, "NO_PROXY_VARIABLES", ()):
        if os.environ.get(name) != bypass:
            return "%s is %r: it opens direct paths beyond AGENSHIELD_ALLOW (%r)" % (name, os.environ.get(name), bypass)
    if shim.tunnels is False:
        return "the broker at %s does not tunnel (%s)" % (shim.broker, shim.tunnel_reason)
    return None


def check_proxy_environment(shim: ShimState, broker_ok: bool) -> Check:
    """Do the proxy variables name the broker, and can the broker carry what uses them?"""
    label = "proxy environment"
    if not shim.active:
        return Check(label, SKIP, "the shim is not active")
    if not broker_ok:
        return Check(label, SKIP, "no broker to check")
    if shim.tunnels is None and shim.config is not None:
        from agenshield_shim import _transport

        choice = _transport.probe(shim.config)
        if choice is not None:
            shim.tunnels, shim.tunnel_reason = choice.transport == _transport.TUNNEL, choice.reason
    boot = sys.modules.get("agenshield_shim._boot")
    if not getattr(boot, "PROXY_VARIABLES", None):
        return Check(label, SKIP, "agenshield-shim %s does not set the proxy variables (a later version does)" % shim.version)
    problem = _proxy_environment_problem(shim)
    if problem is None:
        return Check(label, PASS, "HTTP(S)_PROXY and ALL_PROXY (both cases) and npm's proxy settings name the broker "
                                  "(%s), NO_PROXY holds nothing beyond AGENSHIELD_ALLOW: child processes (curl, git, uv, "
                                  "npm) and libraries without a hook go through it" % proxy_url(shim))
    if shim.tunnels is False:
        return Check(label, WARN, "%s: programs and libraries that use the proxy variables (curl, git, uv, npm, "
                                  "another environment's pip; libraries without a hook) cannot reach the network "
                                  "through it; the hooked Python libraries use rpc. Use a broker that tunnels (the "
                                  "reference broker, the AgenShield daemon 0.7.3+)" % problem)
    return Check(label, FAIL, problem)


def check_routed_request(shim: ShimState, upstream: Optional[Upstream], broker_ok: bool,
                         network_blocked: bool) -> Check:
    """verify's one routed request: urllib through the hook, else sent to the broker as a proxy.

    Either way the request goes through the broker. Which path was used is reported: the second
    means this shim has no routing hook for urllib/http.client (yet).
    """
    label = "routed request"
    if upstream is None or not broker_ok:
        return Check(label, FAIL, "no broker to route through")
    if not network_blocked:
        return Check(label, FAIL, "cannot tell: direct connections are not refused, so a request may not use the broker")
    path = "/verify/urllib"
    how = "urllib.request through the routing hook"
    try:
        body = _get_urllib(upstream.url(path))
    except shim.blocked_error:
        path = "/verify/proxy"
        how = "sent to the broker as an explicit HTTP proxy (no http.client routing hook here)"
        try:
            status, body = http_get_raw(shim.broker_host, shim.broker_port, upstream.url(path), proxy=True)
        except OSError as exc:
            return Check(label, FAIL, "the broker did not forward it: %s: %s" % (type(exc).__name__, exc))
        if status == 403:
            return Check(label, FAIL, "the broker refused loopback %s by policy (403 %r)" % (upstream.url(path), body[:60]))
    except Exception as exc:  # noqa: BLE001
        return Check(label, FAIL, "request failed: %s: %s" % (type(exc).__name__, _first_line(exc)))
    if upstream.expect(path, body):
        return Check(label, PASS, "GET %s: %s" % (upstream.url(path), how))
    return Check(label, FAIL, "unexpected answer %r (%s)" % (body[:80], how))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


# -- the run ------------------------------------------------------------------------------------


class Report:
    def __init__(self, shim: ShimState) -> None:
        self.shim = shim
        self.checks: List[Check] = []
        self.notes: List[str] = []
        self.started = time.monotonic()
        self.duration = 0.0

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def passed(self, prefix: str) -> bool:
        return all(c.status != FAIL for c in self.checks if c.name.startswith(prefix)) and any(
            c.name.startswith(prefix) for c in self.checks
        )

    @property
    def success(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "success": self.success,
            "pythonVersion": "Python %d.%d.%d" % tuple(sys.version_info[:3]),
            "executable": sys.executable,
            "shimInstalled": self.shim.version is not None,
            "shimActive": self.shim.active,
            "shimVersion": self.shim.version,
            "transport": self.shim.transport,
            "transportReason": self.shim.transport_reason,
            "broker": self.shim.broker,
            "locked": self.shim.locked,
            "networkBlocked": self.passed("guard:"),
            "brokerAccessible": self.passed("broker"),
            "routed": self.passed("routed"),
            "checks": [c.as_dict() for c in self.checks],
            "notes": list(self.notes),
            "durationSeconds": round(self.duration, 3),
        }


def run(verify: bool = False, fallback_host: str = "localhost", fallback_port: int = 6969,
        echo: Optional[Callable[[str], None]] = None) -> Report:
    """Run the checks; ``echo`` receives each line as it is decided (the text report)."""
    shim = ShimState(fallback_host, fallback_port)
    report = Report(shim)
    say = echo or (lambda line: None)

    def add(check: Check) -> None:
        report.add(check)
        say(check.line())

    def note(text: str) -> None:
        report.notes.append(text)
        say("%s  %s" % (INFO, text))

    if shim.active:
        add(Check("shim active", PASS, shim.describe()))
    else:
        add(Check("shim active", FAIL, shim.reason))

    restore = _quiet_refusals() if shim.active else (lambda: None)
    try:
        if verify:
            add(check_tcp(shim))
        else:
            for guard_check in (check_tcp, check_udp, check_dns, check_socket_module):
                add(guard_check(shim))
    finally:
        restore()

    started: Optional[StartedBroker] = None
    upstream: Optional[Upstream] = None
    try:
        broker_ok, why = broker_health(shim.broker_host, shim.broker_port)
        if not broker_ok and not verify and shim.active:
            started, why = _start_broker(shim, why, note)
            if started is not None:
                broker_ok, why = broker_health(shim.broker_host, shim.broker_port)
        label = "broker reachable" if started is None else "broker reachable (started for this run)"
        add(Check(label, PASS if broker_ok else FAIL, "%s: %s" % (shim.broker, why)))
        if broker_ok and shim.config is not None:
            add(check_transport(shim))
        add(check_proxy_environment(shim, broker_ok))
        if broker_ok:
            upstream = Upstream()
            note("loopback upstream on 127.0.0.1:%d (reached only through the broker)" % upstream.port)
        if verify:
            add(check_routed_request(shim, upstream, broker_ok, report.passed("guard:")))
        else:
            for name in ("http.client", "urllib.request"):
                add(check_library(name, shim, upstream, broker_ok))
            hooked, versions = hooked_modules(), hook_versions()
            for entry in STACKS:
                check = check_stack(entry, shim, upstream, broker_ok, hooked, versions)
                if check is not None:
                    add(check)
    finally:
        if upstream is not None:
            upstream.close()
        if started is not None:
            started.stop()
    report.duration = time.monotonic() - report.started
    return report


def check_transport(shim: ShimState) -> Check:
    """Which transport the hooked libraries use with this broker, and why (``auto`` asks the broker)."""
    from agenshield_shim import _transport

    config = shim.config
    choice = _transport.probe(config)
    if choice is None:
        return Check("transport", FAIL, "could not learn what the broker at %s serves (no usable answer to ping "
                                        "or CONNECT)" % shim.broker)
    shim.tunnels, shim.tunnel_reason = choice.transport == _transport.TUNNEL, choice.reason
    if config.transport == "auto":
        shim.transport, shim.transport_reason = choice.transport, "auto: %s" % choice.reason
        return Check("transport", PASS, "%s (%s)" % (choice.transport, shim.transport_reason))
    shim.transport_reason = "AGENSHIELD_TRANSPORT=%s" % config.transport
    if config.transport == _transport.TUNNEL and choice.transport != _transport.TUNNEL:
        return Check("transport", FAIL, "AGENSHIELD_TRANSPORT=tunnel, but %s; set AGENSHIELD_TRANSPORT=auto (the "
                                        "default) or rpc" % choice.reason)
    return Check("transport", PASS, "%s (%s; the broker: %s)" % (config.transport, shim.transport_reason, choice.reason))


def _start_broker(shim: ShimState, why: str, note: Callable[[str], None]) -> Tuple[Optional[StartedBroker], str]:
    """Start the reference broker on the configured port, or explain why not."""
    if shim.broker_host not in ("localhost", "127.0.0.1", "::1"):
        return None, "%s; not starting a broker for a non-loopback host" % why
    if shim.locked:
        return None, "%s; this environment is locked, so a broker started from it would be guarded too: start it elsewhere" % why
    if not installed("aiohttp"):
        return None, "%s; the reference broker needs the [broker] extra: %s" % (why, BROKER_EXTRA_HINT)
    if "ConnectionRefused" not in why and "Errno 111" not in why:
        return None, "%s; the port is busy or unreachable, so no broker was started" % why
    try:
        started = StartedBroker(shim.broker_host, shim.broker_port)
    except (OSError, RuntimeError) as exc:
        return None, "%s; %s" % (why, exc)
    note("no broker was running at %s: started the reference broker there (pid %d, shim off for it) for this run"
         % (shim.broker, started.pid))
    return started, why


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; ``argv`` is given by ``agenshield-shim selftest``, None under ``python -m``."""
    parser = argparse.ArgumentParser(
        prog="agenshield-shim selftest" if argv is not None else "python -m agenshield_shim.selftest",
        description="Check that this interpreter is guarded by agenshield-shim and routed through the broker: "
                    "the shim is active; TCP, UDP, DNS and _socket are refused; each installed HTTP library is "
                    "routed end to end; the broker (AGENSHIELD_BROKER_HOST/_PORT, default localhost:6969) answers, "
                    "or a reference broker is started for the checks. Exit status 0 only if all pass.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines (default: lines)")
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)  # agenshield-shim verify
    parser.add_argument("--broker-host", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--broker-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    host = args.broker_host or os.environ.get("AGENSHIELD_BROKER_HOST", "localhost")
    port = args.broker_port or _env_port()
    echo = None if args.json else (lambda line: print(line, flush=True))
    report = run(verify=args.verify, fallback_host=host, fallback_port=port, echo=echo)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        counts = {s: sum(1 for c in report.checks if c.status == s) for s in (PASS, FAIL, SKIP, WARN)}
        print("%s: %d passed, %d failed, %d skipped%s in %.2f s" % (
            "selftest OK" if report.success else "selftest FAILED", counts[PASS], counts[FAIL], counts[SKIP],
            ", %d warnings (WARN lines)" % counts[WARN] if counts[WARN] else "", report.duration,
        ))
    return 0 if report.success else 1


def _env_port() -> int:
    text = os.environ.get("AGENSHIELD_BROKER_PORT", "6969").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else 6969


if __name__ == "__main__":
    sys.exit(main())

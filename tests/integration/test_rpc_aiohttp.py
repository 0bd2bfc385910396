"""aiohttp under ``AGENSHIELD_TRANSPORT=rpc``: each request is one ``http_request`` call to the broker.

The tunnel transport's client suite (``AIOHTTP_SUITE`` of ``test_routing_async``) runs unchanged in
a real shim venv with the rpc transport, against a broker with the protocol extensions
(``rpc_broker``: bodies travel as base64, exactly), against one without (``compat_broker``, the
daemon's behaviour: text bodies only) and against the real AgenShield daemon 0.7.2, through its
HTTP fallback (``daemon_broker``) and its Unix socket (``daemon_unix_broker``). The tests assert what rpc promises, which is not always what
the tunnel gives: bodies are buffered (SSE arrives whole), TLS is the broker's, websockets need the
tunnel, and a body a text-only broker would corrupt is a clear error instead. Routing is proven
from the broker's side (its audit shows one ``http_request`` per request and hop, no tunnel and no
forward) and from the upstream's (``/whoami``: the peer socket belongs to the broker's process).
"""

import json
import textwrap
from typing import Any, Dict, List, NamedTuple

import pytest

from .conftest import ShimEnv
from .test_routing_async import (
    AIOHTTP_SUITE,
    ENV_PROXY_SUITE,
    MAIN,
    MULTIPART_FIELDS,
    PRELUDE,
    SCHEMES,
    SMOKE_SUITE,
    assert_concurrent_answers,
    assert_methods_and_query,
    assert_refusal,
    cookies_seen,
    cookies_set,
    echo_body,
    echo_header,
    echo_query,
    error,
    run_suite,
    upload_sha,
    value,
)

pytestmark = pytest.mark.timeout(600)

RPC = {"AGENSHIELD_TRANSPORT": "rpc"}
OLDEST = ("3.11", "aiohttp==3.9.*")  # the oldest aiohttp of test_routing_async's MATRIX
TUNNEL_HINT = "AGENSHIELD_TRANSPORT=tunnel"
TUNNEL_ONLY = "agenshield_shim.hooks.aiohttp.TunnelOnlyError"

# What AIOHTTP_SUITE cannot show: the rpc transport's own promises, checked from inside the client.
RPC_SUITE = PRELUDE + textwrap.dedent(
    '''
    import gc, io, socket, tempfile, threading, warnings
    import aiohttp

    # anything left dangling (a pending task destroyed, an unclosed transport, an error nobody
    # retrieved) is recorded instead of printed
    LEAKS = []
    warnings.simplefilter("always", ResourceWarning)
    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, (ResourceWarning, RuntimeWarning)):  # unclosed, never awaited
            LEAKS.append(str(message))
    warnings.showwarning = showwarning
    sys.unraisablehook = lambda u: LEAKS.append(repr(u.exc_value))

    def uds_server():
        """A Unix-socket HTTP server: a session on a UnixConnector must reach it itself."""
        path = os.path.join(tempfile.mkdtemp(), "s.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(4)
        def serve():
            conn, _ = server.accept()
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nuds")
            conn.close()
            server.close()
        threading.Thread(target=serve, daemon=True).start()
        return path

    def rpc_tasks():
        """Tasks of the shim's virtual connections still running (a cancelled call must not be one)."""
        return [t for t in asyncio.all_tasks() if "_RpcTransport" in repr(t.get_coro())]

    async def scheme_checks(tag, base):
        creates, reuses = [], []
        trace = aiohttp.TraceConfig()
        async def on_create(session, ctx, params):
            creates.append(1)
        async def on_reuse(session, ctx, params):
            reuses.append(1)
        trace.on_connection_create_end.append(on_create)
        trace.on_connection_reuseconn.append(on_reuse)
        async with aiohttp.ClientSession(trace_configs=[trace]) as s:
            async def whoami():
                async with s.get(base + "/whoami", ssl=CTX) as r:
                    return (await r.json())["pid"]
            await rec(tag + "whoami", whoami)

            async def reuse():
                del creates[:], reuses[:]
                for i in range(10):
                    async with s.get(base + "/echo?reuse=%d" % i, ssl=CTX) as r:
                        await r.read()
                return [len(creates), len(reuses)]
            await rec(tag + "reuse", reuse)

            async def expect100():
                async with s.post(base + "/echo", data=b"e" * 1000, expect100=True, ssl=CTX) as r:
                    return [r.status, (await r.json())["body_length"]]
            await rec(tag + "expect100", expect100)

            async def empty_post():
                async with s.post(base + "/echo", ssl=CTX) as r:
                    echo = await r.json()
                    return [r.status, echo["method"], echo["body_length"]]
            await rec(tag + "empty_post", empty_post)

            async def unicode_query():
                async with s.get(base + "/echo", params={"q": "\\u00e9 &x"}, ssl=CTX) as r:
                    return (await r.json())["query"]
            await rec(tag + "unicode_query", unicode_query)

            async def stream_big():
                # read slowly in small pieces: aiohttp pauses the transport, which must resume it
                digest, length, n = hashlib.sha256(), 0, 0
                async with s.get(base + "/bytes/3000000", ssl=CTX, timeout=aiohttp.ClientTimeout(total=20)) as r:
                    async for chunk in r.content.iter_chunked(8192):
                        digest.update(chunk)
                        length += len(chunk)
                        n += 1
                        if n % 50 == 0:
                            await asyncio.sleep(0.001)
                    return [length, digest.hexdigest(), r.headers["X-Sha256"]]
            await rec(tag + "stream_big", stream_big)

            async def total_timeout():
                async with s.get(base + "/slow/5?head=1", ssl=CTX, timeout=aiohttp.ClientTimeout(total=0.8)) as r:
                    return await r.read()
            await rec(tag + "total_timeout", total_timeout)

            async def cancelled():
                task = asyncio.ensure_future(s.get(base + "/slow/3?head=1", ssl=CTX))
                await asyncio.sleep(0.3)
                running = len(rpc_tasks())
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                await asyncio.sleep(0.2)
                return [running, len(rpc_tasks())]
            await rec(tag + "cancelled", cancelled)

            async def still_works():  # the session is usable after a timeout and a cancellation
                async with s.get(base + "/echo?after=1", ssl=CTX) as r:
                    return r.status
            await rec(tag + "still_works", still_works)

            async def fingerprint():
                async with s.get(base + "/echo", ssl=aiohttp.Fingerprint(b"\\x00" * 32)) as r:
                    return r.status
            if tag.startswith("https"):
                await rec(tag + "fingerprint", fingerprint)

            async def ssl_false():
                async with s.get(base + "/echo", ssl=False) as r:
                    return r.status
            if tag.startswith("https"):
                await rec(tag + "ssl_false", ssl_false)

            async def redirect_denied():
                async with s.get(base + "/redirect-to?url=http://example.com/next", ssl=CTX) as r:
                    return r.status
            await rec(tag + "redirect_denied", redirect_denied)

            async def proxy_auth():  # credentials meant for the application's proxy reach no one
                async with s.get(base + "/echo?via=auth", ssl=CTX, proxy="http://127.0.0.1:9",
                                 proxy_auth=aiohttp.BasicAuth("user", "secret")) as r:
                    return [r.status, [k.lower() for k, v in (await r.json())["headers"]]]
            await rec(tag + "proxy_auth", proxy_auth)

            async def too_large():
                async with s.post(base + "/upload", data=io.BytesIO(b"x" * (11 << 20)), ssl=CTX) as r:
                    return r.status
            await rec(tag + "too_large", too_large)

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: LEAKS.append(ctx.get("message")))
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            await scheme_checks(tag, base)

        async def broker_health():  # the broker itself is a direct destination: not an rpc call
            async with aiohttp.ClientSession() as s:
                async with s.get(P["broker_url"] + "/health") as r:
                    return [r.status, (await r.json())["status"]]
        await rec("broker_health", broker_health)

        async def unix_connector():
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=uds_server())) as s:
                async with s.get("http://uds.invalid/x") as r:
                    return [r.status, await r.text()]
        await rec("unix_connector", unix_connector)

        from agenshield_shim.hooks import aiohttp as hook
        R["patched"] = {"value": [hasattr(aiohttp.TCPConnector._create_connection, "__agenshield_original__"),
                                  hasattr(aiohttp.ClientSession._request, "__agenshield_original__"),
                                  hasattr(aiohttp.UnixConnector._create_connection, "__agenshield_original__"),
                                  issubclass(hook.TunnelOnlyError, aiohttp.ClientConnectionError)]}

    asyncio.run(main())
    gc.collect()
    R["leaks"] = {"value": LEAKS}
    done()
    '''
)

# Refusals, a broker that is down or silent, AGENSHIELD_ALLOW: one GET per scheme, errors recorded.
GET_SUITE = PRELUDE + textwrap.dedent(
    '''
    import aiohttp

    async def main():
        timeout = aiohttp.ClientTimeout(total=30, connect=1.0, sock_read=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
                async def get(base=base):
                    async with s.get(base + "/whoami", ssl=CTX) as r:
                        return [r.status, (await r.json())["pid"]]
                await rec(tag, get)
        R["pid"] = {"value": os.getpid()}

    asyncio.run(main())
    done()
    '''
)


#: The brokers AIOHTTP_SUITE runs against, by mode, and the transport's variables: "rpc" has the
#: protocol extensions, the others carry text bodies only; the *_auto modes run the daemon under the
#: default transport (auto, which finds that the daemon serves rpc only).
SUITE_BROKERS = {"rpc": ("rpc_broker", RPC), "compat": ("compat_broker", RPC), "daemon": ("daemon_broker", RPC),
                 "daemon_unix": ("daemon_unix_broker", RPC), "daemon_auto": ("daemon_broker", {}),
                 "daemon_unix_auto": ("daemon_unix_broker", {})}
#: The daemon through each of its doors.
DAEMONS = ["daemon_broker", "daemon_unix_broker"]


class Suite(NamedTuple):
    mode: str  # a key of SUITE_BROKERS, or newest/oldest (RPC_SUITE)
    broker: Any
    results: Dict[str, Any]
    audit: List[Dict[str, Any]]

    @property
    def text_only(self) -> bool:
        """A broker without the base64 extension: the compat broker, the daemon."""
        return self.mode == "compat" or self.daemon

    @property
    def daemon(self) -> bool:
        return self.mode.startswith("daemon")


def assert_tunnel_only(entry: Dict[str, Any], *words: str) -> None:
    """Our ClientConnectionError subclass (not a ClientOSError: aiohttp would retry it), naming the tunnel."""
    assert TUNNEL_ONLY in entry["mro"], entry
    assert "agenshield_shim.errors.TunnelOnlyError" in entry["mro"], entry  # the one every library shares
    assert "aiohttp.client_exceptions.ClientConnectionError" in entry["mro"], entry
    assert "aiohttp.client_exceptions.ClientOSError" not in entry["mro"], entry
    assert entry["message"].startswith("AgenShield") and TUNNEL_HINT in entry["message"], entry
    for word in words:
        assert word in entry["message"], entry


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory(*MAIN)  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=list(SUITE_BROKERS))
def suite(request: pytest.FixtureRequest, main_env: ShimEnv, upstream: Any) -> Suite:
    """AIOHTTP_SUITE under rpc, against the broker with extensions, a ``--compat`` one and the daemon."""
    fixture, transport = SUITE_BROKERS[request.param]
    broker = request.getfixturevalue(fixture)
    mark = broker.mark()
    results = run_suite(main_env, AIOHTTP_SUITE, broker, upstream, extra_env=transport)
    return Suite(request.param, broker, results, broker.audit(mark))


@pytest.fixture(scope="module", params=["newest", "oldest"])
def rpc_checks(request: pytest.FixtureRequest, shim_env_factory: Any, rpc_broker: Any, upstream: Any) -> Suite:
    """RPC_SUITE on the newest aiohttp and on the oldest the project supports (3.9)."""
    env = shim_env_factory(*(MAIN if request.param == "newest" else OLDEST))
    mark = rpc_broker.mark()
    results = run_suite(env, RPC_SUITE, rpc_broker, upstream, extra_env=RPC, broker_url=rpc_broker.url)
    return Suite(request.param, rpc_broker, results, rpc_broker.audit(mark))


def port_of(upstream: Any, tag: str) -> str:
    """The authority the rpc transport names in its URLs for the scheme's upstream."""
    return "127.0.0.1:%d" % upstream.http_port if tag == "http:" else "localhost:%d" % upstream.https_port


# -- AIOHTTP_SUITE, both brokers ----------------------------------------------------------------


def test_broker_audited_one_call_per_request(suite: Suite, upstream: Any) -> None:
    """Routing, proved from the broker's side: one http_request per request, no tunnel, no forward."""
    value(suite.results, "https:concurrent")
    for tag in SCHEMES:
        prefix = "%s//%s/echo?i=" % (tag, port_of(upstream, tag))
        calls = [e for e in suite.audit if e.get("operation") == "http_request" and str(e.get("target")).startswith(prefix)]
        assert len({e["target"] for e in calls}) == 200 and len(calls) == 200, [e["target"] for e in calls][:5]
        assert all(e["result"] == "success" and e["allowed"] is True for e in calls), calls[:3]
    channel = "socket" if suite.broker.socket_path else "http"  # the reference broker logs none
    assert all(e.get("channel", channel) == channel for e in calls), calls[:3]
    tunnel_or_forward = [e for e in suite.audit if e.get("operation") in ("connect", "forward")]
    assert tunnel_or_forward == [], tunnel_or_forward[:3]


@pytest.mark.parametrize("tag", SCHEMES)
def test_methods_and_query(suite: Suite, tag: str) -> None:
    assert_methods_and_query(suite.results, tag + "methods")


@pytest.mark.parametrize("tag", SCHEMES)
def test_json_form_multipart(suite: Suite, tag: str) -> None:
    assert json.loads(echo_body(value(suite.results, tag + "json"))) == {"k": [1, "\u00e9"]}
    form = value(suite.results, tag + "form")
    assert form["form"] == {"f": "v w", "g": "1"}
    assert echo_header(form, "content-type").startswith("application/x-www-form-urlencoded")
    # a text-only broker could not carry a compressed answer: the request asks for none
    accept = echo_header(form, "accept-encoding")
    assert accept == "identity" if suite.text_only else "gzip" in accept, accept
    # b"\x00\x01binary" is valid UTF-8: a text-only broker carries this file too
    assert value(suite.results, tag + "multipart")["form"] == MULTIPART_FIELDS


@pytest.mark.parametrize("tag", SCHEMES)
def test_binary_bodies_exact_or_clear_error(suite: Suite, tag: str) -> None:
    results = suite.results
    if suite.text_only:
        # random bytes are not UTF-8: refused before anything is sent, instead of corrupted
        assert_tunnel_only(error(results, tag + "binary_up"), "not UTF-8")
        assert_tunnel_only(error(results, tag + "chunked_up"), "not UTF-8")
        assert_tunnel_only(error(results, tag + "binary_down"), "application/octet-stream")
        return
    sent, answer = value(results, tag + "binary_up")
    assert upload_sha(answer) == sent and answer["length"] == 1 << 20
    length, digest, headers = value(results, tag + "binary_down")
    assert length == 1000000
    assert digest == {k.lower(): v for k, v in headers.items()}["x-sha256"]


@pytest.mark.parametrize("tag", SCHEMES)
def test_chunked_upload_arrives_whole(suite: Suite, tag: str) -> None:
    if suite.text_only:
        return  # random bytes: see test_binary_bodies_exact_or_clear_error
    sent, answer, encoding = value(suite.results, tag + "chunked_up")
    assert encoding == "chunked"  # aiohttp wrote it chunked...
    assert upload_sha(answer) == sent and answer["length"] == 400000
    # ...and the broker sent the buffered body with a Content-Length (rpc bodies are whole)
    assert answer["chunked"] is False


@pytest.mark.parametrize("tag", SCHEMES)
def test_redirects_followed_by_aiohttp_each_hop_a_call(suite: Suite, upstream: Any, tag: str) -> None:
    status, url, hops = value(suite.results, tag + "redirects")
    assert status == 200 and url.endswith("/echo") and hops == 3
    base = "%s//%s" % (tag, port_of(upstream, tag))
    targets = [e["target"] for e in suite.audit if e.get("operation") == "http_request"]
    for path in ("/redirect/3", "/redirect/2", "/redirect/1"):
        assert targets.count(base + path) == 1, (path, [t for t in targets if "redirect" in t])


@pytest.mark.parametrize("tag", SCHEMES)
def test_cookies_head_and_gzip(suite: Suite, tag: str) -> None:
    set_cookies, seen = value(suite.results, tag + "cookies")
    expected = cookies_set(suite.daemon)
    assert len(set_cookies) == len(expected) and cookies_seen(seen) == expected
    assert value(suite.results, tag + "head") == [200, ""]
    if suite.text_only:
        # /gzip compresses whatever Accept-Encoding says: a text-only broker cannot carry it intact
        assert_tunnel_only(error(suite.results, tag + "gzip"), "gzip")
        return
    encoding, text = value(suite.results, tag + "gzip")
    assert encoding == "gzip" and json.loads(text)["gzipped"] is True


@pytest.mark.parametrize("tag", SCHEMES)
def test_statuses(suite: Suite, tag: str) -> None:
    out = value(suite.results, tag + "statuses")
    assert out["204"] == [204, 0] and out["304"] == [304, 0]
    assert out["404"] == ["ClientResponseError", 404] and out["500"] == ["ClientResponseError", 500]


@pytest.mark.parametrize("tag", SCHEMES)
def test_server_sent_events_delivered_whole(suite: Suite, tag: str) -> None:
    events = value(suite.results, tag + "sse")
    assert [data["i"] for _, data in events] == [0, 1, 2, 3, 4]
    # rpc buffers the body in the broker: the first event arrives after the last was sent
    assert events[0][0] >= events[-1][1]["sent"], events


@pytest.mark.parametrize("tag", SCHEMES)
def test_read_timeout_honoured_quickly(suite: Suite, tag: str) -> None:
    entry = error(suite.results, tag + "read_timeout")
    assert any("Timeout" in name for name in entry["mro"]), entry
    assert entry["elapsed"] < 2.0, entry


@pytest.mark.parametrize("tag", SCHEMES)
def test_keepalive_requests_all_served(suite: Suite, tag: str) -> None:
    # the upstream's connections are the broker's; the client's reuse is checked in RPC_SUITE
    assert value(suite.results, tag + "keepalive")["requests"] == 10


@pytest.mark.parametrize("tag", SCHEMES)
def test_200_concurrent(suite: Suite, tag: str) -> None:
    assert_concurrent_answers(suite.results, tag + "concurrent")


@pytest.mark.parametrize("tag", SCHEMES)
def test_app_proxy_replaced(suite: Suite, upstream: Any, tag: str) -> None:
    """proxy= points at a port where nothing listens: the request goes to the broker instead."""
    status, echo = value(suite.results, tag + "proxy_arg")
    assert status == 200 and echo_query(echo) == {"via": ["arg"]}
    status, echo = value(suite.results, tag + "module_request")
    assert status == 200 and echo_query(echo) == {"via": ["module"]}
    assert [e for e in suite.audit if "/echo?via=arg" in str(e.get("target"))][0]["operation"] == "http_request"


@pytest.mark.parametrize("tag", SCHEMES)
def test_websocket_is_a_clear_error_naming_the_tunnel(suite: Suite, tag: str) -> None:
    entry = error(suite.results, tag + "ws")
    assert_tunnel_only(entry, "websocket")
    assert entry["elapsed"] < 2.0, entry


def test_tls_is_the_brokers(suite: Suite) -> None:
    """Under rpc no TLS happens in the client: the request's ``ssl=`` context (here one trusting a
    wrong CA) is not used; the broker verifies the upstream against its own trust store (which has
    the upstream's CA through ``--upstream-ca``). The tunnel transport's wrong-CA failure cannot be."""
    assert value(suite.results, "https:wrong_ca") == 200


@pytest.mark.parametrize("tag", SCHEMES)
def test_refusal_is_client_http_proxy_error(suite: Suite, tag: str) -> None:
    entry = error(suite.results, tag + "refused")
    assert_refusal(entry, "ClientHttpProxyError", "example.com")
    assert "403" in entry["message"], entry
    denied = [e for e in suite.audit if e.get("operation") == "http_request" and "example.com" in str(e.get("target"))]
    assert denied and all(e["result"] == "denied" for e in denied), denied


# -- the rpc transport's own promises (RPC_SUITE), newest and oldest aiohttp -----------------------


def test_rpc_hook_patches_the_tcp_connector_only(rpc_checks: Suite) -> None:
    # TCPConnector._create_connection wrapped; ClientSession._request (the tunnel's seam) and
    # UnixConnector left alone; TunnelOnlyError is a ClientConnectionError
    assert value(rpc_checks.results, "patched") == [True, False, False, True]


@pytest.mark.parametrize("tag", SCHEMES)
def test_upstream_sees_the_broker(rpc_checks: Suite, upstream: Any, tag: str) -> None:
    assert value(rpc_checks.results, tag + "whoami") == rpc_checks.broker.pid
    assert rpc_checks.broker.calls("%s//%s/whoami" % (tag, port_of(upstream, tag)))


@pytest.mark.parametrize("tag", SCHEMES)
def test_keepalive_reuses_the_virtual_connection(rpc_checks: Suite, tag: str) -> None:
    # ten requests after /whoami: no connection created, every one reused
    assert value(rpc_checks.results, tag + "reuse") == [0, 10]


@pytest.mark.parametrize("tag", SCHEMES)
def test_expect_100_continue_empty_post_unicode_query(rpc_checks: Suite, tag: str) -> None:
    results = rpc_checks.results
    assert value(results, tag + "expect100") == [200, 1000]
    assert value(results, tag + "empty_post") == [200, "POST", 0]
    assert value(results, tag + "unicode_query") == [["q", "\u00e9 &x"]]


@pytest.mark.parametrize("tag", SCHEMES)
def test_large_body_streams_with_flow_control(rpc_checks: Suite, tag: str) -> None:
    length, digest, expected = value(rpc_checks.results, tag + "stream_big")
    assert length == 3000000 and digest == expected


@pytest.mark.parametrize("tag", SCHEMES)
def test_total_timeout_and_cancellation(rpc_checks: Suite, tag: str) -> None:
    entry = error(rpc_checks.results, tag + "total_timeout")
    assert any("Timeout" in name for name in entry["mro"]), entry
    assert entry["elapsed"] < 2.0, entry
    running, left = value(rpc_checks.results, tag + "cancelled")
    assert running == 1 and left == 0  # the call was in flight, and cancelling the request ended it
    assert value(rpc_checks.results, tag + "still_works") == 200


@pytest.mark.parametrize("tag", SCHEMES)
def test_app_proxy_credentials_not_forwarded(rpc_checks: Suite, tag: str) -> None:
    status, names = value(rpc_checks.results, tag + "proxy_auth")
    assert status == 200 and "proxy-authorization" not in names and "authorization" not in names, names


def test_nothing_left_dangling(rpc_checks: Suite) -> None:
    """After timeouts, a cancellation, refusals and errors: no pending task destroyed, no unclosed
    transport, no exception nobody retrieved."""
    leaks = value(rpc_checks.results, "leaks")
    assert leaks == [], leaks


def test_fingerprint_pinning_needs_the_tunnel(rpc_checks: Suite) -> None:
    assert_tunnel_only(error(rpc_checks.results, "https:fingerprint"), "fingerprint")


def test_ssl_false_still_verified_by_the_broker(rpc_checks: Suite) -> None:
    assert value(rpc_checks.results, "https:ssl_false") == 200


@pytest.mark.parametrize("tag", SCHEMES)
def test_redirect_to_a_denied_host_is_refused_at_that_hop(rpc_checks: Suite, tag: str) -> None:
    entry = error(rpc_checks.results, tag + "redirect_denied")
    assert_refusal(entry, "ClientHttpProxyError", "example.com")
    assert rpc_checks.broker.calls("http://example.com/next")


@pytest.mark.parametrize("tag", SCHEMES)
def test_body_over_the_brokers_limit_is_a_clear_error(rpc_checks: Suite, tag: str) -> None:
    entry = error(rpc_checks.results, tag + "too_large")
    assert any(n.endswith(".ClientHttpProxyError") for n in entry["mro"]), entry
    assert "AgenShield" in entry["message"] and "413" in entry["message"] and TUNNEL_HINT in entry["message"], entry


def test_direct_destinations_left_alone(rpc_checks: Suite) -> None:
    """The broker itself and a UnixConnector are reached directly, not through an rpc call."""
    assert value(rpc_checks.results, "broker_health") == [200, "ok"]
    assert rpc_checks.broker.calls("/health") == []
    assert value(rpc_checks.results, "unix_connector") == [200, "uds"]


# -- refusal, broker trouble, AGENSHIELD_ALLOW ---------------------------------------------------


def test_refusal_by_policy_names_the_rule(main_env: ShimEnv, deny_broker: Any, upstream: Any) -> None:
    mark = deny_broker.mark()
    results = run_suite(main_env, GET_SUITE, deny_broker, upstream, extra_env=RPC)
    for tag in SCHEMES:
        entry = error(results, tag)
        assert any(n.endswith(".ClientHttpProxyError") for n in entry["mro"]), entry
        message = entry["message"]
        assert "AgenShield" in message and port_of(upstream, tag).split(":")[0] in message, message
        assert "deny-upstream" in message and "403" in message, message
    denied = deny_broker.calls("/whoami", mark)
    assert len(denied) == 2 and all(e["result"] == "denied" for e in denied), denied


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_refusal_names_its_reason(main_env: ShimEnv, upstream: Any, tcp_listener: Any, daemon: str, transport: str,
                                         request: pytest.FixtureRequest) -> None:
    """The daemon's built-in policy refuses 127.0.0.2: ClientHttpProxyError with its reason, nothing arrives."""
    broker = request.getfixturevalue(daemon)
    mark = broker.mark()
    where = "%s:%d" % (tcp_listener.host, tcp_listener.port)
    results = run_suite(main_env, GET_SUITE, broker, upstream, extra_env=RPC if transport == "rpc" else {},
                        http_url="http://" + where, https_url="https://" + where)
    for tag in SCHEMES:
        entry = error(results, tag)
        assert any(n.endswith(".ClientHttpProxyError") for n in entry["mro"]), entry
        message = entry["message"]
        assert "AgenShield" in message and where in message and "Host '127.0.0.2' is not allowed" in message, message
        assert "1001" in message and entry["elapsed"] < 2.0, entry
    denied = broker.calls(where + "/whoami", mark)
    assert len(denied) == 2 and all(e["result"] == "denied" for e in denied), denied
    assert tcp_listener.settle() == 0


@pytest.mark.parametrize("which", ["rpc_broker"] + DAEMONS)
def test_environment_proxies_and_no_proxy_open_no_way_around(main_env: ShimEnv, upstream: Any, which: str,
                                                             request: pytest.FixtureRequest) -> None:
    """HTTP(S)_PROXY/ALL_PROXY point nowhere and NO_PROXY covers everything (trust_env=True): still rpc calls."""
    rpc_broker = request.getfixturevalue(which)
    proxies = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")}
    proxies.update(NO_PROXY="*,localhost,127.0.0.1", no_proxy="*,localhost,127.0.0.1")
    mark = rpc_broker.mark()
    results = run_suite(main_env, ENV_PROXY_SUITE, rpc_broker, upstream, extra_env=dict(RPC, **proxies))
    for tag in SCHEMES:
        status, echo = value(results, "aiohttp:" + tag)
        assert status == 200 and echo_query(echo) == {"via": ["env"]}, tag
        assert rpc_broker.calls("%s//%s/echo?via=env" % (tag, port_of(upstream, tag)), mark)


def test_broker_down_fast_clear_error(main_env: ShimEnv, broker: Any, upstream: Any, dead_broker_port: int) -> None:
    port = dead_broker_port
    results = run_suite(main_env, GET_SUITE, broker, upstream, extra_env=dict(RPC, AGENSHIELD_BROKER_PORT=str(port)))
    for tag in SCHEMES:
        entry = error(results, tag)
        assert entry["error"] == "ClientProxyConnectionError", entry  # as the tunnel transport raises
        assert "AgenShield" in entry["message"] and "127.0.0.1:%d" % port in entry["message"], entry
        assert entry["elapsed"] < 2.0, entry


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("door", ["http", "unix"])
def test_stopped_daemon_fast_clear_error(main_env: ShimEnv, upstream: Any, start_daemon: Any, door: str,
                                         transport: str) -> None:
    """The daemon stopped (its port closed, its socket gone): the same error as any broker that is down."""
    daemon = start_daemon(ca_file=str(upstream.ca_file), unix=door == "unix")
    daemon.stop()
    where = "unix:" + daemon.socket_path if door == "unix" else "127.0.0.1:%d" % daemon.port
    results = run_suite(main_env, GET_SUITE, daemon, upstream, extra_env=RPC if transport == "rpc" else {})
    for tag in SCHEMES:
        entry = error(results, tag)
        assert entry["error"] == "ClientProxyConnectionError", entry
        assert "AgenShield" in entry["message"] and where in entry["message"], entry
        assert entry["elapsed"] < 2.0, entry


def test_silent_broker_caller_timeout_honoured(main_env: ShimEnv, broker: Any, upstream: Any, silent_broker: int) -> None:
    results = run_suite(main_env, GET_SUITE, broker, upstream,
                        extra_env=dict(RPC, AGENSHIELD_BROKER_PORT=str(silent_broker)))
    for tag in SCHEMES:
        entry = error(results, tag)
        assert any("Timeout" in n for n in entry["mro"]), entry
        assert 0.8 < entry["elapsed"] < 3.0, entry


@pytest.mark.parametrize("which", ["rpc_broker"] + DAEMONS)
def test_allow_listed_destination_reached_directly(main_env: ShimEnv, upstream: Any, which: str,
                                                   request: pytest.FixtureRequest) -> None:
    """AGENSHIELD_ALLOW lets the plain-HTTP upstream through directly; the HTTPS one still goes via the broker."""
    rpc_broker = request.getfixturevalue(which)
    mark = rpc_broker.mark()
    results = run_suite(main_env, GET_SUITE, rpc_broker, upstream,
                        extra_env=dict(RPC, AGENSHIELD_ALLOW="127.0.0.1:%d" % upstream.http_port))
    pid = value(results, "pid")
    assert value(results, "http:") == [200, pid]
    assert value(results, "https:") == [200, rpc_broker.pid]
    assert rpc_broker.calls("127.0.0.1:%d/whoami" % upstream.http_port, mark) == []
    assert rpc_broker.calls("localhost:%d/whoami" % upstream.https_port, mark)


@pytest.mark.parametrize("which", ["unix_broker", "daemon_unix_broker"])
def test_unix_socket_broker(main_env: ShimEnv, upstream: Any, which: str, request: pytest.FixtureRequest) -> None:
    """With AGENSHIELD_BROKER_SOCKET the calls go over the broker's Unix socket (aiohttp's proxy
    support could not do that: the tunnel transport needs the netns relay for it)."""
    unix_broker = request.getfixturevalue(which)
    mark = unix_broker.mark()
    results = run_suite(main_env, GET_SUITE, unix_broker, upstream, extra_env=RPC)
    assert value(results, "http:") == [200, unix_broker.pid]
    calls = unix_broker.calls("127.0.0.1:%d/whoami" % upstream.http_port, mark)
    assert len(calls) == 1 and calls[0]["channel"] == "socket", calls


# -- versions ---------------------------------------------------------------------------------------

SMOKE = [
    pytest.param(OLDEST, "3.9.", id="aiohttp-3.9-oldest"),
    pytest.param(("3.8", "aiohttp", "httpx"), "3.10.", id="py3.8-aiohttp-3.10"),
    pytest.param(("3.13", "aiohttp", "httpx"), "", id="py3.13"),
]


@pytest.mark.parametrize("env_spec, prefix", SMOKE)
def test_version_smoke(shim_env_factory: Any, rpc_broker: Any, upstream: Any, env_spec: Any, prefix: str) -> None:
    """test_routing_async's smoke suite under rpc: GET, binary POST, a refusal, and ws_connect refused."""
    env = shim_env_factory(*env_spec)
    mark = rpc_broker.mark()
    results = run_suite(env, SMOKE_SUITE, rpc_broker, upstream, extra_env=RPC, libs=["aiohttp"])
    assert value(results, "aiohttp:version").startswith(prefix)
    status, echo = value(results, "aiohttp:get")
    assert status == 200 and echo_query(echo) == {"smoke": ["1"]}
    sent, answer = value(results, "aiohttp:post")
    assert upload_sha(answer) == sent
    assert_refusal(error(results, "aiohttp:refused"), "ClientHttpProxyError", "example.com")
    assert_tunnel_only(error(results, "aiohttp:ws"), "websocket")
    assert rpc_broker.calls("localhost:%d/echo?smoke=1" % upstream.https_port, mark)


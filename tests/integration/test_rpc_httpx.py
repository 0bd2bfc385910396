"""httpx under ``AGENSHIELD_TRANSPORT=rpc``: each request is one ``http_request`` call to the broker.

The same client suite as the tunnel transport's (``HTTPX_SUITE`` of ``test_routing_async``) runs
in a real shim venv with the rpc transport, against a broker with the protocol extensions
(``rpc_broker``: bodies travel as base64, exactly), against one without (``compat_broker``, the
daemon's behaviour: text bodies only) and against the real AgenShield daemon 0.7.2 through its HTTP
fallback (``daemon_broker``) and its Unix socket (``daemon_unix_broker``): ``suite_results`` runs the
checks a broker without extensions can pass against all four. The tests assert what rpc promises, which is not always
what the tunnel gives: bodies are buffered (SSE arrives whole), TLS is the broker's, and a body a
text-only broker would corrupt is a clear error instead. Routing is proven from the broker's side
(its audit shows one ``http_request`` per request, no tunnel and no forward) and from the
upstream's (``/whoami``: the peer socket belongs to the broker's process).
"""

import hashlib
import json
import socket
import textwrap
from typing import Any, Callable, Dict, List

import pytest

from .conftest import ShimEnv
from .test_routing_async import (
    BROKER_TROUBLE_SUITE,
    HTTPX_MODES,
    HTTPX_SUITE,
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
SYNC_MODES = ["sync:http:", "sync:https:"]
ASYNC_MODES = ["async:http:", "async:https:"]

# What HTTPX_SUITE cannot show: the rpc transport's own promises, checked from inside the client.
RPC_SUITE = PRELUDE + textwrap.dedent(
    '''
    import socket, tempfile, threading
    import httpx

    def uds_server():
        """A Unix-socket HTTP server (two answers): a transport built with uds= must reach it itself."""
        path = os.path.join(tempfile.mkdtemp(), "s.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(4)
        def serve():
            for _ in range(2):
                conn, _ = server.accept()
                data = b""
                while b"\\r\\n\\r\\n" not in data:
                    data += conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nuds")
                conn.close()
        threading.Thread(target=serve, daemon=True).start()
        return path

    UDS = uds_server()

    def sync_checks(tag, base):
        with httpx.Client(verify=CTX) as c:
            rec_sync(tag + "whoami", lambda: c.get(base + "/whoami").json()["pid"])

            def reason():
                r = c.get(base + "/status/404")
                # 418: the upstream's "I'm a Teapot", not httpx's own fallback "I'm a teapot"
                return [r.status_code, r.reason_phrase, r.http_version, r.text, c.get(base + "/status/418").reason_phrase]
            rec_sync(tag + "reason", reason)

            def jar():
                r = c.get(base + "/cookies/set?x=1&y=2")
                return [r.headers.get_list("set-cookie"), dict(r.cookies), dict(c.cookies),
                        c.get(base + "/cookies/echo").json()]
            rec_sync(tag + "jar", jar)

            def history():
                r = c.get(base + "/redirect/2?h=1", follow_redirects=True)
                return [str(r.url), str(r.request.url), [[h.status_code, str(h.url)] for h in r.history]]
            rec_sync(tag + "history", history)

            def not_followed():  # the broker does not follow redirects: httpx sees the 302 itself
                r = c.get(base + "/redirect/1?nf=1")
                return [r.status_code, r.headers.get("location"), r.is_redirect, str(r.next_request.url)]
            rec_sync(tag + "not_followed", not_followed)

            def stream_whole():
                with c.stream("GET", base + "/bytes/300000") as r:
                    return [len(part) for part in r.iter_raw()]
            rec_sync(tag + "stream_whole", stream_whole)

            def headers_sent():
                r = c.get(base + "/echo?hs=1", headers={"X-Custom": "v1"})
                return r.json()
            rec_sync(tag + "headers_sent", headers_sent)

            rec_sync(tag + "upstream_down", lambda: c.get("http://127.0.0.1:%d/down" % P["dead_port"]).status_code)

            def upgrade():
                r = c.get(base + "/ws?up=1", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
                return r.status_code
            rec_sync(tag + "upgrade", upgrade)

            def client_timeout():  # the client's own timeout, not a per-request one
                with httpx.Client(verify=CTX, timeout=0.5) as t:
                    return t.get(base + "/slow/5?ct=1").status_code
            rec_sync(tag + "client_timeout", client_timeout)

        def own_transport():
            with httpx.Client(transport=httpx.HTTPTransport(verify=CTX, retries=2)) as o:
                return o.get(base + "/whoami").json()["pid"]
        rec_sync(tag + "own_transport", own_transport)

        def http2():
            with httpx.Client(verify=CTX, http2=True) as h:
                r = h.get(base + "/echo?h2=sync")
                return [r.http_version, r.status_code, r.json()]
        rec_sync(tag + "http2", http2)

    async def async_checks(tag, base):
        async with httpx.AsyncClient(verify=CTX) as c:
            async def whoami():
                return (await c.get(base + "/whoami")).json()["pid"]
            await rec(tag + "whoami", whoami)

            async def stream_whole():
                async with c.stream("GET", base + "/bytes/300000") as r:
                    return [len(part) async for part in r.aiter_raw()]
            await rec(tag + "stream_whole", stream_whole)

            async def upstream_down():
                return (await c.get("http://127.0.0.1:%d/down" % P["dead_port"])).status_code
            await rec(tag + "upstream_down", upstream_down)

            async def jar():
                await c.get(base + "/cookies/set")
                return (await c.get(base + "/cookies/echo")).json()
            await rec(tag + "jar", jar)

        async def http2():
            async with httpx.AsyncClient(verify=CTX, http2=True) as h:
                rs = await asyncio.gather(*(h.get(base + "/echo?h2=%d" % i) for i in range(5)))
                return [[r.http_version, r.status_code, r.json()] for r in rs]
        await rec(tag + "http2", http2)

    def uds_sync():
        with httpx.Client(transport=httpx.HTTPTransport(uds=UDS)) as u:
            r = u.get("http://uds.invalid/uds-check")
            return [r.status_code, r.text]
    rec_sync("uds_sync", uds_sync)

    async def uds_async():
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=UDS)) as u:
            r = await u.get("http://uds.invalid/uds-check")
            return [r.status_code, r.text]
    asyncio.run(rec("uds_async", uds_async))

    for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
        sync_checks("sync:" + tag, base)
        asyncio.run(async_checks("async:" + tag, base))
    done()
    '''
)

# httpx runs on trio too (through anyio); the rpc core speaks asyncio, so trio takes a worker thread.
TRIO_SUITE = PRELUDE + textwrap.dedent(
    '''
    import httpx, trio

    async def main():
        async with httpx.AsyncClient(verify=CTX) as c:
            out = []
            for base in (P["http_url"], P["https_url"]):
                r = await c.post(base + "/upload", content=b"\\xff\\x00trio")
                w = await c.get(base + "/whoami")
                out.append([r.json(), w.json()["pid"]])
            try:
                (await c.get("https://example.com/")).raise_for_status()
                out.append("no error")
            except httpx.HTTPStatusError as e:
                out.append(["HTTPStatusError", str(e)])
            return out

    started = time.monotonic()
    try:
        R["trio"] = {"value": trio.run(main)}
    except Exception as e:
        R["trio"] = failure(e, started)
    done()
    '''
)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpc_main_env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory(*MAIN)  # type: ignore[no-any-return]


def _suite_with_audit(env: ShimEnv, code: str, broker: Any, upstream: Any, transport: Dict[str, str] = RPC,
                      **params: Any) -> Dict[str, Any]:
    mark = broker.mark()
    results = run_suite(env, code, broker, upstream, extra_env=transport, **params)
    results["audit"] = broker.audit(mark)
    return results


#: HTTPX_SUITE's brokers by mode, and the transport's variables: "rpc" has the protocol extensions, the
#: others carry text bodies only; the *_auto modes run the daemon under the default transport (auto,
#: which finds that the daemon serves rpc only).
SUITE_BROKERS = {"rpc": ("rpc_broker", RPC), "compat": ("compat_broker", RPC), "daemon": ("daemon_broker", RPC),
                 "daemon_unix": ("daemon_unix_broker", RPC), "daemon_auto": ("daemon_broker", {}),
                 "daemon_unix_auto": ("daemon_unix_broker", {})}
#: The daemon through each of its doors.
DAEMONS = ["daemon_broker", "daemon_unix_broker"]


@pytest.fixture(scope="module")
def _suites(rpc_main_env: ShimEnv, upstream: Any, request: pytest.FixtureRequest) -> Callable[[str], Dict[str, Any]]:
    """``suite(mode)``: HTTPX_SUITE's results against that mode's broker, run once per module."""
    done: Dict[str, Dict[str, Any]] = {}

    def suite(mode: str) -> Dict[str, Any]:
        if mode not in done:
            fixture, transport = SUITE_BROKERS[mode]
            broker = request.getfixturevalue(fixture)
            done[mode] = _suite_with_audit(rpc_main_env, HTTPX_SUITE, broker, upstream, transport)
            done[mode]["mode"] = mode
            done[mode]["broker"] = broker
        return done[mode]

    return suite


@pytest.fixture(scope="module")
def rpc_results(_suites: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """The broker with the protocol extensions."""
    return _suites("rpc")


@pytest.fixture(scope="module", params=["compat", "daemon", "daemon_unix", "daemon_auto", "daemon_unix_auto"])
def compat_results(request: pytest.FixtureRequest, _suites: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """The brokers without extensions: ``--compat`` and the daemon (HTTP, Unix socket; rpc and auto)."""
    return _suites(request.param)


@pytest.fixture(scope="module", params=list(SUITE_BROKERS))
def suite_results(request: pytest.FixtureRequest, _suites: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """Every broker: for the checks that need no extension."""
    return _suites(request.param)


@pytest.fixture(scope="module")
def extra_results(rpc_main_env: ShimEnv, rpc_broker: Any, upstream: Any) -> Dict[str, Any]:
    probe = socket.socket()  # a loopback port nothing listens on: the upstream the broker cannot reach
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()
    return _suite_with_audit(rpc_main_env, RPC_SUITE, rpc_broker, upstream, dead_port=dead_port)


def calls(results: Dict[str, Any], substring: str) -> List[Dict[str, Any]]:
    """The ``http_request`` audit entries of one suite run whose URL contains ``substring``."""
    return [e for e in results["audit"] if e.get("operation") == "http_request" and substring in str(e.get("target"))]


def origin(upstream: Any, tag: str) -> str:
    """The URL prefix of the upstream a check's tag used (``sync:https:`` -> ``https://localhost:P``)."""
    return upstream.https_url if "https:" in tag else upstream.http_url


def assert_tunnel_hint(entry: Dict[str, Any], exc_type: str, url_part: str) -> None:
    """A body the broker cannot carry: httpx's own type, AgenShield, the URL, the way out."""
    assert any(name.endswith("." + exc_type) for name in entry["mro"]), entry
    message = entry["message"]
    assert "AgenShield" in message and url_part in message, message
    assert "AGENSHIELD_TRANSPORT=tunnel" in message, message


# -- routing, proven from the broker's and the upstream's side ------------------------------------


def test_rpc_broker_saw_every_request_as_http_request(suite_results: Dict[str, Any], upstream: Any) -> None:
    value(suite_results, "async:https:concurrent")
    audit = suite_results["audit"]
    for base in (upstream.http_url, upstream.https_url):
        concurrent = {e["target"] for e in calls(suite_results, base + "/echo?i=")}
        assert len(concurrent) == 200, sorted(concurrent)[:5]
        assert all(e["result"] == "success" for e in calls(suite_results, base + "/echo?a=1"))
    channel = "socket" if suite_results["broker"].socket_path else "http"  # the reference broker logs none
    assert all(e.get("channel", channel) == channel for e in calls(suite_results, "/echo?i=")), audit[:3]
    # no CONNECT tunnel, no forwarded request: the rpc transport only ever calls http_request
    assert not [e for e in audit if e.get("operation") in ("connect", "forward")]


@pytest.mark.parametrize("tag", SCHEMES)
def test_rpc_upstream_peer_is_the_broker(extra_results: Dict[str, Any], rpc_broker: Any, tag: str) -> None:
    for mode in ("sync:", "async:"):
        assert value(extra_results, mode + tag + "whoami") == rpc_broker.pid
    assert value(extra_results, "sync:" + tag + "own_transport") == rpc_broker.pid
    assert len(calls(extra_results, "/whoami")) == 3 * len(SCHEMES)


# -- requests and responses ------------------------------------------------------------------------


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_methods_and_query(suite_results: Dict[str, Any], tag: str) -> None:
    assert_methods_and_query(suite_results, tag + "methods")


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_bodies_exact_and_uploads_whole(rpc_results: Dict[str, Any], tag: str) -> None:
    assert json.loads(echo_body(value(rpc_results, tag + "json"))) == {"k": [1, "\u00e9"]}
    sent, answer = value(rpc_results, tag + "binary_up")
    assert upload_sha(answer) == sent and answer["length"] == 1 << 20
    # httpx wrote the generator's body chunked; the call carries it whole, with a Content-Length
    sent, answer, encoding = value(rpc_results, tag + "chunked_up")
    assert upload_sha(answer) == sent and answer["length"] == 400000
    assert encoding == "chunked" and answer["chunked"] is False
    length, digest, headers = value(rpc_results, tag + "binary_down")
    assert length == 1000000 and digest == headers["x-sha256"]
    assert headers["content-length"] == "1000000"


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_rpc_form_multipart_cookies_gzip_head_statuses(rpc_results: Dict[str, Any], tag: str) -> None:
    form = value(rpc_results, tag + "form")
    assert form["form"] == {"f": "v w", "g": "1"}
    assert echo_header(form, "content-type").startswith("application/x-www-form-urlencoded")
    assert value(rpc_results, tag + "multipart")["form"] == MULTIPART_FIELDS
    set_cookies, seen = value(rpc_results, tag + "cookies")
    assert len(set_cookies) == 2 and cookies_seen(seen) == {"a": "1", "b": "2"}
    encoding, text = value(rpc_results, tag + "gzip")  # still encoded on arrival, decoded by httpx
    assert encoding == "gzip" and json.loads(text)["gzipped"] is True
    assert value(rpc_results, tag + "head") == [200, ""]
    out = value(rpc_results, tag + "statuses")
    assert out["204"] == [204, 0] and out["304"] == [304, 0]
    assert out["404"] == ["HTTPStatusError", 404] and out["500"] == ["HTTPStatusError", 500]


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_rpc_response_is_httpx_own(extra_results: Dict[str, Any], upstream: Any, tag: str) -> None:
    """Reason phrase, HTTP version, cookies in the jar, url/request/history, headers sent upstream."""
    assert value(extra_results, tag + "reason") == [404, "Not Found", "HTTP/1.1", "status 404\n", "I'm a Teapot"]
    set_cookies, response_cookies, jar, seen = value(extra_results, tag + "jar")
    assert [c.split(";")[0] for c in set_cookies] == ["x=1", "y=2"]
    assert response_cookies == {"x": "1", "y": "2"} and jar == {"x": "1", "y": "2"}
    assert cookies_seen(seen) == {"x": "1", "y": "2"}
    base = origin(upstream, tag)
    url, request_url, history = value(extra_results, tag + "history")
    assert url == request_url == base + "/echo?h=1"
    assert history == [[302, base + "/redirect/2?h=1"], [302, base + "/redirect/1?h=1"]]
    status, location, is_redirect, next_url = value(extra_results, tag + "not_followed")
    assert (status, location, is_redirect, next_url) == (302, "/echo?nf=1", True, base + "/echo?nf=1")
    echo = value(extra_results, tag + "headers_sent")
    assert echo_header(echo, "x-custom") == "v1"
    assert echo_header(echo, "user-agent").startswith(("python-httpx/", "python-httpx2/"))  # test_httpx2 reuses this
    assert echo_header(echo, "host") == base.split("://", 1)[1]


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_redirects_followed_by_httpx_each_hop_a_call(suite_results: Dict[str, Any], upstream: Any, tag: str) -> None:
    status, url, hops = value(suite_results, tag + "redirects")
    assert status == 200 and url.endswith("/echo") and hops == 3
    base = origin(upstream, tag)
    for hop in ("/redirect/3", "/redirect/2", "/redirect/1"):
        assert calls(suite_results, base + hop), hop  # the broker checked every hop: it followed none


# -- buffered bodies and timeouts ------------------------------------------------------------------


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_sse_delivered_whole(suite_results: Dict[str, Any], tag: str) -> None:
    events = value(suite_results, tag + "sse")
    assert [data["i"] for _, data in events] == [0, 1, 2, 3, 4]
    # buffered: the first event was read only after the server had sent the last one (1.2 s later)
    assert events[0][0] >= events[-1][1]["sent"], events


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_stream_delivers_the_body_once_whole(extra_results: Dict[str, Any], tag: str) -> None:
    assert value(extra_results, tag + "stream_whole") == [300000]


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_read_timeout_honoured(suite_results: Dict[str, Any], tag: str) -> None:
    entry = error(suite_results, tag + "read_timeout")
    assert entry["error"] == "ReadTimeout", entry
    assert "AgenShield" in entry["message"] and "/slow/5" in entry["message"], entry
    assert entry["elapsed"] < 2.0, entry  # read=0.5 s (the broker's idle timeout), not the 5 s of the body


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_rpc_client_timeout_honoured(extra_results: Dict[str, Any], tag: str) -> None:
    entry = error(extra_results, tag + "client_timeout")
    assert entry["error"] == "ReadTimeout" and entry["elapsed"] < 2.0, entry


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_keepalive_is_the_brokers(suite_results: Dict[str, Any], tag: str) -> None:
    """Tunnel-only in part: there is no client connection to the upstream to keep alive (each call
    is its own connection to the broker), so only the ten requests arriving is asserted."""
    assert value(suite_results, tag + "keepalive")["requests"] == 10


@pytest.mark.parametrize("tag", ASYNC_MODES)
def test_rpc_200_concurrent(suite_results: Dict[str, Any], tag: str) -> None:
    assert_concurrent_answers(suite_results, tag + "concurrent")


# -- transports --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_rpc_app_proxy_replaced(suite_results: Dict[str, Any], tag: str) -> None:
    for check, via in (("proxy_arg", "arg"), ("mounts", "mount")):
        status, echo = value(suite_results, tag + check)
        assert status == 200 and echo_query(echo) == {"via": [via]}
        assert calls(suite_results, "/echo?via=" + via)
    assert value(suite_results, tag + "module_get") == 200


@pytest.mark.parametrize("tag", ASYNC_MODES)
def test_rpc_mock_transport_untouched(suite_results: Dict[str, Any], tag: str) -> None:
    assert value(suite_results, tag + "mock") == {"mocked": "https://example.com/x"}
    assert value(suite_results, tag + "mock_async") == {"mocked": "https://example.com/y"}
    assert not calls(suite_results, "example.com/x") and not calls(suite_results, "example.com/y")


def test_rpc_uds_transport_untouched(extra_results: Dict[str, Any]) -> None:
    assert value(extra_results, "uds_sync") == [200, "uds"]
    assert value(extra_results, "uds_async") == [200, "uds"]
    assert not calls(extra_results, "uds-check")


@pytest.mark.parametrize("tag", SCHEMES)
def test_rpc_http2_client_gets_http11(extra_results: Dict[str, Any], tag: str) -> None:
    version, status, echo = value(extra_results, "sync:" + tag + "http2")
    assert (version, status, echo_query(echo)) == ("HTTP/1.1", 200, {"h2": ["sync"]})
    answers = value(extra_results, "async:" + tag + "http2")
    assert [[a[0], a[1], echo_query(a[2])] for a in answers] == [["HTTP/1.1", 200, {"h2": [str(i)]}] for i in range(5)]


def test_rpc_wrong_ca_is_the_brokers_business(suite_results: Dict[str, Any]) -> None:
    """Tunnel-only check, asserted honestly: under rpc the broker makes the TLS connection and verifies
    it against its own trust store (here with the upstream's CA), so the client's ``verify`` is unused:
    a client trusting the wrong CA still gets the verified answer."""
    assert value(suite_results, "sync:https:wrong_ca") == 200


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_refusal_is_a_403_naming_agenshield(suite_results: Dict[str, Any], tag: str) -> None:
    assert_refusal(error(suite_results, tag + "refused"), "HTTPStatusError", "example.com")
    denied = [e for e in calls(suite_results, "example.com/path") if not e.get("allowed")]
    assert denied, "the broker logged no refusal"


def test_rpc_policy_refusal_names_the_rule(rpc_main_env: ShimEnv, deny_broker: Any, upstream: Any) -> None:
    """A broker whose policy denies the upstream: a 403 naming its reason (``raise_for_status``); nothing arrives."""
    code = PRELUDE + textwrap.dedent(
        '''
        import httpx
        async def aget(base):
            async with httpx.AsyncClient(verify=CTX) as c:
                return (await c.get(base + "/echo?tag=" + P["tag"])).raise_for_status()
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            with httpx.Client(verify=CTX) as c:
                rec_sync("sync:" + tag, lambda: c.get(base + "/echo?tag=" + P["tag"]).raise_for_status())
            asyncio.run(rec("async:" + tag, lambda: aget(base)))
        done()
        '''
    )
    mark = deny_broker.mark()
    results = run_suite(rpc_main_env, code, deny_broker, upstream, extra_env=RPC, tag="rpc-denied")
    for tag in HTTPX_MODES:
        entry = error(results, tag)
        assert any(name.endswith(".HTTPStatusError") for name in entry["mro"]), entry
        message = entry["message"]
        assert "AgenShield" in message and "deny-upstream" in message, message
        where = "localhost:%d" % upstream.https_port if "https" in tag else "127.0.0.1:%d" % upstream.http_port
        assert where in message, message
        assert entry["elapsed"] < 2.0, entry
    denied = [e for e in deny_broker.audit(mark) if e.get("operation") == "http_request" and not e.get("allowed")]
    assert len(denied) == 4, deny_broker.audit(mark)
    assert upstream.request_count("rpc-denied") == 0


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_refusal_names_its_reason(rpc_main_env: ShimEnv, upstream: Any, tcp_listener: Any, daemon: str, transport: str,
                                         request: pytest.FixtureRequest) -> None:
    """The daemon's built-in policy refuses 127.0.0.2: the shim's 403 answer with its reason
    (``raise_for_status`` raises ``HTTPStatusError``); nothing arrives."""
    broker = request.getfixturevalue(daemon)
    where = "%s:%d" % (tcp_listener.host, tcp_listener.port)
    mark = broker.mark()
    results = run_suite(rpc_main_env, BROKER_TROUBLE_SUITE, broker, upstream, extra_env=RPC if transport == "rpc" else {},
                        http_url="http://" + where, https_url="https://" + where)
    for lib in ("httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == "HTTPStatusError", entry
            message = entry["message"]
            assert "AgenShield" in message and where in message and "Host '127.0.0.2' is not allowed" in message
            assert entry["elapsed"] < 2.0, entry
    denied = [e for e in broker.calls(where, mark) if not e["allowed"]]
    assert len(denied) == 6, denied  # aiohttp's two requests, httpx's four
    assert tcp_listener.settle() == 0


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("door", ["http", "unix"])
def test_stopped_daemon_fast_clear_error(rpc_main_env: ShimEnv, upstream: Any, start_daemon: Any, door: str,
                                         transport: str) -> None:
    """The daemon stopped (its port closed, its socket gone): httpx's ConnectError, as for any broker down."""
    daemon = start_daemon(ca_file=str(upstream.ca_file), unix=door == "unix")
    daemon.stop()
    where = "unix:" + daemon.socket_path if door == "unix" else "127.0.0.1:%d" % daemon.port
    results = run_suite(rpc_main_env, BROKER_TROUBLE_SUITE, daemon, upstream, extra_env=RPC if transport == "rpc" else {})
    for lib in ("httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == "ConnectError", entry
            assert "AgenShield" in entry["message"] and where in entry["message"], entry
            assert entry["elapsed"] < 2.0, entry


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_rpc_upstream_unreachable_is_proxy_error(extra_results: Dict[str, Any], tag: str) -> None:
    entry = error(extra_results, tag + "upstream_down")
    assert entry["error"] == "ProxyError", entry
    assert "AgenShield" in entry["message"] and "/down" in entry["message"] and "error 1004" in entry["message"]


@pytest.mark.parametrize("tag", SCHEMES)
def test_rpc_connection_upgrade_is_refused_naming_the_tunnel(extra_results: Dict[str, Any], tag: str) -> None:
    entry = error(extra_results, "sync:" + tag + "upgrade")
    # httpx's own UnsupportedProtocol (and ProxyError), and the TunnelOnlyError every library shares
    assert entry["error"] == "TunnelOnlyError", entry
    for name in (".UnsupportedProtocol", ".ProxyError", "agenshield_shim.errors.TunnelOnlyError"):
        assert any(seen.endswith(name) for seen in entry["mro"]), entry
    assert "AgenShield" in entry["message"] and "AGENSHIELD_TRANSPORT=tunnel" in entry["message"], entry
    assert not calls(extra_results, "/ws?up=1")


def test_rpc_broker_down_fast_clear_error(rpc_main_env: ShimEnv, rpc_broker: Any, upstream: Any,
                                          dead_broker_port: int) -> None:
    """The same httpx type as the tunnel transport's (``test_broker_down_fast_clear_error``)."""
    port = dead_broker_port
    results = run_suite(rpc_main_env, BROKER_TROUBLE_SUITE, rpc_broker, upstream,
                        extra_env=dict(RPC, AGENSHIELD_BROKER_PORT=str(port)))
    for lib in ("httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == "ConnectError", entry
            assert "AgenShield" in entry["message"] and "127.0.0.1:%d" % port in entry["message"], entry
            assert "/echo" in entry["message"], entry
            assert entry["elapsed"] < 2.0, entry


def test_rpc_silent_broker_caller_timeout_honoured(rpc_main_env: ShimEnv, rpc_broker: Any, upstream: Any,
                                                   silent_broker: int) -> None:
    """Timeout(1.0): the local deadline (the read timeout plus the core's 1 s grace) ends the wait."""
    results = run_suite(rpc_main_env, BROKER_TROUBLE_SUITE, rpc_broker, upstream,
                        extra_env=dict(RPC, AGENSHIELD_BROKER_PORT=str(silent_broker)))
    for lib in ("httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == "ReadTimeout", entry
            assert "AgenShield" in entry["message"] and "127.0.0.1:%d" % silent_broker in entry["message"], entry
            assert 0.8 < entry["elapsed"] < 3.0, entry


def test_rpc_garbage_broker_is_a_connect_error(rpc_main_env: ShimEnv, rpc_broker: Any, upstream: Any,
                                               garbage_server: Callable[[bytes], int]) -> None:
    """Something that is not the broker answers: the tunnel transport's type for a broker it cannot use."""
    garbage_broker = garbage_server(b"SSH-2.0-not-a-broker\r\n\r\n")
    results = run_suite(rpc_main_env, BROKER_TROUBLE_SUITE, rpc_broker, upstream,
                        extra_env=dict(RPC, AGENSHIELD_BROKER_PORT=str(garbage_broker)))
    for lib in ("httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == "ConnectError", entry
            assert "AgenShield" in entry["message"] and "127.0.0.1:%d" % garbage_broker in entry["message"], entry
            assert "not HTTP" in entry["message"] and entry["elapsed"] < 2.0, entry


def test_rpc_error_mapping_table(rpc_main_env: ShimEnv, rpc_broker: Any) -> None:
    """Every failure of the core, as the core itself builds it, becomes the httpx type documented in
    the hook (the cases a loopback test cannot provoke, such as a connect timeout, included)."""
    code = textwrap.dedent(
        """
        import json, httpx
        from agenshield_shim import _boot, _rpc
        from agenshield_shim.hooks.httpx import refusal_response
        from agenshield_shim.hooks.httpx_rpc import RpcRoute
        config = _boot.active_config()
        url = "https://api.example.com/v1"
        request = httpx.Request("GET", url)
        route = RpcRoute(httpx, config, refusal_response)
        cases = {
            "denied": _rpc.error_for_code(1001, "Host 'api.example.com' is not allowed", "b", url, "GET"),
            "network": _rpc.error_for_code(1004, "Network error: connect ECONNREFUSED", "b", url, "GET"),
            "broker_timeout": _rpc.error_for_code(1004, "Request timeout", "b", url, "GET"),
            "local_timeout": _rpc._local_timeout(config, url, 1.5),
            "refused": _rpc._unavailable(config, url, "Connection refused"),
            "connect_timeout": _rpc._unavailable(config, url, "connect timed out after 5 s", _rpc.RpcBrokerConnectTimeout),
            "protocol": _rpc.error_for_code(-32603, "Internal error", "b", url, "GET"),
            "body": _rpc.RpcBodyError("AgenShield: body; " + _rpc.TUNNEL_HINT, None, None, "b", url),
        }
        out = {}
        for name, exc in cases.items():
            mapped = route.error(request, exc)
            out[name] = [type(mapped).__name__, str(mapped) == str(exc), mapped.request is request]
        print(json.dumps(out))
        """
    )
    result = rpc_main_env.run(code, env=dict(rpc_broker.rpc_env))
    assert result.returncode == 0, result.stderr[-3000:]
    table = {name: kind for name, (kind, same_message, has_request) in json.loads(result.stdout).items()
             if same_message and has_request}
    assert table == {
        "denied": "ProxyError", "network": "ProxyError", "broker_timeout": "ReadTimeout",
        "local_timeout": "ReadTimeout", "refused": "ConnectError", "connect_timeout": "ConnectTimeout",
        "protocol": "ConnectError", "body": "TunnelOnlyError",  # an httpx.ProxyError too
    }


# -- a broker without the base64 extension (the daemon's behaviour) ----------------------------------


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_compat_text_requests_work(compat_results: Dict[str, Any], tag: str) -> None:
    assert_methods_and_query(compat_results, tag + "methods")
    assert json.loads(echo_body(value(compat_results, tag + "json"))) == {"k": [1, "\u00e9"]}
    status, url, hops = value(compat_results, tag + "redirects")
    assert status == 200 and url.endswith("/echo") and hops == 3
    assert [data["i"] for _, data in value(compat_results, tag + "sse")] == [0, 1, 2, 3, 4]
    assert error(compat_results, tag + "read_timeout")["error"] == "ReadTimeout"
    assert_refusal(error(compat_results, tag + "refused"), "HTTPStatusError", "example.com")


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_compat_form_multipart_cookies_head_statuses(compat_results: Dict[str, Any], tag: str) -> None:
    assert value(compat_results, tag + "form")["form"] == {"f": "v w", "g": "1"}
    assert value(compat_results, tag + "multipart")["form"] == MULTIPART_FIELDS  # its bytes are valid UTF-8
    set_cookies, seen = value(compat_results, tag + "cookies")
    expected = cookies_set(compat_results["mode"].startswith("daemon"))
    assert len(set_cookies) == len(expected) and cookies_seen(seen) == expected
    assert value(compat_results, tag + "head") == [200, ""]
    out = value(compat_results, tag + "statuses")
    assert out["204"] == [204, 0] and out["304"] == [304, 0]
    assert out["404"] == ["HTTPStatusError", 404] and out["500"] == ["HTTPStatusError", 500]


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_compat_binary_bodies_are_clear_errors(compat_results: Dict[str, Any], tag: str) -> None:
    assert_tunnel_hint(error(compat_results, tag + "binary_up"), "ProxyError", "/upload")
    assert_tunnel_hint(error(compat_results, tag + "chunked_up"), "ProxyError", "/upload")
    assert_tunnel_hint(error(compat_results, tag + "binary_down"), "ProxyError", "/bytes/1000000")
    assert not calls(compat_results, "/upload")  # refused before anything was sent


@pytest.mark.parametrize("tag", SYNC_MODES)
def test_compat_gzip_is_a_clear_error(compat_results: Dict[str, Any], tag: str) -> None:
    entry = error(compat_results, tag + "gzip")
    assert_tunnel_hint(entry, "ProxyError", "/gzip")
    assert "gzip" in entry["message"]


@pytest.mark.parametrize("tag", ASYNC_MODES)
def test_compat_200_concurrent(compat_results: Dict[str, Any], tag: str) -> None:
    answers = value(compat_results, tag + "concurrent")
    got = [(i, status, echo_query(echo)) for i, status, echo in answers]
    assert got == [(i, 200, {"i": [str(i)]}) for i in range(200)]


# -- other httpx versions, trio ----------------------------------------------------------------------

VERSIONS = [
    pytest.param("httpx==0.23.*", "0.23.", id="httpx-0.23"),
    pytest.param("httpx==0.27.*", "0.27.", id="httpx-0.27"),
]


@pytest.mark.parametrize("requirement, prefix", VERSIONS)
def test_rpc_version_smoke(shim_env_factory: Any, rpc_broker: Any, upstream: Any,
                           requirement: str, prefix: str) -> None:
    """GET, a binary POST, an async GET and refusals over rpc, on the oldest and a middle httpx."""
    env = shim_env_factory("3.11", requirement)
    results = _suite_with_audit(env, SMOKE_SUITE, rpc_broker, upstream, libs=["httpx"])
    assert value(results, "httpx:version").startswith(prefix)
    status, echo = value(results, "httpx:get")
    assert status == 200 and echo_query(echo) == {"smoke": ["1"]}
    sent, answer = value(results, "httpx:post")
    assert upload_sha(answer) == sent
    status, echo = value(results, "httpx_async:get")
    assert status == 200 and echo_query(echo) == {"smoke": ["async"]}
    assert_refusal(error(results, "httpx:refused"), "HTTPStatusError", "example.com")
    assert_refusal(error(results, "httpx:refused_http"), "HTTPStatusError", "example.com")
    for path in ("/echo?smoke=1", "/upload", "/echo?smoke=async"):
        assert calls(results, upstream.https_url + path), path


def test_rpc_under_trio(shim_env_factory: Any, rpc_broker: Any, upstream: Any) -> None:
    env = shim_env_factory("3.11", "httpx", "trio")
    results = _suite_with_audit(env, TRIO_SUITE, rpc_broker, upstream)
    (http_up, http_pid), (https_up, https_pid), refused = value(results, "trio")
    expected = hashlib.sha256(b"\xff\x00trio").hexdigest()
    assert upload_sha(http_up) == expected and upload_sha(https_up) == expected
    assert http_pid == https_pid == rpc_broker.pid
    assert refused[0] == "HTTPStatusError" and "AgenShield" in refused[1] and "not allowed" in refused[1]

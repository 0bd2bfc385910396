"""The rpc transport (AGENSHIELD_TRANSPORT=rpc) for the sync clients: http.client, urllib.request,
urllib3 1.26 and 2.x, requests, botocore and pip.

The fidelity matrix runs in test_routing_sync.py for every transport (its ``route`` fixture); this
file covers what is particular to rpc: the errors (policy refusal, error 1004, a 413, a broker that
is down, silent or answers garbage), timeouts, an application's proxy, TLS done by the broker,
what only a tunnel can carry, and the clients built on http.client beyond the matrix.
Every test runs a real interpreter against the reference broker and the loopback upstream; those
whose checks apply to a broker without extensions run against the real AgenShield daemon too
(``daemon_broker``: its HTTP fallback, ``daemon_unix_broker``: its Unix socket). The daemon's policy
cannot be configured: where the reference broker's test denies the upstream by a rule, the daemon's
refuses ``127.0.0.2`` (its built-in policy), where a listener proves that nothing arrived.
"""

import json
import uuid
from typing import Dict

import pytest

from .conftest import AuditedBroker, BrokerHandle, Listener, ShimEnv
from .test_routing_sync import SMOKE as ROUTING_SMOKE
from .test_routing_sync import (
    APP_PROXY,
    EPILOGUE,
    PRELUDE,
    READ_TIMEOUTS,
    REFUSAL_CHECKS,
    assert_all_ok,
    base_url,
)

#: The daemon through each of its two doors.
DAEMONS = ["daemon_broker", "daemon_unix_broker"]
#: The reference broker with extensions, and the daemon through each door.
RPC_BROKERS = ["rpc_broker"] + DAEMONS


def text_only(broker: AuditedBroker) -> Dict[str, str]:
    """The variables telling the checks (PRELUDE) what the broker is: the daemon carries text bodies only
    and one Set-Cookie header per answer."""
    if isinstance(broker, BrokerHandle):
        return {}
    return {"EXPECT_TEXT_ONLY": "1", "EXPECT_LAST_SET_COOKIE_ONLY": "1"}

pytestmark = pytest.mark.integration


def rpc(broker_env: Dict[str, str], **extra: str) -> Dict[str, str]:
    return dict(broker_env, AGENSHIELD_TRANSPORT="rpc", **extra)


def rpc_or_auto(transport: str, broker_env: Dict[str, str], **extra: str) -> Dict[str, str]:
    """rpc, or the default transport (auto) against a broker that serves rpc only (the checks expect rpc)."""
    return rpc(broker_env, **extra) if transport == "rpc" else dict(broker_env, EXPECT_RPC="1", **extra)


def results_of(result) -> Dict[str, str]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, "script failed (rc %s):\n%s\n%s" % (result.returncode, result.stdout[-3000:], result.stderr[-5000:])
    return json.loads(lines[-1][len("RESULTS "):])  # type: ignore[no-any-return]


# -- a policy refusal: error 1001 (each library's type: test_routing_sync's refusal test, both
# transports); here, what only rpc can do: check every redirect hop the client follows -------------

REDIRECT_HOP = r'''
import requests
DEST = BASE.split("://", 1)[1]

REASON = os.environ["DENY_REASON"]

@check
def each_redirect_hop_is_checked():
    # the allowed upstream on plain HTTP redirects to a denied destination: requests follows, the broker refuses
    try:
        requests.get(os.environ["ALLOWED_BASE"] + "/redirect-to?url=" + BASE + "/echo%3Ftag%3D" + TAG, verify=CA, timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AgenShield" in str(exc) and DEST in str(exc) and REASON in str(exc) and "1001" in str(exc), str(exc))
    else:
        raise AssertionError("a redirect hop was not checked")
'''


@pytest.fixture(scope="module")
def hop_broker(start_broker, upstream, tmp_path_factory: pytest.TempPathFactory) -> BrokerHandle:
    """Allows the upstream's HTTP port, denies its HTTPS port (rule "deny-upstream")."""
    policy = tmp_path_factory.mktemp("policy") / "deny-https.toml"
    policy.write_text(
        '[[rules]]\nid = "deny-upstream"\naction = "deny"\nhosts = ["127.0.0.1", "localhost", "::1"]\n'
        "ports = [%d]\n\n"
        '[[rules]]\nid = "loopback"\naction = "allow"\nhosts = ["localhost", "127.0.0.0/8", "::1/128"]\n'
        % upstream.https_port
    )
    return start_broker("--policy", str(policy), "--upstream-ca", str(upstream.ca_file))


def test_each_redirect_hop_is_checked(env2: ShimEnv, hop_broker: BrokerHandle, upstream) -> None:
    mark = hop_broker.mark()
    tag = uuid.uuid4().hex
    result = env2.run(PRELUDE + REDIRECT_HOP + EPILOGUE, upstream.https_url, upstream.ca_file, str(hop_broker.pid),
                      tag, env=rpc(hop_broker.env, ALLOWED_BASE=upstream.http_url, DENY_REASON="deny-upstream"))
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 0
    calls = [e for e in hop_broker.audit(mark) if e["operation"] == "http_request"]
    assert [e["allowed"] for e in calls] == [True, False], calls  # the first hop allowed, its redirect refused


@pytest.mark.parametrize("daemon", DAEMONS)
def test_each_redirect_hop_is_checked_by_the_daemon(env2: ShimEnv, upstream, tcp_listener: Listener, daemon: str,
                                                    request: pytest.FixtureRequest) -> None:
    """The daemon's built-in policy refuses 127.0.0.2: a redirect there from the allowed upstream is refused
    at that hop, and the listener on 127.0.0.2 sees nothing."""
    broker = request.getfixturevalue(daemon)
    mark = broker.mark()
    tag = uuid.uuid4().hex
    denied = "http://%s:%d" % (tcp_listener.host, tcp_listener.port)
    result = env2.run(PRELUDE + REDIRECT_HOP + EPILOGUE, denied, upstream.ca_file, str(broker.pid), tag,
                      env=rpc(broker.env, ALLOWED_BASE=upstream.http_url, DENY_REASON="Host '127.0.0.2' is not allowed"))
    assert_all_ok(results_of(result))
    assert tcp_listener.settle() == 0
    calls = [e for e in broker.audit(mark) if e["operation"] == "http_request"]
    assert [e["allowed"] for e in calls] == [True, False], calls
    assert calls[1]["target"].startswith(denied), calls


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_refusal_is_each_librarys_error(requests_env: ShimEnv, tcp_listener: Listener, scheme: str,
                                               daemon: str, transport: str, request: pytest.FixtureRequest) -> None:
    """test_routing_sync's refusal checks against the daemon: every library's own error, the daemon's reason,
    error 1001; nothing reaches the refused destination (127.0.0.2) nor the application's proxy."""
    broker = request.getfixturevalue(daemon)
    evil_proxy = Listener("127.0.0.2")
    try:
        mark = broker.mark()
        variables = rpc_or_auto(transport, broker.env, EVIL_PROXY="http://%s:%d" % (evil_proxy.host, evil_proxy.port),
                                DENY_REASON="Host '127.0.0.2' is not allowed")
        result = requests_env.run(PRELUDE + REFUSAL_CHECKS + EPILOGUE, "%s://%s:%d" % (scheme, tcp_listener.host,
                                  tcp_listener.port), "", str(broker.pid), uuid.uuid4().hex, env=variables)
        assert_all_ok(results_of(result))
        denied = [e for e in broker.audit(mark) if e["operation"] == "http_request" and not e["allowed"]]
        assert len(denied) >= 6 and all(e["result"] == "denied" for e in denied), denied
        assert tcp_listener.settle() == 0 and evil_proxy.settle() == 0
    finally:
        evil_proxy.close()


# -- the broker down, silent, or answering garbage ---------------------------------------------------

BROKER_TROUBLE = r'''
import socket, ssl, urllib.error, urllib.request, http.client
import requests, urllib3
PORT = os.environ["AGENSHIELD_BROKER_PORT"]
KIND = os.environ["TROUBLE"]
# the broker as the shim names it: unix:PATH when it goes through a Unix socket
WHERE = "unix:" + os.environ["AGENSHIELD_BROKER_SOCKET"] if "AGENSHIELD_BROKER_SOCKET" in os.environ else "127.0.0.1:" + PORT

def clear(text):
    expect("AgenShield" in text and WHERE in text and "broker" in text, text)

@check
def requests_error():
    started = time.time()
    try:
        requests.get(BASE + "/echo", params={"tag": TAG}, verify=CA, timeout=(1, 30))
    except requests.exceptions.ConnectTimeout as exc:
        expect(KIND == "silent", "ConnectTimeout for a broker that is " + KIND)
        clear(str(exc))
    except requests.exceptions.ProxyError as exc:
        expect(KIND != "silent", "ProxyError for a silent broker")
        clear(str(exc))
    else:
        raise AssertionError("no error")
    expect(time.time() - started < 3, time.time() - started)

@check
def urllib3_error():
    try:
        urllib3.PoolManager(ca_certs=CA).request("GET", BASE + "/echo?tag=" + TAG, retries=False,
                                                 timeout=urllib3.Timeout(connect=1, read=30))
    except (urllib3.exceptions.ProxyError, urllib3.exceptions.ConnectTimeoutError) as exc:
        clear(str(exc))
    else:
        raise AssertionError("no error")

@check
def urllib_request_error():
    started = time.time()
    try:
        urllib.request.urlopen(BASE + "/echo?tag=" + TAG, context=ssl.create_default_context(cafile=CA), timeout=1)
    except urllib.error.URLError as exc:
        clear(str(exc))
        if KIND == "down":
            expect(isinstance(exc.reason, (ConnectionRefusedError, FileNotFoundError)), type(exc.reason))
    except socket.timeout as exc:
        expect(KIND == "silent", type(exc))
        clear(str(exc))
    else:
        raise AssertionError("no error")
    expect(time.time() - started < 3, time.time() - started)
'''


#: A listener that is not a broker: HTTP, but not JSON-RPC.
NOT_JSON_RPC = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 15\r\n\r\n<html>hi</html>"


@pytest.mark.parametrize("trouble", ["down", "silent", "garbage"])
def test_broker_trouble_is_a_fast_clear_error(requests_env: ShimEnv, upstream, trouble: str,
                                             request: pytest.FixtureRequest) -> None:
    if trouble == "garbage":
        port = request.getfixturevalue("garbage_server")(NOT_JSON_RPC)
    else:
        port = request.getfixturevalue({"down": "dead_broker_port", "silent": "silent_broker"}[trouble])
    tag = uuid.uuid4().hex
    variables = rpc({"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(port)}, TROUBLE=trouble)
    result = requests_env.run(PRELUDE + BROKER_TROUBLE + EPILOGUE, upstream.https_url, upstream.ca_file, "0", tag,
                              env=variables)
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 0  # never a direct connection


@pytest.mark.parametrize("transport", ["rpc", "auto"])
@pytest.mark.parametrize("door", ["http", "unix"])
def test_stopped_daemon_is_a_fast_clear_error(requests_env: ShimEnv, upstream, start_daemon, door: str,
                                              transport: str) -> None:
    """The daemon stopped: its port closed, its Unix socket gone. The same fast, clear error as any broker down
    (under auto too: nothing to learn the transport from)."""
    daemon = start_daemon(ca_file=str(upstream.ca_file), unix=door == "unix")
    daemon.stop()
    tag = uuid.uuid4().hex
    result = requests_env.run(PRELUDE + BROKER_TROUBLE + EPILOGUE, upstream.https_url, upstream.ca_file, "0", tag,
                              env=rpc_or_auto(transport, daemon.env, TROUBLE="down"))
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 0


# -- errors from the broker's side: 1004, 413, TLS --------------------------------------------------

BROKER_ERRORS = r'''
import socket, ssl, urllib.error, urllib.request
import requests, urllib3
CLOSED = os.environ["CLOSED_URL"]

@check
def network_error_1004():
    try:
        requests.get(CLOSED + "/x", timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AgenShield" in str(exc) and "1004" in str(exc) and CLOSED.split("//")[1] in str(exc), str(exc))
    else:
        raise AssertionError("no error")
    try:
        urllib.request.urlopen(CLOSED + "/x", timeout=10)
    except urllib.error.URLError as exc:
        expect("1004" in str(exc), str(exc))
    else:
        raise AssertionError("no error")

@check
def oversized_body_413():
    if os.environ.get("NO_BODY_LIMIT"):  # the daemon 0.7.2 sets no limit on a call's size
        return
    body = "x" * 200000
    try:
        requests.post(BASE + "/echo?tag=" + TAG, data=body, verify=CA, timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AgenShield" in str(exc) and "413" in str(exc), str(exc))
    else:
        raise AssertionError("no error")
    small = requests.post(BASE + "/echo?tag=" + TAG, data="y" * 100, verify=CA, timeout=10)  # still serving
    expect(small.status_code == 200 and small.json()["body"] == "y" * 100, small.text)
'''


def test_broker_errors(env2: ShimEnv, start_broker, upstream, dead_broker_port: int) -> None:
    small = start_broker("--max-body-size", "64k", "--upstream-ca", str(upstream.ca_file))
    tag = uuid.uuid4().hex
    result = env2.run(PRELUDE + BROKER_ERRORS + EPILOGUE, upstream.https_url, upstream.ca_file, str(small.pid), tag,
                      env=rpc(small.env, CLOSED_URL="http://127.0.0.1:%d" % dead_broker_port))
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 1  # only the small upload reached the upstream


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemon_network_error_1004(env2: ShimEnv, upstream, dead_broker_port: int, daemon: str,
                                   request: pytest.FixtureRequest) -> None:
    """The daemon cannot reach the destination (a closed loopback port): its error 1004, each library's error."""
    broker = request.getfixturevalue(daemon)
    tag = uuid.uuid4().hex
    result = env2.run(PRELUDE + BROKER_ERRORS + EPILOGUE, upstream.https_url, upstream.ca_file, str(broker.pid), tag,
                      env=rpc(broker.env, CLOSED_URL="http://127.0.0.1:%d" % dead_broker_port, NO_BODY_LIMIT="1"))
    assert_all_ok(results_of(result))
    assert broker.calls("127.0.0.1:%d/x" % dead_broker_port)[-1]["result"] == "error"


TLS_BY_THE_BROKER = r'''
import ssl, urllib.error, urllib.request
import requests

@check
def broker_without_the_ca_fails_clearly():
    try:
        requests.get(BASE + "/echo", verify=CA, timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AgenShield" in str(exc) and "CERTIFICATE_VERIFY_FAILED" in str(exc), str(exc))
    else:
        raise AssertionError("the broker accepted a certificate it cannot verify")
'''


def test_tls_is_verified_by_the_broker(env2: ShimEnv, broker: BrokerHandle, upstream) -> None:
    """Under rpc the broker makes the TLS connection: a broker that does not trust the upstream's CA
    refuses it, whatever CA the application trusts (in the tunnel transport the application verifies)."""
    result = env2.run(PRELUDE + TLS_BY_THE_BROKER + EPILOGUE, upstream.https_url, upstream.ca_file, str(broker.pid),
                      env=rpc(broker.env))
    assert_all_ok(results_of(result))


@pytest.mark.parametrize("door", ["http", "unix"])
def test_tls_is_verified_by_the_daemon(env2: ShimEnv, upstream, start_daemon, door: str) -> None:
    """A daemon without NODE_EXTRA_CA_CERTS refuses the upstream's certificate: an AgenShield error 1004 and no
    request at the upstream. The daemon's message says only "fetch failed" (Node's fetch hides the TLS
    cause), so the reason cannot be checked as with the reference broker: a daemon difference."""
    daemon = start_daemon(ca_file=None, unix=door == "unix")
    tag = uuid.uuid4().hex
    code = PRELUDE + r'''
import requests

@check
def untrusted_certificate_refused():
    try:
        requests.get(BASE + "/echo?tag=" + TAG, verify=CA, timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AgenShield" in str(exc) and "1004" in str(exc), str(exc))
    else:
        raise AssertionError("the daemon accepted a certificate it cannot verify")
'''
    result = env2.run(code + EPILOGUE, upstream.https_url, upstream.ca_file, str(daemon.pid), tag, env=rpc(daemon.env))
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 0
    daemon.stop()


@pytest.mark.parametrize("which", RPC_BROKERS)
def test_read_timeouts_honoured(requests_env: ShimEnv, upstream, which: str, request: pytest.FixtureRequest) -> None:
    """The caller's read timeout becomes the call's timeout: requests' ReadTimeout, urllib3's ReadTimeoutError."""
    broker = request.getfixturevalue(which)
    result = requests_env.run(PRELUDE + READ_TIMEOUTS + EPILOGUE, upstream.https_url, upstream.ca_file,
                              str(broker.pid), env=broker.rpc_env)
    assert_all_ok(results_of(result))


# -- an application's proxy, tunnel-only requests ---------------------------------------------------


@pytest.mark.parametrize("which", RPC_BROKERS)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_application_proxy_is_replaced(requests_env: ShimEnv, upstream, tcp_listener: Listener, scheme: str,
                                       which: str, request: pytest.FixtureRequest) -> None:
    rpc_broker = request.getfixturevalue(which)
    mark = rpc_broker.mark()
    tag = uuid.uuid4().hex
    variables = dict(rpc_broker.rpc_env, APP_PROXY="http://%s:%d" % (tcp_listener.host, tcp_listener.port))
    result = requests_env.run(PRELUDE + APP_PROXY + EPILOGUE, base_url(upstream, scheme), upstream.ca_file,
                              str(rpc_broker.pid), tag, env=variables)
    assert_all_ok(results_of(result))
    assert tcp_listener.settle() == 0, "the application's proxy was contacted"
    assert upstream.request_count(tag) == 5
    assert len(rpc_broker.calls(tag, mark)) == 5


TUNNEL_ONLY = r'''
import http.client, urllib.request, ssl
import requests
host, port = BASE.split("://")[1].rsplit(":", 1)

@check
def websocket_upgrade_names_the_tunnel():
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/ws?tag=" + TAG, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                      "Sec-WebSocket-Version": "13"})
        conn.getresponse()
    except OSError as exc:
        expect("AgenShield" in str(exc) and "AGENSHIELD_TRANSPORT=tunnel" in str(exc) and "upgrade" in str(exc), str(exc))
        import agenshield_shim  # also the one TunnelOnlyError every library's refusal of this kind is
        expect(isinstance(exc, agenshield_shim.TunnelOnlyError), repr(exc))
    else:
        raise AssertionError("an upgrade went through the rpc transport")

@check
def connect_method_names_the_tunnel():
    try:
        requests.request("CONNECT", BASE + "/?tag=" + TAG, timeout=10)
    except requests.exceptions.ProxyError as exc:
        expect("AGENSHIELD_TRANSPORT=tunnel" in str(exc), str(exc))
    else:
        raise AssertionError("CONNECT went through the rpc transport")

@check
def certificate_pinning_names_the_tunnel():
    import urllib3
    pinned = urllib3.PoolManager(assert_fingerprint="AA:" * 31 + "AA", ca_certs=CA)
    try:
        pinned.request("GET", os.environ["HTTPS_BASE"] + "/echo?tag=" + TAG, retries=False)
    except urllib3.exceptions.ProxyError as exc:
        expect("assert_fingerprint" in str(exc) and "AGENSHIELD_TRANSPORT=tunnel" in str(exc), str(exc))
    else:
        raise AssertionError("a pinned request went through without its pin being checked")

@check
def trace_context_is_sent():
    expect(requests.get(BASE + "/echo?tag=" + TAG, timeout=10).status_code == 200, "request")
'''


@pytest.mark.parametrize("which", RPC_BROKERS)
def test_tunnel_only_requests_and_context(env2: ShimEnv, upstream, which: str, request: pytest.FixtureRequest) -> None:
    rpc_broker = request.getfixturevalue(which)
    mark = rpc_broker.mark()
    tag = uuid.uuid4().hex
    variables = dict(rpc_broker.rpc_env, AGENSHIELD_TRACE_ID="trace-" + tag, AGENSHIELD_DEPTH="2",
                     HTTPS_BASE=upstream.https_url)
    result = env2.run(PRELUDE + TUNNEL_ONLY + EPILOGUE, upstream.http_url, upstream.ca_file, str(rpc_broker.pid), tag,
                      env=variables)
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 1  # only the plain request
    calls = rpc_broker.calls(tag, mark)
    assert len(calls) == 1, calls
    if which == "rpc_broker":  # the daemon 0.7.2 audits no request context
        assert "trace-" + tag in json.dumps(calls[0]), calls[0]  # AGENSHIELD_TRACE_ID reached the broker's audit


BINARY_HINT = r'''
import requests

@check
def binary_body_error_names_a_way_out_that_exists():
    try:
        requests.post(BASE + "/upload?tag=" + TAG, data=bytes(range(256)), verify=CA, timeout=10)
    except requests.exceptions.ProxyError as exc:
        text = str(exc)
        expect("AgenShield" in text and "UTF-8" in text, text)
        # auto is the default, not tunnel; and the daemon 0.7.2 cannot tunnel: the way out is another broker
        expect("(the default transport)" not in text and "with a broker that tunnels" in text, text)
    else:
        raise AssertionError("binary bytes passed a broker that carries text only")
'''


@pytest.mark.parametrize("transport", ["rpc", "auto"])
def test_binary_body_error_against_the_daemon_is_accurate(env2: ShimEnv, daemon_broker, upstream,
                                                          transport: str) -> None:
    """A binary body the daemon cannot carry: a clear error before anything is sent, whose way out exists."""
    tag = uuid.uuid4().hex
    result = env2.run(PRELUDE + BINARY_HINT + EPILOGUE, upstream.https_url, upstream.ca_file, str(daemon_broker.pid),
                      tag, env=rpc_or_auto(transport, daemon_broker.env))
    assert upstream.request_count(tag) == 0  # refused before anything was sent, never corrupted
    assert_all_ok(results_of(result))


# -- Unix socket, other Pythons (botocore, pip: test_routing_sync.py, both transports) ---------


@pytest.mark.parametrize("which", ["unix_broker", "daemon_unix_broker"])
def test_unix_socket_broker(env2: ShimEnv, upstream, which: str, request: pytest.FixtureRequest) -> None:
    unix_broker = request.getfixturevalue(which)
    mark = unix_broker.mark()
    code = PRELUDE + r'''
import requests, urllib.request
s = requests.Session()
for i in range(3):
    assert s.get(BASE + "/echo", params={"tag": TAG}).status_code == 200
assert urllib.request.urlopen(BASE + "/echo?tag=" + TAG).status == 200
print("done")
'''
    tag = uuid.uuid4().hex
    result = env2.run(code, upstream.http_url, upstream.ca_file, str(unix_broker.pid), tag, env=unix_broker.rpc_env)
    assert "done" in result.stdout, result.stderr[-3000:]
    calls = unix_broker.calls(tag, mark)
    assert len(calls) == 4 and all(e["channel"] == "socket" for e in calls), calls


# the tunnel's smoke checks (requests and urllib.request over HTTPS), and rpc's timeouts
SMOKE = ROUTING_SMOKE + r'''
import socket

@check
def timeouts_are_socket_timeouts():
    try:
        urllib.request.urlopen(BASE + "/slow/3?head=1", context=ssl.create_default_context(cafile=CA), timeout=0.5)
    except urllib.error.URLError as exc:
        expect(isinstance(exc.reason, socket.timeout), repr(exc.reason))
    else:
        raise AssertionError("no timeout")
    try:
        requests.get(BASE + "/slow/3?head=1", verify=CA, timeout=0.5)
    except requests.exceptions.ReadTimeout:
        pass
    else:
        raise AssertionError("no timeout")
'''


@pytest.mark.parametrize("which", RPC_BROKERS)
@pytest.mark.parametrize("version", ["3.8", "3.13"])
def test_smoke_other_pythons(shim_env_factory, upstream, version: str, which: str,
                             request: pytest.FixtureRequest) -> None:
    rpc_broker = request.getfixturevalue(which)
    env = shim_env_factory(version, "requests")
    tag = uuid.uuid4().hex
    result = env.run(PRELUDE + SMOKE + EPILOGUE, upstream.https_url, upstream.ca_file, str(rpc_broker.pid), tag,
                     env=dict(rpc_broker.rpc_env, **text_only(rpc_broker)))
    assert_all_ok(results_of(result))
    assert upstream.request_count(tag) == 3

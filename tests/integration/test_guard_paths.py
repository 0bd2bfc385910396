"""Every way Python code can open a connection is refused, and the listener proves nothing arrived.

Each snippet runs in a real interpreter of the shim-installed environment and
tries to reach a listener on 127.0.0.2 (or ::1), which is not the broker.
A snippet prints ``BLOCKED <type>: <message>`` when refused.
"""

import textwrap

import pytest

from .conftest import Listener, ShimEnv

PRELUDE = textwrap.dedent(
    """
    import sys
    HOST, PORT = sys.argv[1], int(sys.argv[2])
    def report(exc):
        print("BLOCKED %s: %s" % (type(exc).__name__, exc))
        print("CHAIN", [c.__name__ for c in type(exc).__mro__])
    """
)

TCP_PATHS = {
    "socket.connect": """
        import socket
        s = socket.socket()
        try:
            s.connect((HOST, PORT)); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "socket.connect_ex": """
        import socket
        s = socket.socket()
        try:
            print("CONNECT_EX RETURNED", s.connect_ex((HOST, PORT)))
        except OSError as e: report(e)
    """,
    "socket.create_connection": """
        import socket
        try:
            socket.create_connection((HOST, PORT), timeout=5); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "_socket direct": """
        import _socket
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            s.connect((HOST, PORT)); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "asyncio.open_connection": """
        import asyncio
        async def main():
            try:
                await asyncio.open_connection(HOST, PORT); print("CONNECTED")
            except OSError as e: report(e)
        asyncio.run(main())
    """,
    "loop.create_connection": """
        import asyncio
        async def main():
            loop = asyncio.get_running_loop()
            try:
                await loop.create_connection(asyncio.Protocol, HOST, PORT); print("CONNECTED")
            except OSError as e: report(e)
        asyncio.run(main())
    """,
    "loop.sock_connect": """
        import asyncio, socket
        async def main():
            loop = asyncio.get_running_loop()
            s = socket.socket(); s.setblocking(False)
            try:
                await loop.sock_connect(s, (HOST, PORT)); print("CONNECTED")
            except OSError as e: report(e)
        asyncio.run(main())
    """,
    "thread": """
        import socket, threading
        def go():
            try:
                socket.socket().connect((HOST, PORT)); print("CONNECTED")
            except OSError as e: report(e)
        t = threading.Thread(target=go); t.start(); t.join()
    """,
    "importlib.reload(socket)": """
        import importlib, socket
        socket = importlib.reload(socket)
        try:
            socket.create_connection((HOST, PORT), timeout=5); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "restored originals": """
        import socket
        original = getattr(socket.create_connection, "__agenshield_original__", socket.create_connection)
        socket.create_connection = original
        socket.socket.connect = socket.socket.__mro__[1].connect
        try:
            original((HOST, PORT), timeout=5); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "str subclass with lying __eq__": """
        import socket
        class Liar(str):
            def __eq__(self, other): return True
            def __hash__(self): return hash("localhost")
            def lower(self): return "localhost"
            def __str__(self): return "localhost"
        s = socket.socket()
        try:
            s.connect((Liar(HOST), PORT)); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "tuple subclass with lying items": """
        import socket
        class Liar(tuple):
            def __getitem__(self, i): return ("localhost", 6969)[i]
            def __eq__(self, other): return True
            def __iter__(self): return iter(("localhost", 6969))
        s = socket.socket()
        try:
            s.connect(Liar((HOST, PORT))); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "int subclass port claiming the broker's": """
        import socket
        class Port(int):
            def __eq__(self, other): return True
            def __hash__(self): return hash(6969)
            def __index__(self): return 6969
        s = socket.socket()
        try:
            s.connect((HOST, Port(PORT))); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "hook __code__ replaced": """
        import gc, socket
        victims = [o for o in gc.get_objects() if callable(o) and getattr(o, "__name__", "") in ("audit_hook", "judge")]
        assert len(victims) >= 2, "the hook's functions are reachable through gc"
        for hook in victims:
            for name, value in [("__code__", (lambda *args: None).__code__),
                                ("__defaults__", tuple(frozenset() if isinstance(d, frozenset) else d
                                                       for d in hook.__defaults__))]:
                try:
                    setattr(hook, name, value)
                    print("REPLACED", name)
                except Exception as e:
                    print("REFUSED", type(e).__name__, e)
        try:
            socket.socket().connect((HOST, PORT)); print("CONNECTED")
        except OSError as e: report(e)
    """,
    "helper __code__ replaced": """
        import socket
        from agenshield_shim import _boot
        try:
            _boot.decide_destination.__code__ = (lambda *a: True).__code__
            print("REPLACED")
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        _boot.decide_destination = lambda *a, **k: True
        _boot.canonical_host = lambda *a, **k: "127.0.0.1"
        import builtins; builtins.len = lambda x: 0
        try:
            socket.socket().connect((HOST, PORT)); print("CONNECTED")
        except OSError as e: report(e)
    """,
}


def _attempt(shim: ShimEnv, body: str, listener: Listener, **env: str) -> str:
    code = PRELUDE + textwrap.dedent(body)
    result = shim.run(code, listener.host, str(listener.port), env=env)
    output = result.stdout + result.stderr
    assert listener.settle() == 0, "the listener was reached:\n" + output
    return output


#: A reloaded ``socket`` has lost the shim's wrappers that pass host names to the resolver as bytes,
#: so its lookups reach ``_socket`` with a str, which the guard refuses (the idna codec could change it).
LOOKUP_REFUSED = {"importlib.reload(socket)"}


@pytest.mark.parametrize("path", sorted(TCP_PATHS))
def test_tcp_path_is_refused(shim: ShimEnv, tcp_listener: Listener, path: str) -> None:
    output = _attempt(shim, TCP_PATHS[path], tcp_listener)
    assert "BLOCKED NetworkBlockedError" in output, output
    assert "ConnectionRefusedError" in output and "OSError" in output  # the exception's classes
    if path in LOOKUP_REFUSED:
        expected = "AgenShield: lookup of 127.0.0.2:%d refused: the C code would convert this str with the idna codec"
    else:
        expected = "AgenShield: direct connection to 127.0.0.2:%d blocked; use the broker at localhost:6969"
    assert expected % tcp_listener.port in output, output
    assert "CONNECTED" not in output and "REPLACED" not in output


def test_ipv6_is_refused(shim: ShimEnv, tcp6_listener: Listener) -> None:
    output = _attempt(shim, TCP_PATHS["socket.create_connection"], tcp6_listener)
    assert "BLOCKED NetworkBlockedError" in output, output
    assert "direct connection to [::1]:%d blocked" % tcp6_listener.port in output, output


@pytest.mark.parametrize("how", ["sendto", "sendmsg"])
def test_udp_is_refused(shim: ShimEnv, udp_listener: Listener, how: str) -> None:
    body = """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if "%s" == "sendto":
                s.sendto(b"x", (HOST, PORT))
            else:
                s.sendmsg([b"x"], [], 0, (HOST, PORT))
            print("SENT")
        except OSError as e: report(e)
    """ % how
    output = _attempt(shim, body, udp_listener)
    assert "BLOCKED NetworkBlockedError" in output and "SENT" not in output, output


@pytest.mark.parametrize(
    "call",
    [
        "socket.getaddrinfo('agenshield-test.invalid', 443)",
        "socket.gethostbyname('agenshield-test.invalid')",
        "socket.gethostbyname_ex('agenshield-test.invalid')",
        "socket.gethostbyaddr('192.0.2.1')",
        "socket.gethostbyaddr('agenshield-test.invalid')",
        "socket.getnameinfo(('192.0.2.1', 80), 0)",
        "__import__('_socket').getaddrinfo('agenshield-test.invalid', 80)",
    ],
)
def test_dns_is_refused(shim: ShimEnv, call: str) -> None:
    # The audit event is raised before the resolver is called, so a refusal means no query left.
    code = "import socket\ntry:\n    %s\n    print('RESOLVED')\nexcept OSError as e:\n    print('BLOCKED', type(e).__name__, e)\n" % call
    output = shim.run(code).stdout
    assert output.startswith("BLOCKED NetworkBlockedError AgenShield:"), output


def test_broker_and_loopback_names_still_resolve(shim: ShimEnv) -> None:
    code = (
        "import socket\n"
        "print(sorted({i[4][0] for i in socket.getaddrinfo('localhost', 6969)}))\n"
        "print(socket.getaddrinfo('93.184.216.34', 80)[0][4])\n"  # a literal: no DNS query
        "print(socket.gethostbyaddr('127.0.0.1')[0])\n"
    )
    result = shim.run(code)
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1" in result.stdout and "93.184.216.34" in result.stdout


def test_the_broker_is_reachable(shim: ShimEnv) -> None:
    broker = Listener("127.0.0.1")
    try:
        code = (
            "import socket, sys\n"
            "for host in ('localhost', '127.0.0.1'):\n"
            "    socket.create_connection((host, int(sys.argv[1])), timeout=5).close()\n"
            "print('OK')\n"
        )
        result = shim.run(code, str(broker.port), env={"AGENSHIELD_BROKER_PORT": str(broker.port)})
        assert result.stdout.strip() == "OK", result.stderr
        assert broker.settle() == 2
    finally:
        broker.close()


def test_allow_list_opens_exactly_that_service(shim: ShimEnv, tcp_listener: Listener) -> None:
    other = Listener("127.0.0.2")
    try:
        code = PRELUDE + textwrap.dedent(
            """
            import socket
            socket.create_connection((HOST, PORT), timeout=5).close(); print("ALLOWED OK")
            try:
                socket.create_connection((HOST, int(sys.argv[3])), timeout=5); print("CONNECTED")
            except OSError as e: report(e)
            """
        )
        result = shim.run(
            code, tcp_listener.host, str(tcp_listener.port), str(other.port),
            env={"AGENSHIELD_ALLOW": "127.0.0.2:%d" % tcp_listener.port},
        )
        assert "ALLOWED OK" in result.stdout, result.stderr
        assert "BLOCKED NetworkBlockedError" in result.stdout
        assert tcp_listener.settle() == 1 and other.settle() == 0
    finally:
        other.close()


def test_raw_and_packet_sockets_are_refused(shim: ShimEnv) -> None:
    code = textwrap.dedent(
        """
        import socket
        for args in [(socket.AF_PACKET, socket.SOCK_RAW, 0x0300), (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                     (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6), (socket.AF_NETLINK, socket.SOCK_RAW, 0)]:
            try:
                socket.socket(*args); print("CREATED", args)
            except OSError as e:
                print("BLOCKED", type(e).__name__, e)
        """
    )
    result = shim.run(code)
    assert "CREATED" not in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("BLOCKED NetworkBlockedError") == 4, result.stdout

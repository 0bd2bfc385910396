"""The package's shape: hook modules without import circles, one ``TunnelOnlyError``, one home for
host/port text, and each hook's supported releases as data the README and selftest agree with.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agenshield_shim
from agenshield_shim import _boot, _rpc, _wire, authority, errors, selftest
from agenshield_shim._config import Config

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "agenshield_shim" / "hooks"


# -- the hooks' imports ----------------------------------------------------------------------------


def hook_imports(path: Path) -> List[Tuple[str, List[str]]]:
    """(hook module imported, names taken from it) for every import in ``path``, at any depth
    (function-level imports included: they make circles too, only later)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if node.level == 1 and module:  # from .http_client import x
                found.append((module, names))
            elif node.level == 1:  # from . import http_client_rpc
                found.extend((name, []) for name in names)
            elif module.startswith("agenshield_shim.hooks."):
                found.append((module.rsplit(".", 1)[1], names))
        elif isinstance(node, ast.Import):
            found.extend((alias.name.rsplit(".", 1)[1], []) for alias in node.names
                         if alias.name.startswith("agenshield_shim.hooks."))
    modules = {p.stem for p in HOOKS.glob("*.py")} - {"__init__"}
    return [(module, names) for module, names in found if module in modules]


def hook_modules() -> List[Path]:
    return sorted(p for p in HOOKS.glob("*.py") if p.stem != "__init__")


def test_no_hook_imports_a_private_name_of_another_hook() -> None:
    """What a hook shares with another (an rpc twin) it passes as an argument or names publicly."""
    private = [(path.stem, module, name) for path in hook_modules() for module, names in hook_imports(path)
               for name in names if name.startswith("_")]
    assert not private, private


def test_rpc_twins_import_nothing_of_their_tunnel_twins() -> None:
    """``x_rpc`` takes ``config`` and what it needs of ``x`` as arguments (``x`` imports it, lazily)."""
    twins = [path for path in hook_modules() if path.stem.endswith("_rpc")]
    assert {p.stem for p in twins} >= {"aiohttp_rpc", "http_client_rpc", "httpx_rpc"}
    for path in twins:
        tunnel = path.stem[: -len("_rpc")]
        assert tunnel not in [module for module, _ in hook_imports(path)], path.stem


def test_hook_modules_form_no_import_circle() -> None:
    graph: Dict[str, Set[str]] = {path.stem: {m for m, _ in hook_imports(path)} for path in hook_modules()}

    def reach(start: str) -> Set[str]:
        seen: Set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return seen

    circles = [module for module in graph if module in reach(module)]
    assert not circles, {m: graph[m] for m in circles}


# -- one TunnelOnlyError ---------------------------------------------------------------------------


def test_tunnel_only_error_is_one_public_class() -> None:
    assert agenshield_shim.TunnelOnlyError is errors.TunnelOnlyError
    assert "TunnelOnlyError" in agenshield_shim.__all__
    assert not issubclass(errors.TunnelOnlyError, OSError)  # retry loops that catch OSError must not spin
    # the rpc core's: an upgrade or CONNECT (what the hooks' virtual connections refuse), a body
    for cls in (_wire.TunnelOnlyError, _rpc.RpcTunnelOnly, _rpc.RpcBodyError):
        assert issubclass(cls, errors.TunnelOnlyError), cls
    assert issubclass(_rpc.RpcBodyError, OSError) and issubclass(_wire.TunnelOnlyError, _wire.WireError)


def test_each_library_raises_its_own_type_and_the_shared_one() -> None:
    """aiohttp's and httpx's classes are both their library's error and the shared base, so the
    library's own ``except`` clauses and ``except agenshield_shim.TunnelOnlyError`` both catch them."""
    aiohttp = pytest.importorskip("aiohttp")
    httpx = pytest.importorskip("httpx")
    from agenshield_shim.hooks import aiohttp as aiohttp_hook
    from agenshield_shim.hooks import httpx as httpx_hook
    from agenshield_shim.hooks.httpx_rpc import RpcRoute

    aio = aiohttp_hook._tunnel_only(aiohttp)
    assert aio is aiohttp_hook.TunnelOnlyError is aiohttp_hook._tunnel_only(aiohttp)  # made once
    assert issubclass(aio, aiohttp.ClientConnectionError) and not issubclass(aio, aiohttp.ClientOSError)
    route = RpcRoute(httpx, Config(transport="rpc"), httpx_hook.refusal_response)
    request = httpx.Request("GET", "http://h.test/")
    for cls, library_types, made in [
        (aio, (aiohttp.ClientConnectionError, aiohttp.ClientError), lambda c: c("AgenShield: x")),
        (route.tunnel_only, (httpx.UnsupportedProtocol, httpx.ProxyError, httpx.TransportError),
         lambda c: c("AgenShield: x", request=request)),
    ]:
        assert cls.__name__ == "TunnelOnlyError"
        for library_type in library_types:
            with pytest.raises(library_type):
                raise made(cls)
        with pytest.raises(agenshield_shim.TunnelOnlyError):
            raise made(cls)
    # the core's refusals come out as these classes
    body = _rpc.RpcBodyError("AgenShield: body", None, None, "b", "http://h.test/")
    assert isinstance(route.error(request, body), route.tunnel_only)
    with pytest.raises(route.tunnel_only):
        route.call_args(httpx.Request("GET", "http://h.test/ws", headers={"Upgrade": "websocket"}))


def test_tunnel_only_error_is_defined_in_tunnel_mode_without_the_rpc_core() -> None:
    """``except hooks.aiohttp.TunnelOnlyError`` (or websockets') is a class before any install, and
    the shared one loads without ``_rpc``/``_wire``."""
    code = (
        "import sys\n"
        "import agenshield_shim\n"
        "from agenshield_shim.hooks import aiohttp, websockets\n"
        "base = agenshield_shim.TunnelOnlyError\n"
        "assert aiohttp.TunnelOnlyError is base and websockets.TunnelOnlyError is base, (aiohttp.TunnelOnlyError,)\n"
        "try:\n"
        "    raise ValueError('x')\n"
        "except (aiohttp.TunnelOnlyError, websockets.TunnelOnlyError):\n"
        "    raise SystemExit('caught the wrong error')\n"
        "except ValueError:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m in ('agenshield_shim._rpc', 'agenshield_shim._wire')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# -- host and port as text ---------------------------------------------------------------------------


@pytest.mark.parametrize("host, port, expected", [
    ("h.test", 443, "h.test:443"), ("::1", 8080, "[::1]:8080"), ("[::1]", 8080, "[::1]:8080"),
    ("127.0.0.1", None, "127.0.0.1"), ("fe80::1", "80", "[fe80::1]:80"),
])
def test_authority(host: str, port: object, expected: str) -> None:
    assert authority.authority(host, port) == expected


@pytest.mark.parametrize("scheme, host, port, expected", [
    ("https", "h.test", 443, "h.test"), ("http", "h.test", 80, "h.test"), ("https", "h.test", 80, "h.test:80"),
    ("http", "::1", 8080, "[::1]:8080"), ("https", "[::1]", 443, "[::1]"), ("HTTPS", "h.test", "443", "h.test"),
])
def test_origin_authority(scheme: str, host: str, port: object, expected: str) -> None:
    assert authority.origin_authority(scheme, host, port) == expected


def test_destination_and_proxy_url() -> None:
    assert authority.destination("https", "::1") == "https://[::1]:443"
    assert authority.destination("ws", "h.test") == "ws://h.test:80"
    assert authority.destination("http", "h.test", 8080) == "http://h.test:8080"
    assert authority.proxy_url("::1", 8899) == "http://[::1]:8899"
    assert authority.proxy_url("[::1]", 8899) == "http://[::1]:8899"


@given(st.one_of(st.ip_addresses().map(str), st.from_regex(r"\A[a-z0-9.-]{1,30}\Z")),
       st.one_of(st.none(), st.integers(0, 65535)))
def test_the_guards_sealed_copy_agrees(host: str, port: object) -> None:
    """The guard keeps its own ``format_destination`` (bound into the sealed audit hook, loaded at
    start-up); for the unbracketed hosts it is given, it writes what :mod:`authority` writes."""
    assert _boot.format_destination(host, port) == authority.authority(host, port)


def test_authority_and_errors_import_nothing() -> None:
    """The hooks load them with their library: they may bring no other module."""
    code = ("import sys\nbefore = set(sys.modules)\nimport agenshield_shim.authority, agenshield_shim.errors\n"
            "print(sorted(set(sys.modules) - before))")
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(["agenshield_shim", "agenshield_shim.authority", "agenshield_shim.errors"])


def test_no_other_module_brackets_hosts_itself() -> None:
    """IPv6 brackets are written in one place (beside the guard's sealed copy, and selftest, which
    runs as a self-contained script inside other interpreters)."""
    allowed = {"authority.py", "_boot.py", "selftest.py"}
    pattern = re.compile(r"""["']\[%s\][:"']""")  # "[%s]:%d" or "[%s]", not a regex class like "[%s]+"
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "agenshield_shim").rglob("*.py")
                 if p.name not in allowed and pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders


# -- supported releases, as data beside each hook -------------------------------------------------------


def versions_by_hook() -> Dict[str, Tuple[Tuple[object, ...], ...]]:
    import importlib

    found = {}
    for name in sorted({spec.partition(":")[0] for _, spec in _boot.HOOKS}):
        module = importlib.import_module(name)
        if hasattr(module, "VERSIONS"):
            found[name] = module.VERSIONS
    return found


def test_hooks_of_third_party_libraries_say_which_releases() -> None:
    data = versions_by_hook()
    assert set(data) == {"agenshield_shim.hooks.aiohttp", "agenshield_shim.hooks.httpx",
                         "agenshield_shim.hooks.http_client", "agenshield_shim.hooks.websockets"}, data
    distributions = [entry[0] for entries in data.values() for entry in entries]
    assert sorted(distributions) == sorted({"aiohttp", "httpx", "httpx2", "urllib3", "websockets"})
    stacks = {entry[0] for entry in selftest.STACKS}
    for entries in data.values():
        for distribution, oldest, newest, why in entries:
            assert distribution in stacks
            assert selftest.release(oldest) and (newest is None or selftest.release(newest))


def test_readme_states_each_hooks_releases() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for entries in versions_by_hook().values():
        for entry in entries:
            text = selftest.range_text(entry[0], entry[1:])
            assert text in readme, text


def test_selftest_reads_the_ranges_from_the_hooks() -> None:
    """Only the hooks hold release numbers: selftest's table has none, and classifies by the hooks' data."""
    for entry in selftest.STACKS:
        assert len(entry) == 5 and not any(isinstance(field, int) for field in entry), entry
        assert not re.search(r"\d", entry[4]), entry  # its note
    versions = selftest.hook_versions()
    assert versions["websockets"][0] == "15" and versions["aiohttp"][:2] == ("3.9", "3.14")
    hooked = [name for name, _ in _boot.HOOKS]
    ws = ("websockets", ("websockets.asyncio.client",), selftest.PROXY_ENV)
    assert selftest.classify(ws[0], ws[1], ws[2], "14.2", versions["websockets"], hooked) == selftest.NONE
    assert selftest.classify(ws[0], ws[1], ws[2], "15.0.1", versions["websockets"], hooked) == selftest.HOOK
    # older than the range, but the hook still patches it: routed, said to be untested
    assert selftest.classify("aiohttp", ("aiohttp",), selftest.NONE, "3.8.6", versions["aiohttp"], hooked) == \
        selftest.HOOK

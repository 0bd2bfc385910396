"""The policy table, policy-file validation, ``--allow`` parsing: pure functions, no network."""

from typing import Any, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agenshield_shim.broker.policy import (
    LOOPBACK_RULE, Policy, PolicyError, Target, allow_rule, build_policy, load_policy_file,
    normalize_path, policy_from_mapping,
)

POLICY = {
    "rules": [
        {"id": "gh", "action": "allow", "hosts": ["github.com", "*.github.com"], "schemes": ["https"], "ports": [443]},
        {"id": "gh-no-delete", "action": "deny", "hosts": ["api.github.com"], "methods": ["DELETE"]},
        {"id": "api-read", "action": "allow", "hosts": "api.example.com", "methods": ["GET", "HEAD"], "paths": ["/v1/"]},
        {"id": "internal", "action": "allow", "hosts": ["10.0.0.0/8"], "ports": ["8000-8100"]},
        {"id": "no-admin", "action": "deny", "paths": "/admin"},
        {"id": "dev", "action": "allow", "hosts": "dev.local", "schemes": ["http", "ws"]},
    ]
}


def U(url_host: str, port: Optional[int] = None, scheme: str = "https", method: str = "GET", path: str = "/") -> Target:
    return Target(host=url_host, port=port or (443 if scheme == "https" else 80), scheme=scheme, method=method, path=path)


def T(host: str, port: int) -> Target:
    return Target(host=host, port=port, tunnel=True)


@pytest.mark.parametrize(
    "target, allowed, policy_id",
    [
        (U("github.com"), True, "gh"),
        (U("GitHub.COM."), True, "gh"),
        (U("api.github.com"), True, "gh"),
        (U("a.b.github.com"), True, "gh"),
        (U("evilgithub.com"), False, None),
        (U("github.com.evil.net"), False, None),
        (U("github.com", scheme="http"), False, None),
        (U("github.com", port=8443), False, None),
        (U("api.github.com", method="DELETE"), False, "gh-no-delete"),  # deny wins over an earlier allow
        (U("api.example.com", path="/v1/items", scheme="http"), True, "api-read"),
        (U("api.example.com", path="/v2/items"), False, None),
        (U("api.example.com", path="/v1/../v2/x"), False, None),  # dot segments normalised
        (U("api.example.com", path="/v1/%2e%2e/v2"), False, None),
        (U("api.example.com", path="/v1/x", method="POST"), False, None),
        (U("github.com", path="/admin/x"), False, "no-admin"),
        (U("10.1.2.3", port=8080, scheme="http"), True, "internal"),
        (U("10.1.2.3", port=9000, scheme="http"), False, None),
        (U("11.1.2.3", port=8080, scheme="http"), False, None),
        (U("dev.local", scheme="http", port=3000), True, "dev"),
        (U("dev.local", scheme="https"), False, None),
        # tunnels: host and port only; rules naming method/path neither allow nor deny
        (T("github.com", 443), True, "gh"),
        (T("github.com", 22), False, None),
        (T("api.github.com", 443), True, "gh"),  # the DELETE deny does not close the tunnel
        (T("api.example.com", 443), False, None),  # a GET /v1/ allow does not open one
        (T("dev.local", 443), True, "dev"),  # schemes are not evaluated for tunnels
        (T("github.com", 443), True, "gh"),
    ],
)
def test_policy_table(target: Target, allowed: bool, policy_id: Optional[str]) -> None:
    d = policy_from_mapping(POLICY).check(target)
    assert d.allowed is allowed
    assert d.policy_id == policy_id
    if not allowed:
        assert d.reason
        res = d.as_result()
        assert res["allowed"] is False and "reason" in res


def test_compat_tunnel_ignores_port() -> None:
    p = policy_from_mapping(POLICY)
    assert not p.check(T("github.com", 22)).allowed
    assert p.check(T("github.com", 22), check_port=False).allowed


def test_default_policy_is_loopback_only() -> None:
    p = build_policy(None, [])
    for host in ("127.0.0.1", "127.3.4.5", "localhost", "LOCALHOST", "::1", "[::1]", "app.localhost"):
        assert p.check(U(host, 8080, scheme="http")).allowed, host
        assert p.check(T(host, 1)).allowed
    for host in ("example.com", "10.0.0.1", "0.0.0.0", "::", "127.1", "localhost.example.com"):
        d = p.check(U(host))
        assert not d.allowed and d.reason == "Host '%s' is not allowed" % host.strip("[]")


def test_default_allow_with_deny_rules() -> None:
    p = policy_from_mapping({"default": "allow", "rules": [{"action": "deny", "hosts": ["*.bad.test"]}]})
    assert p.check(U("good.test")).allowed
    d = p.check(U("x.bad.test"))
    assert not d.allowed and d.policy_id == "rule-0"


def test_allow_flags() -> None:
    p = build_policy(None, ["example.com", "api.test:8443", "[::1]:9000", "*.corp.test"])
    assert p.check(U("example.com", 1234)).allowed
    assert p.check(U("api.test", 8443)).allowed and not p.check(U("api.test", 443)).allowed
    assert p.check(T("::1", 9000)).allowed and not p.check(T("::1", 9001)).allowed
    assert p.check(U("a.corp.test")).allowed
    assert not p.check(U("127.0.0.1", 80, scheme="http")).allowed  # no implicit loopback once told
    for bad in ("", "a:b", "[::1", "x:0", "x:70000", "a*b", "a:b:c:d:", "sp ace", "a/b/c"):
        with pytest.raises(PolicyError):
            allow_rule(0, bad)


@pytest.mark.parametrize(
    "rules, index, fieldname",
    [
        ([{"action": "allow"}, {"action": "maybe"}], 1, "action"),
        ([{"hosts": ["x"]}], 0, "action"),
        ([{"action": "allow", "hosts": [5]}], 0, "hosts"),
        ([{"action": "allow", "hosts": ["a*.b"]}], 0, "hosts"),
        ([{"action": "allow"}, {"action": "allow"}, {"action": "deny", "ports": [0]}], 2, "ports"),
        ([{"action": "allow", "ports": ["80-70"]}], 0, "ports"),
        ([{"action": "allow", "ports": [True]}], 0, "ports"),
        ([{"action": "allow", "schemes": ["ftp"]}], 0, "schemes"),
        ([{"action": "allow", "methods": ["GE T"]}], 0, "methods"),
        ([{"action": "allow", "paths": ["api"]}], 0, "paths"),
        ([{"action": "allow", "colour": "red"}], 0, "colour"),
        ([{"action": "allow", "id": ""}], 0, "id"),
        ([{"action": "allow", "id": "a"}, {"action": "deny", "id": "a"}], 1, "id"),
    ],
)
def test_malformed_policy_names_rule_and_field(rules: Any, index: int, fieldname: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"rules": rules}, source="p.toml")
    msg = str(info.value)
    assert "rule %d" % index in msg and "field '%s'" % fieldname in msg


def test_policy_file_toml(tmp_path: Any) -> None:
    f = tmp_path / "policy.toml"
    f.write_text('default = "deny"\n[[rules]]\nid = "one"\naction = "allow"\nhosts = ["a.test"]\nports = [443, "8000-8001"]\n')
    p = load_policy_file(str(f))
    assert p.check(U("a.test")).allowed and p.check(U("a.test", 8001)).allowed
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy_file(str(bad))
    with pytest.raises(PolicyError, match="unknown top-level key 'rule'"):
        policy_from_mapping({"rule": []})
    with pytest.raises(PolicyError):
        load_policy_file(str(tmp_path / "missing.toml"))


def test_file_rules_then_allow_flags(tmp_path: Any) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\naction = "deny"\nhosts = ["blocked.test"]\n')
    p = build_policy(str(f), ["blocked.test", "ok.test"])
    assert not p.check(U("blocked.test")).allowed  # deny wins, whatever the order
    assert p.check(U("ok.test")).allowed


@pytest.mark.parametrize(
    "raw, expected",
    [("/a/b", "/a/b"), ("/a/../b", "/b"), ("/a/./b/", "/a/b/"), ("/../../x", "/x"), ("", "/"),
     ("/a/b/..", "/a/"), ("/v1/%2E%2E/admin?x=1", "/admin"), ("/a//b", "/a//b")],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@given(st.text(alphabet="/.ab%2eE", max_size=30))
def test_normalize_path_never_keeps_dot_segments(raw: str) -> None:
    out = normalize_path(raw)
    assert out.startswith("/")
    segments = out.split("/")
    assert "." not in segments and ".." not in segments


def test_loopback_rule_is_named() -> None:
    d = Policy([LOOPBACK_RULE]).check(U("127.0.0.1", 1, scheme="http"))
    assert d.allowed and d.policy_id == "default-loopback"

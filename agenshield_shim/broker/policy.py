"""Network policy: ordered allow/deny rules, default deny, loaded from TOML or ``--allow`` flags.

Why a rule list and not the daemon's built-in host list: the reference broker runs on developer
machines and in CI, where the right answer is "nothing but what I said". So the policy is
default-deny, and with neither a policy file nor ``--allow`` only loopback destinations pass.

Policy file (TOML)::

    default = "deny"            # optional; "deny" (default) or "allow"

    [[rules]]
    id = "github"               # optional; defaults to "rule-<index>" (0-based)
    action = "allow"            # required: "allow" or "deny"
    hosts = ["github.com", "*.github.com", "10.0.0.0/8", "*"]
    schemes = ["https"]         # http, https (ws/wss count as http/https)
    ports = [443, "8000-8100"]
    methods = ["GET", "HEAD"]
    paths = ["/api/"]           # path prefixes, matched on the dot-segment-normalised path

Every condition is optional (absent = any); a bare string or number stands for a one-item list.
``*.example.com`` matches any subdomain of example.com but not example.com itself; an IP network
(``127.0.0.0/8``) matches IP-literal hosts inside it. Host names compare case-insensitively,
without a trailing dot.

Evaluation: every rule that matches is considered; if any *deny* rule matches, the request is
denied (``policyId`` is the first matching deny rule's id), else if an *allow* rule matches it is
allowed (first matching allow rule), else the default applies. Order only decides which id is
reported: deny wins over allow.

What the broker can see: ``/rpc`` calls and plain-HTTP forwards expose scheme, host, port, method
and path. A ``CONNECT`` tunnel exposes only host and port, so for a tunnel a rule that names
``methods`` or ``paths`` does not match at all (neither to allow nor to deny: an allow rule for
``GET /api/`` must not open a tunnel that can carry any request), and ``schemes`` are not evaluated
(the broker cannot see what the tunnel carries; restrict tunnels by port). In ``--compat`` mode a
tunnel is checked on its host only, as the daemon does: port conditions are ignored for it.

A malformed file is refused at start with a :class:`PolicyError` naming the file, the rule index
(0-based, as in the default ids) and id, and the field. ``docs/policy.md`` is the user's guide to
this format.
"""

import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_RULE_FIELDS = {"id", "action", "hosts", "schemes", "ports", "methods", "paths", "description"}
_SCHEMES = {"http", "https", "ws", "wss"}
_SCHEME_ALIAS = {"ws": "http", "wss": "https"}
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class PolicyError(ValueError):
    """A policy file or ``--allow`` entry that cannot be used; the message names rule and field."""


@dataclass(frozen=True)
class Target:
    """What a decision is about. ``None`` means "the broker cannot see it" (tunnels)."""

    host: str
    port: Optional[int] = None
    scheme: Optional[str] = None
    method: Optional[str] = None
    path: Optional[str] = None
    tunnel: bool = False


@dataclass(frozen=True)
class Decision:
    """The answer to one policy question; ``as_result()`` is also ``policy_check``'s result."""

    allowed: bool
    policy_id: Optional[str] = None
    reason: Optional[str] = None

    def as_result(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"allowed": self.allowed}
        if self.policy_id is not None:
            out["policyId"] = self.policy_id
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def normalize_host(host: str) -> str:
    """Lower-case, strip brackets and a trailing dot, so ``[::1]`` and ``Example.COM.`` compare."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".") if host not in (".",) else host


def _as_ip(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def normalize_path(path: str) -> str:
    """Remove dot segments (RFC 3986 5.2.4), also percent-encoded ones, so ``/a/../b`` is ``/b``."""
    raw = path.split("?", 1)[0].split("#", 1)[0] or "/"
    raw = raw.replace("%2e", ".").replace("%2E", ".")
    out: List[str] = []
    segments = raw.split("/")
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == len(segments) - 1:
                out.append("")
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if i == len(segments) - 1:
                out.append("")
            continue
        out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


class HostPattern:
    """One ``hosts`` entry: ``*``, ``*.suffix``, an IP network, or an exact name/address."""

    def __init__(self, text: str) -> None:
        self.text = text
        t = normalize_host(text)
        self.any = t == "*"
        self.suffix: Optional[str] = None
        self.network: Optional[IPNetwork] = None
        self.exact: Optional[str] = None
        if self.any:
            return
        if t.startswith("*."):
            rest = t[2:]
            if not rest or "*" in rest:
                raise ValueError("bad wildcard %r (use '*.example.com')" % text)
            self.suffix = "." + rest
            return
        if "*" in t or not t:
            raise ValueError("bad host pattern %r" % text)
        if "/" in t:
            self.network = ipaddress.ip_network(t, strict=False)
            return
        ip = _as_ip(t)
        if ip is None and not _NAME.match(t):
            raise ValueError("bad host %r (a name, an IP address, '*.suffix' or a CIDR network)" % text)
        self.exact = str(ip) if ip is not None else t

    def matches(self, host: str) -> bool:
        if self.any:
            return True
        if self.suffix is not None:
            return host.endswith(self.suffix)
        ip = _as_ip(host)
        if self.network is not None:
            return ip is not None and ip in self.network
        return (str(ip) if ip is not None else host) == self.exact


@dataclass(frozen=True)
class Rule:
    """One ordered rule; every ``None`` condition matches anything."""

    id: str
    action: str
    hosts: Optional[Tuple[HostPattern, ...]] = None
    schemes: Optional[Tuple[str, ...]] = None
    ports: Optional[Tuple[Tuple[int, int], ...]] = None
    methods: Optional[Tuple[str, ...]] = None
    paths: Optional[Tuple[str, ...]] = None

    def matches(self, t: Target, check_port: bool = True) -> bool:
        host = normalize_host(t.host)
        if self.hosts is not None and not any(p.matches(host) for p in self.hosts):
            return False
        if self.ports is not None and check_port:
            if t.port is None or not any(lo <= t.port <= hi for lo, hi in self.ports):
                return False
        if t.tunnel:
            # Method and path are invisible inside a tunnel: such a rule neither allows nor denies.
            return self.methods is None and self.paths is None
        if self.schemes is not None:
            scheme = _SCHEME_ALIAS.get((t.scheme or "").lower(), (t.scheme or "").lower())
            if scheme not in self.schemes:
                return False
        if self.methods is not None and (t.method or "").upper() not in self.methods:
            return False
        if self.paths is not None:
            path = normalize_path(t.path or "/")
            if not any(path.startswith(p) for p in self.paths):
                return False
        return True


class Policy:
    """Ordered rules plus a default; ``check()`` is pure and cheap (called once per request)."""

    def __init__(self, rules: Sequence[Rule], default_allow: bool = False, source: str = "") -> None:
        self.rules = tuple(rules)
        self.default_allow = default_allow
        self.source = source

    def check(self, target: Target, check_port: bool = True) -> Decision:
        allow: Optional[Rule] = None
        for rule in self.rules:
            if not rule.matches(target, check_port):
                continue
            if rule.action == "deny":
                return Decision(False, rule.id, "%s denied by policy '%s'" % (_describe(target), rule.id))
            if allow is None:
                allow = rule
        if allow is not None:
            return Decision(True, allow.id)
        if self.default_allow:
            return Decision(True, "default")
        return Decision(False, None, "Host '%s' is not allowed" % normalize_host(target.host))


    def deny_for(self, target: Target, check_port: bool = True) -> Optional[Decision]:
        """The refusal when a *deny* rule matches ``target`` (used on each resolved address: a name
        the policy allows must not lead to an address it denies), else ``None``."""
        decision = self.check(target, check_port)
        if decision.allowed or decision.policy_id is None:
            return None
        return decision


def _describe(t: Target) -> str:
    host = normalize_host(t.host)
    return "Host '%s'" % (host if t.port is None else "%s:%d" % (host, t.port))


# ---------------------------------------------------------------------------------------------
# Building policies


def _where(source: str) -> str:
    """How a message names the policy: its file, or where its rules came from."""
    if not source:
        return "policy"
    return source if source.startswith("--") else "policy file %s" % source


def _err(index: int, rule_id: Optional[str], fieldname: str, what: str, source: str = "") -> PolicyError:
    label = "rule %d" % index + (" (id %r)" % rule_id if rule_id else "")
    return PolicyError("%s, %s, field '%s': %s; see docs/policy.md" % (_where(source), label, fieldname, what))


def _as_list(value: Any) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parse_port(value: Any) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("not a port: %r" % (value,))
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str):
        a, _, b = value.partition("-")
        words = [w.strip() for w in (a, b or a)]
        if not all(w.isdigit() and w.isascii() for w in words):
            raise ValueError("not a port: %r (a number from 1 to 65535, or a range such as \"8000-8100\")" % (value,))
        lo, hi = int(words[0]), int(words[1])
    else:
        raise ValueError("not a port: %r (a number from 1 to 65535, or a range such as \"8000-8100\")" % (value,))
    if not (1 <= lo <= hi <= 65535):
        raise ValueError("port out of range: %r (ports are 1 to 65535, a range low-high)" % (value,))
    return lo, hi


def rule_from_mapping(index: int, raw: Mapping[str, Any], source: str = "") -> Rule:
    """Validate one rule table; every problem names the file, the rule index (and id) and the field."""
    if not isinstance(raw, Mapping):
        raise _err(index, None, "(rule)", "must be a table", source)
    rid = raw.get("id")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise _err(index, None, "id", "must be a non-empty string", source)
    for key in raw:
        if key not in _RULE_FIELDS:
            raise _err(index, rid, key, "unknown field (known: %s)" % ", ".join(sorted(_RULE_FIELDS)), source)
    action = raw.get("action")
    if action not in ("allow", "deny"):
        raise _err(index, rid, "action", "must be \"allow\" or \"deny\", got %r" % (action,), source)
    kw: Dict[str, Any] = {}
    if "hosts" in raw:
        pats = []
        for h in _as_list(raw["hosts"]):
            if not isinstance(h, str):
                raise _err(index, rid, "hosts", "entries must be strings, got %r" % (h,), source)
            try:
                pats.append(HostPattern(h))
            except ValueError as exc:
                raise _err(index, rid, "hosts", str(exc), source) from None
        kw["hosts"] = tuple(pats)
    if "schemes" in raw:
        schemes = []
        for s in _as_list(raw["schemes"]):
            if not isinstance(s, str) or s.lower() not in _SCHEMES:
                raise _err(index, rid, "schemes", "must be among %s, got %r" % (sorted(_SCHEMES), s), source)
            schemes.append(_SCHEME_ALIAS.get(s.lower(), s.lower()))
        kw["schemes"] = tuple(schemes)
    if "ports" in raw:
        ports = []
        for p in _as_list(raw["ports"]):
            try:
                ports.append(_parse_port(p))
            except ValueError as exc:
                raise _err(index, rid, "ports", str(exc), source) from None
        kw["ports"] = tuple(ports)
    if "methods" in raw:
        methods = []
        for m in _as_list(raw["methods"]):
            if not isinstance(m, str) or not m or not set(m) <= _TOKEN_CHARS:
                raise _err(index, rid, "methods", "must be HTTP method names, got %r" % (m,), source)
            methods.append(m.upper())
        kw["methods"] = tuple(methods)
    if "paths" in raw:
        paths = []
        for p in _as_list(raw["paths"]):
            if not isinstance(p, str) or not p.startswith("/"):
                raise _err(index, rid, "paths", "must be strings starting with '/', got %r" % (p,), source)
            paths.append(p)
        kw["paths"] = tuple(paths)
    if "description" in raw and not isinstance(raw["description"], str):
        raise _err(index, rid, "description", "must be a string", source)
    return Rule(id=rid or "rule-%d" % index, action=action, **kw)


def _load_toml(path: str) -> Dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.9/3.10 only
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data: Dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise PolicyError("policy file %s: %s" % (path, exc.strerror or exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("policy file %s: not valid TOML: %s" % (path, exc)) from None


def policy_from_mapping(data: Mapping[str, Any], source: str = "") -> Policy:
    """Build a :class:`Policy` from a parsed TOML document (see the module docstring)."""
    for key in data:
        if key not in ("default", "rules"):
            raise PolicyError("%s: unknown top-level key '%s' (known: default, rules); see docs/policy.md"
                              % (_where(source), key))
    default = data.get("default", "deny")
    if default not in ("allow", "deny"):
        raise PolicyError("%s: field 'default': must be \"allow\" or \"deny\", got %r" % (_where(source), default))
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise PolicyError("%s: 'rules' must be an array of tables ([[rules]]); see docs/policy.md" % _where(source))
    rules = [rule_from_mapping(i, r, source) for i, r in enumerate(raw_rules)]
    seen: Dict[str, int] = {}
    for i, r in enumerate(rules):
        if r.id in seen:
            raise _err(i, r.id, "id", "duplicate of rule %d" % seen[r.id], source)
        seen[r.id] = i
    return Policy(rules, default_allow=default == "allow", source=source)


def load_policy_file(path: str) -> Policy:
    return policy_from_mapping(_load_toml(path), source=path)


def allow_rule(index: int, spec: str) -> Rule:
    """An ``--allow HOST[:PORT]`` flag as a rule (``[::1]:8080`` for IPv6 with a port)."""
    text = spec.strip()
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PolicyError("--allow %r: unclosed '['; write HOST[:PORT], IPv6 as [::1]:8080" % spec)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise PolicyError("--allow %r: expected HOST[:PORT], IPv6 as [::1]:8080" % spec)
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        pattern = HostPattern(host)
        ports = (_parse_port(port),) if port is not None else None
    except ValueError as exc:
        raise PolicyError("--allow %r: %s; write HOST or HOST:PORT, e.g. --allow api.example.com:443" % (spec, exc)) from None
    return Rule(id="allow-%d" % index, action="allow", hosts=(pattern,), ports=ports)


LOOPBACK_RULE = Rule(
    id="default-loopback",
    action="allow",
    hosts=(HostPattern("localhost"), HostPattern("*.localhost"), HostPattern("127.0.0.0/8"), HostPattern("::1/128")),
)


def build_policy(policy_file: Optional[str], allow: Sequence[str]) -> Policy:
    """The policy a broker runs with: file rules, then ``--allow`` rules; loopback-only with neither."""
    if policy_file is None and not allow:
        return Policy([LOOPBACK_RULE], source="(default: loopback only)")
    base = load_policy_file(policy_file) if policy_file else Policy([], source="")
    rules = list(base.rules) + [allow_rule(i, a) for i, a in enumerate(allow)]
    return Policy(rules, default_allow=base.default_allow, source=policy_file or "--allow")

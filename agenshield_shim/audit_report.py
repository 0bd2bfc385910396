"""``agenshield-shim audit FILE ... [--json] [--suggest-policy]``: what did the agent try to reach?

Reads audit logs of one JSON object per line, as three writers produce them, all with the daemon's
field names (``operation, target, allowed, result, timestamp, policyId``):

- the reference broker (``broker --audit``, or ``run --audit``): ``target`` is ``host:port`` for a
  tunnel, a URL for a forward or an ``http_request``; the reason is ``metadata.reason``;
- the shim's guard (``AGENSHIELD_AUDIT_LOG``): refused direct connections and name lookups,
  ``target`` ``host:port`` or ``host``, ``result`` ``blocked``;
- the AgenShield daemon (its ``AGENSHIELD_AUDIT_LOG``): URLs, the reason in ``errorMessage``.

It prints the destinations by count, each with how often it was allowed and refused and when it
was first and last seen, as a table or (``--json``) as one JSON document. ``--suggest-policy``
prints instead a policy file in the reference broker's TOML format (``docs/policy.md``) that
allows what was refused and keeps allowing what was allowed: a starting point to review, never
to apply blindly (it allows whole hosts on the ports seen, not paths or methods).

Why policy authoring from observation: a default-deny policy is only livable when the list of
what an agent needs can be read off a run instead of guessed up front.
"""

import json
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from .authority import authority
from .cli_args import Parser, usage_error

PROG = "agenshield-shim audit"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class AuditFileError(ValueError):
    """A file that cannot be read as an audit log; the message names it and says what to do."""


def split_target(target: str) -> Tuple[Optional[str], Optional[int]]:
    """(host, port) of an audit ``target``: a URL, ``host:port``, ``[v6]:port`` or a bare host.

    (None, None) for what names no host (the guard's "a raw or non-IP socket ...", "reverse lookup
    of ..."): such a refusal cannot be undone by a broker policy.
    """
    text = target.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            return None, None
        host = parts.hostname
        if not host:
            return None, None
        return host.lower(), port if port is not None else _DEFAULT_PORTS.get(parts.scheme.lower())
    if " " in text or not text:
        return None, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, None
        host, rest = text[1:end], text[end + 1:]
        return host.lower(), _port(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        name, port_text = text.split(":")
        return name.lower(), _port(port_text)
    return text.lower(), None


def _port(text: str) -> Optional[int]:
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def reason_of(entry: Dict[str, Any]) -> Optional[str]:
    """The refusal's reason, wherever its writer put it (broker and shim: metadata; daemon: errorMessage)."""
    meta = entry.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("reason"), str):
        return str(meta["reason"])
    message = entry.get("errorMessage")
    return message if isinstance(message, str) else None


def read_entries(path: str) -> Tuple[List[Dict[str, Any]], List[int]]:
    """The audit entries of ``path`` and the numbers of the lines that are not entries."""
    entries: List[Dict[str, Any]] = []
    bad: List[int] = []
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AuditFileError("%s: %s; give the path of an audit log (broker --audit FILE, AGENSHIELD_AUDIT_LOG)"
                             % (path, exc.strerror or exc)) from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                bad.append(number)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("target"), str) \
                    or not isinstance(entry.get("allowed"), bool):
                bad.append(number)
                continue
            entries.append(entry)
    if not entries:
        raise AuditFileError("%s: no audit entries (JSON lines with operation, target, allowed); is it an audit log "
                             "(broker --audit FILE, AGENSHIELD_AUDIT_LOG)?" % path)
    return entries, bad


def summarise(entries: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per destination, most requested first: counts, first/last seen, operations, reasons."""
    rows: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        host, port = split_target(entry["target"])
        key = authority(host, port) if host is not None else entry["target"]
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"destination": key, "host": host, "port": port, "count": 0, "allowed": 0,
                               "refused": 0, "firstSeen": None, "lastSeen": None, "operations": [],
                               "policyIds": [], "refusedBy": [], "reasons": []}
        row["count"] += 1
        row["allowed" if entry["allowed"] else "refused"] += 1
        stamp = entry.get("timestamp")
        if isinstance(stamp, str):
            row["firstSeen"] = stamp if row["firstSeen"] is None else min(row["firstSeen"], stamp)
            row["lastSeen"] = stamp if row["lastSeen"] is None else max(row["lastSeen"], stamp)
        _add(row["operations"], entry.get("operation"))
        _add(row["policyIds"], entry.get("policyId"))
        if not entry["allowed"]:
            _add(row["reasons"], reason_of(entry))
            _add(row["refusedBy"], entry.get("policyId"))
    return sorted(rows.values(), key=lambda r: (-r["count"], r["destination"]))


def _add(items: List[Any], value: Any) -> None:
    if isinstance(value, str) and value and value not in items:
        items.append(value)


def table(rows: List[Dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = ("DESTINATION", "REQUESTS", "ALLOWED", "REFUSED", "FIRST SEEN", "LAST SEEN")
    body = [(r["destination"], str(r["count"]), str(r["allowed"]), str(r["refused"]), r["firstSeen"] or "-",
             r["lastSeen"] or "-") for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    numeric = (1, 2, 3)

    def fmt(line: Tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join(fmt(line) for line in [head] + body)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable text is a valid TOML basic string


def _comment(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def suggest_policy(rows: List[Dict[str, Any]], sources: List[str]) -> str:
    """A reference-broker policy (TOML) allowing every refused host on the ports seen, keeping the allowed ones.

    Refusals by a *deny* rule are listed as comments only: deny wins over allow, so an allow rule
    could not undo them (the user must change that deny rule). Destinations that name no host are
    listed as comments too.
    """
    lines = [
        "# Suggested by agenshield-shim audit from %s." % _comment(", ".join(sources)),
        "# It allows what was refused (and keeps what was allowed) on the hosts and ports seen.",
        "# Review it before use: the format is in docs/policy.md. Then: agenshield-shim run --policy FILE -- ...",
        'default = "deny"',
    ]
    by_host: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    for row in rows:
        host = row["host"]
        denied_by_rule = row["refusedBy"]  # a refusal with a policy id came from a deny rule, not the default
        if host is None:
            notes.append("# %s: refused %d time(s); a broker policy cannot allow it (names no host)"
                         % (_comment(row["destination"]), row["refused"]))
            continue
        if row["refused"] and denied_by_rule:
            notes.append("# %s: refused %d time(s) by deny rule %s of your policy; an allow rule cannot undo a deny "
                         "rule: narrow or remove that rule" % (_comment(row["destination"]), row["refused"],
                                                                ", ".join(map(repr, denied_by_rule))))
            continue
        item = by_host.setdefault(host, {"ports": [], "any_port": False, "refused": 0, "allowed": 0, "reasons": []})
        if row["port"] is None:
            item["any_port"] = True
        elif row["port"] not in item["ports"]:
            item["ports"].append(row["port"])
        item["refused"] += row["refused"]
        item["allowed"] += row["allowed"]
        for reason in row["reasons"]:
            _add(item["reasons"], reason)
    for host in sorted(by_host, key=lambda h: (-by_host[h]["refused"], h)):
        item = by_host[host]
        what = ("refused %d time(s)" % item["refused"]) if item["refused"] else "already allowed"
        if item["allowed"] and item["refused"]:
            what += ", allowed %d time(s)" % item["allowed"]
        lines += ["", "[[rules]]", "# %s%s" % (what, (": " + _comment(item["reasons"][0])) if item["reasons"] else ""),
                  "id = %s" % _toml_string("allow-" + host), 'action = "allow"', "hosts = [%s]" % _toml_string(host)]
        if item["any_port"]:
            lines.append("# seen without a port (a name lookup): any port of this host")
        else:
            lines.append("ports = [%s]" % ", ".join(str(p) for p in sorted(item["ports"])))
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Summarise audit logs (the reference broker's --audit file, the shim's AGENSHIELD_AUDIT_LOG, the "
                    "AgenShield daemon's audit log): destinations by count, allowed and refused, first and last seen.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="audit log, one JSON object per line")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--suggest-policy", action="store_true",
                        help="print a policy (TOML, see docs/policy.md) that allows what was refused, to review")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    entries: List[Dict[str, Any]] = []
    skipped: Dict[str, List[int]] = {}
    for path in args.files:
        try:
            found, bad = read_entries(path)
        except AuditFileError as exc:
            return usage_error(PROG, str(exc))
        entries += found
        if bad:
            skipped[path] = bad
    for path, bad in skipped.items():
        print("%s: %s: skipped %d line(s) that are not audit entries (first: line %d)" % (PROG, path, len(bad), bad[0]),
              file=sys.stderr)
    rows = summarise(entries)
    if args.suggest_policy:
        sys.stdout.write(suggest_policy(rows, args.files))
    elif args.json:
        print(json.dumps({"files": args.files, "entries": len(entries),
                          "allowed": sum(r["allowed"] for r in rows), "refused": sum(r["refused"] for r in rows),
                          "skippedLines": {p: len(b) for p, b in skipped.items()}, "destinations": rows}, indent=2))
    else:
        print(table(rows))
        print("%d destination(s), %d entries: %d allowed, %d refused" % (
            len(rows), len(entries), sum(r["allowed"] for r in rows), sum(r["refused"] for r in rows)))
    return 0

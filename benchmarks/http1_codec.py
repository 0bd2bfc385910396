"""Request-head parsing: the broker's parser before the codec, the codec (agenshield_shim/http1.py), h11.

Usage: python benchmarks/http1_codec.py [--rounds N] [--loops N] [--instructions]

The broker parses a head per request, so on small keep-alive forwards head parsing was 15% of its
CPU (issue 15). The codec must be at least as fast as the parser it replaced. Measured side by
side in one run: each round times ``--loops`` parses of each column, the columns in a new random
order every round, so noise falls on all alike; reported are the median microseconds per head, and
the ratio to the old parser per round (median, and its spread: lowest and highest round).

Columns, all on the same bytes:

- ``old``: ``parse_request_head`` of broker/http1.py as it was before the codec (copied below,
  verbatim, with the helpers it called);
- ``codec``: the codec (agenshield_shim/http1.py) through the broker's entry points, as the broker
  calls it (``broker/http1.py``'s ``parse_request_head`` and ``request_framing``);
- ``old+frame`` / ``codec+frame``: the broker's per-request work on the head: parse, body framing,
  and the four field look-ups its routes make (``Host``, ``Connection``, ``Upgrade``, ``Expect``);
- ``h11``: a new ``h11.Connection`` reading the same head up to its ``Request`` event, for
  reference (h11 keeps per-connection state, so one connection per head; test-only dependency).

``--instructions`` counts instructions instead (valgrind's callgrind, which machine noise does not
move): each column and input runs in its own interpreter, once with ``--loops`` calls and once with
none (both after one warm-up call), and the difference divided by ``--loops`` is its cost per head.
"""

import argparse
import os
import subprocess
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agenshield_shim import http1  # noqa: E402
from agenshield_shim.broker import http1 as broker_http1  # noqa: E402

# -- the broker's parser before the codec (broker/http1.py at dfa9570), verbatim -------------------------

_REQUEST_LINE = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]{1,18}$")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Headers = List[Tuple[str, str]]


def header_get(headers: Headers, name: str) -> Optional[str]:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def header_all(headers: Headers, name: str) -> List[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def header_tokens(headers: Headers, name: str) -> List[str]:
    out: List[str] = []
    for v in header_all(headers, name):
        out.extend(t.strip(" \t").lower() for t in v.split(",") if t.strip(" \t"))
    return out


@dataclass
class RequestHead:
    method: str
    target: str
    version: Tuple[int, int]
    headers: Headers

    def get(self, name: str) -> Optional[str]:
        return header_get(self.headers, name)


def _parse_headers(lines: List[str]) -> Headers:
    headers: Headers = []
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            raise HttpError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in header value")
        headers.append((name, value))
    return headers


def old_parse_request_head(data: bytes) -> RequestHead:
    text = data.decode("latin-1")
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.split("\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if not m:
        if re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]+(\.[0-9]+)?$", lines[0]):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    major, minor = int(m.group(3)), int(m.group(4))
    if major != 1 or minor > 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if any("\r" in ln or "\n" in ln for ln in lines):
        raise HttpError(400, "bare CR or LF in head")
    return RequestHead(m.group(1), m.group(2), (major, minor), _parse_headers(lines[1:]))


def old_request_framing(headers: Headers) -> Tuple[str, int]:
    te = header_tokens(headers, "transfer-encoding")
    cls = header_all(headers, "content-length")
    if te or header_all(headers, "transfer-encoding"):
        if any(not t.strip(" \t") for v in header_all(headers, "transfer-encoding") for t in v.split(",")):
            raise HttpError(400, "empty element in Transfer-Encoding")
        if cls:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if te != ["chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding")
        return "chunked", 0
    if cls:
        values = {v.strip(" \t") for c in cls for v in c.split(",")}
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length")
        v = values.pop()
        if not _DIGITS.match(v):
            raise HttpError(400, "invalid Content-Length")
        n = int(v)
        return ("length", n) if n else ("none", 0)
    return "none", 0


# -- inputs ---------------------------------------------------------------------------------------------------

INPUTS: Dict[str, bytes] = {
    # what wrk sends through a forward proxy (benchmarks/broker.py's small keep-alive forwards)
    "wrk-forward": b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    # curl / requests through a proxy
    "client-forward": (b"GET http://127.0.0.1:8080/bytes/10 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                       b"User-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\n"
                       b"Connection: keep-alive\r\nProxy-Connection: keep-alive\r\n\r\n"),
    # the shim's own POST /rpc
    "rpc-post": (b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:5201\r\nContent-Type: application/json\r\n"
                 b"Accept: application/json\r\nContent-Length: 312\r\nConnection: close\r\n\r\n"),
    # a browser-sized head: 14 fields, a long cookie
    "browser": (b"GET http://example.test/some/path/index.html?q=1&r=2 HTTP/1.1\r\nHost: example.test\r\n"
                b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
                b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
                b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
                b"Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
                b"Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\nSec-Fetch-User: ?1\r\nPriority: u=0, i\r\n"
                b"Cookie: " + b"; ".join(b"c%d=%s" % (i, b"v" * 20) for i in range(12)) + b"\r\n"
                b"If-None-Match: \"abcdef0123456789\"\r\n\r\n"),
}


def _old_frame(data: bytes) -> object:
    head = old_parse_request_head(data)
    old_request_framing(head.headers)
    return head.get("host"), head.get("connection"), head.get("upgrade"), head.get("expect")


def _codec_frame(data: bytes) -> object:
    head = broker_http1.parse_request_head(data)
    broker_http1.request_framing(head)
    return head.get("host"), head.get("connection"), head.get("upgrade"), head.get("expect")


def _h11_parse(data: bytes) -> object:
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    return conn.next_event()


def columns() -> Dict[str, Callable[[bytes], object]]:
    cols: Dict[str, Callable[[bytes], object]] = {
        "old": old_parse_request_head, "codec": broker_http1.parse_request_head,
        "old+frame": _old_frame, "codec+frame": _codec_frame,
    }
    try:
        import h11  # noqa: F401

        cols["h11"] = _h11_parse
    except ImportError:  # pragma: no cover - reference column only
        pass
    return cols


def check_same(cols: Dict[str, Callable[[bytes], object]]) -> None:
    """The columns must read every input alike (else the figures compare different work)."""
    for name, data in INPUTS.items():
        old, new = old_parse_request_head(data), http1.parse_request_head(data)
        assert (old.method, old.target, old.version, old.headers) == (new.method, new.target, new.version,
                                                                       new.headers), name
        assert _old_frame(data) == _codec_frame(data), name


def measure(fn: Callable[[bytes], object], data: bytes, loops: int) -> float:
    """Microseconds per call (thread CPU time: what the broker's core spends)."""
    clock = time.thread_time_ns if hasattr(time, "thread_time_ns") else time.perf_counter_ns
    start = clock()
    for _ in range(loops):
        fn(data)
    return (clock() - start) / loops / 1000.0


def _run_one(column: str, name: str, loops: int) -> None:
    """The child of ``--instructions``: one warm-up call, then ``loops`` calls."""
    fn, data = columns()[column], INPUTS[name]
    fn(data)
    for _ in range(loops):
        fn(data)


def _instructions(column: str, name: str, loops: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull, sys.executable,
                          __file__, "--run", column, name, str(loops)], capture_output=True, text=True, check=True)
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))  # type: ignore[union-attr]


def instructions(loops: int) -> None:
    cols = columns()
    print("python %s, instructions per head (callgrind), %d calls" % (sys.version.split()[0], loops))
    print("%-15s" % "input" + "".join("%13s" % c for c in cols) + "   codec/old   codec+frame/old+frame")
    for name in INPUTS:
        per = {c: (_instructions(c, name, loops) - _instructions(c, name, 0)) / loops for c in cols}
        print("%-15s" % name + "".join("%13.0f" % per[c] for c in cols) + "   %.2fx       %.2fx" % (
            per["codec"] / per["old"], per["codec+frame"] / per["old+frame"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=5000)
    parser.add_argument("--instructions", action="store_true", help="count instructions with callgrind")
    parser.add_argument("--run", nargs=3, metavar=("COLUMN", "INPUT", "LOOPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return _run_one(args.run[0], args.run[1], int(args.run[2]))
    cols = columns()
    check_same(cols)
    if args.instructions:
        return instructions(args.loops)
    print("python %s, %d rounds x %d loops, thread CPU time" % (sys.version.split()[0], args.rounds, args.loops))
    header = "%-15s" % "input" + "".join("%13s" % c for c in cols) + "   codec/old (spread)   codec+frame/old+frame"
    print(header)
    for name, data in INPUTS.items():
        times: Dict[str, List[float]] = {c: [] for c in cols}
        for _ in range(args.rounds):
            order = list(cols)
            random.shuffle(order)
            for c in order:
                times[c].append(measure(cols[c], data, args.loops))
        med = {c: statistics.median(v) for c, v in times.items()}
        ratio = [n / o for n, o in zip(times["codec"], times["old"])]
        fratio = [n / o for n, o in zip(times["codec+frame"], times["old+frame"])]
        print("%-15s" % name + "".join("%11.2fus" % med[c] for c in cols)
              + "   %.2fx (%.2f-%.2f)     %.2fx (%.2f-%.2f)" % (
                  statistics.median(ratio), min(ratio), max(ratio),
                  statistics.median(fratio), min(fratio), max(fratio)))


if __name__ == "__main__":
    main()

"""Run one interpreter inside a fresh network namespace whose resolver is a counting fake DNS server.

Tests call :func:`run_beside` (test_guard_attacks.py, test_os_layer.py), which runs this file as
``unshare -n -m sh -c '...' netns_harness.py SPEC``: the namespace has
only loopback (brought up here), ``/etc/resolv.conf`` is bind-mounted (in the private mount
namespace only) to ``nameserver 127.0.0.2``, and on 127.0.0.2 this script serves DNS on port 53
(every A query answered with 127.0.0.2, so an unguarded attack connects too), a TCP listener and
a UDP listener. It runs the interpreter of SPEC with the listeners' ports as arguments (and in place
of ``{PORT}``/``{UPORT}`` in its environment's values) and prints
one JSON line: the names queried, the TCP connections and datagrams received, and the output.
Nothing outside the namespace can be reached or disturbed, so tests run side by side.
"""

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

HOST = "127.0.0.2"


def usable() -> bool:
    """Whether ``unshare -n -m`` (root, or user namespaces) and ``ip`` work here."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True).returncode == 0


def run_beside(argv: List[str], env: Dict[str, str], workdir: Path) -> Dict[str, Any]:
    """From the test runner: run ``argv`` (+ HOST PORT UPORT) in a fresh namespace beside the servers.

    Returns the report: ``queries`` (names asked of the resolver), ``tcp``, ``udp`` (what arrived),
    ``returncode`` and ``output``. The caller checks :func:`usable` first.
    """
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver %s\noptions timeout:1 attempts:1\n" % HOST)
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"argv": argv, "env": env}))
    script = 'ip link set lo up && mount --bind "$1" /etc/resolv.conf && exec "$2" "$3" "$4"'
    result = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", script, "sh", str(resolv), sys.executable, __file__, str(spec)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _qname(packet: bytes) -> "tuple[str, int, int]":
    labels, offset = [], 12
    while packet[offset]:
        size = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + size].decode("ascii", "replace"))
        offset += 1 + size
    qtype = struct.unpack("!H", packet[offset + 1 : offset + 3])[0]
    return ".".join(labels).lower(), qtype, offset + 5


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    queries, counts, stop = [], {"tcp": 0, "udp": 0}, threading.Event()
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind((HOST, 53))
    tcp = socket.socket()
    tcp.bind((HOST, 0))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    for sock in (dns, tcp, udp):
        sock.settimeout(0.05)

    def serve() -> None:
        while not stop.is_set():
            try:
                packet, peer = dns.recvfrom(4096)
                name, qtype, end = _qname(packet)
                queries.append(name)
                answer = b""
                if qtype == 1:
                    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(HOST)
                header = packet[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1 if answer else 0, 0, 0)
                dns.sendto(header + packet[12:end] + answer, peer)
            except (socket.timeout, IndexError, struct.error):
                pass
            try:
                conn, _ = tcp.accept()
                counts["tcp"] += 1
                conn.close()
            except socket.timeout:
                pass
            try:
                udp.recvfrom(65536)
                counts["udp"] += 1
            except socket.timeout:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ports = {"{PORT}": str(tcp.getsockname()[1]), "{UPORT}": str(udp.getsockname()[1])}
    env = dict(spec["env"])
    for key, value in env.items():  # "{PORT}" in a value: a listener's port, known only here
        for mark, port in ports.items():
            env[key] = env[key].replace(mark, port)
    argv = spec["argv"] + [HOST, ports["{PORT}"], ports["{UPORT}"]]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=spec.get("cwd"))
    time.sleep(0.3)
    stop.set()
    thread.join(2)
    print(json.dumps({"queries": queries, "tcp": counts["tcp"], "udp": counts["udp"], "returncode": result.returncode,
                      "output": result.stdout + result.stderr}))


if __name__ == "__main__":
    main()

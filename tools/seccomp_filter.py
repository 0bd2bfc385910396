"""Assemble the seccomp programs ``_boot`` installs at teardown (``python tools/seccomp_filter.py``
prints the assignment to paste into ``_boot``).

``_boot.SECCOMP_FILTERS`` holds them as bytes constants: every process of the environment
unmarshals ``_boot``, and this assembler would cost it more than the programs it makes.
tests/test_guard.py checks that the constants are this script's output.

Each program (``struct sock_filter[]``): a call of another architecture (i386 through
``int 0x80``, x32) is refused outright; ``socket()`` unless the family is AF_UNIX; ``sendto()``
when it names a destination (``args[4]``, the address, not NULL); the calls of ``REFUSED``
always; everything else is allowed, so that the process can finish. Refused means
``SECCOMP_RET_ERRNO | EPERM``.
"""

import sys
from typing import Any, Dict, List, Tuple

#: machine: (AUDIT_ARCH_*, seccomp(2)'s number, has x32 numbers, socket, sendto, and the calls
#: always refused: connect, accept, accept4, sendmsg, sendmmsg, bind, listen,
#: io_uring_setup/enter/register, pidfd_getfd). aarch64 has the generic (asm-generic) numbers.
ARCHES: Dict[str, Tuple[int, int, bool, int, int, Tuple[int, ...]]] = {
    "x86_64": (0xC000003E, 317, True, 41, 44, (42, 43, 288, 46, 307, 49, 50, 425, 426, 427, 438)),
    "aarch64": (0xC00000B7, 277, False, 198, 206, (203, 202, 242, 211, 269, 200, 201, 425, 426, 427, 438)),
}

ALLOW, DENY = 0x7FFF0000, 0x00050001  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
NR, ARCH, ARG0, ARG4_LOW, ARG4_HIGH = 0, 4, 16, 48, 52  # offsets in struct seccomp_data (little-endian)
AF_UNIX = 1
X32_SYSCALL_BIT = 0x40000000


def program(machine: str) -> bytes:
    audit_arch, _, x32, socket_nr, sendto_nr, refused = ARCHES[machine]
    # (code, jump if true, jump if false, k); a jump names a label or skips that many instructions
    code: List[Any] = [(LD, 0, 0, ARCH), (JEQ, 1, 0, audit_arch), (RET, 0, 0, DENY), (LD, 0, 0, NR)]
    if x32:
        code.append((JGE, "deny", 0, X32_SYSCALL_BIT))
    code += [(JEQ, "deny", 0, number) for number in refused]
    code += [
        (JEQ, "socket", 0, socket_nr),
        (JEQ, "sendto", 0, sendto_nr),
        (RET, 0, 0, ALLOW),
        "socket", (LD, 0, 0, ARG0), (JEQ, "allow", "deny", AF_UNIX),
        "sendto", (LD, 0, 0, ARG4_LOW), (JEQ, 0, "deny", 0), (LD, 0, 0, ARG4_HIGH), (JEQ, "allow", "deny", 0),
        "allow", (RET, 0, 0, ALLOW),
        "deny", (RET, 0, 0, DENY),
    ]
    labels: Dict[str, int] = {}
    instructions = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)
    out = b""
    for index, (op, yes, no, k) in enumerate(instructions):
        yes = labels[yes] - index - 1 if isinstance(yes, str) else yes
        no = labels[no] - index - 1 if isinstance(no, str) else no
        assert 0 <= yes < 256 and 0 <= no < 256
        out += op.to_bytes(2, "little") + bytes((yes, no)) + k.to_bytes(4, "little")
    return out


def filters() -> Tuple[Tuple[str, int, bytes], ...]:
    """``_boot.SECCOMP_FILTERS``: (machine, seccomp(2)'s number, program) for each machine."""
    return tuple((machine, ARCHES[machine][1], program(machine)) for machine in ARCHES)


def source() -> str:
    """The ``SECCOMP_FILTERS`` assignment, as ``_boot`` holds it."""
    lines = ["SECCOMP_FILTERS = ("]
    for machine, number, code in filters():
        lines += ["    (", "        %r," % machine, "        %d," % number]
        lines += ["        %r" % code[i:i + 24] for i in range(0, len(code), 24)]
        lines[-1] += ","
        lines.append("    ),")
    return "\n".join(lines + [")"])


def main() -> int:
    print(source())
    return 0


if __name__ == "__main__":
    sys.exit(main())

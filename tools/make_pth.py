"""Write ``agenshield_shim.pth`` from the readable pieces below (``python tools/make_pth.py``).

``site`` runs a ``.pth`` import line with ``exec(line)``, twice per start in a virtual
environment (once for ``venv()``, once for ``addsitepackages()``), so the line is compiled
twice by every Python process of the environment, whether the shim is enabled or not.
What ``benchmarks/startup.py`` measured shaped it:

* The line holds only what a disabled interpreter must run: the ``AGENSHIELD_ENABLED``
  check, the lock file check, the "already booted" check. Everything else is in string
  constants, which cost the tokenizer almost nothing and are compiled only when run.
* ``BOOT`` (compiled once, when enabled) is the smallest ``try`` that imports and runs the
  boot; a nested ``try``/``finally`` for ``sys.path`` cost 0.04 ms more, so ``FAILSAFE``
  restores ``sys.path`` instead. It runs from a string as well: compiled inline, cold, the
  fallback code cost about 0.2 ms per start, though it only ever runs on a broken install.
* ``sitedir`` is the name ``site.addpackage`` gives the directory (3.8 to 3.13), read from
  the ``exec`` namespace. Importing from it first means a package of the same name on
  ``PYTHONPATH`` cannot stand in for the shim.

tests/test_pth_file.py checks that the checked-in file is this script's output.
"""

import sys
from pathlib import Path

HEADER = """\
# agenshield-shim: site runs the import line below at every interpreter start
# (tools/make_pth.py in the source tree writes it, from readable pieces, and says why).
# AGENSHIELD_ENABLED=false (0, no, off) skips everything unless agenshield_shim.lock sits
# beside this file. Otherwise it boots agenshield_shim._boot from this directory; if that
# fails for any reason, an audit hook refuses every network connection and stderr says why.
"""

#: Runs in ``except BaseException as e`` of BOOT: one refuse-the-network hook per interpreter,
#: then ``sitedir`` off ``sys.path`` again if the import failed (``b`` unbound) after BOOT put it first.
#: Written like the guard, for an attacker in the same interpreter: everything it uses is a default
#: argument (no global or builtin read at call time), types are compared by identity (a metaclass
#: can make ``==`` lie), names are copied through ``str.__str__`` first, changing the hook's own
#: attributes (``__code__``, ``__defaults__``) is refused, and it is registered as its ``__call__``
#: method-wrapper, where no ``__cantrace__`` can be planted. It refuses every socket but Unix ones
#: at creation, every address that is not a Unix path, every name lookup, and subinterpreters.
FAILSAFE = """\
if not hasattr(sys, "_agenshield_failsafe"):
 sys._agenshield_failsafe = m = "agenshield-shim failed to start (%s: %s)" % (type(e).__name__, e)
 def h(v, a, m="AgenShield: network blocked: " + m, t=type, S=str, B=bytes, c=str.__str__, p=str.rpartition, r=ConnectionRefusedError, s=None):
  if v[:7] == "socket.":
   w = v[7:]
   if w == "__new__" and a[1] != 1 and a[1] != -1 or w in ("connect", "sendto", "sendmsg", "bind") and t(a[1]) is not S and t(a[1]) is not B or w in ("getaddrinfo", "gethostbyname", "gethostbyaddr", "getnameinfo") and a[0] is not None:
    raise r(m)
  elif v in ("object.__setattr__", "object.__delattr__") and a[0] is s or v == "cpython.PyInterpreterState_New" or v == "import" and p(c(a[0]), ".")[2] in ("_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_interpreters"):
   raise r(m)
 h.__defaults__ = h.__defaults__[:-1] + (h,)
 sys.addaudithook(h.__call__)
 sys.stderr.write("agenshield-shim: %s; all network access is blocked. Reinstall agenshield-shim, or set AGENSHIELD_ENABLED=false to run without it.\\n" % m[16:])
"b" in locals() or "sitedir" not in locals() or sys.path.remove(sitedir)
"""

BOOT = """\
try:
 sys.path.insert(0, sitedir); import agenshield_shim._boot as b; sys.path.remove(sitedir); b.boot()
except BaseException as e:
 exec(%r)
""" % FAILSAFE

LINE = (
    "import os, sys; "
    "os.environ.get('AGENSHIELD_ENABLED', '').strip().lower() in ('false', '0', 'no', 'off')"
    " and not os.path.exists(sitedir + '/agenshield_shim.lock')"
    " or 'agenshield_shim._boot' in sys.modules"
    " or exec(%r)" % BOOT
)


def text() -> str:
    return HEADER + LINE + "\n"


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "agenshield_shim.pth"
    if "--check" in sys.argv:
        sys.exit(0 if target.read_text() == text() else "agenshield_shim.pth is stale: run tools/make_pth.py")
    target.write_text(text())

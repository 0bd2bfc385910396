"""The OS layer: what stops native code, ``python -S`` and non-Python children.

- :mod:`.seatbelt`: the macOS ``sandbox-exec`` profile (deny by default, the broker only);
- :mod:`.netns`: a Linux network namespace (bubblewrap or ``unshare``) with only loopback;
- :mod:`.relay`: run first inside that namespace, it forwards ``localhost:PORT`` to the broker's
  Unix socket and then runs the command.

The wrapper script (:mod:`agenshield_shim.wrapper`) puts an interpreter under one of them. Nothing
here is imported by the shim's boot.
"""

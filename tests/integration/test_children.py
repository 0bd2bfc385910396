"""Threads, child processes and subinterpreters of a guarded interpreter are guarded too."""

import sys
import textwrap

import pytest

from .conftest import Listener, ShimEnv

TRY = textwrap.dedent(
    """
    def attempt(host, port):
        import socket
        try:
            socket.socket().connect((host, port))
            return "CONNECTED"
        except OSError as e:
            return "BLOCKED %s" % type(e).__name__
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_children_are_guarded(shim: ShimEnv, tcp_listener: Listener, method: str) -> None:
    code = TRY + textwrap.dedent(
        """
        import multiprocessing, sys
        def child(q, host, port):
            q.put(attempt(host, port))
        if __name__ == "__main__":
            ctx = multiprocessing.get_context(sys.argv[3])
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q, sys.argv[1], int(sys.argv[2])))
            p.start(); print(q.get(timeout=60)); p.join()
        """
    )
    script = shim.root / ("mp_%s.py" % method)
    script.write_text(code)
    result = shim.run(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        str(script), tcp_listener.host, str(tcp_listener.port), method,
    )
    assert result.stdout.strip() == "BLOCKED NetworkBlockedError", result.stdout + result.stderr
    assert tcp_listener.settle() == 0


def test_subprocess_of_the_same_interpreter_is_guarded(shim: ShimEnv, tcp_listener: Listener) -> None:
    code = TRY + textwrap.dedent(
        """
        import subprocess, sys
        child = "import sys\\n" + %r + "print(attempt(sys.argv[1], int(sys.argv[2])))"
        out = subprocess.run([sys.executable, "-c", child, sys.argv[1], sys.argv[2]], capture_output=True, text=True)
        print(out.stdout.strip())
        """
    ) % TRY
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port))
    assert result.stdout.strip() == "BLOCKED NetworkBlockedError", result.stdout + result.stderr
    assert tcp_listener.settle() == 0


def test_subinterpreters_are_guarded(shim: ShimEnv, tcp_listener: Listener) -> None:
    code = textwrap.dedent(
        """
        import sys
        try:
            import _interpreters as interpreters
        except ImportError:
            import _xxsubinterpreters as interpreters
        host, port = sys.argv[1], sys.argv[2]
        inner = (
            "import socket\\n"
            "try:\\n"
            "    socket.socket().connect((%r, %s)); print('SUB CONNECTED')\\n"
            "except OSError as e:\\n"
            "    print('SUB BLOCKED', type(e).__name__)\\n" % (host, port)
        )
        interp = interpreters.create()
        interpreters.run_string(interp, inner)
        """
    )
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port))
    assert "SUB BLOCKED NetworkBlockedError" in result.stdout, result.stdout + result.stderr
    assert tcp_listener.settle() == 0


def test_environment_cannot_be_used_to_switch_children_off(shim: ShimEnv, tcp_listener: Listener) -> None:
    code = TRY + textwrap.dedent(
        """
        import os, subprocess, sys
        for name, value in [("AGENSHIELD_ENABLED", "false"), ("AGENSHIELD_BROKER_HOST", sys.argv[1]),
                            ("AGENSHIELD_ALLOW", sys.argv[1] + ":" + sys.argv[2])]:
            try:
                os.environ[name] = value; print("CHANGED", name)
            except PermissionError as e:
                print("REFUSED", name)
        try:
            del os.environ["AGENSHIELD_BROKER_PORT"]; print("CHANGED unset")
        except (PermissionError, KeyError) as e:
            print("REFUSED unset", type(e).__name__)
        child = "import sys\\n" + %r + "print(attempt(sys.argv[1], int(sys.argv[2])))"
        out = subprocess.run([sys.executable, "-c", child, sys.argv[1], sys.argv[2]], capture_output=True, text=True)
        print(out.stdout.strip())
        """
    ) % TRY
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port), env={"AGENSHIELD_BROKER_PORT": "6969"})
    assert "CHANGED" not in result.stdout, result.stdout
    assert result.stdout.count("REFUSED") == 4
    assert result.stdout.strip().endswith("BLOCKED NetworkBlockedError"), result.stdout + result.stderr
    assert tcp_listener.settle() == 0


TRACE_ATTACK = textwrap.dedent(
    """
    import gc, inspect, socket, sys
    HOST, PORT = sys.argv[1], int(sys.argv[2])
    hook = next(o for o in gc.get_objects() if inspect.isfunction(o) and o.__name__ == "audit_hook")
    lines, start = inspect.getsourcelines(hook)
    first_return = start + next(i for i, l in enumerate(lines) if l.strip() == "return")
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno < first_return:
            frame.f_lineno = first_return  # jump over the decision
        return local
    def tracer(frame, event, arg):
        return local if frame.f_code is hook.__code__ else None
    def plant():
        try:
            hook.__cantrace__ = True; print("PLANTED")
        except Exception as e:
            print("PLANT REFUSED", type(e).__name__)
    def trace():
        try:
            sys.settrace(tracer); print("TRACING")
        except Exception as e:
            print("TRACE REFUSED", type(e).__name__)
    for step in sys.argv[3].split(","):
        {"plant": plant, "trace": trace}[step]()
    try:
        socket.socket().connect((HOST, PORT)); print("CONNECTED")
    except OSError as e:
        print("BLOCKED", type(e).__name__)
    """
)


@pytest.mark.parametrize("order", ["plant,trace", "trace,plant"])
def test_a_tracer_cannot_jump_over_the_guard(shim: ShimEnv, tcp_listener: Listener, order: str) -> None:
    result = shim.run(TRACE_ATTACK, tcp_listener.host, str(tcp_listener.port), order)
    version = tuple(map(int, shim.version.split(".")))
    if version < (3, 11) and order == "trace,plant":
        # Known gap, documented in the README: before 3.11 there is no built-in that can carry the
        # hook untraced, so a tracer installed *before* __cantrace__ is planted gets through.
        assert "CONNECTED" in result.stdout, result.stdout + result.stderr
        return
    assert "BLOCKED NetworkBlockedError" in result.stdout, result.stdout + result.stderr
    assert tcp_listener.settle() == 0

"""Threads and child processes of a guarded interpreter are guarded too; subinterpreters are refused."""

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


def test_subinterpreters_cannot_be_started(shim: ShimEnv, tcp_listener: Listener) -> None:
    # A subinterpreter can be made to start without site, so without the shim: a guarded
    # interpreter refuses the modules that create them (test_guard_attacks.py tries other ways).
    code = textwrap.dedent(
        """
        import sys
        for name in ("_interpreters", "_xxsubinterpreters"):
            try:
                __import__(name); print("IMPORTED", name)
            except ImportError as e:
                print("REFUSED" if "AgenShield" in str(e) else "MISSING", name)
        """
    )
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port))
    assert result.stdout.split() == ["REFUSED", "_interpreters", "REFUSED", "_xxsubinterpreters"], result.stdout + result.stderr
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
    if sys.argv[4] == "control":  # an unsealed hook of the same shape, to show the attack works
        exec(compile("def judge(event, args):\\n    if event != 'socket.connect':\\n        return\\n"
                     "    raise ConnectionRefusedError('toy guard')\\n", __file__, "exec"))
        sys.addaudithook(judge)
    hook = next(o for o in gc.get_objects() if inspect.isfunction(o) and o.__name__ == "judge")
    import dis
    line, first_return = None, None
    for ins in dis.get_instructions(hook.__code__):
        starts = getattr(ins, "line_number", None) or (None if isinstance(ins.starts_line, bool) else ins.starts_line)
        line = starts or line
        if ins.opname in ("RETURN_VALUE", "RETURN_CONST") and first_return is None:
            first_return = line
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


def test_the_tracer_attack_defeats_an_unsealed_hook(shim: ShimEnv, tcp_listener: Listener, tmp_path) -> None:
    script = tmp_path / "attack.py"
    script.write_text(TRACE_ATTACK)
    result = shim.run(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        str(script), tcp_listener.host, str(tcp_listener.port), "plant,trace", "control",
        env={"AGENSHIELD_ENABLED": "false"},
    )
    assert "PLANTED" in result.stdout and "CONNECTED" in result.stdout, result.stdout + result.stderr
    assert tcp_listener.settle() == 1


@pytest.mark.parametrize("order", ["plant,trace", "trace,plant"])
def test_a_tracer_cannot_jump_over_the_guard(shim: ShimEnv, tcp_listener: Listener, order: str, tmp_path) -> None:
    script = tmp_path / "attack.py"
    script.write_text(TRACE_ATTACK)
    result = shim.run(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        str(script), tcp_listener.host, str(tcp_listener.port), order, "shim",
    )
    assert "BLOCKED NetworkBlockedError" in result.stdout, result.stdout + result.stderr
    assert "TRACING" in result.stdout  # tracing itself stays allowed (debuggers, coverage)
    assert tcp_listener.settle() == 0


FINALIZER = textwrap.dedent(
    """
    import builtins, os, socket, sys
    HOST, PORT = sys.argv[1], int(sys.argv[2])
    class Sneaky:
        # finalized while the interpreter shuts down (module teardown, the last collection)
        def __init__(self, fresh):
            self.fresh, self.write, self.socket_type = fresh, os.write, socket.socket
            self.sock = None if fresh else socket.socket()
        def __del__(self):
            try:
                sock = self.socket_type() if self.fresh else self.sock
                sock.connect((HOST, PORT))
                msg = "FINALIZER CONNECTED"
            except BaseException as e:
                msg = "FINALIZER REFUSED %s" % type(e).__name__
            self.write(2, (msg + "\\n").encode())
    builtins._early = Sneaky(fresh=False)   # a socket made while the guard was on
    builtins._late = Sneaky(fresh=True)     # a socket made during teardown
    sys._kept = Sneaky(fresh=False)
    for fresh in (False, True):           # reference cycles: collected by the last garbage collection
        cycle = Sneaky(fresh=fresh); cycle.me = cycle
    del cycle
    """
)


def test_finalizers_at_exit_cannot_connect(shim: ShimEnv, tcp_listener: Listener) -> None:
    result = shim.run(FINALIZER, tcp_listener.host, str(tcp_listener.port))
    assert tcp_listener.settle() == 0, result.stderr
    assert "FINALIZER CONNECTED" not in result.stderr
    assert result.returncode == 0, result.stderr

"""Run a broker from synchronous code: in-process on a private loop thread, or as a real subprocess.

Tests, the selftest and the benchmark need a broker without owning an event loop. Both runners are
context managers exposing ``port``, ``url`` and ``stop()``; both wait until the broker listens.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any, Awaitable, Dict, List, Optional, Sequence, TypeVar

from .config import BrokerConfig
from .server import Broker

T = TypeVar("T")
_LISTEN = re.compile(r"^agenshield broker listening on (\S+)$")


class LoopThread:
    """An event loop running in a daemon thread; ``run(coro)`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: Optional[float] = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class BrokerThread:
    """An in-process :class:`Broker` on its own loop thread (or on a given :class:`LoopThread`)."""

    def __init__(
        self, config: BrokerConfig, loop_thread: Optional[LoopThread] = None, audit_stream: Any = None,
        resolver: Any = None,
    ) -> None:
        self._own_loop = loop_thread is None
        self.loop_thread = loop_thread or LoopThread()
        self.broker = Broker(config, audit_stream=audit_stream, resolver=resolver)
        try:
            self.loop_thread.run(self.broker.start())
        except BaseException:
            if self._own_loop:
                self.loop_thread.close()
            raise

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url

    def stop(self) -> None:
        try:
            self.loop_thread.run(self.broker.stop())
        finally:
            if self._own_loop:
                self.loop_thread.close()

    def __enter__(self) -> "BrokerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class BrokerProcess:
    """``python -m agenshield_shim.broker ARGS`` as a subprocess; reads the listening line(s)."""

    def __init__(self, args: Sequence[str], python: str = sys.executable, timeout: float = 30.0,
                 env: Optional[Dict[str, str]] = None, stderr: Any = None) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        penv = dict(os.environ if env is None else env)
        penv["PYTHONPATH"] = root + (os.pathsep + penv["PYTHONPATH"] if penv.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [python, "-m", "agenshield_shim.broker", *args], stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE, env=penv, text=True,
        )
        self.urls: List[str] = []
        self._expect = 1 + (1 if "--unix" in args and ("--port" in args or "--host" in args) else 0)
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            while len(self.urls) < self._expect:
                line = self.proc.stdout.readline()
                if not line:
                    err = self.proc.stderr.read() if self.proc.stderr else ""
                    raise RuntimeError("broker exited (%s) before listening: %s" % (self.proc.wait(), err))
                m = _LISTEN.match(line.strip())
                if m:
                    self.urls.append(m.group(1))
        finally:
            timer.cancel()

    @property
    def url(self) -> str:
        return next(u for u in self.urls if u.startswith("http://"))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()

    def __enter__(self) -> "BrokerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

"""A git smart-HTTP server on loopback: ``git http-backend`` behind a tiny CGI gateway.

For the proxy-environment tests: ``git clone http://127.0.0.1:PORT/repo.git`` run by a guarded
interpreter's child (or under ``run --sandbox netns``) must go through the broker. The gateway
runs in the test runner's process, so clients reach it only through the broker. ``GitServer.start(root)``
makes a bare repository ``repo.git`` with one commit (file ``hello.txt``, text ``CONTENT``).
"""

import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

CONTENT = "routed through the broker\n"


def _git(*args: str, cwd: Optional[Path] = None) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_NOSYSTEM="1", HOME=str(cwd or "/"))
    subprocess.run(["git", *args], cwd=str(cwd) if cwd else None, env=env, check=True, capture_output=True, timeout=60)


class GitServer:
    """``url`` is the clone URL; ``requests`` counts what the backend served."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests = 0
        backend = shutil.which("git")
        assert backend is not None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.cgi()

            def do_POST(self) -> None:  # noqa: N802
                self.cgi()

            def cgi(self) -> None:
                server.requests += 1
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                env: Dict[str, str] = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_ADDR": self.client_address[0], "GIT_CONFIG_NOSYSTEM": "1",
                }
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                out = subprocess.run([backend, "http-backend"], input=body, env=env, capture_output=True,
                                     timeout=60).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = out.partition(b"\n\n")
                status = 200
                headers: List[Any] = []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d/repo.git" % self.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, root: Path) -> "GitServer":
        work = root / "work"
        work.mkdir()
        _git("init", "-q", "-b", "main", str(work))
        (work / "hello.txt").write_text(CONTENT)
        _git("add", "hello.txt", cwd=work)
        _git("commit", "-q", "-m", "one", cwd=work)
        _git("clone", "-q", "--bare", str(work), str(root / "repo.git"))
        return cls(root)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

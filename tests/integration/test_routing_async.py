"""aiohttp and httpx are routed through the broker (the tunnel transport), in real shim venvs.

Every client here runs in a shim-installed interpreter whose guard refuses any connection but
the broker's, so a request that reaches the upstream has gone through the broker; the broker's
audit log is checked too. Each suite runs once per library in one interpreter (starting Python
with aiohttp costs ~0.3 s) and the tests below assert on its results, one behaviour per test.
"""

import hashlib
import json
import subprocess
import textwrap
import uuid
from typing import Any, Dict, Iterator, List

import pytest

from .conftest import ShimEnv, clean_env

pytestmark = pytest.mark.timeout(600)

MAIN = ("3.11", "aiohttp", "httpx", "h2")
MARK = "@@RESULTS@@"


# -- the client scripts ------------------------------------------------------------------------

PRELUDE = textwrap.dedent(
    '''
    import asyncio, hashlib, json, os, ssl, sys, time
    P = json.loads(sys.argv[1])
    R = {}
    CTX = ssl.create_default_context(cafile=P["ca_file"])

    def sha(data):
        return hashlib.sha256(data).hexdigest()

    def failure(e, started):
        return {"error": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - started,
                "mro": [c.__module__ + "." + c.__name__ for c in type(e).__mro__]}

    async def rec(name, fn):
        started = time.monotonic()
        try:
            R[name] = {"value": await fn(), "elapsed": time.monotonic() - started}
        except Exception as e:
            R[name] = failure(e, started)

    def rec_sync(name, fn):
        started = time.monotonic()
        try:
            R[name] = {"value": fn(), "elapsed": time.monotonic() - started}
        except Exception as e:
            R[name] = failure(e, started)

    def done():
        def plain(o):
            return o.decode("latin-1") if isinstance(o, bytes) else repr(o)
        print(P["mark"] + json.dumps(R, default=plain))
    '''
)

AIOHTTP_SUITE = PRELUDE + textwrap.dedent(
    '''
    import aiohttp

    async def gen_body(parts):
        for part in parts:
            yield part
            await asyncio.sleep(0)

    async def run_scheme(tag, base):
        # unsafe=True: aiohttp's jar otherwise refuses cookies from an IP host (http://127.0.0.1)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async def methods():
                out = {}
                for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
                    async with s.request(m, base + "/echo?a=1&b=x%20y", ssl=CTX) as r:
                        out[m] = [r.status, await r.json()]
                return out
            await rec(tag + "methods", methods)

            async def json_up():
                async with s.post(base + "/echo", json={"k": [1, "\\u00e9"]}, ssl=CTX) as r:
                    return await r.json()
            await rec(tag + "json", json_up)

            async def form_up():
                async with s.post(base + "/echo", data={"f": "v w", "g": "1"}, ssl=CTX) as r:
                    return await r.json()
            await rec(tag + "form", form_up)

            async def multipart_up():
                form = aiohttp.FormData()
                form.add_field("field", "value")
                form.add_field("file", b"\\x00\\x01binary", filename="a.bin", content_type="application/octet-stream")
                async with s.post(base + "/echo", data=form, ssl=CTX) as r:
                    return await r.json()
            await rec(tag + "multipart", multipart_up)

            async def binary_up():
                data = os.urandom(1 << 20)
                async with s.post(base + "/upload", data=data, ssl=CTX) as r:
                    return [sha(data), await r.json()]
            await rec(tag + "binary_up", binary_up)

            async def chunked_up():
                parts = [os.urandom(50000) for _ in range(8)]
                async with s.post(base + "/upload", data=gen_body(parts), ssl=CTX) as r:
                    return [sha(b"".join(parts)), await r.json(), r.request_info.headers.get("Transfer-Encoding")]
            await rec(tag + "chunked_up", chunked_up)

            async def binary_down():
                async with s.get(base + "/bytes/1000000", ssl=CTX) as r:
                    body = await r.read()
                    return [len(body), sha(body), dict(r.headers)]
            await rec(tag + "binary_down", binary_down)

            async def redirects():
                async with s.get(base + "/redirect/3", ssl=CTX) as r:
                    return [r.status, str(r.url), len(r.history)]
            await rec(tag + "redirects", redirects)

            async def cookies():
                async with s.get(base + "/cookies/set", ssl=CTX) as r:
                    set_cookies = r.headers.getall("Set-Cookie", [])
                async with s.get(base + "/cookies/echo", ssl=CTX) as r:
                    return [set_cookies, await r.json()]
            await rec(tag + "cookies", cookies)

            async def gzip():
                async with s.get(base + "/gzip", ssl=CTX) as r:
                    return [r.headers.get("Content-Encoding"), (await r.read()).decode("utf-8", "replace")]
            await rec(tag + "gzip", gzip)

            async def head():
                async with s.head(base + "/echo", ssl=CTX) as r:
                    return [r.status, await r.read()]
            await rec(tag + "head", head)

            async def statuses():
                out = {}
                for code in (204, 304):
                    async with s.get(base + "/status/%d" % code, ssl=CTX) as r:
                        out[code] = [r.status, len(await r.read())]
                for code in (404, 500):
                    try:
                        async with s.get(base + "/status/%d" % code, ssl=CTX, raise_for_status=True) as r:
                            out[code] = "no error"
                    except aiohttp.ClientResponseError as e:
                        out[code] = [type(e).__name__, e.status]
                return out
            await rec(tag + "statuses", statuses)

            async def sse():
                events = []
                async with s.get(base + "/sse", ssl=CTX) as r:
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            events.append([time.time(), json.loads(line[5:])])
                return events
            await rec(tag + "sse", sse)

            async def read_timeout():
                async with s.get(base + "/slow/5", ssl=CTX, timeout=aiohttp.ClientTimeout(sock_read=0.5)) as r:
                    return await r.read()
            await rec(tag + "read_timeout", read_timeout)

            async def keepalive():
                t = "ka-aiohttp-" + P["run"] + tag
                for _ in range(10):
                    async with s.get(base + "/echo?tag=" + t, ssl=CTX) as r:
                        await r.read()
                async with s.get(base + "/connections?tag=" + t, ssl=CTX) as r:
                    return await r.json()
            await rec(tag + "keepalive", keepalive)

            async def ws():
                async with s.ws_connect(base.replace("http", "ws", 1) + "/ws", ssl=CTX) as w:
                    await w.send_str("hello")
                    text = (await w.receive()).data
                    await w.send_bytes(b"\\x00\\xff")
                    data = (await w.receive()).data
                    return [text, list(data)]
            await rec(tag + "ws", ws)

            async def concurrent():
                async def one(i):
                    async with s.get(base + "/echo?i=%d" % i, ssl=CTX) as r:
                        return [i, r.status, await r.json()]
                return await asyncio.gather(*(one(i) for i in range(200)))
            await rec(tag + "concurrent", concurrent)

            async def proxy_arg():
                async with s.get(base + "/echo?via=arg", ssl=CTX, proxy="http://127.0.0.1:9") as r:
                    return [r.status, await r.json()]
            await rec(tag + "proxy_arg", proxy_arg)

            async def wrong_ca():
                wrong = ssl.create_default_context(cafile=P["wrong_ca_file"])
                async with s.get(base + "/echo", ssl=wrong) as r:
                    return r.status
            if tag.endswith("https:"):
                await rec(tag + "wrong_ca", wrong_ca)

            async def refused():
                async with s.get(base.split("://")[0] + "://example.com/path", ssl=CTX) as r:
                    return r.status
            await rec(tag + "refused", refused)

        async def module_request():
            async with aiohttp.request("GET", base + "/echo?via=module", ssl=CTX) as r:
                return [r.status, await r.json()]
        await rec(tag + "module_request", module_request)

    async def main():
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            await run_scheme(tag, base)

    asyncio.run(main())
    done()
    '''
)

HTTPX_SUITE = PRELUDE + textwrap.dedent(
    '''
    import httpx

    def sync_scheme(tag, base):
        with httpx.Client(verify=CTX) as c:
            def methods():
                out = {}
                for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
                    r = c.request(m, base + "/echo?a=1&b=x%20y")
                    out[m] = [r.status_code, r.json()]
                return out
            rec_sync(tag + "methods", methods)
            rec_sync(tag + "json", lambda: c.post(base + "/echo", json={"k": [1, "\\u00e9"]}).json())
            rec_sync(tag + "form", lambda: c.post(base + "/echo", data={"f": "v w", "g": "1"}).json())
            rec_sync(tag + "multipart", lambda: c.post(
                base + "/echo", data={"field": "value"},
                files={"file": ("a.bin", b"\\x00\\x01binary", "application/octet-stream")}).json())

            def binary_up():
                data = os.urandom(1 << 20)
                return [sha(data), c.post(base + "/upload", content=data).json()]
            rec_sync(tag + "binary_up", binary_up)

            def chunked_up():
                parts = [os.urandom(50000) for _ in range(8)]
                r = c.post(base + "/upload", content=iter(parts))
                return [sha(b"".join(parts)), r.json(), r.request.headers.get("Transfer-Encoding")]
            rec_sync(tag + "chunked_up", chunked_up)

            def binary_down():
                r = c.get(base + "/bytes/1000000")
                return [len(r.content), sha(r.content), dict(r.headers)]
            rec_sync(tag + "binary_down", binary_down)

            def redirects():
                r = c.get(base + "/redirect/3", follow_redirects=True)
                return [r.status_code, str(r.url), len(r.history)]
            rec_sync(tag + "redirects", redirects)

            def cookies():
                r = c.get(base + "/cookies/set")
                return [r.headers.get_list("set-cookie"), c.get(base + "/cookies/echo").json()]
            rec_sync(tag + "cookies", cookies)

            def gzip():
                r = c.get(base + "/gzip")
                return [r.headers.get("content-encoding"), r.text]
            rec_sync(tag + "gzip", gzip)

            def head():
                r = c.head(base + "/echo")
                return [r.status_code, r.content.decode()]
            rec_sync(tag + "head", head)

            def statuses():
                out = {}
                for code in (204, 304):
                    r = c.get(base + "/status/%d" % code)
                    out[code] = [r.status_code, len(r.content)]
                for code in (404, 500):
                    try:
                        c.get(base + "/status/%d" % code).raise_for_status()
                        out[code] = "no error"
                    except httpx.HTTPStatusError as e:
                        out[code] = [type(e).__name__, e.response.status_code]
                return out
            rec_sync(tag + "statuses", statuses)

            def sse():
                events = []
                with c.stream("GET", base + "/sse") as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            events.append([time.time(), json.loads(line[5:])])
                return events
            rec_sync(tag + "sse", sse)

            rec_sync(tag + "read_timeout", lambda: c.get(
                base + "/slow/5", timeout=httpx.Timeout(5.0, read=0.5)).content)

            def keepalive():
                t = "ka-httpx-" + P["run"] + tag
                for _ in range(10):
                    c.get(base + "/echo?tag=" + t).read()
                return c.get(base + "/connections?tag=" + t).json()
            rec_sync(tag + "keepalive", keepalive)

            rec_sync(tag + "refused", lambda: c.get(base.split("://")[0] + "://example.com/path").raise_for_status())

            def wrong_ca():
                with httpx.Client(verify=ssl.create_default_context(cafile=P["wrong_ca_file"])) as w:
                    return w.get(base + "/echo").status_code
            if tag.endswith("https:"):
                rec_sync(tag + "wrong_ca", wrong_ca)

        def proxy_arg():
            kw = {"proxies": "http://127.0.0.1:9"} if httpx.__version__.startswith(("0.23", "0.24", "0.25")) \\
                else {"proxy": "http://127.0.0.1:9"}
            with httpx.Client(verify=CTX, **kw) as p:
                r = p.get(base + "/echo?via=arg")
                return [r.status_code, r.json()]
        rec_sync(tag + "proxy_arg", proxy_arg)

        def mounts():
            transport = httpx.HTTPTransport(verify=CTX, proxy=httpx.Proxy("http://127.0.0.1:9"))
            with httpx.Client(mounts={"all://": transport}) as m:
                r = m.get(base + "/echo?via=mount")
                return [r.status_code, r.json()]
        rec_sync(tag + "mounts", mounts)

        rec_sync(tag + "module_get", lambda: httpx.get(base + "/echo?via=module", verify=CTX).status_code)

    async def async_scheme(tag, base):
        async with httpx.AsyncClient(verify=CTX) as c:
            async def methods():
                out = {}
                for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
                    r = await c.request(m, base + "/echo?a=1&b=x%20y")
                    out[m] = [r.status_code, r.json()]
                return out
            await rec(tag + "methods", methods)

            async def json_up():
                return (await c.post(base + "/echo", json={"k": [1, "\\u00e9"]})).json()
            await rec(tag + "json", json_up)

            async def binary_up():
                data = os.urandom(1 << 20)
                return [sha(data), (await c.post(base + "/upload", content=data)).json()]
            await rec(tag + "binary_up", binary_up)

            async def chunked_up():
                parts = [os.urandom(50000) for _ in range(8)]
                async def gen():
                    for part in parts:
                        yield part
                r = await c.post(base + "/upload", content=gen())
                return [sha(b"".join(parts)), r.json(), r.request.headers.get("Transfer-Encoding")]
            await rec(tag + "chunked_up", chunked_up)

            async def binary_down():
                r = await c.get(base + "/bytes/1000000")
                return [len(r.content), sha(r.content), dict(r.headers)]
            await rec(tag + "binary_down", binary_down)

            async def redirects():
                r = await c.get(base + "/redirect/3", follow_redirects=True)
                return [r.status_code, str(r.url), len(r.history)]
            await rec(tag + "redirects", redirects)

            async def sse():
                events = []
                async with c.stream("GET", base + "/sse") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events.append([time.time(), json.loads(line[5:])])
                return events
            await rec(tag + "sse", sse)

            async def read_timeout():
                return (await c.get(base + "/slow/5", timeout=httpx.Timeout(5.0, read=0.5))).content
            await rec(tag + "read_timeout", read_timeout)

            async def keepalive():
                t = "ka-httpx-" + P["run"] + tag
                for _ in range(10):
                    await c.get(base + "/echo?tag=" + t)
                return (await c.get(base + "/connections?tag=" + t)).json()
            await rec(tag + "keepalive", keepalive)

            async def concurrent():
                async def one(i):
                    r = await c.get(base + "/echo?i=%d" % i)
                    return [i, r.status_code, r.json()]
                return await asyncio.gather(*(one(i) for i in range(200)))
            await rec(tag + "concurrent", concurrent)

            async def refused():
                return (await c.get(base.split("://")[0] + "://example.com/path")).raise_for_status()
            await rec(tag + "refused", refused)

        def mock():
            def handler(request):
                return httpx.Response(200, json={"mocked": str(request.url)})
            with httpx.Client(transport=httpx.MockTransport(handler)) as m:
                return m.get("https://example.com/x").json()
        rec_sync(tag + "mock", mock)

        async def mock_async():
            async def handler(request):
                return httpx.Response(200, json={"mocked": str(request.url)})
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as m:
                return (await m.get("https://example.com/y")).json()
        await rec(tag + "mock_async", mock_async)

    def main():
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            sync_scheme("sync:" + tag, base)
            asyncio.run(async_scheme("async:" + tag, base))

    main()
    done()
    '''
)

HTTP2_SUITE = PRELUDE + textwrap.dedent(
    '''
    import httpx

    async def many():
        async with httpx.AsyncClient(verify=CTX, http2=True) as h:
            rs = await asyncio.gather(*(h.get(P["h2_url"] + "/echo?h2=%d" % i) for i in range(20)))
            return [[r.http_version, r.status_code, r.json()] for r in rs]
    asyncio.run(rec("async", many))

    def one():
        with httpx.Client(verify=CTX, http2=True) as h:
            r = h.get(P["h2_url"] + "/echo?h2=sync")
            return [r.http_version, r.status_code, r.json()]
    rec_sync("sync", one)
    done()
    '''
)

# A minimal HTTP/2-only TLS server (the shared upstream speaks HTTP/1.1): run with the venv's h2.
H2_SERVER = textwrap.dedent(
    '''
    import asyncio, json, ssl, sys
    import h2.config, h2.connection, h2.events

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[1])
    ctx.set_alpn_protocols(["h2"])

    def text(x):
        return x.decode() if isinstance(x, bytes) else x

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            self.conn.initiate_connection()
            self.heads = {}
            transport.write(self.conn.data_to_send())

        def data_received(self, data):
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.heads[event.stream_id] = {text(k): text(v) for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    head = self.heads.pop(event.stream_id)
                    path, _, query = head[":path"].partition("?")
                    body = json.dumps({"method": head[":method"], "path": path,
                                       "query": [q.split("=", 1) for q in query.split("&") if q]}).encode()
                    self.conn.send_headers(event.stream_id, [
                        (":status", "200"), ("content-type", "application/json"), ("content-length", str(len(body)))])
                    self.conn.send_data(event.stream_id, body, end_stream=True)
            self.transport.write(self.conn.data_to_send())

    async def main():
        server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0, ssl=ctx)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
    '''
)

# Environment proxies, NO_PROXY included, open no way around the broker.
ENV_PROXY_SUITE = PRELUDE + textwrap.dedent(
    '''
    import aiohttp, httpx

    async def aio():
        async with aiohttp.ClientSession(trust_env=True) as s:
            for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
                async def get(base=base):
                    async with s.get(base + "/echo?via=env", ssl=CTX) as r:
                        return [r.status, await r.json()]
                await rec("aiohttp:" + tag, get)
        async with httpx.AsyncClient(verify=CTX) as c:
            for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
                async def get(base=base):
                    r = await c.get(base + "/echo?via=env")
                    return [r.status_code, r.json()]
                await rec("httpx_async:" + tag, get)

    asyncio.run(aio())
    with httpx.Client(verify=CTX) as c:
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            rec_sync("httpx_sync:" + tag, lambda base=base: [c.get(base + "/echo?via=env").status_code, None])
    done()
    '''
)

# Broker down, or slow: errors come fast (or when the caller's timeout says), naming the broker.
BROKER_TROUBLE_SUITE = PRELUDE + textwrap.dedent(
    '''
    import aiohttp, httpx

    async def aio():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=1.0, sock_read=1.0)) as s:
            for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
                async def get(base=base):
                    async with s.get(base + "/echo", ssl=CTX) as r:
                        return r.status
                await rec("aiohttp:" + tag, get)
        async with httpx.AsyncClient(verify=CTX, timeout=httpx.Timeout(1.0)) as c:
            for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
                async def get(base=base):
                    return checked(await c.get(base + "/echo"))
                await rec("httpx_async:" + tag, get)

    def checked(response):  # a refusal is the shim's 403 answer: raise_for_status() raises it
        response.raise_for_status()
        return response.status_code

    asyncio.run(aio())
    with httpx.Client(verify=CTX, timeout=httpx.Timeout(1.0)) as c:
        for tag, base in (("http:", P["http_url"]), ("https:", P["https_url"])):
            rec_sync("httpx_sync:" + tag, lambda base=base: checked(c.get(base + "/echo")))
    done()
    '''
)

# The version matrix and the other Pythons: GET and POST over HTTPS through the broker, a refusal.
SMOKE_SUITE = PRELUDE + textwrap.dedent(
    '''
    LIBS = P["libs"]

    async def aio():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            async def get():
                async with s.get(P["https_url"] + "/echo?smoke=1", ssl=CTX) as r:
                    return [r.status, await r.json()]
            await rec("aiohttp:get", get)
            async def post():
                data = os.urandom(100000)
                async with s.post(P["https_url"] + "/upload", data=data, ssl=CTX) as r:
                    return [sha(data), await r.json()]
            await rec("aiohttp:post", post)
            async def refused():
                async with s.get("https://example.com/", ssl=CTX) as r:
                    return r.status
            await rec("aiohttp:refused", refused)
            async def ws():
                async with s.ws_connect(P["https_url"].replace("https", "wss", 1) + "/ws", ssl=CTX) as w:
                    await w.send_str("smoke")
                    return (await w.receive()).data
            await rec("aiohttp:ws", ws)
        R["aiohttp:version"] = {"value": aiohttp.__version__}

    async def hx_async():
        import httpx
        async with httpx.AsyncClient(verify=CTX) as c:
            async def get():
                r = await c.get(P["https_url"] + "/echo?smoke=async")
                return [r.status_code, r.json()]
            await rec("httpx_async:get", get)

    def hx():
        import httpx
        with httpx.Client(verify=CTX) as c:
            def get():
                r = c.get(P["https_url"] + "/echo?smoke=1")
                return [r.status_code, r.json()]
            rec_sync("httpx:get", get)
            def post():
                data = os.urandom(100000)
                return [sha(data), c.post(P["https_url"] + "/upload", content=data).json()]
            rec_sync("httpx:post", post)
            rec_sync("httpx:refused", lambda: c.get("https://example.com/").raise_for_status())
            rec_sync("httpx:refused_http", lambda: c.get("http://example.com/").raise_for_status())
        asyncio.run(hx_async())
        R["httpx:version"] = {"value": httpx.__version__}

    if "aiohttp" in LIBS:
        asyncio.run(aio())
    if "httpx" in LIBS:
        hx()
    done()
    '''
)


# -- helpers ----------------------------------------------------------------------------------


def run_suite(env: ShimEnv, code: str, broker: Any, upstream: Any, extra_env: Dict[str, str] = None,
              timeout: float = 240, **params: Any) -> Dict[str, Any]:
    """Run a client suite in the shim venv; its results by check name."""
    payload = {
        "http_url": upstream.http_url.rstrip("/"), "https_url": upstream.https_url.rstrip("/"),
        "ca_file": str(upstream.ca_file), "wrong_ca_file": str(upstream.wrong_ca_file), "mark": MARK,
        "run": uuid.uuid4().hex[:8],  # the upstream's counters are shared by the whole session
    }
    payload.update(params)
    variables = dict(broker.env)
    variables.update(extra_env or {})
    result = env.run(code, json.dumps(payload), env=variables, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])  # type: ignore[no-any-return]
    raise AssertionError("suite did not finish (rc %s):\n%s\n%s" % (result.returncode, result.stdout[-3000:], result.stderr[-6000:]))


def value(results: Dict[str, Any], name: str) -> Any:
    """The check's value; a check that raised fails the test with its error."""
    assert name in results, "check %r did not run; ran: %s" % (name, sorted(results))
    entry = results[name]
    assert "error" not in entry, "%s raised %s: %s" % (name, entry["error"], entry["message"])
    return entry["value"]


def error(results: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The check's error; a check that succeeded fails the test."""
    assert name in results, "check %r did not run" % name
    entry = results[name]
    assert "error" in entry, "%s should have failed but returned %r" % (name, entry.get("value"))
    return entry  # type: ignore[no-any-return]


def assert_refusal(entry: Dict[str, Any], exc_type: str, destination: str) -> None:
    """The library's own exception type, with AgenShield, the destination and the broker's reason."""
    assert any(name.endswith("." + exc_type) for name in entry["mro"]), entry
    message = entry["message"]
    assert "AgenShield" in message, message
    assert destination in message, message
    assert "not allowed" in message or "blocked-by-policy" in message, message


def assert_broker_saw(audit: List[Dict[str, Any]], upstream: Any) -> None:
    """The broker's audit shows tunnels to the HTTPS upstream and every plain-HTTP request forwarded."""
    tunnels = [e for e in audit if e.get("operation") == "connect" and e.get("target") == "localhost:%d" % upstream.https_port]
    assert tunnels and all(e.get("result") == "success" for e in tunnels), audit[-10:]
    http = "127.0.0.1:%d/echo?i=" % upstream.http_port
    forwarded = {e["target"] for e in audit if e.get("operation") == "forward" and http in str(e.get("target"))}
    assert len(forwarded) == 200, sorted(forwarded)[:5]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory(*MAIN)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def aiohttp_results(main_env: ShimEnv, broker: Any, upstream: Any) -> Dict[str, Any]:
    mark = broker.mark()
    results = run_suite(main_env, AIOHTTP_SUITE, broker, upstream)
    results["audit"] = broker.audit(mark)
    return results


@pytest.fixture(scope="module")
def httpx_results(main_env: ShimEnv, broker: Any, upstream: Any) -> Dict[str, Any]:
    mark = broker.mark()
    results = run_suite(main_env, HTTPX_SUITE, broker, upstream)
    results["audit"] = broker.audit(mark)
    return results


@pytest.fixture(scope="module")
def h2_upstream(main_env: ShimEnv, upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The HTTP/2 server's port; its certificate comes from the upstream's CA (so ``ca_file`` verifies it)."""
    pem = tmp_path_factory.mktemp("h2") / "server.pem"
    upstream.ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    process = subprocess.Popen(
        [main_env.python, "-c", H2_SERVER, str(pem)], stdout=subprocess.PIPE, text=True,
        env=clean_env(AGENSHIELD_ENABLED="false"),
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(10)


# -- reading the upstream's answers -------------------------------------------------------------


def echo_method(echo: Dict[str, Any]) -> str:
    return echo["method"]  # type: ignore[no-any-return]


def echo_query(echo: Dict[str, Any]) -> Dict[str, List[str]]:
    """The query the upstream received (decoded), tag excluded: {name: [values]}."""
    out: Dict[str, List[str]] = {}
    for name, item in echo["query"]:
        if name != "tag":
            out.setdefault(name, []).append(item)
    return out


def echo_body(echo: Dict[str, Any]) -> bytes:
    return echo["body"].encode("utf-8")  # type: ignore[no-any-return]


def echo_header(echo: Dict[str, Any], name: str) -> str:
    headers = {k.lower(): v for k, v in echo["headers"]}
    return headers.get(name.lower(), "")


def upload_sha(answer: Dict[str, Any]) -> str:
    return answer["sha256"]  # type: ignore[no-any-return]


def assert_methods_and_query(results: Dict[str, Any], name: str) -> None:
    """A suite's ``methods`` check: every method answered 200, echoed with its query string intact."""
    for method, (status, echo) in value(results, name).items():
        assert status == 200 and echo_method(echo) == method
        assert echo_query(echo) == {"a": ["1"], "b": ["x y"]}


def assert_concurrent_answers(results: Dict[str, Any], name: str) -> None:
    """The 200 concurrent requests of a suite's ``concurrent`` check: each answered, each its own."""
    answers = value(results, name)
    assert len(answers) == 200
    for i, status, echo in answers:
        assert status == 200 and echo_query(echo) == {"i": [str(i)]}


def cookies_seen(answer: Dict[str, Any]) -> Dict[str, str]:  # /cookies/echo
    return answer["cookies"]  # type: ignore[no-any-return]


def cookies_set(daemon: bool = False) -> Dict[str, str]:
    """The cookies /cookies/set's two Set-Cookie headers give the client. The daemon 0.7.2 copies its fetch
    answer's headers into an object, one value per name: only the last header reaches the client (the
    first never leaves the daemon, so no shim can restore it)."""
    return {"b": "2"} if daemon else {"a": "1", "b": "2"}


# -- aiohttp ------------------------------------------------------------------------------------

SCHEMES = ["http:", "https:"]
MULTIPART_FIELDS = {
    "field": "value",
    "file": {"filename": "a.bin", "length": 8, "sha256": hashlib.sha256(b"\x00\x01binary").hexdigest()},
}
HTTPX_MODES = ["sync:http:", "sync:https:", "async:http:", "async:https:"]


def test_aiohttp_broker_saw_the_requests(aiohttp_results: Dict[str, Any], upstream: Any) -> None:
    """Routing, proved from the broker's side: it audited tunnels and forwards to the upstream."""
    value(aiohttp_results, "https:methods")
    assert_broker_saw(aiohttp_results["audit"], upstream)


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_methods_and_query(aiohttp_results: Dict[str, Any], tag: str) -> None:
    assert_methods_and_query(aiohttp_results, tag + "methods")


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_uploads(aiohttp_results: Dict[str, Any], tag: str) -> None:
    body = json.loads(echo_body(value(aiohttp_results, tag + "json")))
    assert body == {"k": [1, "\u00e9"]}
    form = value(aiohttp_results, tag + "form")
    assert form["form"] == {"f": "v w", "g": "1"}
    assert echo_header(form, "content-type").startswith("application/x-www-form-urlencoded")
    assert value(aiohttp_results, tag + "multipart")["form"] == MULTIPART_FIELDS


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_binary_and_chunked_bodies(aiohttp_results: Dict[str, Any], tag: str) -> None:
    sent, answer = value(aiohttp_results, tag + "binary_up")
    assert upload_sha(answer) == sent
    sent, answer, encoding = value(aiohttp_results, tag + "chunked_up")
    assert upload_sha(answer) == sent and encoding == "chunked" and answer["chunked"] is True
    length, digest, headers = value(aiohttp_results, tag + "binary_down")
    assert length == 1000000
    assert digest == {k.lower(): v for k, v in headers.items()}["x-sha256"]


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_redirects_cookies_gzip_head(aiohttp_results: Dict[str, Any], tag: str) -> None:
    status, url, hops = value(aiohttp_results, tag + "redirects")
    assert status == 200 and url.endswith("/echo") and hops == 3
    set_cookies, seen = value(aiohttp_results, tag + "cookies")
    assert len(set_cookies) == 2
    assert cookies_seen(seen) == {"a": "1", "b": "2"}
    encoding, text = value(aiohttp_results, tag + "gzip")
    assert encoding == "gzip" and json.loads(text)["gzipped"] is True
    assert value(aiohttp_results, tag + "head") == [200, ""]


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_statuses(aiohttp_results: Dict[str, Any], tag: str) -> None:
    out = value(aiohttp_results, tag + "statuses")
    assert out["204"] == [204, 0] and out["304"] == [304, 0]
    assert out["404"] == ["ClientResponseError", 404] and out["500"] == ["ClientResponseError", 500]


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_streams_server_sent_events(aiohttp_results: Dict[str, Any], tag: str) -> None:
    events = value(aiohttp_results, tag + "sse")
    assert [data["i"] for _, data in events] == [0, 1, 2, 3, 4]
    # the first event arrived before the server sent the last one (1.2 s later): streamed, not buffered
    assert events[0][0] < events[-1][1]["sent"] - 0.5, events


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_read_timeout_honoured(aiohttp_results: Dict[str, Any], tag: str) -> None:
    entry = error(aiohttp_results, tag + "read_timeout")
    assert "TimeoutError" in entry["error"] or any("Timeout" in n for n in entry["mro"]), entry
    assert entry["elapsed"] < 3.0


def test_aiohttp_keepalive_one_tunnel(aiohttp_results: Dict[str, Any]) -> None:
    """Ten requests of one session, one tunnel (aiohttp 3.9 closes plain-HTTP proxy connections itself)."""
    assert value(aiohttp_results, "https:keepalive") == {"count": 1, "requests": 10}
    assert value(aiohttp_results, "http:keepalive")["requests"] == 10


KEEPALIVE_WORK_SUITE = PRELUDE + textwrap.dedent(
    '''
    import aiohttp

    async def shim_functions_per_request(base, n):
        """Which of the shim's Python functions run during n keep-alive requests, once the first is done."""
        seen = set()

        def profile(frame, event, arg):
            if event == "call" and "agenshield_shim" in frame.f_code.co_filename:
                seen.add(frame.f_code.co_name)

        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # the first asks the broker which transport it takes
                async with s.get(base + "/echo?warm=1", ssl=CTX) as r:
                    await r.read()
            sys.setprofile(profile)
            try:
                for i in range(n):
                    async with s.get(base + "/echo?i=%d" % i, ssl=CTX) as r:
                        assert r.status == 200, r.status
                        await r.read()
            finally:
                sys.setprofile(None)
        return sorted(seen)

    async def main():
        for tag in ("http:", "https:"):
            await rec(tag, lambda: shim_functions_per_request(P[tag[:-1] + "_url"], 20))
        done()

    asyncio.run(main())
    '''
)


@pytest.mark.parametrize("transport", ["auto", "tunnel"])
def test_aiohttp_keepalive_request_runs_only_the_wrapper(main_env: ShimEnv, broker: Any, upstream: Any,
                                                         transport: str) -> None:
    """What the shim adds to a keep-alive request is its ``_request`` wrapper alone: the transport
    learned once, no probe, executor hop, config lookup or answer inspection per request (each was
    a share of the 1.08-1.18x aiohttp measured against itself configured by hand on the same path:
    benchmarks/aiohttp_overhead.py). The broker still saw every request."""
    mark = broker.mark()
    results = run_suite(main_env, KEEPALIVE_WORK_SUITE, broker, upstream,
                        extra_env={"AGENSHIELD_TRANSPORT": transport})
    for tag in SCHEMES:
        assert value(results, tag) == ["_request"], tag
    audit = broker.audit(mark)
    forwarded = [e for e in audit if e.get("operation") == "forward" and "/echo?i=" in str(e.get("target"))]
    assert len(forwarded) == 20, audit[-5:]
    tunnels = [e for e in audit if e.get("operation") == "connect" and e.get("target") == "localhost:%d" % upstream.https_port]
    assert len(tunnels) == 1, tunnels  # the https:// requests, one kept-alive tunnel


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_websockets(aiohttp_results: Dict[str, Any], tag: str) -> None:
    assert value(aiohttp_results, tag + "ws") == ["hello", [0, 255]]


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_200_concurrent(aiohttp_results: Dict[str, Any], tag: str) -> None:
    assert_concurrent_answers(aiohttp_results, tag + "concurrent")


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_app_proxy_replaced(aiohttp_results: Dict[str, Any], tag: str) -> None:
    status, echo = value(aiohttp_results, tag + "proxy_arg")
    assert status == 200 and echo_query(echo) == {"via": ["arg"]}
    status, echo = value(aiohttp_results, tag + "module_request")
    assert status == 200 and echo_query(echo) == {"via": ["module"]}


def test_aiohttp_wrong_ca_fails(aiohttp_results: Dict[str, Any]) -> None:
    entry = error(aiohttp_results, "https:wrong_ca")
    assert "CERTIFICATE_VERIFY_FAILED" in entry["message"] or "Certificate" in entry["error"], entry


@pytest.mark.parametrize("tag", SCHEMES)
def test_aiohttp_refusal_is_client_http_proxy_error(aiohttp_results: Dict[str, Any], tag: str) -> None:
    assert_refusal(error(aiohttp_results, tag + "refused"), "ClientHttpProxyError", "example.com")


# -- httpx --------------------------------------------------------------------------------------


def test_httpx_broker_saw_the_requests(httpx_results: Dict[str, Any], upstream: Any) -> None:
    value(httpx_results, "sync:https:methods")
    assert_broker_saw(httpx_results["audit"], upstream)


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_methods_and_query(httpx_results: Dict[str, Any], tag: str) -> None:
    assert_methods_and_query(httpx_results, tag + "methods")


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_json_binary_and_chunked(httpx_results: Dict[str, Any], tag: str) -> None:
    assert json.loads(echo_body(value(httpx_results, tag + "json"))) == {"k": [1, "\u00e9"]}
    sent, answer = value(httpx_results, tag + "binary_up")
    assert upload_sha(answer) == sent
    sent, answer, encoding = value(httpx_results, tag + "chunked_up")
    assert upload_sha(answer) == sent and encoding == "chunked" and answer["chunked"] is True
    length, digest, headers = value(httpx_results, tag + "binary_down")
    assert length == 1000000 and digest == headers["x-sha256"]


@pytest.mark.parametrize("tag", ["sync:http:", "sync:https:"])
def test_httpx_form_multipart_cookies_gzip_head_statuses(httpx_results: Dict[str, Any], tag: str) -> None:
    assert value(httpx_results, tag + "form")["form"] == {"f": "v w", "g": "1"}
    assert value(httpx_results, tag + "multipart")["form"] == MULTIPART_FIELDS
    set_cookies, seen = value(httpx_results, tag + "cookies")
    assert len(set_cookies) == 2 and cookies_seen(seen) == {"a": "1", "b": "2"}
    encoding, text = value(httpx_results, tag + "gzip")
    assert encoding == "gzip" and json.loads(text)["gzipped"] is True
    assert value(httpx_results, tag + "head") == [200, ""]
    out = value(httpx_results, tag + "statuses")
    assert out["204"] == [204, 0] and out["304"] == [304, 0]
    assert out["404"] == ["HTTPStatusError", 404] and out["500"] == ["HTTPStatusError", 500]


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_redirects(httpx_results: Dict[str, Any], tag: str) -> None:
    status, url, hops = value(httpx_results, tag + "redirects")
    assert status == 200 and url.endswith("/echo") and hops == 3


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_streams_server_sent_events(httpx_results: Dict[str, Any], tag: str) -> None:
    events = value(httpx_results, tag + "sse")
    assert [data["i"] for _, data in events] == [0, 1, 2, 3, 4]
    # the first event arrived before the server sent the last one (1.2 s later): streamed, not buffered
    assert events[0][0] < events[-1][1]["sent"] - 0.5, events


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_read_timeout_honoured(httpx_results: Dict[str, Any], tag: str) -> None:
    entry = error(httpx_results, tag + "read_timeout")
    assert entry["error"] == "ReadTimeout", entry
    assert entry["elapsed"] < 3.0


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_keepalive(httpx_results: Dict[str, Any], tag: str) -> None:
    assert value(httpx_results, tag + "keepalive") == {"count": 1, "requests": 10}


@pytest.mark.parametrize("tag", ["async:http:", "async:https:"])
def test_httpx_200_concurrent(httpx_results: Dict[str, Any], tag: str) -> None:
    assert_concurrent_answers(httpx_results, tag + "concurrent")


def test_httpx_http2(main_env: ShimEnv, broker: Any, upstream: Any, h2_upstream: int) -> None:
    """``http2=True``: HTTP/2 negotiated with the real host inside the broker's tunnel (ALPN)."""
    mark = broker.mark()
    results = run_suite(main_env, HTTP2_SUITE, broker, upstream, h2_url="https://localhost:%d" % h2_upstream)
    answers = value(results, "async")
    assert [a[0] for a in answers] == ["HTTP/2"] * 20
    assert [echo_query(a[2]) for a in answers] == [{"h2": [str(i)]} for i in range(20)]
    version, status, echo = value(results, "sync")
    assert (version, status, echo_query(echo)) == ("HTTP/2", 200, {"h2": ["sync"]})
    assert broker.connects("localhost:%d" % h2_upstream, mark)


@pytest.mark.parametrize("tag", ["sync:http:", "sync:https:"])
def test_httpx_app_proxy_replaced(httpx_results: Dict[str, Any], tag: str) -> None:
    for check, via in (("proxy_arg", "arg"), ("mounts", "mount")):
        status, echo = value(httpx_results, tag + check)
        assert status == 200 and echo_query(echo) == {"via": [via]}
    assert value(httpx_results, tag + "module_get") == 200


@pytest.mark.parametrize("tag", ["async:http:", "async:https:"])
def test_httpx_mock_transport_untouched(httpx_results: Dict[str, Any], tag: str) -> None:
    assert value(httpx_results, tag + "mock") == {"mocked": "https://example.com/x"}
    assert value(httpx_results, tag + "mock_async") == {"mocked": "https://example.com/y"}


def test_httpx_wrong_ca_fails(httpx_results: Dict[str, Any]) -> None:
    entry = error(httpx_results, "sync:https:wrong_ca")
    assert entry["error"] == "ConnectError" and "CERTIFICATE_VERIFY_FAILED" in entry["message"], entry
    assert "AgenShield" not in entry["message"]  # a TLS failure is not reported as the broker's


@pytest.mark.parametrize("tag", HTTPX_MODES)
def test_httpx_refusal_is_a_403_naming_agenshield(httpx_results: Dict[str, Any], tag: str) -> None:
    """The broker's refusal is a 403 answer (see ``hooks/httpx.refusal_response``): ``raise_for_status``
    names AgenShield, the destination and the reason."""
    assert_refusal(error(httpx_results, tag + "refused"), "HTTPStatusError", "example.com")


# -- environment proxies, broker trouble ----------------------------------------------------------


def test_environment_proxies_and_no_proxy_open_no_way_around(main_env: ShimEnv, broker: Any, upstream: Any) -> None:
    """HTTP(S)_PROXY/ALL_PROXY point nowhere and NO_PROXY covers everything: still via the broker."""
    proxies = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")}
    proxies.update(NO_PROXY="*,localhost,127.0.0.1", no_proxy="*,localhost,127.0.0.1")
    results = run_suite(main_env, ENV_PROXY_SUITE, broker, upstream, extra_env=proxies)
    for name in ("aiohttp:http:", "aiohttp:https:", "httpx_async:http:", "httpx_async:https:"):
        status, echo = value(results, name)
        assert status == 200 and echo_query(echo) == {"via": ["env"]}, name
    for name in ("httpx_sync:http:", "httpx_sync:https:"):
        assert value(results, name)[0] == 200


def test_broker_down_fast_clear_error(main_env: ShimEnv, broker: Any, upstream: Any, dead_broker_port: int) -> None:
    port = dead_broker_port
    results = run_suite(main_env, BROKER_TROUBLE_SUITE, broker, upstream,
                        extra_env={"AGENSHIELD_BROKER_PORT": str(port)})
    expected = {"aiohttp": "ClientProxyConnectionError", "httpx_async": "ConnectError", "httpx_sync": "ConnectError"}
    for lib, exc_type in expected.items():
        for scheme in SCHEMES:
            entry = error(results, lib + ":" + scheme)
            assert entry["error"] == exc_type, entry
            assert "AgenShield" in entry["message"] and "127.0.0.1:%d" % port in entry["message"], entry
            assert entry["elapsed"] < 2.0, entry


def test_slow_broker_caller_timeout_honoured(main_env: ShimEnv, broker: Any, upstream: Any, silent_broker: int) -> None:
    port = silent_broker
    results = run_suite(main_env, BROKER_TROUBLE_SUITE, broker, upstream,
                        extra_env={"AGENSHIELD_BROKER_PORT": str(port)})
    for name in ("aiohttp", "httpx_async", "httpx_sync"):
        for scheme in SCHEMES:
            entry = error(results, name + ":" + scheme)
            assert any("Timeout" in n for n in entry["mro"]), entry
            assert 0.8 < entry["elapsed"] < 3.0, entry


# -- versions -------------------------------------------------------------------------------------

MATRIX = [
    pytest.param("3.11", ("aiohttp==3.9.*",), ("aiohttp",), "3.9.", id="aiohttp-3.9-oldest"),
    pytest.param(*MAIN[:1], MAIN[1:], ("aiohttp", "httpx"), "", id="aiohttp-httpx-newest"),
    pytest.param("3.11", ("httpx==0.23.*",), ("httpx",), "0.23.", id="httpx-0.23"),
    pytest.param("3.11", ("httpx==0.27.*",), ("httpx",), "0.27.", id="httpx-0.27"),
    pytest.param("3.11", ("httpx==0.28.*",), ("httpx",), "0.28.", id="httpx-0.28"),
    pytest.param("3.8", ("aiohttp", "httpx"), ("aiohttp", "httpx"), "", id="py3.8"),
    pytest.param("3.13", ("aiohttp", "httpx"), ("aiohttp", "httpx"), "", id="py3.13"),
]


@pytest.mark.parametrize("version, requirements, libs, prefix", MATRIX)
def test_version_smoke(shim_env_factory: Any, broker: Any, upstream: Any, version: str,
                       requirements: Any, libs: Any, prefix: str) -> None:
    """GET and POST over HTTPS through the broker, and a refusal, per library version and Python."""
    env = shim_env_factory(version, *requirements)
    results = run_suite(env, SMOKE_SUITE, broker, upstream, libs=list(libs))
    for lib in libs:
        assert value(results, lib + ":version").startswith(prefix)
    if "aiohttp" in libs:
        status, echo = value(results, "aiohttp:get")
        assert status == 200 and echo_query(echo) == {"smoke": ["1"]}
        sent, answer = value(results, "aiohttp:post")
        assert upload_sha(answer) == sent
        assert value(results, "aiohttp:ws") == "smoke"
        assert_refusal(error(results, "aiohttp:refused"), "ClientHttpProxyError", "example.com")
    if "httpx" in libs:
        status, echo = value(results, "httpx:get")
        assert status == 200 and echo_query(echo) == {"smoke": ["1"]}
        sent, answer = value(results, "httpx:post")
        assert upload_sha(answer) == sent
        status, echo = value(results, "httpx_async:get")
        assert status == 200 and echo_query(echo) == {"smoke": ["async"]}
        assert_refusal(error(results, "httpx:refused"), "HTTPStatusError", "example.com")
        assert_refusal(error(results, "httpx:refused_http"), "HTTPStatusError", "example.com")


def test_each_transport_patches_its_own_seams_once(main_env: ShimEnv, broker: Any) -> None:
    """tunnel: aiohttp's ``ClientSession._request`` and httpx's transports; rpc: aiohttp's
    ``TCPConnector._create_connection`` (not the Unix one) and httpx's transports. A second install
    is a no-op; a transport on a Unix socket is not routed."""
    code = textwrap.dedent(
        """
        import asyncio, aiohttp, httpx
        from agenshield_shim.hooks import aiohttp as aio_hook, httpx as httpx_hook
        def wrapped(f):
            return hasattr(f, "__agenshield_original__")
        flags = [wrapped(aiohttp.ClientSession._request), wrapped(aiohttp.TCPConnector._create_connection),
                 wrapped(aiohttp.UnixConnector.__dict__.get("_create_connection")),
                 wrapped(httpx.HTTPTransport.__init__), wrapped(httpx.AsyncHTTPTransport.handle_async_request)]
        before = (aiohttp.ClientSession._request, aiohttp.TCPConnector._create_connection, httpx.HTTPTransport.__init__)
        aio_hook.install(aiohttp); httpx_hook.install(httpx)
        same = before == (aiohttp.ClientSession._request, aiohttp.TCPConnector._create_connection,
                          httpx.HTTPTransport.__init__)
        uds = getattr(httpx.HTTPTransport(uds="/tmp/x.sock"), "_agenshield_routed", False)
        tcp = getattr(httpx.HTTPTransport(), "_agenshield_routed", False)
        print(" ".join(str(x) for x in flags + [same, uds, tcp]))
        """
    )
    tunnel = main_env.run(code, env=broker.env)
    assert tunnel.stdout.split() == ["True", "False", "False", "True", "True", "True", "False", "True"], \
        tunnel.stdout + tunnel.stderr
    rpc = main_env.run(code, env={**broker.env, "AGENSHIELD_TRANSPORT": "rpc"})
    assert rpc.stdout.split() == ["False", "True", "False", "True", "True", "True", "False", "True"], \
        rpc.stdout + rpc.stderr

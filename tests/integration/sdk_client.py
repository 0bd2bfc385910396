"""The SDK client run of ``test_sdks.py``: every SDK with its default HTTP client, in one interpreter.

``python sdk_client.py PARAMS_JSON`` in a guarded environment. ``PARAMS_JSON``: ``api``, ``mcp``,
``sse`` (base URLs of ``sdk_server.py``), ``denied`` (a base URL the broker refuses), ``sdks``
(which to run), ``mcp_sse`` (false: skip MCP over SSE). Prints ``@@RESULTS@@`` and a JSON object: for each check ``{"value": ...}`` or
``{"error": type, "chain": [...], "elapsed": s}``, where ``chain`` is the ``str`` of the exception and
of everything in its cause/context chain and inside exception groups (what a user can see).
Base URLs are given the way each SDK documents (its base-URL argument or variable); no SDK is
given an HTTP client.
"""

import asyncio
import json
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

P = json.loads(sys.argv[1])
R: Dict[str, Any] = {}
MESSAGES = [{"role": "user", "content": "hi"}]


def chain(exc: BaseException) -> List[str]:
    out: List[str] = []
    todo = [exc]
    seen = set()
    while todo and len(out) < 40:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        out.append("%s: %s" % (type(cur).__name__, cur))
        todo.extend(getattr(cur, "exceptions", ()) or ())
        for nxt in (cur.__cause__, cur.__context__):
            if nxt is not None:
                todo.append(nxt)
    return out


def rec(name: str, fn: Callable[[], Any]) -> None:
    started = time.monotonic()
    try:
        R[name] = {"value": fn(), "elapsed": time.monotonic() - started}
    except BaseException as exc:  # an ExceptionGroup from anyio is a BaseExceptionGroup
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        R[name] = {"error": type(exc).__name__, "chain": chain(exc), "elapsed": time.monotonic() - started}


def versions() -> Dict[str, str]:
    from importlib.metadata import version

    out = {}
    for dist in ("openai", "anthropic", "mcp", "huggingface_hub", "google-genai", "httpx2", "httpcore2"):
        try:
            out[dist] = version(dist)
        except Exception:
            pass
    return out


# -- openai -------------------------------------------------------------------------------------


def openai_checks(base: str, prefix: str) -> None:
    import openai

    client = openai.OpenAI(api_key="sk-test", base_url=base + "/v1")
    rec(prefix + "sync", lambda: client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content)
    if prefix.endswith("denied:"):
        return

    def stream() -> str:
        parts = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in parts)

    rec(prefix + "stream", stream)

    async def run_async() -> str:
        async with openai.AsyncOpenAI(api_key="sk-test", base_url=base + "/v1") as aclient:
            answer = await aclient.chat.completions.create(model="m", messages=MESSAGES)
            return answer.choices[0].message.content  # type: ignore[no-any-return]

    rec(prefix + "async", lambda: asyncio.run(run_async()))


def anthropic_checks(base: str, prefix: str) -> None:
    import anthropic

    client = anthropic.Anthropic(api_key="sk-test", base_url=base)
    rec(prefix + "sync", lambda: client.messages.create(model="m", max_tokens=8, messages=MESSAGES).content[0].text)


def genai_checks(base: str, prefix: str) -> None:
    from google import genai
    from google.genai import types

    client = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=base + "/"))
    rec(prefix + "sync", lambda: client.models.generate_content(model="gemini-test", contents="hi").text)


def hf_checks(base: str, prefix: str) -> None:
    from huggingface_hub import hf_hub_download

    cache = tempfile.mkdtemp(prefix="hf-cache-")

    def download() -> int:
        # the allowed endpoint comes from HF_ENDPOINT, as users set it; the refused one as an argument
        endpoint = base if prefix.endswith("denied:") else None
        path = hf_hub_download("org/model", "config.txt", cache_dir=cache, endpoint=endpoint)
        with open(path, "rb") as f:
            return len(f.read())

    rec(prefix + "download", download)


def mcp_checks(mcp_base: str, sse_base: str, prefix: str) -> None:
    from mcp import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client

    async def call(streams: Any) -> Any:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("add", {"a": 2, "b": 3})
            return [c.text for c in result.content if getattr(c, "text", None)]

    async def streamable() -> Any:
        async with streamable_http_client(mcp_base + "/mcp") as streams:
            return await call(streams)

    async def sse() -> Any:
        async with sse_client(sse_base + "/sse") as streams:
            return await call(streams)

    rec(prefix + "streamable", lambda: asyncio.run(asyncio.wait_for(streamable(), 30)))
    if P.get("mcp_sse", True):  # not under rpc: an SSE stream never ends, and rpc buffers whole bodies
        rec(prefix + "sse", lambda: asyncio.run(asyncio.wait_for(sse(), 30)))


CHECKS = {"openai": openai_checks, "anthropic": anthropic_checks, "genai": genai_checks, "hf": hf_checks}


def main() -> None:
    R["versions"] = {"value": versions()}
    for sdk in P["sdks"]:
        if sdk == "mcp":
            mcp_checks(P["mcp"], P["sse"], "mcp:")
            mcp_checks(P["denied"], P["denied"], "mcp:denied:")
            continue
        CHECKS[sdk](P["api"], sdk + ":")
        CHECKS[sdk](P["denied"], sdk + ":denied:")
    print("@@RESULTS@@" + json.dumps(R, default=repr), flush=True)


if __name__ == "__main__":
    main()

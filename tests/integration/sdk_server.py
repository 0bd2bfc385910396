"""Fake AI APIs on loopback for the SDK tests: openai, anthropic, google-genai, the Hugging Face
hub, and an MCP server over streamable HTTP and over SSE.

Run as ``python sdk_server.py`` with ``AGENSHIELD_ENABLED=false`` in the SDK test's environment
(it needs starlette and uvicorn, which ``mcp`` brings). It prints one line, the JSON ``{"api": P,
"mcp": P, "sse": P}`` of its three ports on 127.0.0.1, and serves until it is terminated. Each
answer is the smallest the SDK accepts as a success; each request's path is kept, and
``GET /_seen`` returns them (the test compares them with the broker's audit).
"""

import asyncio
import hashlib
import json
import socket
import sys
from typing import Any, List

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SEEN: List[str] = []
HF_FILE = b"agenshield hf file\n" * 64
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


async def openai_chat(request: Request) -> Response:
    body = await request.json()
    text = "hello from fake openai"
    if body.get("stream"):
        async def events() -> Any:
            for i, word in enumerate(text.split()):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                      "finish_reason": None}]}
                yield "data: %s\n\n" % json.dumps(chunk)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({
        "id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    })


async def anthropic_messages(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({
        "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
        "content": [{"type": "text", "text": "hello from fake anthropic"}],
        "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 4},
    })


async def genai_generate(request: Request) -> Response:
    return JSONResponse({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "hello from fake gemini"}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 4, "totalTokenCount": 5},
    })


async def hf_resolve(request: Request) -> Response:
    etag = '"%s"' % hashlib.sha1(HF_FILE).hexdigest()
    headers = {"ETag": etag, "X-Repo-Commit": HF_COMMIT, "Content-Length": str(len(HF_FILE)),
               "Accept-Ranges": "bytes", "Content-Type": "text/plain"}
    if request.method == "HEAD":
        return Response(b"", headers=headers)
    return Response(HF_FILE, headers=headers)


async def seen(request: Request) -> Response:
    return JSONResponse(SEEN)


def api_app() -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/{version}/models/{model}:generateContent", genai_generate, methods=["POST"]),
        Route("/{org}/{repo}/resolve/{revision}/{filename:path}", hf_resolve, methods=["GET", "HEAD"]),
        Route("/_seen", seen),
    ])

    async def record(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/_seen":
            SEEN.append(scope["method"] + " " + scope["path"])
        await app(scope, receive, send)

    return record  # type: ignore[return-value]


def mcp_server() -> MCPServer:
    server: MCPServer = MCPServer("agenshield-test")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    return server


def bound() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def main() -> None:
    apps = {"api": api_app(), "mcp": mcp_server().streamable_http_app(), "sse": mcp_server().sse_app()}
    servers, socks = [], {}
    for name, app in apps.items():
        sock = socks[name] = bound()
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        servers.append(uvicorn.Server(config).serve(sockets=[sock]))
    print(json.dumps({name: sock.getsockname()[1] for name, sock in socks.items()}), flush=True)
    await asyncio.gather(*servers)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

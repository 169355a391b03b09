"""Benchmark peer: the official MCP Python SDK (mcp 2.x) serving one `read_file` tool.

Run with the venv interpreter:

    .cache/venv/bin/python bench/peer_sdk_server.py --root REPO [--port 0]

The first stdout line is `peer listening on http://127.0.0.1:PORT/mcp` (flushed), printed
once uvicorn accepts connections.

Server setup, and why:
- `mcp.server.mcpserver.MCPServer` (the 2.x name of FastMCP) with its
  `streamable_http_app()` Starlette app, served by uvicorn. The installed uvicorn has no
  httptools or uvloop, so it runs its pure-Python h11 protocol on the asyncio loop: the
  stock configuration a user gets from `pip install mcp`.
- Stateful sessions (`stateless_http=False`): each client initializes and gets an
  Mcp-Session-Id, the same flow PatchBay serves.
- `json_response=True`: a request is answered with one `application/json` body instead of
  an SSE stream. PatchBay always answers JSON, so this keeps the wire format (and the
  client-side parsing cost) the same on both sides.
- The tool is a plain `def`: it does blocking file I/O, and the SDK runs sync tools in a
  worker thread (anyio.to_thread), which is the documented way for blocking work.
- Path handling is a simple realpath containment check; PatchBay's guard does more
  (pinned root fd, per-component O_NOFOLLOW walk, blocked secret globs), so any gap in
  PatchBay's favour is not from skipping safety work.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from typing import TypedDict

import uvicorn
from mcp.server.mcpserver import MCPServer

TEXT_BUDGET = 80_000        # same character budget as PatchBay's `text_chars` limit
READ_CAP = 8 * 1024 * 1024  # same byte cap as PatchBay's `read_bytes` limit


class ReadResult(TypedDict):
    """The fields PatchBay's read_file returns (the return type gives structured output)."""

    path: str
    text: str
    start_line: int
    end_line: int
    total_lines: int
    next_start_line: int | None
    sha256: str
    truncated: bool


def resolve(root: str, path: str) -> str:
    """The real path of `path` under `root`, or ValueError when it leaves the root."""
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise ValueError("path is outside the root: %s" % path)
    return full


def load_text(full: str) -> tuple[bytes, str]:
    """The file's bytes and its text (UTF-8, errors replaced); refuses binary and huge."""
    with open(full, "rb") as f:
        data = f.read(READ_CAP + 1)
    if len(data) > READ_CAP:
        raise ValueError("file is over %d bytes" % READ_CAP)
    if b"\0" in data[:8192]:
        raise ValueError("binary file")
    return data, data.decode("utf-8", "replace")


def take_lines(lines: list[str], start: int, max_lines: int) -> tuple[str, int, bool]:
    """Up to `max_lines` lines from 1-based `start` within the budget: (text, end, cut)."""
    picked: list[str] = []
    size = 0
    for line in lines[start - 1: start - 1 + max_lines]:
        if size + len(line) > TEXT_BUDGET:
            if not picked:
                picked.append(line[:TEXT_BUDGET])
            return "".join(picked), start - 1 + len(picked), True
        picked.append(line)
        size += len(line)
    return "".join(picked), start - 1 + len(picked), False


def read_file_under(root: str, path: str, start_line: int, max_lines: int) -> ReadResult:
    if start_line < 1 or max_lines < 1:
        raise ValueError("start_line and max_lines must be at least 1")
    full = resolve(root, path)
    data, text = load_text(full)
    lines = text.splitlines(keepends=True)
    if start_line > max(len(lines), 1):
        raise ValueError("start_line %d is past the end (%d lines)" % (start_line, len(lines)))
    chunk, end, cut = take_lines(lines, start_line, max_lines)
    return ReadResult(
        path=os.path.relpath(full, root), text=chunk, start_line=start_line,
        end_line=end, total_lines=len(lines),
        next_start_line=end + 1 if end < len(lines) else None,
        sha256=hashlib.sha256(data).hexdigest(), truncated=cut)


def build_server(root: str) -> MCPServer:
    server = MCPServer("peer-sdk", log_level="WARNING")

    @server.tool(description="Read a UTF-8 text file by line range, with its sha256.")
    def read_file(path: str, start_line: int = 1, max_lines: int = 400) -> ReadResult:
        return read_file_under(root, path, start_line, max_lines)

    return server


class ReadyServer(uvicorn.Server):
    """A uvicorn server that prints the bound URL once it accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1]
        sys.stdout.write("peer listening on http://127.0.0.1:%d/mcp\n" % port)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory the tool may read")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    args = parser.parse_args(argv)
    root = os.path.realpath(args.root)
    app = build_server(root).streamable_http_app(json_response=True, stateless_http=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                            access_log=False)
    ReadyServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

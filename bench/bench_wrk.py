#!/usr/bin/env python3
"""read_file throughput measured with wrk (a C load generator) instead of Python clients.

bench_core.py drives both servers with Python http.client threads; at one client that
client's own ~0.1 ms per request is part of every measured round trip. wrk costs far less
per request, so its numbers are closer to what each server itself can do. Same servers,
same repository, same tool call, same run, as ratios. Needs `wrk` on PATH (Debian: wrk).

    .cache/venv/bin/python bench/bench_wrk.py [--duration 3] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402

LUA = """wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Mcp-Session-Id"] = %s
wrk.headers["MCP-Protocol-Version"] = %s
"""


def session(port: int, path: str) -> tuple[str, str]:
    client = core.McpClient(port, path)
    try:
        client.connect()
        client.initialize()
        data = client.read_file("README.md")  # one checked answer before the load
        if b'"isError":false' not in data:
            raise core.BenchError("read_file failed: %r" % data[:200])
        return client.headers["Mcp-Session-Id"], client.headers["MCP-Protocol-Version"]
    finally:
        client.close()


def wrk(port: int, path: str, script: Path, clients: int, duration: float) -> float:
    argv = ["wrk", "-t%d" % min(clients, 2), "-c%d" % clients, "-d%ds" % max(1, round(duration)),
            "--timeout", "10s", "-s", str(script), "http://%s:%d%s" % (core.HOST, port, path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise core.BenchError("wrk saw errors:\n" + out)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise core.BenchError("no Requests/sec in wrk output:\n" + out)
    return float(match.group(1))


def measure(target: core.Target, children: core.Children, work: Path, clients: list[int],
            duration: float) -> dict[int, float]:
    proc = children.spawn(target.argv(0), pipe_stdout=True)
    try:
        port = core.read_ready_line(proc, target.ready_prefix, 30)
        sid, version = session(port, target.mcp_path)
        script = work / ("%s.lua" % target.name)
        body = core.rpc(7, "tools/call", {"name": "read_file", "arguments": {"path": "README.md"}})
        script.write_text(LUA % (json.dumps(body.decode()), json.dumps(sid), json.dumps(version)))
        wrk(port, target.mcp_path, script, 1, 1)  # warm-up
        return {c: wrk(port, target.mcp_path, script, c, duration) for c in clients}
    finally:
        children.kill(proc)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--runs", type=int, default=2, help="alternating rounds (median is kept)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--out", type=Path, default=core.HERE / "results" / "wrk.json")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench_wrk: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="patchbay-wrk-") as tmp:
        work = Path(tmp)
        core.make_repo(work / "repo", 200)
        targets = core.build_targets(work / "home", work / "repo")
        children = core.Children(work)
        results: dict[str, dict[int, list[float]]] = {t.name: {c: [] for c in args.clients}
                                                       for t in targets}
        try:
            for _ in range(max(1, args.runs)):  # alternate the servers, round after round
                for target in targets:
                    for clients, rps in measure(target, children, work, args.clients,
                                                args.duration).items():
                        results[target.name][clients].append(rps)
        finally:
            children.kill_all()
    doc: dict[str, Any] = {"tool": "wrk", "duration_s": args.duration, "runs": args.runs,
                           "machine": core.machine_info(), "rps": {}, "ratios": {}}
    print("%-24s %10s %10s %8s" % ("read_file rps (wrk)", "patchbay", "sdk peer", "ratio"))
    for clients in args.clients:
        pb = statistics.median(results["patchbay"][clients])
        peer = statistics.median(results["peer"][clients])
        doc["rps"][str(clients)] = {"patchbay": round(pb, 1), "peer": round(peer, 1)}
        doc["ratios"][str(clients)] = round(pb / peer, 2)
        print("%-24s %10.1f %10.1f %7.2fx" % ("%d client(s)" % clients, pb, peer, pb / peer))
    core.write_json(args.out, doc)
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

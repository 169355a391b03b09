"""Search fallback benchmark: the Python scan against git grep, and /health during a
backtracking regular expression.

    python3 bench/bench_search_scan.py            # about half a minute
    python3 bench/bench_search_scan.py --runs 3   # quicker

The Python scan (used outside git repositories when rg is missing) matches in a child
process so that a client's regex cannot hold the server's interpreter. This measures what
that costs and what it buys, against a peer in the same run: the same server searching a
git copy of the same tree with git grep. Both servers run with a PATH without rg.

  scan     median seconds of `search` per query, python scan vs git grep;
  health   the slowest /health answer while `(a+)+$` runs over a line of 25 a's and a `!`
           (exponential backtracking), and how long that search took.

Stdlib only; loopback only; every wait has a deadline; servers are ended on the way out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

SCRIPT = Path(__file__).resolve().parent.parent / "patchbay.py"
QUERIES: List[Tuple[str, bool]] = [("zzqq_no_match", False), (r"def \w+_x\(", True),
                                   ("TOKEN", False)]


class Server:
    def __init__(self, home: Path, root: Path, env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--home", str(home), "serve", "--port", "0",
             "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("patchbay listening on "):
            self.stop()
            raise SystemExit("server did not start: %r" % line)
        self.port = int(line.split()[-1].rstrip("/").rsplit(":", 1)[1])

    def post(self, tool: str, args: Dict[str, Any]) -> Tuple[int, Any, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        started = time.perf_counter()
        conn.request("POST", "/actions/" + tool, json.dumps(args),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        return resp.status, body, time.perf_counter() - started

    def health_s(self) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        started = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        conn.close()
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_tree(root: Path, copies: int) -> None:
    text = SCRIPT.read_text()
    for i in range(copies):
        d = root / ("d%d" % (i % 6))
        d.mkdir(parents=True, exist_ok=True)
        (d / ("f%d.py" % i)).write_text(text)
    (root / "trap.txt").write_text("a" * 25 + "!\n")


def during_backtracking(server: Server) -> Tuple[float, float, int]:
    box: Dict[str, float] = {}

    def search() -> None:
        box["search_s"] = server.post("search", {"query": "(a+)+$", "regex": True,
                                                 "path": "trap.txt"})[2]

    thread = threading.Thread(target=search)
    thread.start()
    worst, probes, deadline = 0.0, 0, time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        worst = max(worst, server.health_s())
        probes += 1
        time.sleep(0.05)
    thread.join(120)
    return box.get("search_s", float("nan")), worst, probes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="searches per query (median)")
    parser.add_argument("--copies", type=int, default=60, help="copies of patchbay.py")
    args = parser.parse_args()
    git = shutil.which("git")
    if not git:
        raise SystemExit("git is needed for the peer")
    tmp = Path(tempfile.mkdtemp(prefix="pb-bench-scan-"))
    servers: List[Server] = []
    try:
        bindir = tmp / "bin"  # git and nothing else: no rg
        bindir.mkdir()
        os.symlink(git, bindir / "git")
        env = {"PATH": str(bindir), "HOME": str(tmp)}
        plain, repo = tmp / "plain" / "tree", tmp / "repo" / "tree"
        make_tree(plain, args.copies)
        shutil.copytree(plain, repo)
        for cmd in (["init", "-q"], ["add", "-A"]):
            subprocess.run([git, *cmd], cwd=repo, check=True, env=env)
        scan = Server(tmp / "home-scan", plain, env)
        servers.append(scan)
        peer = Server(tmp / "home-git", repo, env)
        servers.append(peer)
        print("%-16s %12s %12s %8s" % ("query", "python scan", "git grep", "ratio"))
        for query, regex in QUERIES:
            times: Dict[str, List[float]] = {"python": [], "git": []}
            for _ in range(args.runs):
                for name, server in (("python", scan), ("git", peer)):
                    status, body, secs = server.post("search", {
                        "query": query, "regex": regex, "max_results": 1000})
                    if status != 200 or body.get("backend") != name:
                        raise SystemExit("%s answered %d: %r" % (name, status, body))
                    times[name].append(secs)
            a, b = statistics.median(times["python"]), statistics.median(times["git"])
            print("%-16s %11.3fs %11.3fs %7.2fx" % (query, a, b, a / b))
        for name, server in (("python scan", scan), ("git grep", peer)):
            search_s, worst, probes = during_backtracking(server)
            print("%-12s (a+)+$ took %.2fs; slowest /health %.3fs over %d probes"
                  % (name, search_s, worst, probes))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Core benchmark: PatchBay against the official MCP Python SDK on one generated repo.

    .cache/venv/bin/python bench/bench_core.py            # full run (about a minute)
    .cache/venv/bin/python bench/bench_core.py --quick    # smoke run (under ~30 s)

Measures, for both servers (bench/README.md explains each number):
  startup  spawn -> first answered MCP `initialize`, median of --runs spawns;
  rps      `tools/call read_file` per second over keep-alive HTTP/1.1, one connection and
           one MCP session per client thread, at 1 and at 16 clients.
Prints a table with the ratios and writes bench/results/latest.json.

Stdlib only (the peer server needs the venv; this runner does not). Loopback only; every
wait has a deadline and every loop a count bound; every child runs in its own process
group and is killed on the way out, errors included.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
MAIN = HERE.parent
HOST = "127.0.0.1"
PROTOCOL = "2025-11-25"  # offered by both servers through the initialize handshake
BASE_HEADERS = {"Content-Type": "application/json",
                "Accept": "application/json, text/event-stream"}
READ_PATH = "README.md"
TARGET_STARTUP = 5.0  # peer startup / PatchBay startup must be at least this
TARGET_RPS = 3.0      # PatchBay rps / peer rps must be at least this, at 1 and 16 clients

SPAWN_DEADLINE_S = 30.0       # a server that is not answering by then has failed
POLL_INTERVAL_S = 0.002       # startup poll: resolution of the measurement
MAX_POLLS = 20_000            # bound on startup poll attempts (well past the deadline)
HTTP_TIMEOUT_S = 10.0         # per socket operation, both in polls and under load
MAX_REQUESTS_PER_CLIENT = 5_000_000
KILL_GRACE_S = 3.0


class BenchError(Exception):
    """A server misbehaved (exited, never got ready, answered wrongly)."""


# ---------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One server under test: how to start it on a port and where MCP lives."""

    name: str
    argv: Callable[[int], list[str]]
    ready_prefix: str
    mcp_path: str = "/mcp"


def child_env() -> dict[str, str]:
    """The caller's environment without PATCHBAY_* (a stray token would change auth)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}


class Children:
    """Every server this run started; each one leads its own process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def spawn(self, argv: list[str], pipe_stdout: bool) -> subprocess.Popen[bytes]:
        self.count += 1
        log = open(self.log_dir / ("child-%d.stderr" % self.count), "wb")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=log, env=child_env(), cwd=MAIN,
                stdout=subprocess.PIPE if pipe_stdout else subprocess.DEVNULL,
                start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=KILL_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            self.kill(proc)

    def stderr_tail(self) -> str:
        path = self.log_dir / ("child-%d.stderr" % self.count)
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def read_ready_line(proc: subprocess.Popen[bytes], prefix: str, deadline_s: float) -> int:
    """Wait (bounded) for the ready line on the child's stdout; return the port in it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + deadline_s
    while b"\n" not in buf and len(buf) < 4096:
        left = end - time.monotonic()
        if left <= 0:
            raise BenchError("no ready line within %.0f s" % deadline_s)
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError("exited before its ready line (rc=%s)" % proc.poll())
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode("utf-8", "replace")
    match = re.match(re.escape(prefix) + r" http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        raise BenchError("unexpected first line: %r" % line[:200])
    return int(match.group(1))


# ---------------------------------------------------------------------------------------
# A minimal MCP client over one keep-alive connection
# ---------------------------------------------------------------------------------------

def rpc(msg_id: Optional[int], method: str, params: Optional[dict[str, Any]] = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if msg_id is not None:
        msg["id"] = msg_id
    if params is not None:
        msg["params"] = params
    return json.dumps(msg, separators=(",", ":")).encode()


INIT_BODY = rpc(0, "initialize", {"protocolVersion": PROTOCOL, "capabilities": {},
                                  "clientInfo": {"name": "patchbay-bench", "version": "1"}})


class McpClient:
    """One HTTP/1.1 connection, one MCP session."""

    def __init__(self, port: int, path: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.path = path
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        self.headers = dict(BASE_HEADERS)
        self.next_id = 1

    def connect(self) -> None:
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, body: bytes) -> tuple[int, http.client.HTTPResponse, bytes]:
        self.conn.request("POST", self.path, body, self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp, resp.read()

    def initialize(self) -> None:
        status, resp, data = self.post(INIT_BODY)
        sid = resp.getheader("Mcp-Session-Id")
        if status != 200 or not sid:
            raise BenchError("initialize answered %d: %r" % (status, data[:200]))
        version = json.loads(data)["result"]["protocolVersion"]
        self.headers.update({"Mcp-Session-Id": sid, "MCP-Protocol-Version": version})
        status, _, data = self.post(rpc(None, "notifications/initialized"))
        if status != 202:
            raise BenchError("notifications/initialized answered %d: %r" % (status, data[:200]))

    def read_file(self, path: str) -> bytes:
        self.next_id += 1
        body = rpc(self.next_id, "tools/call", {"name": "read_file",
                                                "arguments": {"path": path}})
        status, _, data = self.post(body)
        if status != 200:
            raise BenchError("tools/call answered %d: %r" % (status, data[:200]))
        return data

    def close(self) -> None:
        self.conn.close()


def answers_initialize(port: int, path: str) -> bool:
    """One startup poll: True once the server answers initialize with a session."""
    client = McpClient(port, path, timeout=HTTP_TIMEOUT_S)
    try:
        status, resp, _ = client.post(INIT_BODY)
        return status == 200 and bool(resp.getheader("Mcp-Session-Id"))
    except (OSError, http.client.HTTPException):
        return False
    finally:
        client.close()


# ---------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------

def make_repo(root: Path, readme_lines: int) -> dict[str, Any]:
    """A small repository; returns the structured result read_file must give for README."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["# Bench repository\n", "\n"] + [
        "Line %04d: the quick brown fox jumps over the lazy dog, twice over.\n" % i
        for i in range(3, readme_lines + 1)]
    text = "".join(lines[:readme_lines])
    (root / READ_PATH).write_text(text, encoding="utf-8")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "app.py").write_text("def main():\n    return 0\n", encoding="utf-8")
    (root / ".gitignore").write_text("build/\n", encoding="utf-8")
    total = len(text.splitlines())
    shown = min(total, 400)  # both tools default to max_lines=400
    return {"path": READ_PATH, "text": "".join(text.splitlines(keepends=True)[:shown]),
            "start_line": 1, "end_line": shown, "total_lines": total,
            "next_start_line": shown + 1 if shown < total else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "truncated": False}


def check_answer(data: bytes, expected: dict[str, Any]) -> None:
    """Full check of one read_file answer (done once per client: parsing costs CPU)."""
    result = json.loads(data).get("result") or {}
    if result.get("isError") or result.get("structuredContent") != expected:
        raise BenchError("wrong read_file answer: %r" % data[:300])


def proc_cpu_s(pid: int) -> Optional[float]:
    """User+system CPU seconds of a process, from /proc (None where unavailable)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Window:
    """When warm-up ends and measuring stops (set once all clients are initialized)."""

    start: float = 0.0
    end: float = 0.0
    go: threading.Event = field(default_factory=threading.Event)


@dataclass
class ClientStats:
    count: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str = ""


def client_loop(port: int, path: str, expected: dict[str, Any], ready: threading.Barrier,
                window: Window, stats: ClientStats) -> None:
    """One client thread: its own connection and session, then read_file in a loop."""
    client = McpClient(port, path)
    try:
        client.connect()
        client.initialize()
        check_answer(client.read_file(READ_PATH), expected)
        ready.wait()
        if not window.go.wait(HTTP_TIMEOUT_S):
            raise BenchError("never told to start")
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            began = time.perf_counter()
            if began >= window.end:
                break
            data = client.read_file(READ_PATH)
            done = time.perf_counter()
            if b'"isError":false' not in data:
                raise BenchError("read_file failed: %r" % data[:300])
            if began >= window.start and done <= window.end:
                stats.count += 1
                stats.latencies.append(done - began)
    except (OSError, http.client.HTTPException, BenchError, ValueError,
            threading.BrokenBarrierError) as exc:
        stats.error = "%s: %s" % (type(exc).__name__, exc)
        ready.abort()
    finally:
        client.close()


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests: int
    rps: float
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    server_cpu_ms_per_request: Optional[float]
    bench_cpu_s: float
    errors: list[str]


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def start_clients(port: int, path: str, expected: dict[str, Any], clients: int,
                  window: Window) -> tuple[list[threading.Thread], list[ClientStats],
                                           threading.Barrier]:
    ready = threading.Barrier(clients + 1, timeout=SPAWN_DEADLINE_S)
    stats = [ClientStats() for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(port, path, expected, ready, window, s))
               for s in stats]
    for t in threads:
        t.start()
    return threads, stats, ready


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


def run_load(pid: int, port: int, path: str, expected: dict[str, Any], clients: int,
             warmup: float, duration: float) -> LoadResult:
    window = Window()
    threads, stats, ready = start_clients(port, path, expected, clients, window)
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed; its error is reported below
    window.start = time.perf_counter() + warmup
    window.end = window.start + duration
    window.go.set()
    sleep_until(window.start)
    cpu0, bench0 = proc_cpu_s(pid), time.process_time()
    sleep_until(window.end)
    cpu1, bench1 = proc_cpu_s(pid), time.process_time()
    for t in threads:
        t.join(timeout=HTTP_TIMEOUT_S + 5)
    return summarize(clients, duration, stats, cpu0, cpu1, bench1 - bench0)


def summarize(clients: int, duration: float, stats: list[ClientStats], cpu0: Optional[float],
              cpu1: Optional[float], bench_cpu: float) -> LoadResult:
    total = sum(s.count for s in stats)
    latencies = [x for s in stats for x in s.latencies]
    cpu_per_req = None
    if cpu0 is not None and cpu1 is not None and total:
        cpu_per_req = round((cpu1 - cpu0) * 1000 / total, 3)
    return LoadResult(
        clients=clients, seconds=duration, requests=total, rps=round(total / duration, 1),
        p50_ms=_round(percentile(latencies, 0.50)), p99_ms=_round(percentile(latencies, 0.99)),
        server_cpu_ms_per_request=cpu_per_req, bench_cpu_s=round(bench_cpu, 2),
        errors=root_causes_first([s.error for s in stats if s.error]))


def root_causes_first(errors: list[str]) -> list[str]:
    """Distinct errors; a client that failed breaks the barrier for the rest, so the
    BrokenBarrierError echoes go last."""
    return sorted(set(errors), key=lambda e: (e.startswith("BrokenBarrierError"), e))


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------

def time_startup(target: Target, children: Children) -> float:
    """Seconds from spawn to the first answered initialize (fresh port, fresh process)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = children.spawn(target.argv(port), pipe_stdout=False)
    try:
        for _ in range(MAX_POLLS):
            if answers_initialize(port, target.mcp_path):
                return time.perf_counter() - t0
            if proc.poll() is not None:
                raise BenchError("%s exited (rc=%s): %s"
                                 % (target.name, proc.returncode, children.stderr_tail()))
            if time.perf_counter() - t0 > SPAWN_DEADLINE_S:
                break
            time.sleep(POLL_INTERVAL_S)
        raise BenchError("%s did not answer initialize within %.0f s"
                         % (target.name, SPAWN_DEADLINE_S))
    finally:
        children.kill(proc)


def startup_phase(targets: list[Target], children: Children, runs: int) -> dict[str, Any]:
    """Interleaved spawns (A, B, A, B, ...) so background load hits both alike.
    The first spawn of each is a discarded warm-up (page cache, bytecode caches)."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    for i in range(runs + 1):
        for target in targets:
            seconds = time_startup(target, children)
            if i:
                samples[target.name].append(seconds)
    return {name: {"median_ms": round(statistics.median(s) * 1000, 1),
                   "min_ms": round(min(s) * 1000, 1), "max_ms": round(max(s) * 1000, 1),
                   "samples_ms": [round(x * 1000, 1) for x in s]}
            for name, s in samples.items()}


def load_phase(targets: list[Target], children: Children, expected: dict[str, Any],
               client_counts: list[int], warmup: float,
               duration: float) -> dict[str, dict[str, Any]]:
    """Both servers up at once; runs interleave by client count (A1, B1, A16, B16)."""
    running: list[tuple[Target, int, int]] = []
    for target in targets:
        proc = children.spawn(target.argv(0), pipe_stdout=True)
        try:
            port = read_ready_line(proc, target.ready_prefix, SPAWN_DEADLINE_S)
        except BenchError as exc:
            raise BenchError("%s: %s\n%s" % (target.name, exc, children.stderr_tail())) from None
        running.append((target, proc.pid, port))
    out: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    for clients in client_counts:
        for target, pid, port in running:
            result = run_load(pid, port, target.mcp_path, expected, clients, warmup, duration)
            out[target.name]["c%d" % clients] = asdict(result)
            print("  %-8s %2d client(s): %8.1f rps%s" % (
                target.name, clients, result.rps,
                "  ERRORS: %s" % result.errors[:3] if result.errors else ""), flush=True)
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def compute_ratios(startup: dict[str, Any], load: dict[str, dict[str, Any]],
                   client_counts: list[int]) -> dict[str, Any]:
    pb, peer = "patchbay", "peer"
    out: dict[str, Any] = {"startup_peer_over_patchbay": {
        "value": ratio(startup[peer]["median_ms"], startup[pb]["median_ms"]),
        "target": TARGET_STARTUP}}
    for c in client_counts:
        key = "c%d" % c
        out["rps_patchbay_over_peer_%s" % key] = {
            "value": ratio(load[pb][key]["rps"], load[peer][key]["rps"]), "target": TARGET_RPS}
    for item in out.values():
        item["met"] = item["value"] is not None and item["value"] >= item["target"]
    return out


def print_table(startup: dict[str, Any], load: dict[str, dict[str, Any]],
                ratios: dict[str, Any], client_counts: list[int]) -> None:
    rows = [("startup median, ms", startup["patchbay"]["median_ms"],
             startup["peer"]["median_ms"], ratios["startup_peer_over_patchbay"])]
    for c in client_counts:
        key = "c%d" % c
        rows.append(("read_file rps, %d client%s" % (c, "s" if c > 1 else ""),
                     load["patchbay"][key]["rps"], load["peer"][key]["rps"],
                     ratios["rps_patchbay_over_peer_%s" % key]))
    print("\n%-26s %10s %10s %8s %8s" % ("", "patchbay", "sdk peer", "ratio", "target"))
    for label, a, b, r in rows:
        print("%-26s %10.1f %10.1f %7sx %6s %s" % (
            label, a, b, r["value"], ">=%g" % r["target"], "ok" if r["met"] else "MISSED"))
    print("\n%-32s %10s %10s" % ("detail", "patchbay", "sdk peer"))
    for c in client_counts:
        key = "c%d" % c
        for metric in ("p50_ms", "p99_ms", "server_cpu_ms_per_request", "bench_cpu_s"):
            a, b = load["patchbay"][key][metric], load["peer"][key][metric]
            print("%-32s %10s %10s" % ("%s %s" % (key, metric), a, b))
    print("(ratios: rps is patchbay/peer, startup is peer/patchbay; above 1 favours PatchBay)")


def git_head() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=MAIN,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def package_version(name: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "implementation":
            platform.python_implementation(), "platform": platform.platform(),
            "loadavg_start": os.getloadavg(), "mcp": package_version("mcp"),
            "uvicorn": package_version("uvicorn"), "patchbay_commit": git_head(),
            "patchbay_sha256": hashlib.sha256((MAIN / "patchbay.py").read_bytes()).hexdigest()}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

def build_targets(home: Path, repo: Path) -> list[Target]:
    py = sys.executable  # one interpreter for both, so startup compares servers, not Pythons

    def patchbay(port: int) -> list[str]:
        return [py, str(MAIN / "patchbay.py"), "--home", str(home), "serve",
                "--root", str(repo), "--port", str(port)]

    def peer(port: int) -> list[str]:
        return [py, str(HERE / "peer_sdk_server.py"), "--root", str(repo),
                "--port", str(port)]

    return [Target("patchbay", patchbay, "patchbay listening on"),
            Target("peer", peer, "peer listening on")]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PatchBay vs the MCP Python SDK: startup and rps.")
    p.add_argument("--quick", action="store_true",
                   help="short run (3 startups, 0.5 s warm-up, 1.5 s per load step)")
    p.add_argument("--runs", type=int, help="startup spawns per server (default 7)")
    p.add_argument("--duration", type=float, help="seconds measured per load step (default 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per load step (default 1)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16],
                   help="client counts to measure (default 1 16)")
    p.add_argument("--readme-lines", type=int, default=200,
                   help="lines in the README.md that read_file fetches (default 200)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = p.parse_args(argv)
    quick = {"runs": 3, "duration": 1.5, "warmup": 0.5}
    full = {"runs": 7, "duration": 3.0, "warmup": 1.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.runs < 1 or args.duration <= 0 or args.warmup < 0 or min(args.clients) < 1:
        p.error("--runs and --clients must be at least 1, --duration above 0")
    if max(args.clients) > 30:
        p.error("PatchBay caps connections at 32; keep --clients at 30 or below")
    return args


def raise_on_signal(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt("signal %d" % signum)


def run(args: argparse.Namespace, workdir: Path, children: Children) -> dict[str, Any]:
    expected = make_repo(workdir / "repo", args.readme_lines)
    targets = build_targets(workdir / "home", workdir / "repo")
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    print("startup: %d spawns per server (+1 warm-up each)..." % args.runs, flush=True)
    startup = startup_phase(targets, children, args.runs)
    print("load: %.1f s warm-up + %.1f s per step..." % (args.warmup, args.duration), flush=True)
    load = load_phase(targets, children, expected, args.clients, args.warmup, args.duration)
    ratios = compute_ratios(startup, load, args.clients)
    print_table(startup, load, ratios, args.clients)
    machine["loadavg_end"] = os.getloadavg()
    return {"date": started.isoformat(timespec="seconds"), "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "workload": {"tool": "read_file", "path": READ_PATH,
                         "bytes": len(expected["text"].encode()),
                         "lines": expected["total_lines"]},
            "startup": startup, "load": load, "ratios": ratios}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_signal)
    with tempfile.TemporaryDirectory(prefix="patchbay-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            doc = run(args, Path(tmp), children)
        except BenchError as exc:
            print("bench failed: %s" % exc, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return 130
        finally:
            children.kill_all()
    write_json(args.out, doc)
    print("wrote %s" % args.out)
    return 0 if all(r["met"] for r in doc["ratios"].values()) else 3


if __name__ == "__main__":
    sys.exit(main())

"""Worker-start benchmark: PatchBay's `codex_worker_start` against the same work by hand.

    .cache/venv/bin/python bench/bench_worker.py            # full: 7 samples (+1 warm-up)
    .cache/venv/bin/python bench/bench_worker.py --quick    # smoke: 3 samples (+1 warm-up)

On a small generated repository (50 files) and a large one (10,000 committed files) it
times, alternating the two, from the first byte of work until the fake model receives
Codex's first `POST /v1/responses` (the prompt marker identifies the sample):
  patchbay  MCP `tools/call codex_worker_start` over HTTP to an in-process PatchBay
            (hardened git, a worktree on branch patchbay/NAME, a turn thread, Popen);
  baseline  `git worktree add -b <branch> <dir> HEAD`, then Popen of the same `codex exec`
            command with the same environment and the prompt on stdin.
Both runs end in the same real Codex CLI (tests/fake_model.py finds it) talking to the
same fake Responses server, so "spawned" means the same for both: spawn plus Codex's own
startup. Prints medians, overhead (ms) and ratio; writes bench/results/worker.json.

Unless --no-profile, PatchBay's steps are timed in-process by wrapping instance methods
(every git call, the turn thread reaching Popen, the state write after it); this edits no
file and costs microseconds. Loopback only; every wait has a deadline and every loop a
count bound; every Codex process group is killed on the way out, errors included.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Optional, Protocol

HERE = Path(__file__).resolve().parent
MAIN = HERE.parent
for _path in (MAIN / "tests", MAIN):
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

import patchbay  # noqa: E402
from bench_core import BenchError, McpClient, git_head, rpc, write_json  # noqa: E402
from fake_model import (FAKE_API_KEY, MODEL_SLUG, FakeModel, Step,  # noqa: E402
                        find_codex_bin, input_texts, write_codex_home,
                        CODEX_HOME_BASE)
from pbtest import InProcessServer, make_app  # noqa: E402

POST_DEADLINE_S = 60.0     # Codex must reach the fake model by then
EXIT_DEADLINE_S = 60.0     # a one-message turn must end by then
EXIT_POLL_S = 0.005
MAX_EXIT_POLLS = 20_000    # bound on exit polls (well past the deadline)
STATUS_WAIT_S = 5          # codex_status wait_s per poll
MAX_STATUS_POLLS = 24      # 24 x 5 s: two minutes at most per worker
GIT_TIMEOUT_S = 120.0
KILL_GRACE_S = 5.0
FILES_PER_DIR = 100
IDLE_STATES = ("idle", "failed", "done", "cancelled", "interrupted")


# ---------------------------------------------------------------------------------------
# Repositories
# ---------------------------------------------------------------------------------------

def bench_git(cwd: Path, *args: str, env: Optional[dict[str, str]] = None) -> str:
    """Plain git, as a person would run it; a failure is a BenchError."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=GIT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError("git %s timed out" % args[0]) from None
    if out.returncode != 0:
        raise BenchError("git %s failed: %s" % (" ".join(args[:2]), out.stderr.strip()[-300:]))
    return out.stdout


def commit_env() -> dict[str, str]:
    fixed = "2024-01-01T00:00:00Z"
    return dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
                GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com",
                GIT_AUTHOR_DATE=fixed, GIT_COMMITTER_DATE=fixed, GIT_CONFIG_NOSYSTEM="1",
                GIT_CONFIG_GLOBAL=os.devnull)


def module_text(i: int) -> str:
    body = "".join("    total += %d * step  # line %d\n" % (i + k, k) for k in range(8))
    return ('"""Generated module %d."""\n\n\ndef compute_%d(step: int) -> int:\n'
            "    total = 0\n%s    return total\n" % (i, i, body))


def make_repo(root: Path, files: int) -> Path:
    """A committed repository of exactly `files` files: a README and modules in
    directories of FILES_PER_DIR."""
    root.mkdir(parents=True)
    (root / "README.md").write_text("# Bench repository\n\n%d files.\n" % files)
    for i in range(files - 1):
        folder = root / ("pkg%03d" % (i // FILES_PER_DIR))
        if i % FILES_PER_DIR == 0:
            folder.mkdir()
        (folder / ("mod%05d.py" % i)).write_text(module_text(i))
    env = commit_env()
    bench_git(root, "init", "-q", "-b", "main", env=env)
    bench_git(root, "add", "-A", env=env)
    bench_git(root, "commit", "-q", "-m", "generated", env=env)
    tracked = bench_git(root, "ls-files", "-z", env=env).count("\0")
    if tracked != files:
        raise BenchError("generated repo tracks %d files, not %d" % (tracked, files))
    return root


def verify_clean(repo: Path, branch: str, workdir: Path) -> None:
    """After a sample: no worktree directory, no branch, only the main worktree."""
    if workdir.exists():
        raise BenchError("worktree %s was not removed" % workdir.name)
    if bench_git(repo, "branch", "--list", branch).strip():
        raise BenchError("branch %s was not deleted" % branch)
    listed = bench_git(repo, "worktree", "list", "--porcelain").count("worktree ")
    if listed != 1:
        raise BenchError("%d worktrees left in %s" % (listed, repo.name))


# ---------------------------------------------------------------------------------------
# The fake model, with arrival times
# ---------------------------------------------------------------------------------------

class StampedModel(FakeModel):
    """tests/fake_model.py's Responses server, noting when each POST /v1/responses
    arrives (time.perf_counter(), stamped as soon as the body is read) and its user text."""

    def __init__(self) -> None:
        super().__init__([])
        self.arrivals: list[tuple[float, str]] = []
        self.arrived = threading.Condition()

    def _next_step(self, body: Any) -> tuple[int, Step]:
        now = time.perf_counter()
        text = "\n".join(input_texts(body))
        with self.arrived:
            self.arrivals.append((now, text))
            self.arrived.notify_all()
        return super()._next_step(body)

    def _find(self, marker: str, since: float) -> Optional[float]:
        return next((t for t, text in self.arrivals if t >= since and marker in text), None)

    def first_post(self, marker: str, since: float) -> float:
        """When the first request carrying `marker` arrived (waits up to the deadline)."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: self._find(marker, since) is not None,
                                         POST_DEADLINE_S):
                raise BenchError("codex never reached the fake model within %.0f s"
                                 % POST_DEADLINE_S)
            found = self._find(marker, since)
        assert found is not None
        return found


# ---------------------------------------------------------------------------------------
# Timing PatchBay's steps in-process
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mark:
    label: str
    start: float
    end: float
    name: str = ""


def git_label(args: list[str]) -> str:
    """`git worktree add`, `git rev-parse HEAD^{commit}`, `git config`, ..."""
    words = [a for a in args if not a.startswith("-")]
    if words[:1] == ["worktree"]:
        return "git worktree " + words[1]
    if words[:1] == ["rev-parse"]:
        return "git rev-parse " + args[-1]
    return "git " + (words[0] if words else args[0])


class Probe:
    """Wraps methods of one App's instances (never the class, never the file): each git
    call, the turn thread building argv just before Popen, and `_changed` right after
    Popen (its duration is the state.json write before the prompt goes to stdin)."""

    def __init__(self) -> None:
        self.marks: list[Mark] = []

    def install(self, app: patchbay.App) -> None:
        self._wrap_git(app.git)
        self._wrap_argv(app.runner)
        self._wrap_changed(app.runner)

    def _wrap_git(self, git: patchbay.Git) -> None:
        original = git.call

        def call(cwd: str, args: list[str], *rest: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(cwd, args, *rest, **kw)
            finally:
                self.marks.append(Mark(git_label(args), start, time.perf_counter()))

        setattr(git, "call", call)

    def _wrap_argv(self, runner: patchbay.CodexRunner) -> None:
        original = runner._argv

        def argv(run: patchbay.Run) -> list[str]:
            self.marks.append(Mark("turn thread at Popen", time.perf_counter(), 0.0, run.name))
            return original(run)

        setattr(runner, "_argv", argv)

    def _wrap_changed(self, runner: patchbay.CodexRunner) -> None:
        original = runner._changed

        def changed(run: patchbay.Run, persist: bool = True) -> None:
            start = time.perf_counter()
            try:
                original(run, persist)
            finally:
                if persist and run.state == "running" and run.proc is not None:
                    self.marks.append(Mark("spawned", start, time.perf_counter(), run.name))

        setattr(runner, "_changed", changed)

    def find(self, label: str, name: str) -> Optional[Mark]:
        return next((m for m in reversed(self.marks) if m.label == label and m.name == name),
                    None)

    def git_calls(self, since: float, until: float) -> list[Mark]:
        return [m for m in self.marks if m.label.startswith("git ") and since <= m.start <= until]


# ---------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One timed start. total: request/first command -> first POST at the fake model;
    spawn: -> Popen returned (PatchBay: only with the probe)."""

    total_ms: float
    spawn_ms: Optional[float]
    parts_ms: dict[str, float] = field(default_factory=dict)
    response_ms: Optional[float] = None


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def call_tool(client: McpClient, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """One tools/call; the structured result, or a BenchError if it failed."""
    client.next_id += 1
    status, _, data = client.post(rpc(client.next_id, "tools/call",
                                      {"name": name, "arguments": args}))
    result = json.loads(data).get("result") if status == 200 else None
    if not isinstance(result, dict) or result.get("isError"):
        raise BenchError("%s answered %d: %r" % (name, status, data[:300]))
    content = result.get("structuredContent")
    return content if isinstance(content, dict) else {}


class PatchbayMode:
    """codex_worker_start through MCP on an in-process PatchBay; codex_stop discard=true."""

    label = "patchbay"

    def __init__(self, app: patchbay.App, url_port: int, repo: Path, fake: StampedModel,
                 probe: Optional[Probe], pgids: set[int]) -> None:
        self.app, self.repo, self.fake, self.probe, self.pgids = app, repo, fake, probe, pgids
        self.client = McpClient(url_port, "/mcp")
        self.client.connect()
        self.client.initialize()
        root = app.workspaces.get(None)
        self.ws_key = app.runner.key(root)
        self.trees = Path(app.runner.trees_dir) / self.ws_key

    def sample(self, name: str, prompt: str, marker: str) -> Sample:
        self.client.next_id += 1
        body = rpc(self.client.next_id, "tools/call", {
            "name": "codex_worker_start", "arguments": {"name": name, "brief": prompt}})
        self.client.close()
        self.client.connect()  # a fresh connection, opened outside the timed window
        t0 = time.perf_counter()
        status, _, data = self.client.post(body)
        t_resp = time.perf_counter()
        if status != 200 or b'"isError":false' not in data:
            raise BenchError("codex_worker_start answered %d: %r" % (status, data[:300]))
        t_post = self.fake.first_post(marker, t0)
        self._note_pgid(name)
        self.finish(name)
        sample = self._timed(name, t0, t_post)
        sample.response_ms = ms(t_resp - t0)
        return sample

    def _note_pgid(self, name: str) -> None:
        run = self.app.runner.runs.get((self.ws_key, name))
        if run is not None and run.pgid:
            self.pgids.add(run.pgid)

    def _timed(self, name: str, t0: float, t_post: float) -> Sample:
        if self.probe is None:
            return Sample(ms(t_post - t0), None)
        at_popen = self.probe.find("turn thread at Popen", name)
        spawned = self.probe.find("spawned", name)
        gits = self.probe.git_calls(t0, t_post)
        if at_popen is None or spawned is None or not gits:
            raise BenchError("the probe missed a step of %s" % name)
        parts = {"request to first git call": ms(gits[0].start - t0)}
        for mark in gits:
            parts[mark.label] = round(parts.get(mark.label, 0.0) + ms(mark.end - mark.start), 2)
        spent = sum(m.end - m.start for m in gits)
        parts["between git calls"] = ms(gits[-1].end - gits[0].start - spent)
        parts["enqueue to turn thread"] = ms(at_popen.start - gits[-1].end)
        parts["popen"] = ms(spawned.start - at_popen.start)
        parts["state write before stdin"] = ms(spawned.end - spawned.start)
        parts["prompt + codex startup"] = ms(t_post - spawned.end)
        return Sample(ms(t_post - t0), ms(spawned.start - t0), parts)

    def finish(self, name: str) -> None:
        """Wait (bounded) for the turn to end, then discard worker, worktree and branch."""
        for _ in range(MAX_STATUS_POLLS):
            status = call_tool(self.client, "codex_status", {"name": name,
                                                              "wait_s": STATUS_WAIT_S})
            if status.get("state") in IDLE_STATES:
                break
        else:
            raise BenchError("%s never finished its turn" % name)
        if status.get("state") != "idle":
            raise BenchError("%s ended %s: %s" % (name, status.get("state"), status.get("error")))
        stopped = call_tool(self.client, "codex_stop", {"name": name, "discard": True})
        if not stopped.get("discarded"):
            raise BenchError("codex_stop did not discard %s: %r" % (name, stopped))
        verify_clean(self.repo, "patchbay/" + name, self.trees / name)

    def close(self) -> None:
        self.client.close()


class BaselineMode:
    """`git worktree add -b <branch> <dir> HEAD` + Popen of the same codex command."""

    label = "baseline"

    def __init__(self, repo: Path, trees: Path, codex_bin: str, fake: StampedModel,
                 pgids: set[int]) -> None:
        self.repo, self.trees, self.codex_bin, self.fake = repo, trees, codex_bin, fake
        self.pgids = pgids
        # The very environment PatchBay gives Codex: its allowlist plus codex.env.
        self.env = patchbay.child_env(extra={"FAKE_API_KEY": FAKE_API_KEY})
        trees.mkdir(parents=True, exist_ok=True)

    def argv(self, workdir: Path) -> list[str]:
        return [self.codex_bin, "exec", "--json", "--skip-git-repo-check", "-C", str(workdir),
                "-s", "workspace-write", "-m", MODEL_SLUG, "-"]

    def sample(self, name: str, prompt: str, marker: str) -> Sample:
        branch, workdir = "bench/" + name, self.trees / name
        t0 = time.perf_counter()
        run_bounded(["git", "worktree", "add", "-b", branch, str(workdir), "HEAD"], self.repo)
        t_tree = time.perf_counter()
        proc = subprocess.Popen(self.argv(workdir), cwd=workdir, env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        t_popen = time.perf_counter()
        self.pgids.add(proc.pid)
        drains = feed_and_drain(proc, prompt)
        try:
            t_post = self.fake.first_post(marker, t0)
        finally:
            end_group(proc, drains)
        if proc.returncode != 0:
            raise BenchError("baseline codex exited with %s" % proc.returncode)
        self.cleanup(branch, workdir)
        parts = {"git worktree add": ms(t_tree - t0), "popen": ms(t_popen - t_tree),
                 "prompt + codex startup": ms(t_post - t_popen)}
        return Sample(ms(t_post - t0), ms(t_popen - t0), parts)

    def cleanup(self, branch: str, workdir: Path) -> None:
        bench_git(self.repo, "worktree", "remove", "--force", str(workdir))
        bench_git(self.repo, "branch", "-D", branch)
        verify_clean(self.repo, branch, workdir)

    def close(self) -> None:
        return None


def run_bounded(argv: list[str], cwd: Path) -> None:
    """Run a command to its end as a shell would: a blocking wait, no polling. (With
    subprocess.run(timeout=...) CPython polls for the exit with growing sleeps, which
    adds about 1 ms per call; a timer enforces the deadline instead.)"""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(GIT_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        _, err = proc.communicate()
    finally:
        timer.cancel()
    if proc.returncode != 0:
        raise BenchError("%s failed (%s): %s" % (" ".join(argv[:3]), proc.returncode,
                                                 err.decode(errors="replace")[-300:]))


def drain(stream: IO[bytes]) -> None:
    for _ in iter(lambda: stream.read(65536), b""):
        pass
    stream.close()


def feed_and_drain(proc: subprocess.Popen[bytes], prompt: str) -> list[threading.Thread]:
    """As PatchBay does: the prompt on stdin, then EOF; stdout and stderr read to the end."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(prompt.encode("utf-8"))
    finally:
        proc.stdin.close()
    threads = [threading.Thread(target=drain, args=(s,), daemon=True)
               for s in (proc.stderr, proc.stdout)]
    for t in threads:
        t.start()
    return threads


def end_group(proc: subprocess.Popen[bytes], drains: list[threading.Thread]) -> None:
    """Wait (bounded) for codex to exit without reaping it, so its group id cannot be
    reused; kill whatever is left in the group; then reap."""
    end = time.monotonic() + EXIT_DEADLINE_S
    for _ in range(MAX_EXIT_POLLS):
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        if time.monotonic() > end:
            break
        time.sleep(EXIT_POLL_S)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=KILL_GRACE_S)
    for t in drains:
        t.join(KILL_GRACE_S)


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------

class Mode(Protocol):
    """PatchbayMode or BaselineMode."""

    label: str

    def sample(self, name: str, prompt: str, marker: str) -> Sample: ...

    def close(self) -> None: ...


def quiesce(settle_s: float) -> None:
    """Between samples: flush what the last checkout and removal left dirty (10,000 files
    are megabytes of data and metadata) so its writeback does not land on the next
    sample, then pause briefly. The disk itself still varies with other load."""
    os.sync()
    time.sleep(settle_s)


class Stop:
    """SIGINT/SIGTERM: the first one stops the run after the current sample (so no git
    or Codex child is left writing into the temporary directory); a second one stops
    at once; once cleanup has begun, signals wait for it (it is bounded)."""

    def __init__(self) -> None:
        self.requested = False
        self.cleaning = False

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.cleaning:
            print("cleaning up; stopping codex and removing worktrees first", file=sys.stderr)
            return
        if self.requested:
            raise KeyboardInterrupt("signal %d" % signum)
        self.requested = True
        print("stopping after this sample (signal again to stop at once)", file=sys.stderr)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt("stop requested")


def run_repo(tag: str, modes: list[Mode], runs: int, settle_s: float,
             stop: Stop) -> dict[str, list[Sample]]:
    """runs + 1 rounds (the first is a discarded warm-up); the order alternates each
    round so neither mode always follows the other's cleanup."""
    samples: dict[str, list[Sample]] = {m.label: [] for m in modes}
    for i in range(runs + 1):
        order = modes if i % 2 == 0 else modes[::-1]
        shown = []
        for mode in order:
            stop.check()
            marker = uuid.uuid4().hex[:16]
            name = "%s-%s-%d-%s" % (mode.label[:2], tag, i, marker[:6])
            prompt = "Benchmark sample %s: reply done." % marker
            sample = mode.sample(name, prompt, marker)
            if i:
                samples[mode.label].append(sample)
            shown.append("%s %7.1f ms" % (mode.label, sample.total_ms))
            quiesce(settle_s)
        print("  %-5s round %d%s: %s" % (tag, i, " (warm-up)" if not i else "",
                                          "  ".join(shown)), flush=True)
    return samples


def median_or_none(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


SHARED_STEPS = ("git worktree add", "prompt + codex startup")


def own_steps_ms(sample: Sample) -> Optional[float]:
    """Everything but the two steps both sides share (the checkout and Codex's startup):
    far less noisy than the totals, which the disk and Codex dominate."""
    if not all(k in sample.parts_ms for k in SHARED_STEPS):
        return None
    return round(sample.total_ms - sum(sample.parts_ms[k] for k in SHARED_STEPS), 2)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    totals = [s.total_ms for s in samples]
    keys = list(dict.fromkeys(k for s in samples for k in s.parts_ms))
    return {"median_ms": round(statistics.median(totals), 2), "min_ms": min(totals),
            "max_ms": max(totals), "samples_ms": totals,
            "spawn_median_ms": median_or_none([s.spawn_ms for s in samples]),
            "response_median_ms": median_or_none([s.response_ms for s in samples]),
            "own_steps_median_ms": median_or_none([own_steps_ms(s) for s in samples]),
            "parts_median_ms": {k: round(statistics.median([s.parts_ms.get(k, 0.0)
                                                            for s in samples]), 2)
                                for k in keys},
            "parts_samples_ms": [s.parts_ms for s in samples if s.parts_ms]}


def compare(pb: list[Sample], base: list[Sample], files: int) -> dict[str, Any]:
    a, b = summarize(pb), summarize(base)
    paired = [p.total_ms - q.total_ms for p, q in zip(pb, base)]
    out: dict[str, Any] = {
        "files": files, "patchbay": a, "baseline": b,
        "overhead_ms": round(a["median_ms"] - b["median_ms"], 2),
        "paired_overhead_median_ms": round(statistics.median(paired), 2),
        "ratio": round(a["median_ms"] / b["median_ms"], 3)}
    if a["spawn_median_ms"] is not None:
        out["spawn_overhead_ms"] = round(a["spawn_median_ms"] - b["spawn_median_ms"], 2)
        out["spawn_ratio"] = round(a["spawn_median_ms"] / b["spawn_median_ms"], 3)
    if a["own_steps_median_ms"] is not None:
        out["own_steps_overhead_ms"] = round(a["own_steps_median_ms"]
                                             - b["own_steps_median_ms"], 2)
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("\n%-6s %6s %12s %12s %12s %12s %7s" % (
        "repo", "files", "patchbay ms", "baseline ms", "overhead ms", "paired ms", "ratio"))
    for tag, r in results.items():
        print("%-6s %6d %12.1f %12.1f %+12.1f %+12.1f %6.2fx" % (
            tag, r["files"], r["patchbay"]["median_ms"], r["baseline"]["median_ms"],
            r["overhead_ms"], r["paired_overhead_median_ms"], r["ratio"]))
    print("(medians; request/first command -> Codex's first POST /v1/responses)")
    for tag, r in results.items():
        if "spawn_overhead_ms" in r:
            print("%-6s to Popen returned: patchbay %.1f ms, baseline %.1f ms (%+.1f ms, "
                  "%.2fx); tools/call answered after %.1f ms" % (
                      tag, r["patchbay"]["spawn_median_ms"], r["baseline"]["spawn_median_ms"],
                      r["spawn_overhead_ms"], r["spawn_ratio"],
                      r["patchbay"]["response_median_ms"]))
        if "own_steps_overhead_ms" in r:
            print("%-6s own steps (all but checkout and Codex startup): patchbay %.1f ms, "
                  "baseline %.1f ms (%+.1f ms)" % (
                      tag, r["patchbay"]["own_steps_median_ms"],
                      r["baseline"]["own_steps_median_ms"], r["own_steps_overhead_ms"]))
    for tag, r in results.items():
        print_parts(tag, r)


def print_parts(tag: str, r: dict[str, Any]) -> None:
    pb, base = r["patchbay"]["parts_median_ms"], r["baseline"]["parts_median_ms"]
    if not pb:
        return
    print("\n%s repo, where the time goes (medians, ms)   %10s %10s" % (tag, "patchbay",
                                                                       "baseline"))
    for key in list(dict.fromkeys([*pb, *base])):
        print("  %-40s %10s %10s" % (key, pb.get(key, "-"), base.get(key, "-")))


def tool_version(argv: list[str], env: Optional[dict[str, str]] = None) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or out.stderr.strip())[:200] or None


def machine_info(codex_bin: str) -> dict[str, Any]:
    dirty = tool_version(["git", "-C", str(MAIN), "status", "--porcelain", "--", "patchbay.py"])
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": os.getloadavg(), "git": tool_version(["git", "--version"]),
            "codex": tool_version([codex_bin, "--version"]), "codex_bin": codex_bin,
            "patchbay_commit": git_head(), "patchbay_modified_since_commit": bool(dirty),
            "patchbay_sha256": hashlib.sha256((MAIN / "patchbay.py").read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

class Session:
    """Everything one run starts: the fake model, servers, modes, Codex process groups."""

    def __init__(self, workdir: Path, codex_bin: str, profile: bool) -> None:
        self.workdir, self.codex_bin, self.profile = workdir, codex_bin, profile
        self.fake = StampedModel().start()
        self.pgids: set[int] = set()
        self.servers: list[InProcessServer] = []
        self.modes: list[Mode] = []
        self.saved_env: dict[str, Optional[str]] = {}

    def use_codex_env(self) -> None:
        """PatchBay hands Codex its own environment (allowlisted), so it must hold the
        fake model's CODEX_HOME and key; the baseline copies exactly that environment."""
        env = write_codex_home(self.workdir / "codex-home", self.fake.url)
        self.saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    def modes_for(self, tag: str, repo: Path) -> list[Mode]:
        profile = {"bin": self.codex_bin, "model": MODEL_SLUG, "env": ["FAKE_API_KEY"]}
        app = make_app(repo, self.workdir / ("home-" + tag), "worker", codex=profile)
        probe = Probe() if self.profile else None
        if probe is not None:
            probe.install(app)
        server = InProcessServer(app)
        self.servers.append(server)
        modes: list[Mode] = [
            PatchbayMode(app, server.port, repo, self.fake, probe, self.pgids),
            BaselineMode(repo, self.workdir / ("trees-" + tag), self.codex_bin, self.fake,
                         self.pgids)]
        self.modes += modes
        return modes

    def close(self) -> None:
        for mode in self.modes:
            mode.close()
        for server in self.servers:
            server.stop()  # App.close stops any turn still running
        sweep_groups(self.pgids)
        self.fake.close()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sweep_groups(pgids: set[int]) -> int:
    """SIGKILL every recorded process group that still has a Codex process in it."""
    doomed: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                pgid = int(f.read().rsplit(b")", 1)[1].split()[2])
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if pgid in pgids and b"codex" in cmdline:
            doomed.add(pgid)
    for pgid in doomed:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)


def run(args: argparse.Namespace, workdir: Path, session: Session,
        stop: Stop) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info(session.codex_bin)
    session.use_codex_env()
    results: dict[str, dict[str, Any]] = {}
    for tag, files in (("small", args.small_files), ("large", args.large_files)):
        t0 = time.monotonic()
        repo = make_repo(workdir / ("repo-" + tag), files)
        print("%s repo: %d files generated and committed in %.1f s" % (
            tag, files, time.monotonic() - t0), flush=True)
        modes = session.modes_for(tag, repo)
        stop.check()
        samples = run_repo(tag, modes, args.runs, args.settle, stop)
        results[tag] = compare(samples["patchbay"], samples["baseline"], files)
    print_table(results)
    machine["loadavg_end"] = os.getloadavg()
    return {"date": started.isoformat(timespec="seconds"), "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "measure": "ms from the tools/call request (patchbay) or the first git command "
                       "(baseline) until the fake model receives Codex's first "
                       "POST /v1/responses; spawn_* until Popen returned",
            "results": results}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PatchBay codex_worker_start vs the same by hand.")
    p.add_argument("--quick", action="store_true", help="3 samples per mode and repo")
    p.add_argument("--runs", type=int, help="samples per mode and repo (default 7, +1 warm-up)")
    p.add_argument("--small-files", type=int, default=50, help="files in the small repo")
    p.add_argument("--large-files", type=int, default=10_000, help="files in the large repo")
    p.add_argument("--settle", type=float, default=0.2,
                   help="seconds of pause after each sample's cleanup and sync "
                        "(default 0.2)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="do not wrap PatchBay's methods (totals only)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "worker.json")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 7
    if args.runs < 1 or args.small_files < 2 or args.large_files < 2 or args.settle < 0:
        p.error("--runs must be at least 1, file counts at least 2, --settle not negative")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    codex_bin = find_codex_bin()
    if codex_bin is None or shutil.which("git") is None:
        print("bench needs git and the Codex CLI (sh tests/run installs it)", file=sys.stderr)
        return 1
    stop = Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Outside /tmp: Codex keeps no sandbox helper links in a CODEX_HOME there.
    with tempfile.TemporaryDirectory(prefix="patchbay-bench-worker-", dir=CODEX_HOME_BASE,
                                     ignore_cleanup_errors=True) as tmp:
        session = Session(Path(tmp), codex_bin, args.profile)
        try:
            doc = run(args, Path(tmp), session, stop)
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            print("bench failed: %s" % exc, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; codex processes stopped", file=sys.stderr)
            return 130
        finally:
            stop.cleaning = True
            session.close()
    write_json(args.out, doc)
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

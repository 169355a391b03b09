#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["PyYAML>=6"]
# ///
# SPDX-License-Identifier: MIT
"""PatchBay: let ChatGPT and any MCP client work on local git repositories.

Run it:
    python3 patchbay.py serve --root /path/to/repo      # HTTP on 127.0.0.1:8765
    python3 patchbay.py stdio --root /path/to/repo      # MCP over stdin/stdout
    pipx run patchbay.py serve --root .                 # same, via the PEP 723 block

Endpoints (serve):
    /mcp                 MCP Streamable HTTP (revisions 2025-03-26, 2025-06-18, 2025-11-25)
    POST /actions/<tool> custom-GPT Actions; GET /openapi.json describes them
    GET /health, GET /privacy

Subcommands (`patchbay.py COMMAND --help` for flags):
    serve, stdio              the two ways to run it
    channel, token, rotate-token, access, workspace
                              the ChatGPT channel: token, TTL, workspace registry
    tunnel                    cloudflared or ngrok for a server that is already running
    jobs                      Codex workers and jobs in the terminal
    status, doctor, verify, api-smoke
                              what runs, what is missing, does it work end to end

Security: every tool goes through one path guard (roots pinned as directory fds, no `..`,
no symlink leaves a root, blocked secret files), every HTTP route but the public GETs
needs the bearer token (or `?patchbay_token=`), Host and Origin are checked before
anything else, and a server bound beyond loopback or behind a tunnel refuses to start
without a token. Tokens never reach logs, child processes or tool results. The profile
(`readonly`, `worker`, `power`, `full`) fixes the tool list at start; nothing widens it.

Contents (grep -n '^# §'):
    §1 Errors · §2 Utilities · §3 Config and profiles · §4 Channel and auth ·
    §5 Path guard · §6 Git · §7 Edits and the command policy · §8 Codex runner ·
    §9 Tools · §10 MCP · §11 OpenAPI and Actions · §12 HTTP server · §13 Tunnel · §14 CLI
"""

from __future__ import annotations

import argparse
import collections
import datetime
import errno
import fnmatch
import glob
import hashlib
import hmac
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import signal
import selectors
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Tuple, Union

__version__ = "0.1.0"

if sys.version_info < (3, 10):  # written so that older interpreters can still parse it
    sys.stderr.write("patchbay: error: Python 3.10 or newer is required\n")
    sys.exit(2)

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

NAME = "patchbay"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
ENV_HOME = "PATCHBAY_HOME"
ENV_TOKEN = "PATCHBAY_HTTP_TOKEN"
ENV_ROOT = "PATCHBAY_ROOT"
ENV_PROFILE = "PATCHBAY_PROFILE"
QUERY_TOKEN = "patchbay_token"

MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")  # newest first
MCP_BATCH_VERSIONS = ("2025-03-26",)  # batching was removed in 2025-06-18
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)

DEFAULT_BLOCKED_GLOBS = (
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".netrc",
    ".git-credentials", ".npmrc", ".pypirc", "*.kdbx", ".aws/credentials", ".ssh/*")

DEFAULT_LIMITS: Dict[str, int] = {
    "body_bytes": 4 * 1024 * 1024,      # HTTP request body cap (413 above it)
    "read_bytes": 8 * 1024 * 1024,      # largest file read_file/fetch will open
    "result_chars": 100_000,            # ChatGPT Actions refuse payloads of 100k chars
    "text_chars": 80_000,               # main text field of one result, leaves room for JSON
    "search_timeout_s": 10,
    "max_connections": 32,
    "request_timeout_s": 20,            # per socket read: slow clients are dropped
    "max_sessions": 64,
    "session_idle_s": 3600,
    "output_bytes": 40_000,             # run_command: stdout kept (head and tail); stderr half
    "actions_timeout_s": 40,            # ChatGPT gives up on an Action after 45 s
    "max_parallel_turns": 3,
    "turn_timeout_s": 45 * 60,
    "audit_bytes": 5 * 1024 * 1024,
}
# The largest value a profile may give each limit (the smallest is 1): far above any real
# need, low enough that a typo cannot ask for terabytes or a timeout of centuries.
LIMIT_MAX: Dict[str, int] = {
    "body_bytes": 1 << 30, "read_bytes": 1 << 30, "result_chars": 1 << 30,
    "text_chars": 1 << 30, "output_bytes": 1 << 30, "audit_bytes": 1 << 40,
    "max_connections": 1 << 20, "max_sessions": 1 << 20, "max_parallel_turns": 256,
    "search_timeout_s": 86400, "request_timeout_s": 86400, "actions_timeout_s": 86400,
    "session_idle_s": 365 * 86400, "turn_timeout_s": 365 * 86400,
}
PORT_RANGE = (0, 65535)  # 0: any free port
TTL_RANGE = (1, 366 * 24 * 60)  # minutes: up to a year

class Log:
    """Lines to stderr. `verbose` (set once by -v) adds info lines: the access log."""

    def __init__(self) -> None:
        self.verbose = False
        self._lock = threading.Lock()

    def info(self, fmt: str, *args: Any) -> None:
        if self.verbose:
            self._write(fmt, args)

    def warning(self, fmt: str, *args: Any) -> None:
        self._write(fmt, args)

    error = warning

    def _write(self, fmt: str, args: Tuple[Any, ...]) -> None:
        with self._lock:
            sys.stderr.write("patchbay: %s\n" % (fmt % args if args else fmt))
            sys.stderr.flush()


log = Log()


# =======================================================================================
# §1 Errors
# =======================================================================================

# One table maps each machine code to its HTTP status, so both front doors agree.
ERROR_STATUS = {
    "INVALID_ARG": 400, "BINARY_FILE": 415, "NOT_A_FILE": 400, "DENIED_PATH": 403,
    "BLOCKED_FILE": 403, "POLICY_BLOCKED": 403, "NOT_FOUND": 404, "CONFLICT": 409,
    "TOO_LARGE": 413, "BUSY": 429, "UNSUPPORTED_REPO": 422, "UNAVAILABLE": 503,
    "TIMEOUT": 504, "INTERNAL": 500,
}


def printable(text: str) -> str:
    """`text` with any lone surrogate (a file name's non-UTF-8 byte, as os and git keep it)
    written as a \\x escape, so a message always encodes as UTF-8 JSON."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


class PatchbayError(Exception):
    """An expected failure: it knows its machine code, HTTP status and exit code."""

    exit_code = 1

    def __init__(self, message: str, code: str = "INVALID_ARG", **data: Any) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.code = code
        self.data = data

    @property
    def status(self) -> int:
        return ERROR_STATUS.get(self.code, 400)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"error": self.code, "message": self.message}
        out.update(self.data)
        return out


class UsageError(PatchbayError):
    """Bad command line or configuration: exit 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message, "INVALID_ARG")


# =======================================================================================
# §2 Utilities: clock, JSON, redaction, private files
# =======================================================================================

def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(ts: Optional[datetime.datetime] = None) -> str:
    if ts is None:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> Optional[datetime.datetime]:
    if not text:
        return None
    try:
        ts = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=datetime.timezone.utc)


def dumps(obj: Any) -> str:
    """Compact JSON, the form every result and log line uses."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # two values for one key is ambiguous: which one did the client mean?
            raise _DuplicateKey("duplicate key %r" % key)
        out[key] = value
    return out


def loads_strict(data: bytes) -> Any:
    """Parse a request body: UTF-8, no duplicate keys, no NaN, bounded nesting."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PatchbayError("request body is not valid JSON: %s" % exc) from None
    except RecursionError:  # deeply nested input raises this, not ValueError
        raise PatchbayError("request body is nested too deeply") from None
    # A lone surrogate can only come from a \uD8xx escape; it cannot be encoded again, so
    # it is refused here rather than failing later in a log or a reply.
    if "\\ud" in text.lower() and _has_lone_surrogate(obj):
        raise PatchbayError("request body is not valid JSON: lone surrogate escape")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        return any("\ud800" <= ch <= "\udfff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


# Secret shapes that must never reach a log, a child's output or a tool report.
# Secret shapes that must never reach a log, a child's output or a tool report. One
# alternation, one pass; `keep` is a prefix that stays (the name before a query token).
_SECRETS = re.compile("|".join([
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    r"\bsk-[A-Za-z0-9_-]{20,}",
    r"(?P<keep>(?i:%s=|authorization:\s*bearer\s+))[^&\s\"']+" % QUERY_TOKEN,
]), re.S)


_SECRET_HINTS = ("private key", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "akia",
                 "asia", "xox", "eyj", "sk-", QUERY_TOKEN, "bearer")


class Redactor:
    """Removes known secrets (exact strings) and common secret shapes from text."""

    def __init__(self) -> None:
        self._exact: List[str] = []

    def add(self, secret: Optional[str]) -> None:
        if secret and len(secret) >= 8 and secret not in self._exact:
            self._exact.append(secret)

    def __call__(self, text: str) -> str:
        for secret in self._exact:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        lowered = text.lower()
        if not any(hint in lowered for hint in _SECRET_HINTS):
            return text  # cheap test first: most lines carry no secret shape at all
        return _SECRETS.sub(lambda m: (m.group("keep") or "") + "[REDACTED]", text)


def private_dir(path: str) -> str:
    """Create a 0700 directory and return it. Missing parents are made 0700 as well
    (os.makedirs would give them the umask's 0755): `stdio` may create PATCHBAY_HOME
    itself on the way to its logs directory."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another thread or process
            pass
    path = missing[0] if missing else path
    if not os.path.isdir(path):
        raise PatchbayError("%s exists and is not a directory" % path, "UNAVAILABLE")
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a private file atomically: temp file in the same directory, fsync, rename.

    The file is created with its final mode, so it is never world-readable, not even for
    the moment between a create and a chmod.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, ".%s.%s.tmp" % (os.path.basename(path), secrets.token_hex(6)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def looks_binary(data: bytes) -> bool:
    """A NUL in the first 8 KiB: the test git and grep use too."""
    return b"\0" in data[:8192]


def count_lines(text: str) -> int:
    """Lines as editors count them: separated by "\\n", a last line without one counts."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def json_len(text: str) -> int:
    """Characters `text` takes inside a JSON string: escapes count (a quote is 2, a control
    character 6), so results capped this way really fit the 100k-character limits."""
    return len(json.dumps(text, ensure_ascii=False)) - 2


def cap_text(text: str, limit: int) -> Tuple[str, bool]:
    """Cut text so its JSON encoding fits in `limit`, at a line break when one is near."""
    if len(text) <= limit // 6 or json_len(text) <= limit:
        return text, False
    cut = min(len(text), limit)
    while cut > 0:
        size = json_len(text[:cut])
        if size <= limit:
            break
        cut = max(0, cut * limit // size - 1)
    newline = text.rfind("\n", 0, cut)
    if newline > cut // 2:
        cut = newline + 1
    return text[:cut], True


def cap_middle(text: str, limit: int) -> Tuple[str, bool]:
    """Like cap_text, but keep the head and the tail (a test run's summary is at the end)."""
    if len(text) <= limit // 6 or json_len(text) <= limit:
        return text, False
    head = cap_text(text, limit // 2 - 40)[0]
    tail = cap_text(text[::-1], limit // 2 - 40)[0][::-1]
    return head + "\n[... output cut here ...]\n" + tail, True


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a child started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - a zombie that will not die
        pass


class _Capture(threading.Thread):
    """Reads a pipe to its end, keeping the first and the last cap/2 bytes."""

    def __init__(self, stream: Any, cap: int) -> None:
        super().__init__(daemon=True)
        # Head and tail plus the marker stay under `cap`, so nothing cuts them again.
        self.fd, self.half = stream.fileno(), max(cap // 2 - 64, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.total += len(chunk)
            room = self.half - len(self.head)
            if room > 0:
                self.head += chunk[:room]
                chunk = chunk[room:]
            if chunk:
                self.tail += chunk
                del self.tail[: max(0, len(self.tail) - self.half)]

    def text(self) -> Tuple[str, bool]:
        cut = self.total > len(self.head) + len(self.tail)
        middle = b"\n[... %d bytes omitted ...]\n" % (self.total - len(self.head) - len(self.tail))
        data = bytes(self.head) + (middle if cut else b"") + bytes(self.tail)
        return data.decode("utf-8", "replace"), cut


def run_capped(argv: List[str], cwd: str, env: Dict[str, str], timeout: float, cap: int,
               cancel: threading.Event) -> Dict[str, Any]:
    """Run a child in its own process group with no stdin; read stdout and stderr at once
    (no pipe can fill up and deadlock), keep head and tail of each, and on timeout, cancel
    or normal exit kill whatever is left in the group, grandchildren included."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    readers = [_Capture(proc.stdout, cap), _Capture(proc.stderr, cap // 2)]
    for reader in readers:
        reader.start()
    timed_out = False
    while True:
        try:
            proc.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - started > timeout or cancel.is_set():
                timed_out = not cancel.is_set()
                break
    kill_group(proc)  # also ends `cmd &` children that would hold the pipes open
    for reader in readers:
        reader.join(timeout=2)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
    (out, out_cut), (err, err_cut) = readers[0].text(), readers[1].text()
    return {"exit_code": proc.returncode, "stdout": out, "stderr": err,
            "timed_out": timed_out, "cancelled": cancel.is_set(),
            "duration_ms": int((time.monotonic() - started) * 1000),
            "stdout_truncated": out_cut, "stderr_truncated": err_cut}


# Children see only these variables: the token, tunnel credentials and anything else in
# PatchBay's own environment stay out of reach (a child can read /proc/<ppid>/environ of
# the parent only if it started with the secret; prefer --token-file for long runs).
CHILD_ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM",
                   "TMPDIR", "TZ", "CODEX_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
                   "VIRTUAL_ENV", "PYTHONPATH", "NODE_PATH", "GOPATH", "CARGO_HOME",
                   "RUSTUP_HOME", "JAVA_HOME", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                   "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy")
CHILD_ENV_PREFIX_ALLOW = ("LC_", "OPENAI_", "CODEX_")
OWN_SECRET_ENV = (ENV_TOKEN, "CLOUDFLARED_TOKEN", "TUNNEL_TOKEN", "NGROK_AUTHTOKEN",
                  "NGROK_API_KEY")


def child_env(inherit: bool = False, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    if inherit:
        env = {k: v for k, v in os.environ.items() if k not in OWN_SECRET_ENV}
    else:
        env = {k: v for k, v in os.environ.items()
               if k in CHILD_ENV_ALLOW or k.startswith(CHILD_ENV_PREFIX_ALLOW)}
    env.update(extra or {})
    return env


# =======================================================================================
# §3 Config and profiles
# =======================================================================================

# Which groups of tools each built-in profile exposes (SPEC §4). A tool names its group.
PROFILE_GROUPS: Dict[str, Tuple[str, ...]] = {
    "readonly": ("context", "plan"),
    "worker": ("context", "plan", "codex"),
    "power": ("context", "plan", "codex", "write", "command", "transcript"),
    "full": ("context", "plan", "codex", "write", "command", "transcript"),
}
BUILTIN_PROFILES: Dict[str, Dict[str, Any]] = {
    "readonly": {"command_policy": True, "child_env": "allowlist",
                 "codex": {"sandbox": "read-only", "plan_sandbox": "read-only"}},
    "worker": {"command_policy": True, "child_env": "allowlist",
               "codex": {"sandbox": "workspace-write", "plan_sandbox": "read-only"}},
    "power": {"command_policy": True, "child_env": "allowlist",
              "codex": {"sandbox": "workspace-write", "plan_sandbox": "read-only"}},
    "full": {"command_policy": True, "child_env": "inherit",
             "codex": {"sandbox": "danger-full-access", "plan_sandbox": "read-only",
                       "allow_bypass": True}},
}
DEFAULT_PROFILE = "worker"
CODEX_DEFAULTS: Dict[str, Any] = {
    "bin": "codex", "model": None, "sandbox": "workspace-write", "plan_sandbox": "read-only",
    "allow_bypass": False, "config_overrides": [], "env": []}
CODEX_SANDBOXES = ("read-only", "workspace-write", "danger-full-access")
# Every key a profile file may hold; anything else is a typo worth an error.
PROFILE_KEYS = ("extends", "description", "roots", "blocked_globs", "tools", "command_policy",
                "codex", "limits", "allow_query_token", "allowed_origins", "store_prompts",
                "child_env", "host", "port", "tunnel", "hostname", "tunnel_name",
                "public_base_url", "allow_hosts", "token_file", "cloudflare_token_file",
                "ttl_minutes")


def load_profile_file(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError("cannot read profile %s: %s" % (path, exc.strerror)) from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # lazily: JSON profiles and everything else need no third party
        except ImportError:
            raise UsageError("profile %s is YAML, which needs PyYAML: pip install PyYAML, "
                             "or write the profile as .json" % path) from None
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError("profile %s is not valid YAML: %s" % (path, exc)) from None
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError("profile %s is not valid JSON: %s" % (path, exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError("profile %s must be a mapping of keys to values" % path)
    return data


def check_int(what: str, value: Any, low: int, high: int) -> int:
    """`value` if it is an integer from `low` to `high`; else a UsageError naming both."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise UsageError("%s must be an integer from %d to %d, not %s"
                     % (what, low, high, repr(value)[:40]))


def check_profile(data: Dict[str, Any], where: str) -> Dict[str, Any]:
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if unknown:
        raise UsageError("%s: unknown profile key(s) %s; accepted keys: %s"
                         % (where, ", ".join(unknown), ", ".join(PROFILE_KEYS)))
    for key in ("limits", "codex"):
        if key in data and not isinstance(data[key], dict):
            raise UsageError("%s: %s must be a mapping" % (where, key))
    for key in ("roots", "blocked_globs", "tools", "allowed_origins", "allow_hosts"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            raise UsageError("%s: %s must be a list of strings" % (where, key))
    bad_limits = sorted(set(data.get("limits", {})) - set(DEFAULT_LIMITS))
    if bad_limits:
        raise UsageError("%s: unknown limit(s) %s; accepted: %s"
                         % (where, ", ".join(bad_limits), ", ".join(DEFAULT_LIMITS)))
    for key, value in data.get("limits", {}).items():
        check_int("%s: limits.%s" % (where, key), value, 1, LIMIT_MAX.get(key, 1 << 30))
    if data.get("port") is not None:
        check_int("%s: port" % where, data["port"], *PORT_RANGE)
    if data.get("ttl_minutes") is not None:
        check_int("%s: ttl_minutes" % where, data["ttl_minutes"], *TTL_RANGE)
    bad_codex = sorted(set(data.get("codex", {})) - set(CODEX_DEFAULTS))
    if bad_codex:
        raise UsageError("%s: unknown codex key(s) %s; accepted: %s"
                         % (where, ", ".join(bad_codex), ", ".join(CODEX_DEFAULTS)))
    for key in ("sandbox", "plan_sandbox"):
        value = data.get("codex", {}).get(key)
        if value is not None and value not in CODEX_SANDBOXES:
            raise UsageError("%s: codex.%s must be one of %s"
                             % (where, key, ", ".join(CODEX_SANDBOXES)))
    if data.get("child_env", "allowlist") not in ("allowlist", "inherit"):
        raise UsageError("%s: child_env must be allowlist or inherit" % where)
    return data


class Config:
    """All settings, resolved once: built-in profile < profile file < environment < flags."""

    def __init__(self, home: str, profile_name: str, settings: Dict[str, Any]) -> None:
        self.home = home
        self.profile_name = profile_name
        s = settings
        self.extends: str = s.get("extends", profile_name)
        self.groups = PROFILE_GROUPS[self.extends]
        self.roots: List[str] = [os.path.expanduser(r) for r in s.get("roots") or []]
        self.blocked_globs: List[str] = list(s.get("blocked_globs") or DEFAULT_BLOCKED_GLOBS)
        self.tools: Optional[List[str]] = s.get("tools")
        self.command_policy: bool = bool(s.get("command_policy", True))
        self.codex: Dict[str, Any] = dict(CODEX_DEFAULTS, **s.get("codex", {}))
        self.limits: Dict[str, int] = dict(DEFAULT_LIMITS, **s.get("limits", {}))
        self.allow_query_token: bool = bool(s.get("allow_query_token", True))
        self.allowed_origins: List[str] = [o.rstrip("/") for o in s.get("allowed_origins") or []]
        self.store_prompts: bool = bool(s.get("store_prompts", False))
        self.child_env: str = s.get("child_env", "allowlist")
        self.host: str = s.get("host", DEFAULT_HOST)
        self.port: int = int(s.get("port", DEFAULT_PORT))
        self.token_file: Optional[str] = s.get("token_file")
        self.ttl_minutes: Optional[int] = s.get("ttl_minutes")
        self.public_base_url: str = (s.get("public_base_url") or "").rstrip("/")
        self.allow_hosts: List[str] = list(s.get("allow_hosts") or [])
        self.tunnel: str = s.get("tunnel", "none")
        self.settings = s

    @classmethod
    def resolve(cls, home: str, profile: Optional[str] = None,
                overrides: Optional[Dict[str, Any]] = None,
                environ: Optional[Dict[str, str]] = None) -> Config:
        env = os.environ if environ is None else environ
        profile = profile or env.get(ENV_PROFILE) or DEFAULT_PROFILE
        name, data = cls._load(home, profile)
        base = name if name in BUILTIN_PROFILES else data.get("extends", DEFAULT_PROFILE)
        if base not in BUILTIN_PROFILES:
            raise UsageError("profile %s extends unknown profile %r; built-in profiles: %s"
                             % (profile, base, ", ".join(BUILTIN_PROFILES)))
        settings: Dict[str, Any] = json.loads(json.dumps(BUILTIN_PROFILES[base]))
        settings["extends"] = base
        for key, value in data.items():
            if key in ("codex", "limits"):
                settings[key] = dict(settings.get(key, {}), **value)
            elif key != "extends":
                settings[key] = value
        if env.get(ENV_ROOT):
            settings["roots"] = [p for p in env[ENV_ROOT].split(os.pathsep) if p]
        for key, value in (overrides or {}).items():
            if value is not None and value != []:
                settings[key] = value
        return cls(home, name, settings)

    @staticmethod
    def _load(home: str, profile: str) -> Tuple[str, Dict[str, Any]]:
        if profile in BUILTIN_PROFILES:
            return profile, {}
        candidates = [profile]
        if re.fullmatch(r"[A-Za-z0-9_.-]+", profile):
            candidates.append(os.path.join(home, "profiles", profile + ".json"))
        for path in candidates:
            if os.path.isfile(path):
                name = os.path.splitext(os.path.basename(path))[0]
                return name, check_profile(load_profile_file(path), path)
        raise UsageError("no profile %r: use one of %s, a .json/.yaml file, or a name saved "
                         "with --save-profile" % (profile, ", ".join(BUILTIN_PROFILES)))

    def enabled_tools(self, registry: ToolRegistry) -> List[Tool]:
        """The fixed tool list: the profile's groups, narrowed by an explicit `tools` list."""
        tools = [t for t in registry.tools if t.group in self.groups]
        if self.tools is not None:
            known = {t.name for t in registry.tools}
            unknown = sorted(set(self.tools) - known)
            if unknown:
                raise UsageError("profile %s names unknown tool(s) %s; known tools: %s"
                                 % (self.profile_name, ", ".join(unknown),
                                    ", ".join(sorted(known))))
            tools = [t for t in tools if t.name in self.tools]
        return tools


# =======================================================================================
# §4 Channel and auth: token, TTL, Host and Origin
# =======================================================================================

class Channel:
    """`PATCHBAY_HOME/config.json`: token, public URL, access expiry, workspace registry.

    A running server re-reads it whenever its stat signature changes, so a rotated token,
    a revoke or a new TTL takes effect on the next request without a restart.
    """

    def __init__(self, home: str) -> None:
        self.home = home
        self.path = os.path.join(home, "config.json")
        self._sig: Optional[Tuple[int, int, int]] = None
        self._data: Dict[str, Any] = {}
        self.generation = 0  # bumped whenever the file is (re)read or disappears
        self._lock = threading.Lock()

    def load(self) -> Dict[str, Any]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._sig is not None:
                with self._lock:
                    self._sig, self._data = None, {}
                    self.generation += 1
            return {}
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if sig != self._sig:
                try:
                    with open(self.path, "rb") as f:
                        data = json.loads(f.read().decode("utf-8"))
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    raise PatchbayError("%s is unreadable (%s); fix or remove it, then run "
                                        "`patchbay channel register`" % (self.path, exc),
                                        "UNAVAILABLE") from None
                self._data = data if isinstance(data, dict) else {}
                self._sig = sig
                self.generation += 1
            return self._data

    def save(self, data: Dict[str, Any]) -> None:
        private_dir(self.home)
        atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def update(self, **changes: Any) -> Dict[str, Any]:
        data = dict(self.load())
        data.update(changes)
        self.save(data)
        return data


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits, URL-safe for connector URLs


def _digest(value: str) -> bytes:
    # Compare digests: equal length always, and any str (non-ASCII included) encodes.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def split_host(host: str) -> Tuple[str, str]:
    """'Example.COM:443' -> ('example.com', '443'); '[::1]:8' -> ('[::1]', '8')."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, ""
        rest = host[end + 1:]
        return host[: end + 1], rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


class Access:
    """Decides whether a request may proceed: Host, Origin, token, TTL (SPEC §5).

    What it derives from the channel (token digest, expiry, allowed hosts) is computed
    once per change of config.json, not once per request.
    """

    LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

    def __init__(self, cfg: Config, channel: Channel, static_token: Optional[str],
                 redactor: Redactor) -> None:
        self.cfg = cfg
        self.channel = channel
        self.static_token = static_token
        self.redactor = redactor
        self.port = 0
        self.started = time.time()
        self.tunnel_hosts: List[str] = []
        self.tunnel_url = ""  # set by a tunnel this process supervises; wins over the rest
        self._key: Any = None
        self._view: Dict[str, Any] = {}
        redactor.add(static_token)
        # A static token (--token-file, PATCHBAY_HTTP_TOKEN) wins only until the channel's
        # token changes: rotate-token, channel revoke, renew --rotate-token or register
        # retire it for good in this process, so no rotation is silently ignored.
        self._start_token = channel.load().get("token") if static_token else None

    def view(self) -> Dict[str, Any]:
        data = self.channel.load()
        key = (self.channel.generation, tuple(self.tunnel_hosts), self.port, self.tunnel_url)
        if key != self._key:
            if self.static_token and data.get("token") != self._start_token:
                self.static_token = None
            token = self.static_token or data.get("token") or None
            self.redactor.add(token)
            expires = parse_iso(str(data.get("access_expires_at") or ""))
            if self.cfg.ttl_minutes:
                own = datetime.datetime.fromtimestamp(
                    self.started + 60 * self.cfg.ttl_minutes, datetime.timezone.utc)
                expires = min(expires, own) if expires else own
            public = (self.tunnel_url or self.cfg.public_base_url
                      or data.get("public_base_url") or "").rstrip("/")
            hosts = ["%s:%d" % (n, self.port) for n in self.LOOPBACK_NAMES]
            if public:
                hosts.append(urllib.parse.urlsplit(public).netloc.lower())
            hosts.extend(h.lower() for h in self.tunnel_hosts + self.cfg.allow_hosts)
            digest = _digest(token) if token else None
            self._view = {
                "token": token, "digest": digest,
                "cred": hashlib.sha256(b"cred:" + digest).hexdigest()[:32] if digest else "",
                "expires": expires.timestamp() if expires else None, "public": public,
                "hosts": [split_host(h) for h in hosts], "exact": set(hosts)}
            self._key = key
        return self._view

    # -- token -----------------------------------------------------------------------
    def token(self) -> Optional[str]:
        token: Optional[str] = self.view()["token"]
        return token

    def credential(self, header: Optional[str], query_token: Optional[str],
                   view: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Return a stable id of the credential used, or None when it is wrong or missing."""
        view = view or self.view()
        if view["digest"] is None:
            return ""  # loopback without a token: everyone on this machine is the same caller
        offered = None
        if header and header[:7].lower() == "bearer ":
            offered = header[7:].strip()
        elif query_token is not None and self.cfg.allow_query_token:
            offered = query_token
        if offered is None or not hmac.compare_digest(_digest(offered), view["digest"]):
            return None
        cred: str = view["cred"]
        return cred

    def expired(self, view: Optional[Dict[str, Any]] = None) -> bool:
        expires = (view or self.view())["expires"]
        return expires is not None and time.time() >= expires

    # -- Host and Origin (DNS rebinding, cross-site posts) ------------------------------
    def public_url(self) -> str:
        public: str = self.view()["public"]
        return public

    def host_ok(self, host: Optional[str], view: Optional[Dict[str, Any]] = None) -> bool:
        if not host:
            return False
        view = view or self.view()
        if host.lower() in view["exact"]:
            return True
        name, port = split_host(host)
        for a_name, a_port in view["hosts"]:
            if name == a_name and (a_port == "*" or a_port == port
                                   or (not a_port and port in ("", "443", "80"))):
                return True
        return False

    def cors_origin(self, origin: str) -> bool:
        """Whether a profile lists this origin for CORS (off unless allowed_origins is set)."""
        return origin.strip().rstrip("/").lower() in (o.lower() for o in self.cfg.allowed_origins)

    def origin_ok(self, origin: Optional[str], view: Optional[Dict[str, Any]] = None) -> bool:
        if origin is None:
            return True  # non-browser clients send none; browsers always do
        if self.cors_origin(origin):
            return True
        origin = origin.strip().rstrip("/").lower()
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null", file:, chrome-extension: ...
        return self.host_ok(parts.netloc, view)


# =======================================================================================
# §5 Path guard: the only way a user path becomes an open file or directory
# =======================================================================================

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINK_HOPS = 40
_IGNORABLE = {0x00AD, 0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0}


def fold(name: str) -> str:
    """Compare names the way a case-insensitive filesystem and a human would.

    NFC, case folded, with invisible (default-ignorable) code points removed, so `.ENV`,
    `.E\u200bnv` and `.env` are one name to the blocked-file check.
    """
    if name.isascii():  # the common case: nothing to normalise or remove
        return name.lower()
    import unicodedata  # only non-ASCII names need it
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name
                   if not (ord(ch) in _IGNORABLE or unicodedata.category(ch) == "Cf"
                           or 0xFE00 <= ord(ch) <= 0xFE0F or 0xE0100 <= ord(ch) <= 0xE01EF))
    return name.casefold()


def rel(parts: List[str]) -> str:
    return "/".join(parts) or "."


# How a path that JSON cannot carry plainly is shown (docs/paths.md): in double quotes with
# C escapes, as git's core.quotePath does, when it holds a byte that is not UTF-8 (kept
# by os and git as a U+DC80..U+DCFF surrogate), a control character, or begins with a
# quote. Any path that begins and ends with a quote is read back that way, so the form is
# reversible and never ambiguous; every other path means itself.
_NEEDS_QUOTES = re.compile('^"|[\x00-\x1f\x7f-\x9f\udc80-\udcff]')
_C_ESCAPES = {"\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f",
              "\r": "r", '"': '"', "\\": "\\"}
_C_UNESCAPES = {v: k.encode() for k, v in _C_ESCAPES.items()}


def quote_path(path: str) -> str:
    if not _NEEDS_QUOTES.search(path):
        return path
    out = []
    for ch in path:
        if ch in _C_ESCAPES:
            out.append("\\" + _C_ESCAPES[ch])
        elif _NEEDS_QUOTES.match(ch) and ch != '"':
            out.extend("\\%03o" % b for b in ch.encode("utf-8", "surrogateescape"))
        else:
            out.append(ch)
    return '"%s"' % "".join(out)


def unquote_path(path: str) -> str:
    """The path `quote_path` showed as `path` (a plain path is returned as it is)."""
    if len(path) < 2 or path[0] != '"' or path[-1] != '"':
        return path
    body, out, i = path[1:-1], bytearray(), 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            if ch == '"':
                raise PatchbayError('a quoted path writes a quote inside it as \\"')
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
        elif body[i + 1:i + 2] in _C_UNESCAPES:
            out += _C_UNESCAPES[body[i + 1]]
            i += 2
        elif re.fullmatch("[0-3][0-7][0-7]", body[i + 1:i + 4]):
            out.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raise PatchbayError("a quoted path has a bad escape at %r (docs/paths.md)"
                                % body[i:i + 4])
    return out.decode("utf-8", "surrogateescape")


class Root:
    """A workspace root pinned as a directory fd at start: renaming or replacing the
    directory afterwards cannot redirect PatchBay somewhere else."""

    def __init__(self, name: str, path: str) -> None:
        try:
            self.real = os.path.realpath(path, strict=True)
            self.fd = os.open(self.real, DIR_FLAGS)
        except OSError as exc:
            raise UsageError("workspace %s: cannot open %s: %s"
                             % (name, path, exc.strerror or exc)) from None
        self.name = name
        self.dev = os.fstat(self.fd).st_dev

    def current_path(self) -> str:
        """Where the pinned directory is now (for subprocess cwd)."""
        try:
            return os.readlink("/proc/self/fd/%d" % self.fd)
        except OSError:
            return self.real

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class PathGuard:
    """Every tool turns paths into files through here (reference/security.md).

    Lexical checks first (no `..`, no NUL, absolute paths only inside the root, compared
    by components), then a walk with O_NOFOLLOW from the pinned root fd, one component at
    a time. A symlink is followed only by re-walking its target from the root, so it can
    never lead out. Blocked globs and protected paths are checked on every component, on
    the path as given and on the path a symlink resolves to.
    """

    def __init__(self, blocked_globs: List[str], protected: Tuple[str, ...] = ()) -> None:
        globs = [[fold(c) for c in g.split("/") if c] for g in blocked_globs]
        # One regex for all one-component globs (checked against every component), and a
        # list of per-component regexes for globs such as .ssh/* (checked on windows).
        single = [fnmatch.translate(g[0]) for g in globs if len(g) == 1]
        self.single = re.compile("|".join(single)) if single else None
        self.multi = [(g, [re.compile(fnmatch.translate(c)) for c in g])
                      for g in globs if len(g) > 1]
        self.singles = [g[0] for g in globs if len(g) == 1]
        self.protected = [os.path.realpath(p) for p in protected]
        # Held across read-check-write so concurrent edits with expected_sha256 never
        # lose an update (edits in this process; other writers are caught by the hash).
        self.lock = threading.RLock()
        umask = os.umask(0o022)  # read the umask (at start-up, while single-threaded)
        os.umask(umask)
        self.new_file_mode = 0o666 & ~umask

    # -- lexical -----------------------------------------------------------------------
    def split(self, root: Root, path: Any, allow_root: bool = False) -> List[str]:
        if isinstance(path, str):
            path = unquote_path(path)  # a quoted path (docs/paths.md) is only a spelling
        if not isinstance(path, str) or "\x00" in path:
            raise PatchbayError("path must be a string without NUL bytes", "INVALID_ARG")
        try:  # a non-UTF-8 byte of a name is a U+DC80..U+DCFF surrogate, as os keeps it
            encoded = path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # other lone surrogates
            raise PatchbayError("path is not valid Unicode", "INVALID_ARG") from None
        if len(encoded) > 4096 or any(len(c) > 255 for c in encoded.split(b"/")):
            raise PatchbayError("path is too long", "INVALID_ARG")
        if ".." in path.split("/"):
            raise PatchbayError("path may not contain '..': give it relative to the "
                                "workspace root", "DENIED_PATH")
        if path.startswith("/"):
            norm = os.path.normpath(path)
            inside = self._relative_to(root.real, norm)
            if inside is None:
                raise PatchbayError("absolute path is outside the workspace; give paths "
                                    "relative to its root", "DENIED_PATH")
            path = inside
        parts = [c for c in path.split("/") if c not in ("", ".")]
        if not parts and not allow_root:
            raise PatchbayError("path names the workspace root, not a file", "INVALID_ARG")
        return parts

    @staticmethod
    def _relative_to(base: str, path: str) -> Optional[str]:
        b = [c for c in base.split("/") if c]
        p = [c for c in path.split("/") if c]
        if p[: len(b)] != b:  # whole components: /repo-evil is not inside /repo
            return None
        return "/".join(p[len(b):])

    def blocked(self, parts: List[str]) -> Optional[str]:
        """The blocked glob that matches any component (or run of components), if any."""
        folded = [fold(c) for c in parts]
        if self.single is not None:
            for name in folded:
                if self.single.match(name):
                    return next(g for g in self.singles if fnmatch.fnmatchcase(name, g))
        for pattern, regexes in self.multi:
            k = len(regexes)
            for j in range(len(folded) - k + 1):
                if all(regexes[t].match(folded[j + t]) for t in range(k)):
                    return "/".join(pattern)
        return None

    def check(self, root: Root, parts: List[str]) -> None:
        if any(fold(c) == ".git" for c in parts):
            raise PatchbayError("%s is inside .git, which PatchBay never exposes; use the "
                                "changes tool for repository state" % rel(parts), "DENIED_PATH")
        for prot in self.protected:
            inside = self._relative_to(root.real, prot)
            if inside is not None:
                prefix = [fold(c) for c in inside.split("/") if c]
                if [fold(c) for c in parts[: len(prefix)]] == prefix:
                    raise PatchbayError("%s is PatchBay's own state directory" % rel(parts),
                                        "DENIED_PATH")
        pattern = self.blocked(parts)
        if pattern:
            raise PatchbayError("%s matches the blocked pattern %r (secrets are never read "
                                "or written)" % (rel(parts), pattern), "BLOCKED_FILE")

    # -- kernel walk -------------------------------------------------------------------
    def walk(self, root: Root, parts: List[str], whole: bool, create: bool = False,
             final: bool = True, created: Optional[List[str]] = None) -> Tuple[int, List[str]]:
        """Open the directory holding parts[-1] (or parts itself when `whole`).

        Returns (fd, resolved parts); the caller hands fd back with release(). In-root
        symlinks are resolved by splicing their target into the path and walking again
        from the root; `final=False` leaves a symlink in the last place to the caller
        (which then opens it with O_NOFOLLOW and gets ELOOP).
        """
        for _hop in range(MAX_SYMLINK_HOPS):
            self.check(root, parts)
            fd, spliced = self._walk_once(root, parts, whole, create, final, created)
            if spliced is None:
                return fd, parts
            parts = spliced
        raise PatchbayError("too many symlinks in %s" % rel(parts), "DENIED_PATH")

    @staticmethod
    def release(root: Root, fd: int) -> None:
        if fd != root.fd:  # the pinned root fd itself is lent, never closed
            os.close(fd)

    def _walk_once(self, root: Root, parts: List[str], whole: bool, create: bool,
                   final: bool, created: Optional[List[str]]) -> Tuple[int, Optional[List[str]]]:
        fd = root.fd
        try:
            for i in range(len(parts) if whole else len(parts) - 1):
                try:
                    nfd = os.open(parts[i], DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise PatchbayError("no such directory: %s" % rel(parts[: i + 1]),
                                            "NOT_FOUND") from None
                    os.mkdir(parts[i], 0o755, dir_fd=fd)
                    if created is not None:  # so a failed patch can take them away again
                        created.append(rel(parts[: i + 1]))
                    nfd = os.open(parts[i], DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = self._link(fd, parts[i])
                    if target is None:
                        raise PatchbayError("not a directory: %s" % rel(parts[: i + 1]),
                                            "NOT_FOUND") from None
                    self.release(root, fd)
                    return -1, self._splice(root, parts, i, target)
                self.release(root, fd)
                fd = nfd
                if os.fstat(fd).st_dev != root.dev:
                    raise PatchbayError("%s crosses into another filesystem"
                                        % rel(parts[: i + 1]), "DENIED_PATH")
            if parts and not whole and final:
                target = self._link(fd, parts[-1])
                if target is not None:
                    self.release(root, fd)
                    return -1, self._splice(root, parts, len(parts) - 1, target)
            if whole and fd == root.fd:
                # A directory to scan gets its own open file description: a dup of the
                # root fd would share one read offset between concurrent listings.
                fd = os.open(".", DIR_FLAGS, dir_fd=root.fd)
            return fd, None
        except BaseException:
            try:
                self.release(root, fd)
            except OSError:
                pass
            raise

    @staticmethod
    def _link(dir_fd: int, name: str) -> Optional[str]:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        return os.readlink(name, dir_fd=dir_fd)

    def _splice(self, root: Root, parts: List[str], i: int, target: str) -> List[str]:
        if target.startswith("/"):
            inside = self._relative_to(root.real, os.path.normpath(target))
            if inside is None:
                raise PatchbayError("%s is a symlink that points outside the workspace"
                                    % rel(parts[: i + 1]), "DENIED_PATH")
            base = inside.split("/")
        else:
            base = parts[:i] + target.split("/")
        out: List[str] = []
        for c in base + parts[i + 1:]:
            if c in ("", "."):
                continue
            if c == "..":
                if not out:
                    raise PatchbayError("%s is a symlink that points outside the workspace"
                                        % rel(parts[: i + 1]), "DENIED_PATH")
                out.pop()
            else:
                out.append(c)
        return out

    # -- operations --------------------------------------------------------------------
    def read(self, root: Root, path: Any, cap: int) -> Tuple[bytes, List[str]]:
        """Read a whole regular file of at most `cap` bytes (few syscalls: this is the hot
        path of read_file, fetch and edits)."""
        parts = self.split(root, path)
        for _hop in range(MAX_SYMLINK_HOPS):
            pfd, parts = self.walk(root, parts, whole=False, final=False)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, dir_fd=pfd)
                break
            except FileNotFoundError:
                raise PatchbayError("no such file: %s" % rel(parts), "NOT_FOUND") from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                target = self._link(pfd, parts[-1])  # a symlink: follow it inside the root
                if target is None:
                    raise PatchbayError("%s changed while being opened" % rel(parts),
                                        "DENIED_PATH") from None
                parts = self._splice(root, parts, len(parts) - 1, target)
            finally:
                self.release(root, pfd)
        else:
            raise PatchbayError("too many symlinks in %s" % rel(parts), "DENIED_PATH")
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise PatchbayError("%s is a directory; use list_files" % rel(parts),
                                    "NOT_A_FILE")
            if not stat.S_ISREG(st.st_mode):  # FIFOs and devices would block or never end
                raise PatchbayError("%s is not a regular file" % rel(parts), "NOT_A_FILE")
            if st.st_nlink > 1:  # a hard link may be a window onto a file outside the root
                raise PatchbayError("%s has several hard links; PatchBay does not read "
                                    "hard-linked files" % rel(parts), "DENIED_PATH")
            if st.st_size > cap:
                raise PatchbayError("%s is %d bytes, over the %d-byte read limit"
                                    % (rel(parts), st.st_size, cap), "TOO_LARGE")
            # O_NONBLOCK (which kept a FIFO from blocking the open) is harmless on a
            # regular file, so the file is read as it is: one read for the usual case.
            want = st.st_size if st.st_size else cap + 1
            chunks: List[bytes] = []
            got = 0
            while got < want:
                chunk = os.read(fd, want - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        finally:
            os.close(fd)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) > cap:
            raise PatchbayError("%s grew over the read limit" % rel(parts), "TOO_LARGE")
        return data, parts

    def write(self, root: Root, path: Any, data: bytes, expected_sha256: Optional[str] = None,
              create_dirs: bool = True, mode: Optional[int] = None,
              created: Optional[List[str]] = None) -> Dict[str, Any]:
        """Replace a file atomically: temp file in the same directory (by fd), fsync, then
        rename over the old name. The rename replaces a symlink or hard link instead of
        writing through it; the old file's mode is kept."""
        parts = self.split(root, path)
        pfd, parts = self.walk(root, parts, whole=False, create=create_dirs, created=created)
        try:
            name = parts[-1]
            try:
                st: Optional[os.stat_result] = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    raise PatchbayError("%s exists and is not a regular file" % rel(parts),
                                        "NOT_A_FILE")
                if st.st_nlink > 1:
                    raise PatchbayError("%s has several hard links; PatchBay does not write "
                                        "hard-linked files" % rel(parts), "DENIED_PATH")
                if mode is None:  # keep the file's mode (setuid and friends are dropped)
                    mode = stat.S_IMODE(st.st_mode) & 0o777
            if expected_sha256 is not None:
                current = self._sha_at(pfd, name) if st is not None else None
                if current != expected_sha256.lower():
                    raise PatchbayError("%s changed since it was read (sha256 is now %s); read "
                                        "it again" % (rel(parts), current or "absent"),
                                        "CONFLICT", sha256=current)
            tmp = ".%s.%s.patchbay-tmp" % (name[:100], secrets.token_hex(6))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    os.fchmod(f.fileno(), self.new_file_mode if mode is None else mode)
                os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise
            return {"path": quote_path(rel(parts)), "created": st is None, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        finally:
            self.release(root, pfd)

    @staticmethod
    def _sha_at(dir_fd: int, name: str) -> str:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def lstat(self, root: Root, path: Any) -> Optional[os.stat_result]:
        """The entry itself (a symlink is reported as one), or None when it is absent."""
        parts = self.split(root, path)
        try:
            pfd, parts = self.walk(root, parts, whole=False, final=False)
        except PatchbayError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise
        try:
            return os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            self.release(root, pfd)

    def exists(self, root: Root, path: Any) -> bool:
        return self.lstat(root, path) is not None

    def unlink(self, root: Root, path: Any) -> int:
        """Delete one regular file (never what a symlink points to); returns its mode."""
        parts = self.split(root, path)
        pfd, parts = self.walk(root, parts, whole=False, final=False)
        try:
            try:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise PatchbayError("no such file: %s" % rel(parts), "NOT_FOUND") from None
            if not stat.S_ISREG(st.st_mode):
                raise PatchbayError("%s is not a regular file (PatchBay deletes files, not "
                                    "links or directories)" % rel(parts), "NOT_A_FILE")
            if st.st_nlink > 1:
                raise PatchbayError("%s has several hard links; PatchBay does not delete "
                                    "hard-linked files" % rel(parts), "DENIED_PATH")
            os.unlink(parts[-1], dir_fd=pfd)
            return stat.S_IMODE(st.st_mode) & 0o777
        finally:
            self.release(root, pfd)

    def rmdir(self, root: Root, path: str) -> None:
        """Remove an empty directory (a rollback of one a failed write created)."""
        parts = self.split(root, path)
        pfd, parts = self.walk(root, parts, whole=False, final=False)
        try:
            os.rmdir(parts[-1], dir_fd=pfd)
        except OSError:
            pass  # not empty, or gone: leave it
        finally:
            self.release(root, pfd)

    def open_dir(self, root: Root, path: Any) -> Tuple[int, List[str]]:
        parts = self.split(root, path, allow_root=True)
        try:
            return self.walk(root, parts, whole=True)
        except PatchbayError as exc:
            if exc.code == "NOT_FOUND" and exc.message.startswith("not a directory"):
                raise PatchbayError("%s is not a directory" % rel(parts), "NOT_A_FILE") from None
            raise

    def visible(self, root: Root, parts: List[str]) -> bool:
        """Whether a listed or searched entry may be shown at all."""
        try:
            self.check(root, parts)
        except PatchbayError:
            return False
        return True


# =======================================================================================
# §6 Git: the only code that runs git, hardened (reference/security.md)
# =======================================================================================

class Git:
    """Runs git with hooks, fsmonitor, pagers, external diff and textconv off, a global
    config of /dev/null, no inherited GIT_* variables, and every path after `--`.

    Settings that `-c` cannot neutralise (clean/smudge filters, includes, textconv and
    merge drivers, ssh commands) make a repository unsupported instead.
    """

    PREFIX = ("git", "--no-pager", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
              "-c", "core.untrackedCache=false", "-c", "diff.external=", "-c", "core.pager=cat",
              "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", "-c", "credential.helper=",
              "-c", "protocol.allow=never", "-c", "core.quotePath=false", "--no-optional-locks")
    REFUSED = re.compile(r"^(filter\..*|diff\..*\.(textconv|command)|merge\..*\.driver|"
                         r"include\.path|includeif\..*|core\.sshcommand|core\.gitproxy|"
                         r"uploadpack\..*)$")

    def __init__(self) -> None:
        env = {k: v for k, v in child_env().items() if not k.startswith("GIT_")}
        env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
                   GIT_EDITOR="true", GIT_PAGER="cat", GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
        self.env = env
        self.available = shutil.which("git") is not None
        self._checked: Dict[str, Tuple[str, Any, Optional[str], bytes]] = {}
        self._lock = threading.Lock()

    def argv(self, args: List[str]) -> List[str]:
        return list(self.PREFIX) + args

    def call(self, cwd: str, args: List[str], input: Optional[bytes] = None,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        # A timer kills the group on timeout; subprocess.run(timeout=) would instead poll
        # for the exit with sleeps, about a millisecond lost on every git call.
        try:
            proc = subprocess.Popen(self.argv(args), cwd=cwd, env=self.env,
                                    stdin=subprocess.PIPE if input is not None
                                    else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise PatchbayError("git is not installed", "UNAVAILABLE") from None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            kill_group(proc)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            out, err = proc.communicate(input)
        finally:
            timer.cancel()
        if expired.is_set():
            raise PatchbayError("git %s timed out" % args[0], "TIMEOUT")
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def run(self, cwd: str, args: List[str], input: Optional[bytes] = None,
            timeout: float = 30, ok_codes: Tuple[int, ...] = (0,)) -> bytes:
        proc = self.call(cwd, args, input, timeout)
        if proc.returncode not in ok_codes:
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            why = msg[-1] if msg else "exit %d" % proc.returncode
            raise PatchbayError("git %s failed: %s" % (args[0], why),
                                "UNAVAILABLE")
        return proc.stdout

    def repo_state(self, cwd: str) -> Optional[str]:
        """None for a usable repository; 'none' outside one; otherwise why it is refused.

        The verdict is cached against the stat of the repository's config file, so a
        filter added while the server runs is noticed on the next call.
        """
        with self._lock:
            cached = self._checked.get(cwd)
        if cached is not None:
            sig = self._sig(cached[0])
            if cached[1] == sig:
                return cached[2]
            if cached[0] and sig is not None and self._content(cached[0]) == cached[3]:
                with self._lock:  # rewritten with the same content (git branch -D does)
                    self._checked[cwd] = (cached[0], sig, cached[2], cached[3])
                return cached[2]
        config_path, sig = "", None
        verdict: Optional[str] = "none"
        if self.available:
            try:
                common = self.run(cwd, ["rev-parse", "--path-format=absolute",
                                        "--git-common-dir"]).decode().strip()
                config_path = os.path.join(common, "config")
                sig = self._sig(config_path)
                raw = self.run(cwd, ["config", "--local", "--list", "-z"], ok_codes=(0, 1))
                keys = [item.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
                        for item in raw.split(b"\0") if item]
                bad = sorted({k for k in keys if self.REFUSED.match(k)})
                verdict = None if not bad else (
                    "this repository's .git/config sets %s, which can make git run programs "
                    "that PatchBay cannot switch off; remove them (git config --unset ...) "
                    "to use git features here" % ", ".join(bad))
            except PatchbayError:
                config_path, verdict = "", "none"
        with self._lock:
            self._checked[cwd] = (config_path, sig, verdict,
                                  self._content(config_path) if config_path else b"")
        return verdict

    @staticmethod
    def _content(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read(1 << 20)
        except OSError:
            return b""

    @staticmethod
    def _sig(path: str) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def require(self, cwd: str) -> None:
        state = self.repo_state(cwd)
        if state == "none":
            raise PatchbayError("the workspace is not a git repository", "UNSUPPORTED_REPO")
        if state:
            raise PatchbayError(state, "UNSUPPORTED_REPO")

    def status(self, cwd: str) -> Dict[str, Any]:
        """`git status --porcelain=v2 --branch -z`, parsed into branch, head and files."""
        # Paths keep a non-UTF-8 byte as a surrogate, so they name the file exactly.
        out = self.run(cwd, ["status", "--porcelain=v2", "--branch", "-z",
                             "--untracked-files=all"]).decode("utf-8", "surrogateescape")
        fields = out.split("\0")
        info: Dict[str, Any] = {"branch": None, "head": None, "files": []}
        i = 0
        while i < len(fields):
            f = fields[i]
            i += 1
            if f.startswith("# branch.oid "):
                oid = f[13:]
                info["head"] = None if oid == "(initial)" else oid[:12]
            elif f.startswith("# branch.head "):
                head = f[14:]
                info["branch"] = None if head == "(detached)" else printable(head)
            elif f[:2] in ("1 ", "2 ", "u "):
                cols = f.split(" ", {"1": 8, "2": 9, "u": 10}[f[0]])
                xy, path = cols[1], cols[-1]
                entry: Dict[str, Any] = {"path": path, "index": xy[0], "worktree": xy[1]}
                if f[0] == "2":  # renames carry the old path as the next field
                    entry["from"] = fields[i]
                    i += 1
                if f[0] == "u":
                    entry["conflict"] = True
                info["files"].append(entry)
            elif f.startswith("? "):
                info["files"].append({"path": f[2:], "index": "?", "worktree": "?"})
        return info

    def ignored(self, cwd: str, paths: List[str]) -> set:
        """Which of `paths` .gitignore excludes (tracked files never count as ignored)."""
        if not paths:
            return set()
        out = self.run(cwd, ["check-ignore", "-z", "--stdin"],
                       input="\0".join(paths).encode("utf-8", "surrogateescape") + b"\0",
                       ok_codes=(0, 1))
        return {p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p}


# =======================================================================================
# §7 Edits: text replacement, patches, and the command policy (pure logic, no I/O)
# =======================================================================================

class TextFile:
    """A text file's content with its byte-level conventions (BOM, CRLF, final newline),
    so edits can work on plain LF text and write the original conventions back."""

    def __init__(self, data: bytes, where: str) -> None:
        if looks_binary(data):
            raise PatchbayError("%s is a binary file; it cannot be edited as text" % where,
                                "BINARY_FILE")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PatchbayError("%s is not UTF-8 text" % where, "BINARY_FILE") from None
        self.bom = text.startswith("\ufeff")
        if self.bom:
            text = text[1:]
        crlf = text.count("\r\n")
        # Only a file whose every newline is CRLF is converted; mixed files stay exact.
        self.crlf = crlf > 0 and crlf == text.count("\n")
        self.text = text.replace("\r\n", "\n") if self.crlf else text

    def encode(self, text: str) -> bytes:
        if self.crlf:
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        return (("\ufeff" if self.bom else "") + text).encode("utf-8")


def replace_exact(text: str, old: str, new: str, replace_all: bool, where: str) -> Tuple[str, int]:
    """Exact replacement; zero matches or an ambiguous match is an error that says where."""
    if not old:
        raise PatchbayError("old_text must not be empty")
    count = text.count(old)
    if count == 0:
        raise PatchbayError("old_text was not found in %s; read the file again and copy the "
                            "text exactly (whitespace included)" % where, "NO_MATCH")
    if count > 1 and not replace_all:
        lines: List[int] = []
        pos = text.find(old)
        while pos >= 0 and len(lines) < 20:
            lines.append(text.count("\n", 0, pos) + 1)
            pos = text.find(old, pos + len(old))
        raise PatchbayError("old_text matches %d times in %s (at lines %s); add context to make "
                            "it unique or pass replace_all=true"
                            % (count, where, ", ".join(map(str, lines))), "AMBIGUOUS",
                            matches=count, lines=lines)
    return text.replace(old, new) if replace_all else text.replace(old, new, 1), count


class Hunk:
    def __init__(self) -> None:
        self.old: List[str] = []
        self.new: List[str] = []
        self.anchor: Optional[str] = None   # Codex `@@ context` line to find first
        self.hint: Optional[int] = None     # unified diff: 1-based old start line
        self.at_eof = False
        self.old_eof_nl = True              # "\ No newline at end of file" flags
        self.new_eof_nl = True
        self.plus = self.minus = 0


class FilePatch:
    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind                   # add | update | delete
        self.path = path
        self.move_to: Optional[str] = None
        self.hunks: List[Hunk] = []
        self.added: List[str] = []         # content of an added file
        self.added_eof_nl = True
        self.mode: Optional[int] = None    # from a git "new mode" header


def parse_patch(text: str) -> List[FilePatch]:
    """Parse a Codex `*** Begin Patch` envelope or a unified diff (`git diff` output)."""
    # Split on \n only: a carriage return stays part of its line, so a git diff of a file
    # with mixed line endings applies byte for byte (apply_hunks drops it for LF files).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if start is None:
        raise PatchbayError("the patch is empty")
    if lines[start].strip() == "*** Begin Patch":
        files = _parse_envelope(lines[start + 1:])
    elif any(ln.startswith(("--- ", "diff --git ")) for ln in lines):
        files = _parse_unified(lines)
    else:
        raise PatchbayError("not a patch: expected '*** Begin Patch' or a unified diff with "
                            "'--- a/...' and '+++ b/...' headers")
    if not files:
        raise PatchbayError("the patch changes no files")
    seen: set = set()
    for fp in files:
        for path in (fp.path, fp.move_to):
            if path is not None and path in seen:
                raise PatchbayError("the patch touches %s twice" % path)
            if path is not None:
                seen.add(path)
    return files


def _parse_envelope(lines: List[str]) -> List[FilePatch]:
    files: List[FilePatch] = []
    cur: Optional[FilePatch] = None
    hunk: Optional[Hunk] = None
    for n, line in enumerate(lines, 2):
        if line.strip() == "*** End Patch":
            return files
        header = re.match(r"\*\*\* (Add|Update|Delete) File: (.+)$", line)
        if header:
            cur = FilePatch(header.group(1).lower(), header.group(2).strip())
            files.append(cur)
            hunk = None
            continue
        if cur is None:
            raise PatchbayError("patch line %d: expected a '*** Add/Update/Delete File:' "
                                "header" % n)
        if line.startswith("*** Move to: ") and cur.kind == "update":
            cur.move_to = line[len("*** Move to: "):].strip()
        elif cur.kind == "add":
            if not line.startswith("+"):
                raise PatchbayError("patch line %d: lines of an added file start with '+'" % n)
            cur.added.append(line[1:])
        elif cur.kind == "delete":
            if line.strip():
                raise PatchbayError("patch line %d: a deleted file takes no lines" % n)
        elif line.startswith("@@"):
            hunk = Hunk()
            hunk.anchor = line[2:].strip() or None
            cur.hunks.append(hunk)
        elif line.strip() == "*** End of File":
            if hunk is None:
                raise PatchbayError("patch line %d: '*** End of File' outside a hunk" % n)
            hunk.at_eof = True
        elif line[:1] in (" ", "-", "+") or line == "":
            if hunk is None:
                hunk = Hunk()
                cur.hunks.append(hunk)
            _hunk_line(hunk, line if line else " ")
        else:
            raise PatchbayError("patch line %d: unexpected %r" % (n, line[:60]))
    raise PatchbayError("the patch has no '*** End Patch' line")


def _hunk_line(hunk: Hunk, line: str) -> None:
    tag, body = line[0], line[1:]
    if tag in " -":
        hunk.old.append(body)
    if tag in " +":
        hunk.new.append(body)
    hunk.plus += tag == "+"
    hunk.minus += tag == "-"


def _diff_path(raw: str) -> Optional[str]:
    path = raw.split("\t")[0].strip()
    if path.startswith('"') and path.endswith('"'):
        path = path[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        path = path.encode("latin-1").decode("utf-8", "replace")
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        return path[2:]
    return path  # absolute or other: left for the path guard to judge


def _git_headers(fp: Optional[FilePatch], headers: List[str]) -> Optional[FilePatch]:
    """Apply a `diff --git` section's extended headers; a section with no ---/+++ (a pure
    rename or a mode change) becomes a patch of its own."""
    if any(re.match(r"(new file|deleted file|old|new) mode 120", h) for h in headers):
        raise PatchbayError("symlink patches are not supported")
    info = {h.split(" ", 2)[0] + " " + h.split(" ", 2)[1]: h.split(" ", 2)[2]
            for h in headers if h.startswith(("rename from ", "rename to ", "new mode "))}
    if fp is None and "rename from" in info and "rename to" in info:
        fp = FilePatch("update", info["rename from"])
        fp.move_to = info["rename to"]
    elif fp is None and "new mode" in info and headers and headers[0].startswith("diff --git "):
        fp = FilePatch("update", _diff_path(headers[0].rsplit(" b/", 1)[-1].join(["b/", ""]))
                       or "")
    if fp is not None and "new mode" in info:
        fp.mode = 0o755 if info["new mode"].strip().endswith("755") else 0o644
    return fp


def _parse_unified(lines: List[str]) -> List[FilePatch]:
    files: List[FilePatch] = []
    headers: List[str] = []   # the current `diff --git` section's extended header lines
    current: Optional[FilePatch] = None
    i = 0

    def close_section() -> None:
        fp = _git_headers(current, headers)
        if fp is not None and fp is not current:
            files.append(fp)

    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old, new = _diff_path(line[4:]), _diff_path(lines[i + 1][4:])
            if old is None and new is None:
                raise PatchbayError("patch line %d: both sides are /dev/null" % (i + 1))
            kind = "add" if old is None else "delete" if new is None else "update"
            current = FilePatch(kind, (new if old is None else old) or "")
            if kind == "update" and new != old:
                current.move_to = new
            files.append(current)
            i = _parse_hunks(lines, i + 2, current)
            continue
        if line.startswith("GIT binary patch") or line.startswith("Binary files "):
            raise PatchbayError("binary patches are not supported")
        if line.startswith("diff --git "):
            close_section()
            headers, current = [line], None
        elif headers:
            headers.append(line.rstrip("\r"))
        i += 1
    close_section()
    return files


def _parse_hunks(lines: List[str], i: int, fp: FilePatch) -> int:
    """Read the @@ hunks of one file from line i; return the index after them."""
    while i < len(lines) and lines[i].startswith("@@"):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", lines[i])
        if not m:
            raise PatchbayError("patch line %d: bad hunk header" % (i + 1))
        hunk = Hunk()
        hunk.hint = int(m.group(1))
        old_left = int(m.group(2) or 1)
        new_left = int(m.group(4) or 1)
        last_tag = " "
        i += 1
        while i < len(lines) and (old_left > 0 or new_left > 0 or lines[i].startswith("\\")):
            body = lines[i]
            if body.startswith("\\"):  # "\ No newline at end of file"
                if last_tag in " -":
                    hunk.old_eof_nl = False
                if last_tag in " +":
                    hunk.new_eof_nl = False
                i += 1
                continue
            last_tag = body[:1] or " "
            if last_tag not in " -+":
                raise PatchbayError("patch line %d: hunk is shorter than its header says"
                                    % (i + 1))
            _hunk_line(hunk, body if body else " ")
            old_left -= last_tag in " -"
            new_left -= last_tag in " +"
            i += 1
        fp.hunks.append(hunk)
    if fp.kind == "add":
        fp.added = [x for h in fp.hunks for x in h.new]
        fp.added_eof_nl = all(h.new_eof_nl for h in fp.hunks)
    return i


def apply_hunks(text: str, hunks: List[Hunk], where: str) -> str:
    """Apply hunks in order by finding their old lines (exact, then ignoring trailing and
    then surrounding whitespace); a hunk that cannot be placed fails the whole file."""
    if "\r" not in text:  # an LF file: a patch that travelled with CRLF still applies
        for hunk in hunks:
            hunk.old = [x.rstrip("\r") for x in hunk.old]
            hunk.new = [x.rstrip("\r") for x in hunk.new]
            hunk.anchor = hunk.anchor.rstrip("\r") if hunk.anchor else hunk.anchor
    had_nl = text.endswith("\n")
    lines = text.split("\n")
    if had_nl:
        lines.pop()
    cursor = 0
    for number, hunk in enumerate(hunks, 1):
        start = cursor
        if hunk.anchor:
            found = _find(lines, [hunk.anchor], cursor, None)
            if found is None:
                raise PatchbayError("%s: hunk %d: context line %r not found"
                                    % (where, number, hunk.anchor[:80]), "PATCH_FAILED")
            start = found + 1
        if not hunk.old:  # pure insertion: "-N,0" in a unified diff means after line N
            if hunk.hint is not None:
                at = min(hunk.hint, len(lines))
            elif hunk.anchor and not hunk.at_eof:
                at = start
            else:
                at = len(lines)
            lines[at:at] = hunk.new
            cursor = at + len(hunk.new)
            continue
        hint = (hunk.hint - 1) if hunk.hint else None
        pos = _find(lines, hunk.old, start, hint, at_eof=hunk.at_eof)
        if pos is None:
            raise PatchbayError("%s: hunk %d does not apply: its %d old line(s) starting %r were "
                                "not found%s" % (where, number, len(hunk.old), hunk.old[0][:80],
                                                 " after line %d" % start if start else ""),
                                "PATCH_FAILED")
        lines[pos:pos + len(hunk.old)] = hunk.new
        cursor = pos + len(hunk.new)
        if pos + len(hunk.new) >= len(lines):
            if not hunk.new_eof_nl:
                had_nl = False
            elif not hunk.old_eof_nl:
                had_nl = True
    return "\n".join(lines) + ("\n" if had_nl and lines else "")


def _find(lines: List[str], old: List[str], start: int, hint: Optional[int],
          at_eof: bool = False) -> Optional[int]:
    last = len(lines) - len(old)
    if last < 0:
        return None
    if at_eof:
        order = [last]
    elif hint is not None:  # unified diffs: the place nearest the stated line wins
        order = sorted(range(0, last + 1), key=lambda i: abs(i - hint))
    else:
        order = list(range(start, last + 1))
    for norm in (str, str.rstrip, str.strip):  # exact, then looser whitespace
        want = [norm(x) for x in old]
        have = [norm(x) for x in lines]
        for i in order:
            if have[i:i + len(want)] == want:
                return i
    return None


class CommandPolicy:
    """A guardrail, not a sandbox: blocks common destructive commands before bash runs.

    It tokenises the command like a shell (quotes, backslashes, `;`/`&&`/`||`/`|`/`&`,
    `$(…)`, backticks), looks inside `bash -c`/`sh -c`/`eval` strings, `xargs` and
    `find -exec`, skips `sudo`/`env`/`command`/`nohup`/`nice`/`time`/`exec` prefixes and
    resolves variables assigned earlier on the same line. It cannot see through scripts,
    interpreters (`python -c`), aliases, functions or encoded payloads.
    """

    SHELLS = ("sh", "bash", "zsh", "dash", "ksh", "fish")
    PREFIXES = ("sudo", "doas", "env", "command", "nohup", "nice", "time", "exec", "timeout",
                "stdbuf", "ionice", "builtin", "busybox", "watch", "chroot", "unbuffer")
    # Shell words that may stand before a command: `{ rm -rf /; }`, `if …; then rm …`.
    KEYWORDS = ("{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while",
                "until", "case", "esac", "in")
    DOWNLOADERS = ("curl", "wget", "fetch")
    FORK_BOMB = re.compile(r"(\S+)\s*\(\)\s*\{[^}]*\1\s*\|\s*\1\s*&")
    # A shell (or eval/source) fed by a download through $(…) or <(…), without a pipe.
    SHELL_OF_DOWNLOAD = re.compile(r"(?:^|[\s;&|({!])(?:eval|source|\.|(?:ba|z|da|k)?sh)\b"
                                   r"[^;&|\n]*[$<]\(\s*(?:curl|wget|fetch)\b")

    def __init__(self, root_paths: Tuple[str, ...] = ()) -> None:
        self.root_paths = {p.rstrip("/") for p in root_paths}

    def check(self, command: str) -> Optional[str]:
        """None when allowed, else 'rule: reason'."""
        if self.FORK_BOMB.search(command):
            return "fork-bomb: a function that pipes into itself in the background"
        return self._check(command, 0)

    def _check(self, command: str, depth: int) -> Optional[str]:
        if depth > 5:
            return "too-nested: the command nests shells more than 5 deep"
        if self.SHELL_OF_DOWNLOAD.search(command):
            return "pipe-to-shell: a shell runs downloaded text"
        for inner in self._substitutions(command):  # $(…), <(…), `…`, even inside quotes
            why = self._check(inner, depth + 1)
            if why:
                return why
        # A newline ends a command as `;` does (shlex would take it for plain space).
        flat = command.replace("\\\n", " ").replace("\n", " ; ").replace("`", " ; ")
        try:
            tokens = self._tokens(flat)
        except ValueError as exc:
            return "unparseable: %s (bash would refuse it too)" % exc
        variables: Dict[str, str] = {}
        for pipeline in self._pipelines(tokens):
            producers_download = False
            for seg in pipeline:
                seg = self._expand(seg, variables)
                argv = self._strip_prefixes(seg, variables)
                if not argv:
                    continue
                why = self._rules(argv, seg, depth)
                if why:
                    return why
                name = os.path.basename(argv[0])
                if name in self.DOWNLOADERS or (name == "base64" and set(argv[1:]) & {
                        "-d", "-D", "--decode"}):
                    producers_download = True
                elif producers_download and (name in self.SHELLS or re.match(
                        r"(python[0-9.]*|perl|ruby|node)$", name)):
                    return "pipe-to-shell: downloaded or decoded text piped into %s" % name
        return None

    @staticmethod
    def _substitutions(command: str) -> List[str]:
        """The text inside every $(…), <(…), >(…) and `…`, found by bracket counting."""
        found = re.findall(r"`([^`]*)`", command)
        for m in re.finditer(r"[$<>]\(", command):
            depth, i = 1, m.end()
            while i < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[i], 0)
                i += 1
            found.append(command[m.end(): i - 1 if not depth else i])
        return found

    @staticmethod
    def _tokens(command: str) -> List[str]:
        import shlex  # only run_command needs it
        lex = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
        lex.whitespace_split = True
        lex.commenters = ""
        return list(lex)

    @staticmethod
    def _pipelines(tokens: List[str]) -> Iterator[List[List[str]]]:
        """Split tokens into pipelines (lists of simple commands)."""
        pipeline: List[List[str]] = []
        seg: List[str] = []
        for tok in tokens:
            if tok in ("|", "|&"):
                pipeline.append(seg)
                seg = []
            elif tok and set(tok) <= set(";&|()") or tok == "\n":
                pipeline.append(seg)
                yield pipeline
                pipeline, seg = [], []
            else:
                seg.append(tok)
        pipeline.append(seg)
        yield pipeline

    @staticmethod
    def _expand(seg: List[str], variables: Dict[str, str]) -> List[str]:
        def sub(tok: str) -> str:
            return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                          lambda m: variables.get(m.group(1), m.group(0)), tok)
        return [sub(t) for t in seg]

    def _strip_prefixes(self, seg: List[str], variables: Dict[str, str]) -> List[str]:
        argv = list(seg)
        while argv:
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", argv[0], re.S)
            if m:
                variables[m.group(1)] = m.group(2)
                argv.pop(0)
                continue
            if argv[0] in self.KEYWORDS:
                argv.pop(0)
                continue
            name = os.path.basename(argv[0])
            if name not in self.PREFIXES:
                break
            argv.pop(0)
            # Options of the prefix (sudo -u root, env -i, timeout 5, nice -n 5 ...).
            while argv and (argv[0].startswith("-") or "=" in argv[0]
                            or (name in ("timeout", "nice") and argv[0][:1].isdigit())):
                opt = argv.pop(0)
                if opt in ("-u", "-g", "-n", "-C", "-s", "--user", "--group") and argv:
                    argv.pop(0)
        return argv

    def _rules(self, argv: List[str], seg: List[str], depth: int) -> Optional[str]:
        name = os.path.basename(argv[0])
        args = argv[1:]
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
        longs = [a for a in args if a.startswith("--")]
        if name in self.SHELLS or name == "eval":
            if name == "eval":
                return self._check(" ".join(args), depth + 1)
            for i, a in enumerate(args):
                if re.fullmatch(r"-[a-z]*c[a-z]*", a) and i + 1 < len(args):
                    return self._check(args[i + 1], depth + 1)
        if name == "xargs":
            rest = list(args)
            while rest and rest[0].startswith("-"):
                opt = rest.pop(0)
                if opt in ("-I", "-n", "-P", "-L", "-d", "-E", "-s", "-a") and rest:
                    rest.pop(0)
            return self._rules(rest, rest, depth) if rest else None
        if name == "find":
            why = self._find_rule(args, depth)
            if why:
                return why
        if name == "rm":
            recursive = "r" in flags or "R" in flags or "--recursive" in longs
            for t in args:
                if recursive and not t.startswith("-") and self._dangerous_target(t):
                    return "rm-root: recursive delete of %s" % t
            if "--no-preserve-root" in longs:
                return "rm-root: --no-preserve-root"
        if re.match(r"mkfs(\.|$)|mke2fs$|wipefs$|mkswap$", name):
            return "mkfs: %s formats a device" % name
        if name == "dd" and any(a.startswith("of=/dev/") and a not in (
                "of=/dev/null", "of=/dev/stdout", "of=/dev/stderr") for a in args):
            return "dd-device: dd writes to a device"
        for i, tok in enumerate(seg[:-1]):
            if tok in (">", ">>") and re.match(r"/dev/(sd|hd|vd|xvd|nvme|mmcblk|disk|md|dm-)",
                                                seg[i + 1]):
                return "write-device: output redirected to %s" % seg[i + 1]
        if name in ("chmod", "chown", "chgrp") and ("R" in flags or "--recursive" in longs):
            if any(self._dangerous_target(t, root_only=True) for t in args
                   if not t.startswith("-")):
                return "%s-root: recursive %s on /" % (name, name)
        if name in ("shutdown", "reboot", "halt", "poweroff") or (
                name == "systemctl" and set(args) & {"poweroff", "reboot", "halt", "kexec"}) or (
                name in ("init", "telinit") and set(args) & {"0", "6"}):
            return "shutdown: %s stops or restarts the machine" % name
        if name not in ("ls", "cat") and any(
                ".git/hooks" in posixpath.normpath(a.replace("\\", "/")) for a in seg):
            return "git-hooks: writing into .git/hooks runs code on later git commands"
        if name == "git":
            return self._git_rule(args)
        return None

    FIND_FILTERS = ("-name", "-iname", "-path", "-ipath", "-regex", "-iregex", "-newer",
                    "-mtime", "-mmin", "-size", "-user", "-empty", "-wholename")

    def _find_rule(self, args: List[str], depth: int) -> Optional[str]:
        """find … -delete / -exec rm: refused on /, home or the root unless filtered by name,
        path, age or size (find . -name '*.pyc' -delete is ordinary housekeeping)."""
        targets = []
        for a in args:
            if a.startswith(("-", "(", "!")):
                break
            targets.append(a)
        filtered = any(a in self.FIND_FILTERS for a in args)
        wide = [t for t in targets or ["."] if self._dangerous_target(t, root_only=filtered)]
        if not wide:
            return None
        if "-delete" in args:
            return "find-delete-root: find -delete on %s" % wide[0]
        for marker in ("-exec", "-execdir", "-ok", "-okdir"):
            if marker in args:
                sub = args[args.index(marker) + 1:]
                sub = sub[: min([sub.index(e) for e in (";", "+") if e in sub] or [len(sub)])]
                if sub and os.path.basename(sub[0]) in ("rm", "shred", "unlink"):
                    return "find-delete-root: find -exec %s on %s" % (sub[0], wide[0])
                why = self._rules(sub, sub, depth) if sub else None
                if why:
                    return why
        return None

    def _git_rule(self, args: List[str]) -> Optional[str]:
        rest = list(args)
        while rest and rest[0].startswith("-"):  # git -C dir -c k=v ... subcommand
            opt = rest.pop(0)
            if opt in ("-C", "-c", "--git-dir", "--work-tree", "--namespace") and rest:
                if opt == "-c" and rest[0].lower().startswith("core.hookspath"):
                    return "git-hooks: core.hooksPath makes git run other programs"
                rest.pop(0)
        if not rest:
            return None
        sub, sargs = rest[0], rest[1:]
        sflags = "".join(a[1:] for a in sargs if a.startswith("-") and not a.startswith("--"))
        if sub == "push" and ("f" in sflags or any(a.startswith(("--force", "--mirror"))
                                                   for a in sargs)
                              or any(a.startswith("+") for a in sargs)):
            return "git-push-force: force push rewrites remote history"
        if sub == "reset" and "--hard" in sargs:
            return "git-reset-hard: discards uncommitted work"
        if sub == "clean" and ("f" in sflags or "--force" in sargs) and (
                "d" in sflags or "x" in sflags or "X" in sflags):
            return "git-clean: deletes untracked (and ignored) files"
        if sub == "config" and any(a.lower() == "core.hookspath" for a in sargs):
            return "git-hooks: core.hooksPath makes git run other programs"
        return None

    def _dangerous_target(self, target: str, root_only: bool = False) -> bool:
        t = target.rstrip("/") if target not in ("/",) else "/"
        if t in ("/", "", "/*") or re.fullmatch(r"/+\*?", target):
            return True
        if root_only:
            return False
        if t in ("~", "~/*", "$HOME", "${HOME}", "$HOME/*", "${HOME}/*", ".", "./*", "*", "..",
                 "../*", "$PWD", "${PWD}", "$PWD/*", "${PWD}/*", "/home", "/root", "/usr",
                 "/etc", "/var", "/boot", "/bin", "/lib"):
            return True
        home = os.path.expanduser("~").rstrip("/")
        return t in self.root_paths or t == home or t.rstrip("*").rstrip("/") in self.root_paths



# =======================================================================================
# §8 Codex runner: workers and jobs in isolated worktrees (reference/codex.md)
# =======================================================================================

SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
MODEL_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ACTIVE = ("queued", "running")


class Run:
    """One Codex worker or job: persisted metadata plus its live process and queue.

    Persisted (state.json, written on transitions only): never the prompt unless the
    profile says store_prompts. The thread id is kept for resume and never reported.
    """

    FIELDS = ("name", "kind", "workspace", "mode", "sandbox", "model", "state", "turns",
              "created", "updated", "thread_id", "branch", "base", "last_message",
              "changed_files", "commands", "error", "usage", "pgid")

    def __init__(self, **values: Any) -> None:
        self.name = ""
        self.kind = "worker"          # worker | plan | apply
        self.workspace = ""
        self.mode = "isolated"        # isolated | read_only | workspace
        self.sandbox = "read-only"
        self.model: Optional[str] = None
        self.state = "queued"
        self.turns = 0
        self.created = iso()
        self.updated = iso()
        self.thread_id: Optional[str] = None
        self.branch: Optional[str] = None
        self.base: Optional[str] = None
        self.last_message = ""
        self.changed_files: List[str] = []
        self.commands = 0
        self.error: Optional[str] = None
        self.usage: Optional[Dict[str, Any]] = None
        self.pgid: Optional[int] = None
        for key, value in values.items():
            if key in self.FIELDS:
                setattr(self, key, value)
        self.state_dir = ""
        self.workdir = ""
        self.queue: List[str] = []
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.thread: Optional[threading.Thread] = None
        self.stop_requested = False
        self.timed_out = False
        self.completed = False
        self.version = 0
        self.turn_started = 0.0

    def save(self) -> None:
        """Write state.json atomically (0600): on transitions only, never per event."""
        self.updated = iso()
        private_dir(self.state_dir)
        atomic_write(os.path.join(self.state_dir, "state.json"),
                     (json.dumps({k: getattr(self, k) for k in self.FIELDS}, indent=1)
                      + "\n").encode())

    def report(self) -> Dict[str, Any]:
        """What a caller may see: no thread id, no process id, no absolute path."""
        out: Dict[str, Any] = {"name": self.name, "kind": self.kind, "state": self.state,
                               "mode": self.mode, "turns": self.turns,
                               "queued_messages": len(self.queue)}
        if self.branch:
            out["branch"] = self.branch
        if self.state == "running" and self.turn_started:
            out["running_s"] = int(time.time() - self.turn_started)
        out["last_message"], cut = cap_text(self.last_message, 4000)
        if cut:
            out["last_message_truncated"] = True
        out["changed_files"] = self.changed_files[:200]
        out["commands_run"] = self.commands
        if self.error:
            out["error"] = self.error[:1000]
        if self.usage:
            out["usage"] = {k: v for k, v in self.usage.items() if isinstance(v, int)}
        out["updated"] = self.updated
        return out


class CodexRunner:
    """Starts `codex exec --json` turns, one process group each, at most N at once.

    The prompt goes on stdin (then closed: an open stdin hangs Codex), so it never shows
    in a process list and can never be read as a flag. Events are parsed as they stream;
    state is written on transitions; `wait` wakes on any change through a condition
    variable. After a turn in a worktree PatchBay commits the changes itself, because
    Codex's sandbox keeps `.git` read-only.
    """

    def __init__(self, cfg: Config, git: Git, redactor: Redactor) -> None:
        self.cfg, self.git, self.redactor = cfg, git, redactor
        self.jobs_dir = os.path.join(cfg.home, "runtime", "jobs")
        self.trees_dir = os.path.join(cfg.home, "worktrees")
        self.cond = threading.Condition()
        self.version = 0
        self.runs: Dict[Tuple[str, str], Run] = {}
        self.slots = threading.Semaphore(cfg.limits["max_parallel_turns"])
        self.closing = False
        self._load()

    # -- bookkeeping -------------------------------------------------------------------
    @staticmethod
    def key(root: Root) -> str:
        slug = re.sub(r"[^a-z0-9-]+", "-", root.name.lower()).strip("-")[:40] or "ws"
        return "%s-%s" % (slug, hashlib.sha256(root.real.encode()).hexdigest()[:8])

    def _load(self) -> None:
        """Pick up runs from a previous process: anything it left running is interrupted,
        and any process group it left behind is ended."""
        if not os.path.isdir(self.jobs_dir):
            return
        for ws_key in sorted(os.listdir(self.jobs_dir)):
            ws_dir = os.path.join(self.jobs_dir, ws_key)
            for name in sorted(os.listdir(ws_dir)) if os.path.isdir(ws_dir) else []:
                path = os.path.join(ws_dir, name, "state.json")
                try:
                    with open(path, encoding="utf-8") as f:
                        run = Run(**json.load(f))
                except (OSError, ValueError, TypeError):
                    continue
                run.state_dir = os.path.dirname(path)
                run.workdir = os.path.join(self.trees_dir, ws_key, name)
                if run.state in ACTIVE:
                    self._kill_stale(run.pgid)
                    run.state, run.pgid = "interrupted", None
                    run.error = "PatchBay stopped during this turn; message it to resume"
                    run.save()
                self.runs[(ws_key, run.name)] = run

    @staticmethod
    def _kill_stale(pgid: Optional[int]) -> None:
        if not pgid:
            return
        try:
            with open("/proc/%d/cmdline" % pgid, "rb") as f:
                if b"codex" not in f.read():
                    return  # the id was reused by something else: leave it alone
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


    def _changed(self, run: Run, persist: bool = True) -> None:
        """Call with self.cond held."""
        if persist:
            run.save()
        run.version += 1
        self.version += 1
        self.cond.notify_all()

    def get(self, root: Root, name: str) -> Run:
        run = self.runs.get((self.key(root), name))
        if run is None:
            known = sorted(n for (k, n) in self.runs if k == self.key(root))
            raise PatchbayError("no worker or job named %r in this workspace%s"
                                % (name, "; known: " + ", ".join(known) if known else ""),
                                "NOT_FOUND")
        return run

    def _binary(self) -> str:
        path = shutil.which(self.cfg.codex["bin"])
        if not path:
            raise PatchbayError("the Codex CLI (%s) was not found: install it with `npm install "
                                "-g @openai/codex`, or set codex.bin in the profile"
                                % self.cfg.codex["bin"], "UNAVAILABLE")
        return path

    # -- starting work -----------------------------------------------------------------
    def start(self, root: Root, kind: str, name: Optional[str], prompt: str, mode: str,
              model: Optional[str]) -> Run:
        if model is not None and not MODEL_SLUG.fullmatch(model):
            raise PatchbayError("model must be a model slug such as gpt-5.5")
        self._binary()
        ws_key = self.key(root)
        with self.cond:
            if name is None:
                taken = [int(n.split("-")[1]) for (k, n) in self.runs
                         if k == ws_key and re.fullmatch(kind + r"-\d+", n)]
                name = "%s-%d" % (kind, max(taken, default=0) + 1)
            if not SLUG.fullmatch(name):
                raise PatchbayError("name must be a short slug: lowercase letters, digits and "
                                    "'-', starting with a letter or digit (e.g. fix-login)")
            if (ws_key, name) in self.runs:
                raise PatchbayError("%s already exists; message it, or stop it with "
                                    "discard=true first" % name, "CONFLICT")
            sandbox = self.cfg.codex["plan_sandbox" if mode != "isolated" else "sandbox"]
            run = Run(name=name, kind=kind, workspace=root.name, mode=mode, sandbox=sandbox,
                      model=model or self.cfg.codex.get("model"))
            run.state_dir = os.path.join(self.jobs_dir, ws_key, name)
            run.workdir = os.path.join(self.trees_dir, ws_key, name)
            self.runs[(ws_key, name)] = run  # reserve the name while the worktree is made
        try:
            if mode == "isolated":
                self._make_worktree(root, run)
            else:
                run.workdir = root.current_path()
            with self.cond:
                self._enqueue(run, prompt)
        except BaseException:
            with self.cond:
                self.runs.pop((ws_key, name), None)
            raise
        return run

    def _make_worktree(self, root: Root, run: Run) -> None:
        cwd = root.current_path()
        self.git.require(cwd)
        try:
            head = self.git.run(cwd, ["rev-parse", "--verify", "HEAD^{commit}"])
            run.base = head.decode().strip()
        except PatchbayError:
            raise PatchbayError("the workspace has no commits yet; commit once so a worker "
                                "has a base to branch from", "UNSUPPORTED_REPO") from None
        run.branch = "patchbay/" + run.name
        private_dir(os.path.dirname(run.workdir))
        if os.path.exists(run.workdir):
            raise PatchbayError("a stale worktree for %s exists; stop it with discard=true"
                                % run.name, "CONFLICT")
        self.git.run(cwd, ["worktree", "add", "-b", run.branch, "--", run.workdir, run.base],
                     timeout=120)
        os.chmod(run.workdir, 0o700)  # git made it with the umask; PATCHBAY_HOME stays private

    def message(self, root: Root, name: str, text: str) -> Run:
        run = self.get(root, name)
        with self.cond:
            if run.kind != "worker":
                raise PatchbayError("%s is a one-shot job; start a worker to keep talking"
                                    % name)
            self._enqueue(run, text)
        return run

    def _enqueue(self, run: Run, prompt: str) -> None:
        """With self.cond held: queue a prompt, starting a turn unless one is under way."""
        if self.cfg.store_prompts:
            private_dir(run.state_dir)
            with open(os.path.join(run.state_dir, "prompts.jsonl"), "a", encoding="utf-8") as f:
                f.write(dumps({"ts": iso(), "prompt": self.redactor(prompt)}) + "\n")
        run.queue.append(prompt)
        if run.state not in ACTIVE or run.thread is None:
            self._launch(run)
        else:
            self._changed(run, persist=False)

    def _launch(self, run: Run) -> None:
        prompt = run.queue.pop(0)
        run.state, run.stop_requested, run.timed_out, run.completed = "queued", False, False, False
        run.thread = threading.Thread(target=self._turn, args=(run, prompt), daemon=True,
                                      name="codex-" + run.name)
        self._changed(run)
        run.thread.start()

    def _argv(self, run: Run) -> List[str]:
        argv = [self._binary(), "exec", "--json", "--skip-git-repo-check", "-C", run.workdir,
                "-s", run.sandbox]
        if run.model:
            argv += ["-m", run.model]
        for override in self.cfg.codex.get("config_overrides") or []:
            argv += ["-c", str(override)]  # from the operator's profile, never from a prompt
        if run.thread_id:
            argv += ["resume", run.thread_id]
        return argv + ["-"]  # "-": the prompt comes on stdin

    def _env(self) -> Dict[str, str]:
        env = child_env(inherit=self.cfg.child_env == "inherit")
        for name in self.cfg.codex.get("env") or []:
            if name in os.environ and name not in OWN_SECRET_ENV:
                env[name] = os.environ[name]
        return env

    # -- one turn ----------------------------------------------------------------------
    def _turn(self, run: Run, prompt: str) -> None:
        self.slots.acquire()
        try:
            with self.cond:
                if run.stop_requested or self.closing:
                    return
                argv = self._argv(run)
                run.proc = proc = subprocess.Popen(
                    argv, cwd=run.workdir, env=self._env(), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                assert proc.stdin and proc.stdout and proc.stderr
                try:  # the prompt first: Codex starts only when its stdin ends
                    proc.stdin.write(prompt.encode("utf-8"))
                except OSError:
                    pass
                finally:
                    proc.stdin.close()
                run.state, run.pgid, run.error = "running", proc.pid, None
                run.turns += 1
                run.turn_started = time.time()
                self._changed(run)
            stderr = threading.Thread(target=self._pump_stderr, args=(run, proc.stderr),
                                      daemon=True)
            stderr.start()
            timer = threading.Timer(self.cfg.limits["turn_timeout_s"], self._timeout, (run,))
            timer.daemon = True
            timer.start()
            for line in proc.stdout:
                self._event(run, line)
            proc.wait()
            timer.cancel()
            stderr.join(5)
            proc.stdout.close()
        finally:
            self.slots.release()
        self._finish(run, prompt)

    def _timeout(self, run: Run) -> None:
        run.timed_out = True
        if run.proc is not None:
            kill_group(run.proc)

    def _finish(self, run: Run, prompt: str) -> None:
        proc = run.proc
        if proc is not None:
            kill_group(proc)  # nothing the turn started outlives it
        if run.mode == "isolated" and not self.closing and os.path.isdir(run.workdir):
            try:
                self.commit(run, "turn %d: %s" % (run.turns, prompt.strip().split("\n")[0][:72]))
            except PatchbayError as exc:
                run.error = "could not commit the turn: %s" % exc.message
        with self.cond:
            run.proc, run.pgid = None, None
            if self.closing:
                run.state = "interrupted"
                run.error = "PatchBay stopped during this turn; message it to resume"
            elif run.stop_requested or self._cancelled_on_disk(run, proc):
                run.state = "cancelled"
            elif run.timed_out:
                run.state = "failed"
                run.error = "the turn timed out after %d s" % self.cfg.limits["turn_timeout_s"]
            elif proc is not None and proc.returncode == 0 and run.completed:
                run.state = "idle" if run.kind == "worker" else "done"
            else:
                run.state = "failed"
                if not run.error:
                    run.error = "codex exited with status %s" % (proc.returncode if proc else "?")
            if run.queue and run.state not in ("cancelled", "interrupted"):
                self._launch(run)
            else:
                run.thread = None
                self._changed(run)

    @staticmethod
    def _cancelled_on_disk(run: Run, proc: Optional[subprocess.Popen[bytes]]) -> bool:
        """`patchbay jobs cancel` (another process) kills the group and says so on disk."""
        if proc is None or (proc.returncode or 0) >= 0:
            return False
        try:
            with open(os.path.join(run.state_dir, "state.json"), encoding="utf-8") as f:
                return bool(json.load(f).get("state") == "cancelled")
        except (OSError, ValueError):
            return False

    def _event(self, run: Run, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self._log(run, "events.jsonl", dumps(event) + "\n")
        kind = event.get("type")
        item: Dict[str, Any] = event["item"] if isinstance(event.get("item"), dict) else {}
        notify = False
        with self.cond:
            if kind == "thread.started" and isinstance(event.get("thread_id"), str):
                run.thread_id = event["thread_id"]
            elif kind == "item.completed" and item.get("type") == "agent_message":
                run.last_message = self.redactor(str(item.get("text", "")))
                notify = True
            elif kind == "item.completed" and item.get("type") == "command_execution":
                run.commands += 1
                notify = True
            elif kind == "item.completed" and item.get("type") == "file_change":
                for change in item.get("changes") or []:
                    path = self._relative(run, str(change.get("path", "")))
                    if path and path not in run.changed_files:
                        run.changed_files.append(path)
                notify = True
            elif kind == "turn.completed":
                run.completed = True
                run.usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
            elif kind == "turn.failed":
                err = event.get("error")
                run.error = self.redactor(str(err.get("message") if isinstance(err, dict) else err))
            if notify:
                self._changed(run, persist=False)

    @staticmethod
    def _relative(run: Run, path: str) -> str:
        base = run.workdir.rstrip("/") + "/"
        if path.startswith(base):
            return path[len(base):]
        return "" if path.startswith("/") else path

    def _pump_stderr(self, run: Run, stream: Any) -> None:
        for line in stream:
            self._log(run, "stderr.log", line.decode("utf-8", "replace"))
        stream.close()

    def _log(self, run: Run, name: str, text: str) -> None:
        """Append redacted text to a per-run log, capped (the rest is dropped)."""
        path = os.path.join(run.state_dir, name)
        try:
            if os.path.getsize(path) > 2 * 1024 * 1024:
                return
        except OSError:
            pass
        try:
            private_dir(run.state_dir)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(self.redactor(text))
        except OSError:
            pass

    def commit(self, run: Run, message: str) -> bool:
        """Commit everything in the worker's worktree on its branch; False if clean."""
        if not self.git.run(run.workdir, ["status", "--porcelain", "-z"]):
            return False
        self.git.run(run.workdir, ["add", "-A"])
        self.git.run(run.workdir, ["-c", "user.name=patchbay", "-c",
                                   "user.email=patchbay@localhost", "commit", "-q",
                                   "--no-verify", "-m", message])
        return True

    # -- looking and stopping ----------------------------------------------------------
    def wait(self, root: Root, name: Optional[str], wait_s: float) -> List[Run]:
        """Runs of this workspace (or one), after waiting up to wait_s for any change."""
        ws_key = self.key(root)
        with self.cond:
            one = self.get(root, name) if name else None
            if wait_s > 0:
                before = one.version if one else self.version
                self.cond.wait_for(lambda: (one.version if one else self.version) != before,
                                   timeout=wait_s)
            return [one] if one else [r for (k, _), r in sorted(self.runs.items()) if k == ws_key]

    def stop(self, root: Root, name: str, discard: bool) -> Dict[str, Any]:
        run = self.get(root, name)
        with self.cond:
            run.stop_requested = True
            run.queue.clear()
            proc, thread = run.proc, run.thread
            if run.state in ACTIVE and proc is None:
                run.state = "cancelled"  # still waiting for a slot
                self._changed(run)
        if proc is not None:
            kill_group(proc)
        if thread is not None:
            thread.join(15)
        out = {"name": name, "state": run.state, "discarded": False}
        if discard:
            cwd = root.current_path()
            if run.mode == "isolated":
                if os.path.isdir(run.workdir):
                    self.git.run(cwd, ["worktree", "remove", "--force", "--", run.workdir],
                                 timeout=120)
                if run.branch:
                    self.git.run(cwd, ["branch", "-D", "--", run.branch], ok_codes=(0, 1))
            shutil.rmtree(run.state_dir, ignore_errors=True)
            with self.cond:
                self.runs.pop((self.key(root), name), None)
                self.version += 1
                self.cond.notify_all()
            out.update(state="discarded", discarded=True)
        return out

    def shutdown(self) -> None:
        """Stop every running turn; they become `interrupted` and can be resumed later."""
        with self.cond:
            self.closing = True
            live = [r for r in self.runs.values() if r.proc is not None or r.state in ACTIVE]
        for run in live:
            if run.proc is not None:
                kill_group(run.proc)
        for run in live:
            if run.thread is not None:
                run.thread.join(10)
            with self.cond:
                if run.state in ACTIVE:
                    run.state = "interrupted"
                    self._changed(run)

    # -- results -----------------------------------------------------------------------
    def diff(self, run: Run, path: Optional[str], limit: int) -> Dict[str, Any]:
        if run.mode != "isolated" or not run.base:
            raise PatchbayError("%s works in the workspace itself and has no diff of its own; "
                                "use changes" % run.name)
        spec = ["--", ":(literal)" + path] if path else []
        names = self.git.run(run.workdir, ["diff", "--name-status", "-z", run.base] + spec)
        fields = [f.decode("utf-8", "replace") for f in names.split(b"\0") if f]
        files = [{"status": fields[i][0], "path": fields[i + 1]}
                 for i in range(0, len(fields) - 1, 2) if not fields[i].startswith(("R", "C"))]
        text = self.git.run(run.workdir, ["diff", "--no-ext-diff", "--no-textconv", "--no-color",
                                          run.base] + spec).decode("utf-8", "replace")
        status = self.git.status(run.workdir)
        for entry in status["files"]:  # new files not committed yet (a turn is running)
            if entry["index"] == "?" and (not path or entry["path"].startswith(path)):
                files.append({"status": "A", "path": entry["path"]})
                text += self.git.run(run.workdir, ["diff", "--no-index", "--no-color", "--",
                                                   os.devnull, entry["path"]],
                                     ok_codes=(0, 1)).decode("utf-8", "replace")
        diff, cut = cap_text(text, limit)
        return {"name": run.name, "branch": run.branch, "base": run.base[:12],
                "files": files[:500], "diff": diff, "truncated": cut or len(files) > 500}

    def integrate(self, root: Root, run: Run, dry_run: bool) -> Dict[str, Any]:
        if run.mode != "isolated" or not run.base:
            raise PatchbayError("%s changed the workspace directly; nothing to integrate"
                                % run.name)
        if run.state in ACTIVE:
            raise PatchbayError("%s is %s; wait for it (codex_status wait_s) or stop it"
                                % (run.name, run.state), "BUSY")
        self.commit(run, "uncommitted changes")
        tip = self.git.run(run.workdir, ["rev-parse", "HEAD"]).decode().strip()
        raw = self.git.run(run.workdir, ["diff", "--name-only", "-z", "--no-renames",
                                         run.base, tip])
        files = sorted({f.decode("utf-8", "replace") for f in raw.split(b"\0") if f})
        if not files:
            return {"name": run.name, "integrated": False, "files": [],
                    "message": "the worker changed nothing"}
        cwd = root.current_path()
        self.git.require(cwd)
        dirty = sorted({f["path"] for f in self.git.status(cwd)["files"]} & set(files))
        if dirty:
            raise PatchbayError("not integrated: these files have uncommitted changes in the "
                                "workspace: %s; commit or stash them first" % ", ".join(dirty),
                                "CONFLICT", files=dirty)
        patch = self.git.run(run.workdir, ["diff", "--binary", "--no-ext-diff", "--no-textconv",
                                           "--no-renames", run.base, tip])
        check = self.git.call(cwd, ["apply", "--check", "--whitespace=nowarn"], patch)
        if check.returncode != 0:
            err = check.stderr.decode("utf-8", "replace")
            bad = sorted(set(re.findall(r"error: (?:patch failed: )?([^:\n]+)", err)) & set(files))
            raise PatchbayError("not integrated: the changes conflict with the workspace in %s"
                                % (", ".join(bad) or err.strip()[:300]), "CONFLICT", files=bad)
        if dry_run:
            return {"name": run.name, "integrated": False, "dry_run": True, "files": files}
        self.git.run(cwd, ["apply", "--whitespace=nowarn"], input=patch)
        return {"name": run.name, "integrated": True, "files": files,
                "message": "applied as uncommitted changes; review them with `changes`"}

    def transcript(self, run: Run, limit: int) -> Dict[str, Any]:
        """The newest messages of this run's own Codex session, bounded and redacted."""
        messages: List[Dict[str, str]] = []
        if run.thread_id and re.fullmatch(r"[0-9A-Za-z-]{8,64}", run.thread_id):
            codex_home = os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex")
            pattern = os.path.join(codex_home, "sessions", "*", "*", "*",
                                   "rollout-*-%s.jsonl" % run.thread_id)
            for path in sorted(glob.glob(pattern))[-1:]:
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 8 * 1024 * 1024))
                    lines = f.read().splitlines()
                for line in lines:
                    msg = self._rollout_message(line)
                    if msg:
                        messages.append(msg)
        return {"name": run.name, "messages": messages[-limit:],
                "total_messages": len(messages)}

    def _rollout_message(self, line: bytes) -> Optional[Dict[str, str]]:
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        if not isinstance(entry, dict):  # valid JSON, but a list, a string, a number...
            return None
        payload = entry.get("payload")
        if entry.get("type") != "response_item" or not isinstance(payload, dict):
            return None
        if payload.get("type") != "message" or payload.get("role") not in ("user", "assistant"):
            return None
        content = payload.get("content")
        text = "".join(c["text"] for c in content if isinstance(c, dict)
                       and isinstance(c.get("text"), str)) if isinstance(content, list) else ""
        if not text or text.lstrip().startswith(("<environment_context>", "<permissions")):
            return None
        return {"role": payload["role"], "text": cap_text(self.redactor(text), 2000)[0]}


# =======================================================================================
# §9 Tools: one registry feeds MCP and Actions
# =======================================================================================

REQUIRED = object()


class Param:
    """One argument: JSON type, description, default, and bounds. Builds schema and checks."""

    def __init__(self, kind: str, description: str, default: Any = REQUIRED,
                 minimum: Optional[int] = None, maximum: Optional[int] = None,
                 max_length: Optional[int] = None, enum: Optional[List[str]] = None,
                 nullable: bool = False) -> None:
        self.kind, self.description, self.default = kind, description, default
        self.minimum, self.maximum, self.max_length, self.enum = minimum, maximum, max_length, enum
        self.nullable = nullable

    def schema(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": [self.kind, "null"] if self.nullable else self.kind,
                               "description": self.description}
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum),
                           ("maxLength", self.max_length), ("enum", self.enum)):
            if value is not None:
                out[key] = value
        if self.default is not REQUIRED and self.default is not None:
            out["default"] = self.default
        return out

    def check(self, name: str, value: Any) -> Any:
        if value is None and (self.nullable or self.default is None):
            return None
        types = {"string": str, "integer": int, "boolean": bool, "object": dict}
        ok = isinstance(value, types[self.kind])
        if self.kind == "integer" and isinstance(value, bool):
            ok = False
        if self.kind == "integer" and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
        if not ok:
            raise PatchbayError("argument %r must be a %s" % (name, self.kind))
        if self.minimum is not None and value < self.minimum:
            raise PatchbayError("argument %r must be at least %d" % (name, self.minimum))
        if self.maximum is not None and value > self.maximum:
            raise PatchbayError("argument %r must be at most %d" % (name, self.maximum))
        if self.max_length is not None and len(value) > self.max_length:
            raise PatchbayError("argument %r is longer than %d characters"
                                % (name, self.max_length))
        if self.enum is not None and value not in self.enum:
            raise PatchbayError("argument %r must be one of %s" % (name, ", ".join(self.enum)))
        return value


class Tool:
    """Name, description, parameters, annotations and group: everything both doors need."""

    def __init__(self, name: str, group: str, summary: str, params: Dict[str, Param],
                 handler: Callable[[CallContext, Dict[str, Any]], Dict[str, Any]],
                 read_only: bool, destructive: bool = False, idempotent: bool = True,
                 open_world: bool = False) -> None:
        self.name, self.group, self.summary, self.params = name, group, summary, params
        self.handler = handler
        self.annotations = {"readOnlyHint": read_only,
                            "destructiveHint": False if read_only else destructive,
                            "idempotentHint": True if read_only else idempotent,
                            "openWorldHint": open_world}

    @property
    def read_only(self) -> bool:
        return bool(self.annotations["readOnlyHint"])

    def input_schema(self) -> Dict[str, Any]:
        schema: Dict[str, Any] = {
            "type": "object",
            "properties": {k: p.schema() for k, p in self.params.items()},
            "additionalProperties": False}
        required = [k for k, p in self.params.items() if p.default is REQUIRED]
        if required:
            schema["required"] = required
        return schema

    def mcp(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.summary,
                "inputSchema": self.input_schema(), "annotations": self.annotations}

    def validate(self, args: Any) -> Dict[str, Any]:
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise PatchbayError("arguments must be a JSON object")
        unknown = sorted(set(args) - set(self.params))
        if unknown:
            raise PatchbayError("unknown argument(s) %s; %s takes %s"
                                % (", ".join(unknown), self.name,
                                   ", ".join(self.params) or "no arguments"))
        out: Dict[str, Any] = {}
        for key, param in self.params.items():
            if key in args:
                out[key] = param.check(key, args[key])
            elif param.default is REQUIRED:
                raise PatchbayError("missing required argument %r" % key)
            else:
                out[key] = param.default
        return out


class ToolRegistry:
    def __init__(self, tools: List[Tool]) -> None:
        self.tools = tools
        self.by_name = {t.name: t for t in tools}


class Workspaces:
    """The roots this process may touch, pinned as directory fds, by name.

    Started with --root, the set is fixed. Started from the channel's registry, it follows
    the registry: `workspace add` pins a new root on the next call, `workspace remove`
    hides one (its fd stays open: closing it under a concurrent call could let the number
    be reused for another directory), and the channel's active workspace is the default.
    """

    def __init__(self, entries: List[Tuple[str, str]],
                 channel: Optional[Channel] = None) -> None:
        self.roots: Dict[str, Root] = {}
        self.channel = channel
        self._pinned: Dict[Tuple[str, str], Root] = {}
        self._generation = -1
        self._lock = threading.Lock()
        for name, path in entries:
            self.roots[name] = self._pin(name, path)
        if not self.roots:
            raise UsageError("no workspace: pass --root DIR (or set %s, or run "
                             "`patchbay channel register --workspace DIR`)" % ENV_ROOT)
        self.default = next(iter(self.roots))
        if channel is not None:
            self._generation = channel.generation

    def _pin(self, name: str, path: str) -> Root:
        key = (name, os.path.realpath(path))
        if key not in self._pinned:
            self._pinned[key] = Root(name, path)
        return self._pinned[key]

    def _sync(self) -> None:
        if self.channel is None:
            return
        data = self.channel.load()
        if self.channel.generation == self._generation:
            return
        with self._lock:
            registry = data.get("workspaces") or {}
            roots: Dict[str, Root] = {}
            for name, path in registry.items():
                try:
                    roots[name] = self._pin(name, path)
                except UsageError as exc:
                    log.warning("%s", exc.message)
            self.roots = roots  # empty: the registry was emptied, so nothing is served
            active = data.get("active_workspace")
            self.default = active if active in roots else next(iter(roots), "")
            self._generation = self.channel.generation

    @staticmethod
    def from_paths(paths: List[str]) -> List[Tuple[str, str]]:
        entries: List[Tuple[str, str]] = []
        taken: set = set()
        for path in paths:
            base = re.sub(r"[^A-Za-z0-9_.-]+", "-",
                          os.path.basename(os.path.realpath(path)) or "root").strip("-") or "root"
            name, n = base, 2
            while name in taken:
                name, n = "%s-%d" % (base, n), n + 1
            taken.add(name)
            entries.append((name, path))
        return entries

    def names(self) -> List[str]:
        self._sync()
        return list(self.roots)

    def get(self, name: Optional[str]) -> Root:
        self._sync()
        roots = self.roots
        root = roots.get(name or self.default) or roots.get(self.default)
        if root is None:
            raise PatchbayError("no workspace is registered any more: add one with `patchbay "
                                "workspace add --name N --path DIR`", "NOT_FOUND")
        return root


class WorkspaceChoice:
    """Which workspace a caller has selected: per MCP session, or the channel's for Actions."""

    def __init__(self, channel: Optional[Channel] = None) -> None:
        self.channel = channel
        self.name: Optional[str] = None

    def get(self) -> Optional[str]:
        if self.channel is not None:
            return self.channel.load().get("active_workspace")
        return self.name

    def set(self, name: str) -> None:
        if self.channel is not None:
            self.channel.update(active_workspace=name)
        else:
            self.name = name


class CallContext:
    def __init__(self, door: str, choice: WorkspaceChoice,
                 cancel: Optional[threading.Event] = None) -> None:
        self.door = door
        self.choice = choice
        self.cancel = cancel or threading.Event()
        self.root: Root  # set by the dispatcher before the handler runs


def search_timeout(timeout: float) -> PatchbayError:
    return PatchbayError("the search did not finish within %g s (limits.search_timeout_s); "
                         "narrow it with path or glob, or a simpler query" % timeout, "TIMEOUT")


def kill_at_deadline(proc: subprocess.Popen[Any],
                     timeout: float) -> Tuple[threading.Timer, threading.Event]:
    """Kill the child's group after `timeout` s; the event tells that it came to that."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        kill_group(proc)

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    return timer, fired


def stream_records(argv: List[str], cwd: str, env: Dict[str, str], timeout: float,
                   cancel: threading.Event, error_codes: Tuple[int, ...] = ()) -> Iterator[bytes]:
    """Yield stdout lines of a child; stop it (whole group) when the consumer stops,
    on timeout or on cancel. Never lets the child's output pile up in memory. A child that
    ends with one of `error_codes` before printing anything raises its own message
    (a bad regular expression, for instance) instead of looking like "no matches"."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    timer, fired = kill_at_deadline(proc, timeout)
    produced = False
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if cancel.is_set():
                break
            produced = True
            yield line[:65536]
        else:
            proc.wait()
            if fired.is_set():
                raise search_timeout(timeout)
            if proc.returncode in error_codes and not produced:
                lines = proc.stderr.read(4096).decode("utf-8", "replace").strip().splitlines()
                why = " ".join(ln.strip() for ln in lines if ln.strip())[:300]
                raise PatchbayError("the search failed: %s" % (why or "exit %d"
                                                               % proc.returncode))
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill_group(proc)
        else:
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


# The Python scan never runs a client's regular expression in this process: `re`
# backtracks (`(a+)+$` on a long line takes exponential time) and holds the interpreter
# meanwhile, freezing every other client. A child matches instead and is killed at the
# deadline. It reads records "<byte length>\n<UTF-8 text>": first the pattern, then texts,
# and answers each text with one line, the numbers of its lines that match.
MATCH_CHILD = r"""
import re, sys
src = sys.stdin.buffer
def record():
    head = src.readline()
    return src.read(int(head)).decode("utf-8", "surrogatepass") if head else None
pattern = re.compile(record(), int(sys.argv[1]))
while True:
    text = record()
    if text is None:
        break
    found = [str(n) for n, line in enumerate(text.split("\n"), 1) if pattern.search(line)]
    sys.stdout.write(" ".join(found) + "\n")
    sys.stdout.flush()
"""


class RegexChild:
    """One search's matcher process: `lines(text)` runs in the child, which is killed at
    the deadline (then `lines` raises TIMEOUT)."""

    def __init__(self, pattern: str, flags: int, timeout: float) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", MATCH_CHILD, str(int(flags))], env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.timer, self.fired = kill_at_deadline(self.proc, timeout)
        self._send(pattern)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        data = text.encode("utf-8", "surrogatepass")
        try:
            self.proc.stdin.write(b"%d\n" % len(data) + data)
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone; the answer's absence says why

    def lines(self, text: str) -> List[int]:
        assert self.proc.stdout is not None
        self._send(text)
        answer = self.proc.stdout.readline()
        if not answer.endswith(b"\n"):
            if self.fired.is_set():
                raise search_timeout(self.timeout)
            raise PatchbayError("the search's matcher process ended early", "INTERNAL")
        return [int(n) for n in answer.split()]

    def close(self) -> None:
        self.timer.cancel()
        kill_group(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


Hit = Tuple[str, int, str]  # path, line number, line text


def shown_status(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A `Git.status` file entry with its paths as tools show them (`quote_path`)."""
    return {k: quote_path(v) if k in ("path", "from") else v for k, v in entry.items()}


class Workbench:
    """The tool handlers. `tool_<name>` methods; TOOLS below declares them."""

    def __init__(self, cfg: Config, workspaces: Workspaces, guard: PathGuard, git: Git,
                 channel: Channel, redactor: Redactor, runner: CodexRunner) -> None:
        self.cfg, self.workspaces, self.guard, self.git = cfg, workspaces, guard, git
        self.channel, self.redactor, self.runner = channel, redactor, runner
        self.policy = CommandPolicy(tuple(r.real for r in workspaces.roots.values()))
        self.limits = cfg.limits
        self.rg = shutil.which("rg")
        self.enabled: List[str] = []

    # -- helpers -------------------------------------------------------------------------
    def _text(self, data: bytes, parts: List[str]) -> str:
        if looks_binary(data):
            raise PatchbayError("%s is a binary file" % rel(parts), "BINARY_FILE")
        return data.decode("utf-8", "replace")

    def _url(self, root: Root, path: str, line: Optional[int] = None) -> str:
        url = "patchbay://%s/%s" % (urllib.parse.quote(root.name),
                                    urllib.parse.quote(path, errors="surrogateescape"))
        return url + ("#L%d" % line if line else "")

    # -- context tools -------------------------------------------------------------------
    def tool_workspace(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        root = call.root
        out: Dict[str, Any] = {"workspace": root.name, "workspaces": self.workspaces.names(),
                               "profile": self.cfg.profile_name, "tools": self.enabled}
        cwd = root.current_path()
        if self.git.repo_state(cwd) is None:
            st = self.git.status(cwd)
            files = [f for f in st["files"] if self.guard.visible(root, f["path"].split("/"))]
            out["git"] = {
                "branch": st["branch"], "head": st["head"],
                "staged": sum(1 for f in files if f["index"] not in ".?"),
                "unstaged": sum(1 for f in files if f["worktree"] not in ".?"),
                "untracked": sum(1 for f in files if f["index"] == "?"),
                "conflicts": sum(1 for f in files if f.get("conflict"))}
        else:
            out["git"] = None
            out["git_note"] = ("not a git repository" if self.git.repo_state(cwd) == "none"
                               else self.git.repo_state(cwd))
        try:
            data, _ = self.guard.read(root, "AGENTS.md", 1024 * 1024)
            out["agents_md"], cut = cap_text(data.decode("utf-8", "replace"), 4000)
            out["agents_md_truncated"] = cut
        except PatchbayError:
            pass
        return out

    def tool_switch_workspace(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        name = args["name"]
        if name not in self.workspaces.names():
            raise PatchbayError("no workspace named %r; registered: %s"
                                % (name, ", ".join(self.workspaces.names())), "NOT_FOUND")
        call.choice.set(name)
        call.root = self.workspaces.get(name)
        return self.tool_workspace(call, {})

    def tool_list_files(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        root, limit, budget = call.root, args["max_entries"], self.limits["text_chars"]
        fd, base = self.guard.open_dir(root, args["path"])
        entries: List[Dict[str, Any]] = []
        truncated = False
        use_git = self.git.repo_state(root.current_path()) is None
        level: List[Tuple[int, List[str]]] = [(fd, base)]
        try:
            for depth in range(args["depth"]):
                found: List[Tuple[Dict[str, Any], int, List[str]]] = []
                for dfd, dparts in level:
                    for entry in sorted(os.scandir(dfd), key=lambda e: e.name):
                        parts = dparts + [entry.name]
                        if entry.name == ".git" or not self.guard.visible(root, parts):
                            continue
                        if entry.name.startswith(".") and not args["include_hidden"]:
                            continue
                        found.append((self._entry(entry, parts), dfd, parts))
                if use_git and found:
                    ignored = self.git.ignored(root.current_path(),
                                               [rel(p) for _, _, p in found])
                    found = [f for f in found if rel(f[2]) not in ignored]
                nxt: List[Tuple[int, List[str]]] = []
                for info, dfd, parts in found:
                    budget -= len(dumps(info)) + 1
                    if len(entries) >= limit or budget < 0:
                        truncated = True
                        break
                    entries.append(info)
                    if info["type"] == "dir" and depth + 1 < args["depth"]:
                        try:
                            nxt.append((os.open(parts[-1], DIR_FLAGS, dir_fd=dfd), parts))
                        except OSError:
                            pass
                for dfd, _ in level:
                    if dfd != fd:
                        os.close(dfd)
                level = nxt
                if truncated or not level:
                    break
        finally:
            for dfd, _ in level:
                if dfd != fd:
                    os.close(dfd)
            self.guard.release(root, fd)
        entries.sort(key=lambda e: e["path"])
        return {"path": quote_path(rel(base)), "entries": entries, "truncated": truncated}

    @staticmethod
    def _entry(entry: os.DirEntry[str], parts: List[str]) -> Dict[str, Any]:
        st = entry.stat(follow_symlinks=False)
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
        info: Dict[str, Any] = {"path": quote_path(rel(parts)), "type": kind}
        if kind == "file":
            info["size"] = st.st_size
        return info

    def tool_read_file(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        data, parts = self.guard.read(call.root, args["path"], self.limits["read_bytes"])
        text = self._text(data, parts)
        total = count_lines(text)
        start, budget = args["start_line"], self.limits["text_chars"]
        if start > max(total, 1):
            raise PatchbayError("start_line %d is past the end: %s has %d lines"
                                % (start, rel(parts), total))
        stop = min(start - 1 + args["max_lines"], total)
        if start == 1 and stop == total:
            whole = text  # the usual case, the whole file: no need to split it
        else:
            pieces = text.split("\n")
            whole = "".join(pieces[i] + "\n" if i < len(pieces) - 1 else pieces[i]
                            for i in range(start - 1, stop))
        end, truncated = stop, False
        if len(whole) > budget // 6 and json_len(whole) > budget:  # cut at a line that fits
            whole, truncated = cap_text(whole, budget)
            end = start - 1 + max(1, count_lines(whole))
        return {"path": quote_path(rel(parts)), "text": whole, "start_line": start,
                "end_line": end,
                "total_lines": total, "next_start_line": end + 1 if end < total else None,
                "sha256": hashlib.sha256(data).hexdigest(), "truncated": truncated}

    def tool_search(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        root = call.root
        base = self._search_target(root, args["path"])
        limit, budget = args["max_results"], self.limits["text_chars"]
        results: List[Dict[str, Any]] = []
        truncated = False
        linked: Dict[str, bool] = {}
        for backend, hits in self._search_backends(call, root, base, args):
            for path, line, text in hits:
                parts = path.split("/")
                if (not self.guard.visible(root, parts) or not self._glob_ok(args["glob"], path)
                        or self._hard_linked(root, path, linked)):
                    continue
                ref = "%s:%d" % (quote_path(path), line)
                hit = {"id": ref, "title": ref, "url": self._url(root, path, line),
                       "path": quote_path(path), "line": line, "snippet": text.strip()[:300]}
                budget -= len(dumps(hit)) + 1
                if len(results) >= limit or budget < 0:
                    truncated = True
                    break
                results.append(hit)
            return {"results": results, "truncated": truncated, "backend": backend}
        raise PatchbayError("no search backend available", "UNAVAILABLE")  # pragma: no cover

    def _search_target(self, root: Root, path: Any) -> List[str]:
        """The path to search, resolved through the guard: symlinks followed only inside
        the root, and only a directory or a regular file (a FIFO would stall the search)."""
        parts = self.guard.split(root, path, allow_root=True)
        if not parts:
            return parts
        pfd, parts = self.guard.walk(root, parts, whole=False)
        try:
            st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise PatchbayError("no such file or directory: %s" % rel(parts),
                                "NOT_FOUND") from None
        finally:
            self.guard.release(root, pfd)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise PatchbayError("%s is neither a file nor a directory" % rel(parts),
                                "NOT_A_FILE")
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise PatchbayError("%s has several hard links; PatchBay does not read "
                                "hard-linked files" % rel(parts), "DENIED_PATH")
        return parts

    @staticmethod
    def _hard_linked(root: Root, path: str, seen: Dict[str, bool]) -> bool:
        """A hit in a hard-linked file is dropped, as read_file would refuse the file."""
        if path not in seen:
            try:
                st = os.stat(path, dir_fd=root.fd, follow_symlinks=False)
                seen[path] = not stat.S_ISREG(st.st_mode) or st.st_nlink > 1
            except OSError:
                seen[path] = True
        return seen[path]

    @staticmethod
    def _glob_ok(glob: Optional[str], path: str) -> bool:
        if not glob:
            return True
        target = path if "/" in glob else path.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(target, glob)

    def _search_backends(self, call: CallContext, root: Root, base: List[str],
                         args: Dict[str, Any]) -> Iterator[Tuple[str, Iterator[Hit]]]:
        """rg, then git grep, then Python. The query always follows -e, paths follow --."""
        cwd = root.current_path()
        target = "/".join(base) or "."
        timeout = self.limits["search_timeout_s"]
        # All three search hidden files too (dot-files such as .github/), never .git, and
        # never follow a symlink while walking (the target itself was resolved above).
        if self.rg:
            argv = [self.rg, "--no-config", "--no-messages", "--null", "--line-number",
                    "--with-filename", "--no-heading", "--color=never", "--max-columns=400",
                    "--max-columns-preview", "--max-filesize=8M", "--hidden", "--glob=!.git"]
            argv += ["--fixed-strings"] if not args["regex"] else []
            argv += ["--case-sensitive"] if args["case_sensitive"] else ["--ignore-case"]
            if args["glob"]:
                argv.append("--glob=" + args["glob"])
            argv += ["-e", args["query"], "--", target]
            yield "rg", self._parse_hits(stream_records(
                argv, cwd, child_env(), timeout, call.cancel, (2,)), rg=True)
            return
        if self.git.repo_state(cwd) is None:
            # -P: Perl-style regex, the dialect closest to rg's and Python's (\d, \w, ...).
            argv = self.git.argv(["grep", "-n", "-z", "-I", "--no-color", "--untracked",
                                  "-P" if args["regex"] else "-F"])
            argv += [] if args["case_sensitive"] else ["-i"]
            argv += ["-e", args["query"], "--", ":(literal)" + target if base else "."]
            yield "git", self._parse_hits(stream_records(
                argv, cwd, self.git.env, timeout, call.cancel, (128,)), rg=False)
            return
        yield "python", self._python_search(call, root, base, args, timeout)

    @staticmethod
    def _parse_hits(lines: Iterator[bytes], rg: bool) -> Iterator[Hit]:
        carry = b""
        for raw in lines:
            raw, carry = carry + raw, b""
            if b"\0" not in raw:  # a path with a newline in it: the record goes on
                carry = raw[:4096]
                continue
            # The path as the filesystem spells it (a non-UTF-8 byte kept as a surrogate).
            name, _, tail = raw.rstrip(b"\n").partition(b"\0")
            path = name.decode("utf-8", "surrogateescape")
            num, _, text = tail.decode("utf-8", "replace").partition(":" if rg else "\0")
            if path.startswith("./"):
                path = path[2:]
            if num.isdigit():
                yield path, int(num), text

    def _python_search(self, call: CallContext, root: Root, base: List[str],
                       args: Dict[str, Any], timeout: float) -> Iterator[Hit]:
        query = args["query"] if args["regex"] else re.escape(args["query"])
        flags = 0 if args["case_sensitive"] else re.IGNORECASE
        try:
            re.compile(query, flags)  # compiling is linear; only matching can run away
        except re.error as exc:
            raise PatchbayError("query is not a valid regular expression: %s" % exc) from None
        matcher = RegexChild(query, flags, timeout)
        try:
            yield from self._python_walk(call, root, base, matcher)
        finally:
            matcher.close()

    def _python_walk(self, call: CallContext, root: Root, base: List[str],
                     matcher: RegexChild) -> Iterator[Hit]:
        stack = [base]
        while stack:
            parts = stack.pop()
            try:
                fd, parts = self.guard.walk(root, parts, whole=True)
            except PatchbayError as exc:
                if exc.code == "NOT_FOUND" and parts:  # the target is a file, not a directory
                    yield from self._python_scan_file(root, parts, matcher)
                continue
            try:
                entries = sorted(os.scandir(fd), key=lambda e: e.name, reverse=True)
            finally:
                self.guard.release(root, fd)
            for entry in entries:
                if matcher.fired.is_set():
                    raise search_timeout(matcher.timeout)
                if call.cancel.is_set():
                    return
                child = parts + [entry.name]
                if entry.name == ".git" or not self.guard.visible(root, child):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
                elif entry.is_file(follow_symlinks=False):
                    yield from self._python_scan_file(root, child, matcher)

    def _python_scan_file(self, root: Root, parts: List[str],
                          matcher: RegexChild) -> Iterator[Hit]:
        try:
            data, parts = self.guard.read(root, rel(parts), 8 * 1024 * 1024)
        except PatchbayError:
            return
        if looks_binary(data) or not data:
            return
        # Lines end at "\n", as for rg, git grep and read_file, so line numbers agree; the
        # newline ending the last line starts no line of its own.
        text = data.decode("utf-8", "replace")
        text = text[:-1] if text.endswith("\n") else text
        lines = text.split("\n")
        for n in matcher.lines(text):
            yield "/".join(parts), n, lines[n - 1]

    def tool_fetch(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        ref = args["id"]
        path, line = ref, None
        m = re.fullmatch(r"(.+):(\d+)", ref)
        if m:
            path, line = m.group(1), int(m.group(2))
        data, parts = self.guard.read(call.root, path, self.limits["read_bytes"])
        full = self._text(data, parts)
        text, cut = cap_text(full, self.limits["text_chars"])
        return {"id": ref, "title": quote_path(rel(parts)), "text": text,
                "url": self._url(call.root, rel(parts), line),
                "metadata": {"path": quote_path(rel(parts)), "line": line,
                             "workspace": call.root.name,
                             "sha256": hashlib.sha256(data).hexdigest(),
                             "total_lines": count_lines(full),
                             "truncated": cut}}

    def tool_changes(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        root = call.root
        cwd = root.current_path()
        self.git.require(cwd)
        prefix: List[str] = []
        if args["path"]:
            prefix = self.guard.split(root, args["path"], allow_root=True)
            self.guard.check(root, prefix)
        st = self.git.status(cwd)
        files = [f for f in st["files"] if self.guard.visible(root, f["path"].split("/"))
                 and f["path"].split("/")[: len(prefix)] == prefix]
        col = "index" if args["staged"] else "worktree"
        changed = [f["path"] for f in files if f[col] not in ".?"]
        diff = b""
        if changed:
            diff = self.git.run(cwd, ["diff", "--no-ext-diff", "--no-textconv", "--no-color"]
                                + (["--cached"] if args["staged"] else [])
                                + ["--"] + [":(literal)" + p for p in changed[:2000]])
        text, cut = cap_text(diff.decode("utf-8", "replace"),
                             min(args["max_bytes"], self.limits["text_chars"]))
        hidden = len(st["files"]) - len(files) if not prefix else None
        out = {"branch": st["branch"], "head": st["head"], "staged": args["staged"],
               "files": [shown_status(f) for f in files[:1000]], "diff": text,
               "truncated": cut or len(files) > 1000}
        if hidden:
            out["hidden_blocked"] = hidden
        return out


    # -- power tools -------------------------------------------------------------------
    def tool_write_file(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        with self.guard.lock:
            return self.guard.write(call.root, args["path"], args["content"].encode("utf-8"),
                                    args["expected_sha256"], args["create_dirs"])

    def tool_edit_file(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        with self.guard.lock:
            data, parts = self.guard.read(call.root, args["path"], self.limits["read_bytes"])
            sha = hashlib.sha256(data).hexdigest()
            if args["expected_sha256"] and args["expected_sha256"].lower() != sha:
                raise PatchbayError("%s changed since it was read (sha256 is now %s); read it "
                                    "again" % (rel(parts), sha), "CONFLICT", sha256=sha)
            doc = TextFile(data, rel(parts))
            old, new = args["old_text"], args["new_text"]
            if doc.crlf:  # the caller most likely sent LF text for a CRLF file
                old, new = old.replace("\r\n", "\n"), new.replace("\r\n", "\n")
            text, count = replace_exact(doc.text, old, new, args["replace_all"], rel(parts))
            out = self.guard.write(call.root, rel(parts), doc.encode(text), expected_sha256=sha)
        return {"path": out["path"], "replacements": count, "sha256": out["sha256"]}

    def tool_apply_patch(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        root = call.root
        with self.guard.lock:
            plan, reports = self._plan_patch(root, parse_patch(args["patch"]))
            if args["dry_run"]:
                return {"applied": False, "dry_run": True, "files": reports}
            done: List[Tuple[str, Optional[bytes], Optional[int]]] = []
            created: List[str] = []
            try:
                for path, original, new, mode in plan:
                    if new is None:
                        done.append((path, original, self.guard.unlink(root, path)))
                    else:
                        before = self.guard.lstat(root, path) if original is not None else None
                        self.guard.write(root, path, new, mode=mode, created=created)
                        done.append((path, original, stat.S_IMODE(before.st_mode) & 0o777
                                     if before is not None else None))
            except (PatchbayError, OSError) as exc:
                for path, original, old_mode in reversed(done):  # all files or none
                    if original is None:
                        self.guard.unlink(root, path)
                    else:
                        self.guard.write(root, path, original, mode=old_mode)
                for directory in reversed(created):
                    self.guard.rmdir(root, directory)
                why = exc.message if isinstance(exc, PatchbayError) else str(exc)
                raise PatchbayError("patch not applied, nothing changed: %s" % why,
                                    "PATCH_FAILED") from None
        return {"applied": True, "dry_run": False, "files": reports}

    def _plan_patch(self, root: Root, files: List[FilePatch]) -> Tuple[
            List[Tuple[str, Optional[bytes], Optional[bytes], Optional[int]]],
            List[Dict[str, Any]]]:
        """Check every target and compute every new content before touching anything.
        Plan steps are (path, original bytes or None, new bytes or None to delete, mode)."""
        plan: List[Tuple[str, Optional[bytes], Optional[bytes], Optional[int]]] = []
        reports: List[Dict[str, Any]] = []
        for fp in files:
            for target in (fp.path, fp.move_to):
                if target is not None:
                    self.guard.check(root, self.guard.split(root, target))
            if fp.kind == "add":
                if self.guard.exists(root, fp.path):
                    raise PatchbayError("cannot add %s: it already exists" % fp.path, "CONFLICT")
                text = "\n".join(fp.added) + ("\n" if fp.added and fp.added_eof_nl else "")
                plan.append((fp.path, None, text.encode("utf-8"), fp.mode))
                reports.append({"path": fp.path, "action": "added", "lines_added": len(fp.added)})
                continue
            entry = self.guard.lstat(root, fp.path)
            if fp.kind == "delete" and entry is not None and stat.S_ISLNK(entry.st_mode):
                raise PatchbayError("%s is a symlink; PatchBay deletes files, never what a link "
                                    "points to" % fp.path, "NOT_A_FILE")
            data, parts = self.guard.read(root, fp.path, self.limits["read_bytes"])
            path = rel(parts)
            if fp.kind == "delete":
                plan.append((path, data, None, None))
                reports.append({"path": path, "action": "deleted"})
                continue
            doc = TextFile(data, path)
            new = doc.encode(apply_hunks(doc.text, fp.hunks, path)) if fp.hunks else data
            report: Dict[str, Any] = {
                "path": path, "action": "updated", "hunks": len(fp.hunks),
                "lines_added": sum(h.plus for h in fp.hunks),
                "lines_removed": sum(h.minus for h in fp.hunks)}
            if fp.move_to and fp.move_to != fp.path:
                if self.guard.exists(root, fp.move_to):
                    raise PatchbayError("cannot move %s to %s: it already exists"
                                        % (path, fp.move_to), "CONFLICT")
                source = self.guard.lstat(root, path)  # the file itself, past any link
                mode = fp.mode if fp.mode is not None else (
                    stat.S_IMODE(source.st_mode) & 0o777 if source is not None else None)
                plan += [(fp.move_to, None, new, mode), (path, data, None, None)]
                report.update(action="moved", to=fp.move_to)
            else:
                plan.append((path, data, new, fp.mode))
            reports.append(report)
        return plan, reports

    def tool_run_command(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        command = args["command"]
        if self.cfg.command_policy:
            why = self.policy.check(command)
            if why:
                raise PatchbayError("blocked by the command policy: %s. The policy is a "
                                    "guardrail against common destructive commands; do this "
                                    "by hand if you really mean it" % why, "POLICY_BLOCKED",
                                    rule=why.split(":")[0])
        timeout = args["timeout_s"]
        if call.door == "actions":  # ChatGPT abandons an Action after 45 s
            timeout = min(timeout, self.limits["actions_timeout_s"])
        fd, parts = self.guard.open_dir(call.root, args["cwd"])
        try:
            cwd = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            cwd = os.path.join(call.root.current_path(), *parts)
        finally:
            self.guard.release(call.root, fd)
        env = child_env(inherit=self.cfg.child_env == "inherit",
                        extra={"TERM": "dumb", "PAGER": "cat", "GIT_PAGER": "cat"})
        out = run_capped(["bash", "-c", command], cwd, env, timeout,
                         self.limits["output_bytes"], call.cancel)
        cap = self.limits["output_bytes"]
        for key, limit in (("stdout", cap), ("stderr", cap // 2)):
            out[key], cut = cap_middle(self.redactor(out[key]), limit)
            out[key + "_truncated"] = out[key + "_truncated"] or cut
        out["cwd"] = rel(parts)
        return out


    # -- Codex workers and jobs --------------------------------------------------------
    def tool_codex_plan_job(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.start(call.root, "plan", None, args["prompt"], "workspace",
                                 args["model"]).report()

    def tool_codex_apply_job(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.start(call.root, "apply", None, args["prompt"], "isolated",
                                 args["model"]).report()

    def tool_codex_worker_start(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        mode = "isolated" if args["workspace_mode"] == "isolated" else "read_only"
        return self.runner.start(call.root, "worker", args["name"], args["brief"], mode,
                                 args["model"]).report()

    def tool_codex_worker_message(self, call: CallContext,
                                  args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.message(call.root, args["worker"], args["message"]).report()

    def tool_codex_status(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        runs = self.runner.wait(call.root, args["name"], args["wait_s"])
        if args["name"]:
            return runs[0].report()
        return {"runs": [r.report() for r in runs]}

    def tool_codex_diff(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        path = None
        if args["path"]:
            parts = self.guard.split(call.root, args["path"])
            self.guard.check(call.root, parts)
            path = rel(parts)
        return self.runner.diff(self.runner.get(call.root, args["name"]), path,
                                min(args["max_bytes"], self.limits["text_chars"]))

    def tool_codex_integrate(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.integrate(call.root, self.runner.get(call.root, args["name"]),
                                     args["dry_run"])

    def tool_codex_stop(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.stop(call.root, args["name"], args["discard"])

    def tool_codex_transcript(self, call: CallContext, args: Dict[str, Any]) -> Dict[str, Any]:
        return self.runner.transcript(self.runner.get(call.root, args["name"]),
                                      args["max_messages"])


def _p_path(desc: str = "Path relative to the workspace root.", default: Any = REQUIRED) -> Param:
    return Param("string", desc, default, max_length=4096)


# The declaration list: name, group, summary, parameters, annotations. Order is the order
# clients see. Descriptions stay one or two sentences (the whole list must fit ChatGPT's
# 5,000-token budget for an app).
TOOL_SPECS: List[Tuple[str, str, str, Dict[str, Param], Dict[str, bool]]] = [
    ("workspace", "context",
     "Show the active workspace: git branch, HEAD, dirty counts, the start of AGENTS.md, "
     "registered workspaces and enabled tools.", {}, {"read_only": True}),
    ("switch_workspace", "context",
     "Select another registered workspace for the following calls.",
     {"name": Param("string", "Workspace name from `workspace`.", max_length=200)},
     {"read_only": True}),
    ("list_files", "context",
     "List files and directories with type and size, honouring .gitignore.",
     {"path": _p_path("Directory relative to the workspace root.", "."),
      "depth": Param("integer", "How many levels to descend.", 2, minimum=1, maximum=10),
      "include_hidden": Param("boolean", "Include dot-files.", False),
      "max_entries": Param("integer", "Most entries to return.", 500, minimum=1,
                           maximum=5000)},
     {"read_only": True}),
    ("read_file", "context",
     "Read a UTF-8 text file by line range; returns sha256 of the whole file for later edits.",
     {"path": _p_path(),
      "start_line": Param("integer", "First line, 1-based.", 1, minimum=1),
      "max_lines": Param("integer", "Most lines to return.", 400, minimum=1, maximum=20000)},
     {"read_only": True}),
    ("search", "context",
     "Search file contents (literal by default) and return matching lines as path:LINE ids "
     "for fetch.",
     {"query": Param("string", "Text (or regex with regex=true) to find.", max_length=1000),
      "path": _p_path("Directory or file to search in.", "."),
      "glob": Param("string", "Only files whose name matches, e.g. *.py.", None,
                    max_length=200, nullable=True),
      "regex": Param("boolean", "Treat query as a regular expression.", False),
      "case_sensitive": Param("boolean", "Match case exactly.", False),
      "max_results": Param("integer", "Most matches to return.", 100, minimum=1,
                           maximum=1000)},
     {"read_only": True}),
    ("fetch", "context",
     "Fetch the full text of a file by a search result id (path:LINE) or a path.",
     {"id": Param("string", "An id from search, or a workspace-relative path.",
                  max_length=4200)},
     {"read_only": True}),
    ("changes", "context",
     "Show git status and the diff of uncommitted changes in the workspace.",
     {"path": Param("string", "Limit to this directory or file.", None, max_length=4096,
                    nullable=True),
      "staged": Param("boolean", "Show the staged diff instead of the unstaged one.", False),
      "max_bytes": Param("integer", "Most characters of diff to return.", 60000, minimum=1,
                         maximum=100000)},
     {"read_only": True}),
]


TOOL_SPECS += [
    ("write_file", "write",
     "Create or overwrite a file atomically; pass expected_sha256 from read_file to refuse "
     "if it changed meanwhile.",
     {"path": _p_path(),
      "content": Param("string", "The complete new file content (UTF-8)."),
      "expected_sha256": Param("string", "sha256 the file must still have, if any.", None,
                               max_length=64, nullable=True),
      "create_dirs": Param("boolean", "Create missing parent directories.", True)},
     {"read_only": False, "destructive": True, "idempotent": True}),
    ("edit_file", "write",
     "Replace exact text in a file (must match once unless replace_all); keeps line endings "
     "and BOM.",
     {"path": _p_path(),
      "old_text": Param("string", "Exact text to replace."),
      "new_text": Param("string", "Replacement text."),
      "replace_all": Param("boolean", "Replace every occurrence.", False),
      "expected_sha256": Param("string", "sha256 the file must still have, if any.", None,
                               max_length=64, nullable=True)},
     {"read_only": False, "destructive": True, "idempotent": False}),
    ("apply_patch", "write",
     "Apply a Codex '*** Begin Patch' envelope or a unified diff to several files: all or "
     "nothing.",
     {"patch": Param("string", "The patch text."),
      "dry_run": Param("boolean", "Only report what would change.", False)},
     {"read_only": False, "destructive": True, "idempotent": False}),
    ("run_command", "command",
     "Run a bash command in the workspace (no stdin, own process group, timeout, capped and "
     "redacted output).",
     {"command": Param("string", "The bash command line.", max_length=20000),
      "cwd": _p_path("Working directory relative to the workspace root.", "."),
      "timeout_s": Param("integer", "Seconds before the whole process group is killed "
                         "(Actions: at most 40).", 60, minimum=1, maximum=3600)},
     {"read_only": False, "destructive": True, "idempotent": False, "open_world": True}),
]


_NAME = Param("string", "Worker or job name, e.g. fix-login or plan-1.", max_length=40)
_MODEL = Param("string", "Codex model slug; default from the profile.", None, max_length=64,
               nullable=True)
_PROMPT = Param("string", "What Codex should do.", max_length=100_000)
# Starting Codex changes nothing in the checkout, but it is not read-only either: it runs a
# process that talks to a model service (open world) and may write in its worktree.
_STARTS_CODEX = {"read_only": False, "destructive": False, "idempotent": False,
                 "open_world": True}
TOOL_SPECS += [
    ("codex_plan_job", "plan",
     "Start a Codex run that studies the workspace read-only and answers with a plan; "
     "returns its name at once.",
     {"prompt": _PROMPT, "model": _MODEL},
     _STARTS_CODEX),
    ("codex_apply_job", "codex",
     "Start a one-shot Codex run in a new isolated git worktree; review with codex_diff.",
     {"prompt": _PROMPT, "model": _MODEL},
     _STARTS_CODEX),
    ("codex_worker_start", "codex",
     "Start a named Codex worker (own worktree and branch patchbay/NAME); its first turn "
     "begins at once.",
     {"name": _NAME, "brief": _PROMPT,
      "workspace_mode": Param("string", "isolated (own worktree) or read_only (advice only).",
                              "isolated", enum=["isolated", "read_only"]),
      "model": _MODEL},
     _STARTS_CODEX),
    ("codex_worker_message", "codex",
     "Send a worker its next instruction (resumes its Codex session; queued while a turn "
     "runs).",
     {"worker": _NAME, "message": _PROMPT},
     _STARTS_CODEX),
    ("codex_status", "plan",
     "State, last message and changed files of one worker or job, or all; wait_s waits for "
     "the next change.",
     {"name": Param("string", "One worker or job; all when omitted.", None, max_length=40,
                    nullable=True),
      "wait_s": Param("integer", "Return early on any change, at most this long.", 0,
                      minimum=0, maximum=25)},
     {"read_only": True}),
    ("codex_diff", "codex",
     "Everything a worker changed against its base commit, committed or not.",
     {"name": _NAME, "path": Param("string", "Limit to this path.", None, max_length=4096,
                                   nullable=True),
      "max_bytes": Param("integer", "Most characters of diff.", 60000, minimum=1,
                         maximum=100000)},
     {"read_only": True}),
    ("codex_integrate", "codex",
     "Apply a worker's changes to the workspace as uncommitted changes; refuses on conflicts "
     "or dirty files.",
     {"name": _NAME, "dry_run": Param("boolean", "Only check that it would apply.", False)},
     {"read_only": False, "destructive": True, "idempotent": False}),
    ("codex_stop", "plan",
     "Stop a worker's or job's running turn; discard=true also removes its worktree and "
     "branch.",
     {"name": _NAME, "discard": Param("boolean", "Also delete worktree, branch and state.",
                                      False)},
     {"read_only": False, "destructive": True, "idempotent": True}),
    ("codex_transcript", "transcript",
     "The newest messages of a worker's own Codex session, bounded and redacted.",
     {"name": _NAME, "max_messages": Param("integer", "Most messages.", 40, minimum=1,
                                           maximum=200)},
     {"read_only": True}),
]


def build_registry(bench: Workbench) -> ToolRegistry:
    tools = []
    for name, group, summary, params, ann in TOOL_SPECS:
        tools.append(Tool(name, group, summary, params, getattr(bench, "tool_" + name),
                          read_only=ann["read_only"],
                          destructive=ann.get("destructive", False),
                          idempotent=ann.get("idempotent", True),
                          open_world=ann.get("open_world", False)))
    return ToolRegistry(tools)


class Audit:
    """`runtime/audit.jsonl`: one redacted line per authorised call; rotated at a size cap."""

    BULKY = ("content", "patch", "old_text", "new_text", "brief", "message", "prompt")

    def __init__(self, home: str, redactor: Redactor, cap: int) -> None:
        self.dir = os.path.join(home, "runtime")
        self.path = os.path.join(self.dir, "audit.jsonl")
        self.redactor, self.cap = redactor, cap
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._size = 0

    def summary(self, args: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in (args.items() if isinstance(args, dict) else []):
            if key in self.BULKY and isinstance(value, str):
                out[key] = "<%d chars>" % len(value)
            elif isinstance(value, str):
                out[key] = value[:120]
            elif isinstance(value, (int, float, bool)) or value is None:
                out[key] = value
            else:
                out[key] = "<%s>" % type(value).__name__
        return out

    def record(self, door: str, tool: str, args: Any, outcome: str, ms: float) -> None:
        line = (self.redactor(dumps({"ts": iso(), "door": door, "tool": tool,
                                     "args": self.summary(args), "outcome": outcome,
                                     "ms": round(ms, 1)})) + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._fd is None or self._size > self.cap:
                    self._open()
                assert self._fd is not None
                self._size += os.write(self._fd, line)  # O_APPEND: one write, one line
            except OSError as exc:  # auditing must not take the server down
                log.warning("audit log not written: %s", exc)

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, self.path + ".1")
        private_dir(self.dir)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Dispatcher:
    """Runs one tool call for either front door: validate, run, cap, audit."""

    def __init__(self, cfg: Config, bench: Workbench, registry: ToolRegistry,
                 audit: Audit) -> None:
        self.cfg, self.bench, self.audit = cfg, bench, audit
        self.tools = {t.name: t for t in cfg.enabled_tools(registry)}
        bench.enabled = list(self.tools)

    def call(self, name: str, args: Any, ctx: CallContext) -> Tuple[Dict[str, Any], bool, str]:
        """Return (result, is_error, result as JSON text): encoded once, here.
        Unknown tools raise KeyError for the caller to map."""
        tool = self.tools[name]
        started = time.monotonic()
        outcome = "ok"
        try:
            clean = tool.validate(args)
            ctx.root = self.bench.workspaces.get(ctx.choice.get())
            result = tool.handler(ctx, clean)
            text = dumps(result)
            if len(text) > self.cfg.limits["result_chars"]:
                raise PatchbayError("the result is larger than %d characters; narrow the "
                                    "request" % self.cfg.limits["result_chars"], "TOO_LARGE")
            return result, False, text
        except PatchbayError as exc:
            outcome = exc.code
            result = exc.to_json()
        except OSError as exc:
            outcome = "OS_ERROR"
            result = {"error": "OS_ERROR", "message": "%s: %s" % (
                type(exc).__name__, exc.strerror or "operating system error")}
        finally:
            self.audit.record(ctx.door, name, args, outcome, (time.monotonic() - started) * 1000)
        return result, True, dumps(result)


# =======================================================================================
# §10 MCP: JSON-RPC methods, sessions, stdio
# =======================================================================================

class RawJson(str):
    """A JSON document already encoded; encode_json writes it as it is."""


def encode_json(obj: Any) -> str:
    if isinstance(obj, RawJson):
        return obj
    if isinstance(obj, list) and any(isinstance(x, RawJson) for x in obj):
        return "[" + ",".join(encode_json(x) for x in obj) + "]"
    return dumps(obj)


def rpc_error(msg_id: Any, code: int, message: str, data: Any = None) -> Dict[str, Any]:
    err: Dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": err}


class McpSession:
    """A client's MCP session: bound to the credential that created it (a session id is
    never a credential on its own), with its own workspace choice and in-flight calls."""

    def __init__(self, cred: str, version: str) -> None:
        self.id = secrets.token_urlsafe(24)  # 192 bits, visible ASCII
        self.cred = cred
        self.version = version
        self.choice = WorkspaceChoice()
        self.last_used = time.monotonic()
        self.inflight: Dict[Any, threading.Event] = {}


class McpSessions:
    def __init__(self, cap: int, idle_s: int) -> None:
        self.cap, self.idle_s = cap, idle_s
        self._by_id: Dict[str, McpSession] = {}
        self._lock = threading.Lock()
        self._swept = 0.0

    def create(self, cred: str, version: str) -> McpSession:
        session = McpSession(cred, version)
        with self._lock:
            self._expire()
            while len(self._by_id) >= self.cap:  # evict the longest idle, never refuse
                oldest = min(self._by_id.values(), key=lambda s: s.last_used)
                del self._by_id[oldest.id]
            self._by_id[session.id] = session
        return session

    def get(self, sid: str, cred: str) -> Optional[McpSession]:
        with self._lock:
            self._expire()
            session = self._by_id.get(sid)
            # Another credential gets the same answer as an unknown id: no oracle.
            if session is None or not hmac.compare_digest(session.cred, cred):
                return None
            if time.monotonic() - session.last_used > self.idle_s:
                del self._by_id[sid]
                return None
            session.last_used = time.monotonic()
            return session

    def delete(self, sid: str, cred: str) -> bool:
        if self.get(sid, cred) is None:
            return False
        with self._lock:
            return self._by_id.pop(sid, None) is not None

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        cutoff = now - self.idle_s
        for sid in [s.id for s in self._by_id.values() if s.last_used < cutoff]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)


class McpEndpoint:
    """The MCP methods, independent of the wire (HTTP or stdio)."""

    INSTRUCTIONS = ("PatchBay exposes one local git workspace at a time. Paths are relative "
                    "to the workspace root. Start with `workspace`, find code with `search` "
                    "and read it with `read_file`.")

    def __init__(self, dispatcher: Dispatcher, door: str) -> None:
        self.dispatcher = dispatcher
        self.door = door
        self._tools_list = {"tools": [t.mcp() for t in dispatcher.tools.values()]}

    def initialize(self, msg: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
        """Answer initialize; return (response, negotiated version or None on error)."""
        msg_id = msg.get("id")
        params = msg.get("params")
        if not isinstance(params, dict) or not isinstance(params.get("protocolVersion"), str):
            return rpc_error(msg_id, INVALID_PARAMS, "initialize needs protocolVersion"), None
        asked = params["protocolVersion"]
        version = asked if asked in MCP_VERSIONS else MCP_VERSIONS[0]
        result = {"protocolVersion": version,
                  "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {"name": NAME, "version": __version__},
                  "instructions": self.INSTRUCTIONS}
        return {"jsonrpc": "2.0", "id": msg_id, "result": result}, version

    def handle(self, msg: Any, session: McpSession) -> Any:
        """One JSON-RPC message; None when nothing is to be sent back (notifications)."""
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            return rpc_error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 message")
        method = msg.get("method")
        if method is None and ("result" in msg or "error" in msg):
            return None  # a response to a request we never send
        msg_id = msg.get("id")
        is_request = "id" in msg
        if not isinstance(method, str) or (is_request and (
                isinstance(msg_id, bool) or not isinstance(msg_id, (str, int)))):
            return rpc_error(msg_id if isinstance(msg_id, (str, int)) else None,
                             INVALID_REQUEST, "invalid JSON-RPC request")
        params = msg.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            if not is_request:
                return None
            return rpc_error(msg_id, INVALID_PARAMS, "params must be an object")
        if not is_request:
            if method == "notifications/cancelled":
                event = session.inflight.get(params.get("requestId"))
                if event is not None:
                    event.set()
            return None
        if method == "initialize":
            return rpc_error(msg_id, INVALID_REQUEST, "this session is already initialized")
        if method == "ping":
            return {"jsonrpc": "2.0", "id": msg_id, "result": {}}
        if method == "tools/list":
            if params.get("cursor") is not None:
                return rpc_error(msg_id, INVALID_PARAMS, "unknown cursor: the list has one page")
            return {"jsonrpc": "2.0", "id": msg_id, "result": self._tools_list}
        if method == "tools/call":
            return self._call(msg_id, params, session)
        return rpc_error(msg_id, METHOD_NOT_FOUND, "method not found: %s" % method[:100])

    def _call(self, msg_id: Any, params: Dict[str, Any], session: McpSession) -> Any:
        name = params.get("name")
        if not isinstance(name, str) or name not in self.dispatcher.tools:
            return rpc_error(msg_id, INVALID_PARAMS, "Unknown tool: %s" % str(name)[:100])
        cancel = threading.Event()
        session.inflight[msg_id] = cancel
        try:
            _, is_error, text = self.dispatcher.call(
                name, params.get("arguments"), CallContext(self.door, session.choice, cancel))
        finally:
            session.inflight.pop(msg_id, None)
        # Built around the already-encoded result: the text item and structuredContent
        # are the same JSON, so it is serialised once (and escaped once for the text).
        return RawJson('{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":%s}],'
                       '"structuredContent":%s,"isError":%s}}'
                       % (dumps(msg_id), dumps(text), text, "true" if is_error else "false"))


def serve_stdio(endpoint: McpEndpoint, stdin: Any, stdout: Any) -> int:
    """MCP over newline-delimited JSON on stdin/stdout (one implicit session)."""
    session: Optional[McpSession] = None

    def send(obj: Any) -> None:
        stdout.write((encode_json(obj) + "\n").encode("utf-8"))
        stdout.flush()

    for raw in stdin:
        if not raw.strip():
            continue
        try:
            msg = loads_strict(raw)
        except PatchbayError as exc:
            send(rpc_error(None, PARSE_ERROR, exc.message))
            continue
        if isinstance(msg, dict) and msg.get("method") == "initialize" and "id" in msg:
            first, version = endpoint.initialize(msg)
            if version:
                session = McpSession("", version)
            send(first)
            continue
        if session is None:
            if isinstance(msg, dict) and "id" in msg:
                send(rpc_error(msg.get("id"), INVALID_REQUEST, "send initialize first"))
            continue
        if isinstance(msg, list):
            if session.version not in MCP_BATCH_VERSIONS or not msg:
                send(rpc_error(None, INVALID_REQUEST, "batches are not allowed in %s"
                               % session.version))
                continue
            replies = [r for r in (endpoint.handle(m, session) for m in msg) if r]
            if replies:
                send(replies)
            continue
        reply = endpoint.handle(msg, session)
        if reply is not None:
            send(reply)
    return 0


# =======================================================================================
# §11 OpenAPI and Actions
# =======================================================================================

def build_openapi(tools: List[Tool], server_url: str) -> Dict[str, Any]:
    """OpenAPI 3.1 for custom-GPT Actions, from the same registry as MCP."""
    error_ref = {"$ref": "#/components/schemas/Error"}
    paths: Dict[str, Any] = {}
    for tool in tools:
        paths["/actions/" + tool.name] = {"post": {
            "operationId": tool.name,
            "summary": tool.summary[:300],
            # true: ChatGPT asks every time; false: it may offer "Always allow".
            "x-openai-isConsequential": not tool.read_only,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": tool.input_schema()}}},
            "responses": {
                "200": {"description": "The tool's result.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "4XX": {"description": "The call failed; `error` is a machine code.",
                        "content": {"application/json": {"schema": error_ref}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "PatchBay", "version": __version__,
                 "description": "Read, search and change a local git workspace."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error", "message"],
                                  "properties": {"error": {"type": "string"},
                                                 "message": {"type": "string"}}}},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearerAuth": []}],
    }


PRIVACY = """PatchBay privacy statement

PatchBay runs on the computer of the person who started it. Requests sent to it read,
search or change files in the workspaces that person chose, and their results go back
only to the caller that sent the request. PatchBay itself sends nothing to any third
party, keeps no analytics, and stores on that computer only an audit log of calls (tool
names and short argument summaries, never file contents or tokens) under its home
directory. Whoever runs it is responsible for what it exposes and to whom.
"""


# =======================================================================================
# §12 HTTP server: thin wire layer; limits, auth, routing, errors -> statuses
# =======================================================================================

class HttpError(Exception):
    def __init__(self, status: int, body: Any, headers: Tuple[Tuple[str, str], ...] = (),
                 close: bool = False) -> None:
        super().__init__(status)
        self.status, self.body, self.headers, self.close = status, body, headers, close


UNAUTHORIZED = HttpError(401, {"error": "unauthorized",
                               "message": "a valid bearer token is required"},
                         (("WWW-Authenticate", 'Bearer realm="patchbay"'),))


class App:
    """Everything one server (or stdio session) shares, built once from a Config."""

    def __init__(self, cfg: Config, static_token: Optional[str] = None) -> None:
        self.cfg = cfg
        self.redactor = Redactor()
        self.channel = Channel(cfg.home)
        if cfg.roots:  # --root narrows: a fixed set, whatever the channel says
            self.workspaces = Workspaces(Workspaces.from_paths(cfg.roots))
        else:
            self.workspaces = Workspaces(
                list((self.channel.load().get("workspaces") or {}).items()), self.channel)
            active = self.channel.load().get("active_workspace")
            if active in self.workspaces.roots:
                self.workspaces.default = active
        self.guard = PathGuard(cfg.blocked_globs, protected=(cfg.home,))
        self.git = Git()
        self.runner = CodexRunner(cfg, self.git, self.redactor)
        self.bench = Workbench(cfg, self.workspaces, self.guard, self.git, self.channel,
                               self.redactor, self.runner)
        self.registry = build_registry(self.bench)
        self.audit = Audit(cfg.home, self.redactor, cfg.limits["audit_bytes"])
        self.dispatcher = Dispatcher(cfg, self.bench, self.registry, self.audit)
        self.access = Access(cfg, self.channel, static_token, self.redactor)
        self.sessions = McpSessions(cfg.limits["max_sessions"], cfg.limits["session_idle_s"])
        self.local_url = ""
        self._openapi: Dict[str, bytes] = {}

    def close(self) -> None:
        """Stop Codex turns (they become interrupted) so no child outlives the server."""
        self.runner.shutdown()
        self.audit.close()

    def openapi(self) -> bytes:
        url = self.access.public_url() or self.local_url.rstrip("/")
        if url not in self._openapi:
            self._openapi[url] = dumps(
                build_openapi(list(self.dispatcher.tools.values()), url)).encode()
        return self._openapi[url]


HTTP_REASONS = {
    200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 421: "Misdirected Request",
    422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported"}
MAX_LINE = 16384        # request line or one header line
MAX_HEADERS = 100
TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def head_end(data: Union[bytes, bytearray]) -> int:
    """Where a request's body starts (after the blank line), or -1 if the head is not over.
    CRLF line ends are standard; bare LF ones are accepted too."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    end = data.find(b"\n\n")
    return end + 2 if end >= 0 else -1


class Headers:
    """Request headers, case-insensitive, every value of a repeated header kept."""

    def __init__(self) -> None:
        self._values: Dict[str, List[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> List[str]:
        return self._values.get(name.lower(), [])


class Exchange:
    """One HTTP/1.1 request and its answer, parsed strictly by PatchBay itself.

    The Server's loop frames a complete request (head and body) before an Exchange sees it,
    so nothing here waits on a socket: it reads the request line and headers with explicit
    limits, refuses obsolete line folding and bad header names, routes, and writes the
    whole answer into one buffer. (The stdlib's BaseHTTPRequestHandler parses headers
    through the email package, slow to import and to run, and logs raw request lines,
    query tokens included.)
    """

    def __init__(self, server: Server, client_address: Tuple[str, int], data: bytes) -> None:
        self.server = server
        self.client_address = client_address
        self.rfile = io.BytesIO(data)
        self.answer: List[bytes] = []  # head and body, sent together without a copy
        self.command, self.path, self.headers = "", "", Headers()
        self.close_connection = False
        self._unread = False
        self._t0 = time.monotonic()

    def run(self) -> Tuple[List[bytes], bool]:
        """The answer's bytes, and whether the connection must close after it."""
        if self._read_head():
            self._route(self.command)
        return self.answer, self.close_connection

    def _read_head(self) -> bool:
        """Parse the request line and headers; False when the answer is already written."""
        data = self.rfile.getvalue()
        skip = 2 if data[:2] == b"\r\n" else 0  # one empty line between requests is fine
        cut = head_end(data[skip:])
        head = data[skip: skip + cut] if cut >= 0 else data[skip:]
        self.rfile.seek(skip + cut if cut >= 0 else len(data))
        lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
        if len(lines[0]) > MAX_LINE:
            return self._refuse(414, "request line too long")
        parts = lines[0].decode("latin-1").split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1]:
            return self._refuse(400, "bad request line")
        self.command, self.path, version = parts
        if len(lines) > MAX_HEADERS + 1:
            return self._refuse(431, "too many headers")
        for raw in lines[1:]:
            if len(raw) > MAX_LINE:
                return self._refuse(431, "bad or oversized header")
            if raw[:1] in (b" ", b"\t"):
                return self._refuse(400, "obsolete header line folding")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not TOKEN_CHARS.fullmatch(name):
                return self._refuse(400, "bad header name")
            self.headers.add(name, value.strip(" \t"))
        connection = (self.headers.get("Connection") or "").lower()
        if version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in connection
        elif "close" in connection:
            self.close_connection = True
        return True

    def _refuse(self, status: int, message: str) -> bool:
        self._unread = True
        try:
            self._send_json(status, {"error": "bad_request", "message": message}, close=True)
        except OSError:
            pass
        return False

    def _route(self, method: str) -> None:
        # A body we never read would be parsed as the next request on this connection, so
        # any answer given before reading it closes the connection.
        self._unread = bool((self.headers.get("Content-Length") or "").strip("0 ")
                            or self.headers.get("Transfer-Encoding"))
        try:
            self._dispatch(method)
        except HttpError as exc:
            self._send_json(exc.status, exc.body, exc.headers, close=exc.close)
        except Exception:  # a bug: answer with an id, log the details, keep serving
            import traceback  # only on a bug
            err_id = secrets.token_hex(4)
            log.error("internal error %s on %s %s\n%s", err_id, method, self._log_path(),
                      self.server.app.redactor(traceback.format_exc()))
            try:
                self._send_json(500, {"error": "INTERNAL", "message": "internal error; the "
                                      "server log has details", "error_id": err_id}, close=True)
            except OSError:
                self.close_connection = True

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        # An origin-form target: path, then an optional query (absolute forms are 404s).
        path, _, query = self.path.partition("#")[0].partition("?")
        view = app.access.view()  # config.json is looked at once per request
        if not app.access.host_ok(self.headers.get("Host"), view):
            raise HttpError(421, {"error": "misdirected", "message": "Host header not allowed; "
                                  "add it with --allow-host if it is yours"})
        origin = self.headers.get("Origin")
        if not app.access.origin_ok(origin, view):
            raise HttpError(403, {"error": "forbidden_origin", "message": "Origin not allowed"})
        if method == "OPTIONS":
            if origin and app.access.cors_origin(origin):
                self._send(204, b"", headers=(
                    ("Access-Control-Allow-Methods", "GET, POST, DELETE"),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept, "
                     "Mcp-Session-Id, MCP-Protocol-Version"),
                    ("Access-Control-Max-Age", "600")))
                return
            raise HttpError(405, {"error": "method_not_allowed", "message": "no CORS here"})
        if method == "GET" and path in ("/health", "/openapi.json", "/privacy"):
            if path == "/health":
                self._send_json(200, {"ok": True, "name": NAME, "version": __version__})
            elif path == "/openapi.json":
                self._send(200, app.openapi())
            else:
                self._send(200, PRIVACY.encode(), ctype="text/plain; charset=utf-8")
            return
        if path.startswith("/.well-known/"):
            raise HttpError(404, {"error": "not_found", "message": "no OAuth here; use the "
                                  "bearer token"})
        cred = self._credential(query, view)
        if cred is None:
            raise UNAUTHORIZED
        if app.access.expired(view):
            raise HttpError(403, {"error": "access_expired", "message": "access has expired; "
                                  "renew it to continue"})
        if path in ("/mcp", "/mcp/"):
            if method == "POST":
                self._mcp_post(cred)
            elif method == "DELETE":
                self._mcp_delete(cred)
            else:
                raise HttpError(405, {"error": "method_not_allowed", "message":
                                      "use POST (this server opens no SSE stream)"},
                                (("Allow", "POST, DELETE"),))
            return
        if path.startswith("/actions/") and method == "POST":
            self._action(path[len("/actions/"):])
            return
        raise HttpError(404, {"error": "not_found", "message": "no such route"})

    # -- pieces ------------------------------------------------------------------------
    def _credential(self, query: str, view: Dict[str, Any]) -> Optional[str]:
        headers = self.headers.get_all("Authorization") or []
        if len(headers) > 1:
            return None
        tokens = urllib.parse.parse_qs(query, keep_blank_values=True).get(QUERY_TOKEN, []) \
            if query else []
        if len(tokens) > 1:
            return None
        return self.server.app.access.credential(headers[0] if headers else None,
                                                 tokens[0] if tokens else None, view)

    def _body(self, need_json: bool = True) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, {"error": "length_required", "message":
                                  "send a Content-Length body, not chunked"}, close=True)
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
            raise HttpError(400, {"error": "bad_request", "message": "bad Content-Length"},
                            close=True)
        size = int(lengths[0]) if lengths else 0
        cap = self.server.app.cfg.limits["body_bytes"]
        if size > cap:
            raise HttpError(413, {"error": "TOO_LARGE", "message": "request body is over %d "
                                  "bytes" % cap}, close=True)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if need_json and (size or ctype):
            if ctype != "application/json":  # also stops cross-site text/plain form posts
                raise HttpError(415, {"error": "unsupported_media_type",
                                      "message": "Content-Type must be application/json"},
                                close=True)
        self._unread = False  # from here on the body is consumed or the connection closed
        body = self.rfile.read(size)
        if len(body) < size:  # the loop frames whole requests; this is a safety net
            raise HttpError(400, {"error": "bad_request", "message": "body ended early"},
                            close=True)
        return body

    def _mcp_post(self, cred: str) -> None:
        app = self.server.app
        accept = (self.headers.get("Accept") or "*/*").lower()
        if not any(a in accept for a in ("application/json", "*/*", "application/*")):
            raise HttpError(406, rpc_error(None, INVALID_REQUEST,
                                           "Accept must include application/json"))
        body = self._body()
        if not body:
            raise HttpError(400, rpc_error(None, PARSE_ERROR, "empty body"))
        try:
            msg = loads_strict(body)
        except PatchbayError as exc:
            raise HttpError(400, rpc_error(None, PARSE_ERROR, exc.message)) from None
        version_header = self.headers.get("MCP-Protocol-Version")
        if version_header is not None and version_header not in MCP_VERSIONS:
            raise HttpError(400, rpc_error(None, INVALID_REQUEST, "Unsupported protocol version",
                                           {"supported": list(MCP_VERSIONS),
                                            "requested": version_header[:40]}))
        endpoint = self.server.mcp
        if isinstance(msg, dict) and msg.get("method") == "initialize" and "id" in msg:
            first, version = endpoint.initialize(msg)
            headers: Tuple[Tuple[str, str], ...] = ()
            if version:
                headers = (("Mcp-Session-Id", app.sessions.create(cred, version).id),)
            self._send_json(200, first, headers)
            return
        sid = self.headers.get("Mcp-Session-Id")
        if not sid:
            raise HttpError(400, rpc_error(None, INVALID_REQUEST,
                                           "Mcp-Session-Id header required; send initialize"))
        session = app.sessions.get(sid, cred)
        if session is None:
            raise HttpError(404, rpc_error(None, INVALID_REQUEST, "Session not found"))
        if isinstance(msg, list):
            if session.version not in MCP_BATCH_VERSIONS or not msg:
                raise HttpError(400, rpc_error(None, INVALID_REQUEST,
                                               "batches are not allowed in %s" % session.version))
            replies = [r for r in (endpoint.handle(m, session) for m in msg) if r is not None]
            if replies:
                self._send_json(200, replies)
            else:
                self._send(202, b"", ctype="")
            return
        reply = endpoint.handle(msg, session)
        if reply is None:
            self._send(202, b"", ctype="")
        else:
            self._send_json(200, reply)

    def _mcp_delete(self, cred: str) -> None:
        sid = self.headers.get("Mcp-Session-Id")
        if not sid:
            raise HttpError(400, rpc_error(None, INVALID_REQUEST, "Mcp-Session-Id header required"))
        if not self.server.app.sessions.delete(sid, cred):
            raise HttpError(404, rpc_error(None, INVALID_REQUEST, "Session not found"))
        self._send(204, b"", ctype="")

    def _action(self, name: str) -> None:
        app = self.server.app
        if name not in app.dispatcher.tools:
            raise HttpError(404, {"error": "NOT_FOUND", "message": "no tool named %r in this "
                                  "profile" % name[:100]})
        body = self._body()
        try:
            args = loads_strict(body) if body.strip() else {}
        except PatchbayError as exc:
            raise HttpError(400, exc.to_json()) from None
        ctx = CallContext("actions", WorkspaceChoice(app.channel))
        result, is_error, text = app.dispatcher.call(name, args, ctx)
        self._send(ERROR_STATUS.get(result.get("error", ""), 400) if is_error else 200,
                   text.encode("utf-8"))

    # -- writing -----------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any, headers: Tuple[Tuple[str, str], ...] = (),
                   close: bool = False) -> None:
        self._send(status, encode_json(obj).encode("utf-8"), headers=headers, close=close)

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: Tuple[Tuple[str, str], ...] = (), close: bool = False) -> None:
        """Write status, headers and body in one send (one segment for small answers)."""
        lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "")),
                 "Server: " + NAME, "Cache-Control: no-store", "X-Content-Type-Options: nosniff"]
        if ctype:
            lines.append("Content-Type: " + ctype)
        if status != 204:
            lines.append("Content-Length: %d" % len(body))
        origin = self.headers.get("Origin")
        if origin and self.server.app.access.cors_origin(origin):
            lines += ["Access-Control-Allow-Origin: " + origin.rstrip("/"), "Vary: Origin",
                      "Access-Control-Expose-Headers: Mcp-Session-Id"]
        lines += ["%s: %s" % h for h in headers]
        if close or self.close_connection or getattr(self, "_unread", False):
            lines.append("Connection: close")
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.answer = [head] if self.command == "HEAD" or not body else [head, body]
        self._log_access(status, len(body))

    def _log_path(self) -> str:
        path = self.path.partition("#")[0].partition("?")[0][:200]  # as _dispatch routes
        return self.server.app.redactor(path)  # a token pasted into the path stays out

    def _log_access(self, status: int, size: int) -> None:
        if log.verbose:  # the query string (maybe a token) is never logged
            log.info("%s %s %s %d %d %.1fms", self.client_address[0], self.command,
                     self._log_path(), status, size, (time.monotonic() - self._t0) * 1000)


class Connection:
    """One client socket, owned by the Server's loop thread."""

    def __init__(self, sock: socket.socket, addr: Tuple[str, int], now: float) -> None:
        self.sock, self.addr = sock, addr
        self.inbuf = bytearray()
        self.out = bytearray()
        self.busy = False          # a request of this connection runs on a worker thread
        self.closing = False       # close once `out` is sent
        self.deadline = now        # set by the loop: idle, reading or writing limit
        self.writing = False       # registered for EVENT_WRITE too


class Server:
    """One thread owns every connection and answers fast requests inline (reads, protocol
    messages: no thread hand-offs, no lock convoys); anything that may take long (commands,
    Codex, search, git-heavy tools, batches) runs on a worker thread of its own.

    The loop frames requests strictly before an Exchange sees them: a head over the limit,
    a bad or missing length, chunked bodies and bodies over the cap are answered without
    reading on; every request must arrive whole within request_timeout_s of its first
    byte (a client dripping bytes gains nothing), idle kept-alive connections end after the
    same time, and over max_connections a new connection gets 503 at once.
    """

    INLINE_TOOLS = ("read_file", "fetch")
    INLINE_CALL = re.compile(rb'"name"\s*:\s*"(?:read_file|fetch)"')
    MAX_HEAD = MAX_LINE * 4

    def __init__(self, addr: Tuple[str, int], app: App) -> None:
        self.app = app
        self.mcp = McpEndpoint(app.dispatcher, "mcp")
        self.limits = app.cfg.limits
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(addr)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        app.access.port = self.server_address[1]
        host = addr[0] if ":" not in addr[0] else "[%s]" % addr[0]
        app.local_url = "http://%s:%d/" % (host, app.access.port)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.conns: Dict[socket.socket, Connection] = {}
        self._done: collections.deque[Tuple[Connection, List[bytes], bool]] = \
            collections.deque()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._swept = 0.0

    # -- the loop ----------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                for key, mask in self.selector.select(timeout=min(poll_interval, 0.2)):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        try:
                            self._ready(key.data, mask)
                        except Exception as exc:  # a bug must cost one connection, not all
                            log.error("connection from %s dropped: %s", key.data.addr[0],
                                      self.app.redactor(repr(exc))[:300])
                            self._close(key.data)
                self._finish_workers()
                self._expire()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        self._stopped.wait(10)

    def server_close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        for sock in (self.socket, self._wake_r, self._wake_w):
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self.selector.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the buffer is full: the loop is awake anyway

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(64):  # a bounded burst; the rest wait for the next round
            try:
                sock, addr = self.socket.accept()
            except OSError:
                return
            if len(self.conns) >= self.limits["max_connections"]:
                try:
                    sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                              b"Retry-After: 1\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms stalls
            conn = Connection(sock, addr, time.monotonic() + self.limits["request_timeout_s"])
            self.conns[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _ready(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.sock in self.conns:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            if not conn.inbuf and not conn.busy and not conn.out:  # a new request begins
                conn.deadline = time.monotonic() + self.limits["request_timeout_s"]
            conn.inbuf += data
            if len(conn.inbuf) > self.MAX_HEAD + self.limits["body_bytes"]:
                self._close(conn)  # more than one whole request can hold: not a client
                return
            self._next(conn)

    # -- framing -----------------------------------------------------------------------
    def _next(self, conn: Connection) -> None:
        """Start the complete requests in the buffer, one at a time, in order: a loop, not
        recursion, so a client pipelining thousands of requests costs no stack."""
        while not (conn.busy or conn.out or conn.closing or not conn.inbuf):
            if conn.inbuf[:2] == b"\r\n":
                del conn.inbuf[:2]
            cut = head_end(conn.inbuf)
            if cut < 0:
                if len(conn.inbuf) > self.MAX_HEAD:  # no end of head in sight: answer now
                    self._start(conn, bytes(conn.inbuf[: self.MAX_HEAD]), close=True)
                return
            size, fits = self._body_size(bytes(conn.inbuf[:cut]))
            if not fits:  # the Exchange answers 400/411/413 from the head, then we close
                self._start(conn, bytes(conn.inbuf[:cut]), close=True)
                return
            if len(conn.inbuf) < cut + size:
                return  # the body is still on its way (within the request deadline)
            request = bytes(conn.inbuf[: cut + size])
            del conn.inbuf[: cut + size]
            self._start(conn, request, close=False)

    def _body_size(self, head: bytes) -> Tuple[int, bool]:
        """The body length the head announces, and whether it may be read at all."""
        lengths = re.findall(rb"(?im)^content-length[ \t]*:[ \t]*([^\r\n]*)", head)
        if re.search(rb"(?im)^transfer-encoding[ \t]*:", head) or len(lengths) > 1:
            return 0, False
        if not lengths:
            return 0, True
        value = lengths[0].strip()
        if not value.isdigit():
            return 0, False
        size = int(value)
        return size, size <= self.limits["body_bytes"]

    def _start(self, conn: Connection, request: bytes, close: bool) -> None:
        if close:
            conn.inbuf.clear()
        if self._inline(request):
            answer, must_close = Exchange(self, conn.addr, request).run()
            self._reply(conn, answer, must_close or close)
            return
        conn.busy = True  # no deadline while a tool works; the next request waits

        def work() -> None:
            try:
                answer, must_close = Exchange(self, conn.addr, request).run()
            except Exception as exc:  # Exchange answers its own errors; this is a last resort
                log.error("request from %s failed: %s", conn.addr[0],
                          self.app.redactor(repr(exc))[:300])
                answer, must_close = [b"HTTP/1.1 500 Internal Server Error\r\n"
                                      b"Content-Length: 0\r\nConnection: close\r\n\r\n"], True
            self._done.append((conn, answer, must_close or close))
            self._wake()

        threading.Thread(target=work, daemon=True, name="patchbay-request").start()

    def _inline(self, request: bytes) -> bool:
        """Whether a request is quick enough to answer on the loop thread itself."""
        line = request[: request.find(b"\n")]
        if not line.startswith(b"POST "):
            return True  # GET, DELETE and refusals touch no tool
        target = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
        if target.startswith(b"/actions/"):
            return target[9:].split(b"?")[0].decode("latin-1") in self.INLINE_TOOLS
        cut = head_end(request)
        body = request[cut:] if cut >= 0 else b""
        if body.lstrip()[:1] == b"[":
            return False  # a batch may hold anything
        if b'"tools/call"' not in body:
            return True  # protocol messages (initialize, ping, tools/list, notifications)
        # Decided on the raw bytes, without a second parse: exactly one "name" key, no
        # \u escapes that could spell another one, and it names a quick tool. Anything
        # else simply goes to a worker thread.
        return (b"\\u" not in body and body.count(b'"name"') == 1
                and self.INLINE_CALL.search(body) is not None)

    def _finish_workers(self) -> None:
        while self._done:
            conn, answer, close = self._done.popleft()
            conn.busy = False
            if conn.sock in self.conns:
                self._reply(conn, answer, close)
                if conn.sock in self.conns:
                    self._next(conn)  # requests that arrived meanwhile

    # -- writing and closing -----------------------------------------------------------
    def _reply(self, conn: Connection, answer: List[bytes], close: bool) -> None:
        conn.closing = conn.closing or close
        conn.deadline = time.monotonic() + self.limits["request_timeout_s"]
        sent = 0
        if not conn.out:  # the usual case: head and body leave in one call, uncopied
            try:
                sent = conn.sock.sendmsg(answer)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
        if sent < sum(len(part) for part in answer):
            conn.out += b"".join(answer)[sent:]
        self._flush(conn, resume=False)  # _next, which called us, goes on by itself

    def _flush(self, conn: Connection, resume: bool = True) -> None:
        try:
            sent = conn.sock.send(conn.out) if conn.out else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        if conn.out:
            if not conn.writing:  # the rest goes when the client reads
                self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                     conn)
                conn.writing = True
            return
        if conn.closing:
            self._close(conn)
            return
        if conn.writing:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
            conn.writing = False
        conn.deadline = time.monotonic() + self.limits["request_timeout_s"]
        if resume:
            self._next(conn)  # a pipelined request may already be waiting

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._swept < 0.1:
            return
        self._swept = now
        for conn in [c for c in self.conns.values() if not c.busy and now > c.deadline]:
            self._close(conn)  # idle, dripping or not reading its answer: dropped

    def _close(self, conn: Connection) -> None:
        self.conns.pop(conn.sock, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress  # only serve needs it
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# =======================================================================================
# §13 Tunnel: cloudflared and ngrok as supervised children (SPEC §9)
# =======================================================================================

TUNNEL_PROVIDERS: Dict[str, Dict[str, str]] = {
    "cloudflare": {"bin": "cloudflared", "env": "CLOUDFLARED_BIN",
                   "install": "install cloudflared from Cloudflare's packages "
                              "(https://pkg.cloudflare.com) or your package manager"},
    "cloudflare-named": {"bin": "cloudflared", "env": "CLOUDFLARED_BIN",
                         "install": "install cloudflared from Cloudflare's packages "
                                    "(https://pkg.cloudflare.com) or your package manager"},
    "ngrok": {"bin": "ngrok", "env": "NGROK_BIN",
              "install": "install the ngrok agent (https://ngrok.com/download) and run "
                         "`ngrok config add-authtoken ...` once"},
}
QUICK_URL = re.compile(r"https://([a-z0-9-]+)\.trycloudflare\.com\b")


def tunnel_binary(mode: str, explicit: Optional[str] = None) -> Optional[str]:
    info = TUNNEL_PROVIDERS[mode]
    return shutil.which(explicit or os.environ.get(info["env"]) or info["bin"])


class Tunnel:
    """One tunnel child: started in its own process group, its log read for the public
    URL, restarted with backoff if it dies, ended with the server. PatchBay never
    downloads the binary."""

    def __init__(self, mode: str, port: int, on_url: Callable[[str], None],
                 hostname: Optional[str] = None, name: Optional[str] = None,
                 binary: Optional[str] = None, token_file: Optional[str] = None) -> None:
        if mode not in TUNNEL_PROVIDERS:
            raise UsageError("unknown tunnel %r; use one of %s"
                             % (mode, ", ".join(TUNNEL_PROVIDERS)))
        path = tunnel_binary(mode, binary)
        if not path:
            raise UsageError("%s was not found: %s, then try again (or pass --tunnel-bin PATH). "
                             "PatchBay never downloads it for you."
                             % (TUNNEL_PROVIDERS[mode]["bin"], TUNNEL_PROVIDERS[mode]["install"]))
        if mode == "cloudflare-named" and not (hostname and (name or token_file
                                                            or os.environ.get("TUNNEL_TOKEN"))):
            raise UsageError("a named Cloudflare tunnel needs --hostname (the public name "
                             "routed to it) and --tunnel-name, or a tunnel token (profile key "
                             "cloudflare_token_file, or TUNNEL_TOKEN)")
        self.mode, self.port, self.on_url = mode, port, on_url
        self.hostname, self.name, self.binary = hostname, name, path
        # The tunnel's own settings and credentials (TUNNEL_* for cloudflared, NGROK_* for
        # ngrok) reach it; PatchBay's token never does.
        prefix = "NGROK_" if mode == "ngrok" else "TUNNEL_"
        self.env = child_env(extra={k: v for k, v in os.environ.items() if k.startswith(prefix)})
        if token_file:
            try:
                with open(os.path.expanduser(token_file), encoding="utf-8") as f:
                    self.env["TUNNEL_TOKEN"] = f.read().strip()  # env, never argv
            except OSError as exc:
                raise UsageError("cannot read the tunnel token file %s: %s"
                                 % (token_file, exc.strerror)) from None
        self.url: Optional[str] = None
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def argv(self) -> List[str]:
        local = "http://127.0.0.1:%d" % self.port
        if self.mode == "cloudflare":
            return [self.binary, "tunnel", "--no-autoupdate", "--url", local]
        if self.mode == "cloudflare-named":
            return ([self.binary, "tunnel", "--no-autoupdate", "run", "--url", local]
                    + ([self.name] if self.name else []))
        argv = [self.binary, "http", str(self.port), "--log", "stdout", "--log-format", "json"]
        return argv + (["--url", self.hostname] if self.hostname else [])

    def parse(self, line: str) -> Optional[str]:
        """The public URL announced by this log line, if any."""
        if self.mode == "cloudflare":
            for m in QUICK_URL.finditer(line):
                if m.group(1) != "api":  # api.trycloudflare.com is the API, in error lines
                    return m.group(0)
            return None
        if self.mode == "cloudflare-named":
            return "https://%s" % self.hostname if "Registered tunnel connection" in line else None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if isinstance(event, dict) and event.get("msg") == "started tunnel":
            url = event.get("url")
            return url if isinstance(url, str) and url.startswith("https://") else None
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, daemon=True,
                                        name="patchbay-tunnel")
        self._thread.start()

    def _supervise(self) -> None:
        delay = 1.0
        for _attempt in range(10_000):  # bounded; each round waits at least `delay`
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
            except OSError as exc:
                log.warning("tunnel: cannot start %s: %s", self.binary, exc.strerror)
                return
            with self._lock:
                self.proc = proc
                if self._stop.is_set():  # stop() ran while this child was starting
                    kill_group(proc)
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                log.info("tunnel: %s", line[:500])
                url = self.parse(line)
                if url and url != self.url:
                    self.url = url
                    self.on_url(url)
            proc.wait()
            proc.stdout.close()
            if self._stop.is_set():
                return
            self.restarts += 1
            if time.monotonic() - started > 60:
                delay = 1.0
            log.warning("tunnel: %s exited with status %s; restarting in %.0f s",
                        TUNNEL_PROVIDERS[self.mode]["bin"], proc.returncode, delay)
            if self.mode in ("cloudflare", "ngrok") and not self.hostname:
                self.url = None  # a quick tunnel gets a new URL; announce it when it comes
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 60.0)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                kill_group(proc)
        if self._thread is not None:
            self._thread.join(5)


def forget_tunnel_url(channel: Channel, tunnel: Tunnel) -> None:
    """A quick tunnel's URL dies with it: do not keep advertising (or accepting) it."""
    if tunnel.url and not tunnel.hostname and channel.load().get("public_base_url") == tunnel.url:
        channel.update(public_base_url="")


def chatgpt_settings(url: str, token: Optional[str], reveal: bool) -> str:
    shown = token if (reveal and token) else "<token: run `patchbay token` or add --reveal-token>"
    return ("  ChatGPT app (developer mode), MCP server URL:\n"
            "    %s/mcp?%s=%s\n"
            "  Custom GPT Actions: import the schema from\n"
            "    %s/openapi.json\n"
            "    Authentication: API Key, Auth Type: Bearer, key: the PatchBay token\n"
            % (url, QUERY_TOKEN, shown, url))


# =======================================================================================
# §14 CLI: one COMMANDS table, cmd_<name>(args) -> exit code
# =======================================================================================

class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def int_flag(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (so no NaN, inf or 1e9)."""
    def parse(text: str) -> int:
        try:
            return check_int("", int(text), low, high)
        except (ValueError, UsageError):
            raise argparse.ArgumentTypeError("must be an integer from %d to %d, not %r"
                                             % (low, high, text[:40])) from None
    return parse


def resolve_home(args: argparse.Namespace) -> str:
    return os.path.abspath(os.path.expanduser(
        args.home or os.environ.get(ENV_HOME) or os.path.join("~", ".patchbay")))


def static_token(token_file: Optional[str]) -> Optional[str]:
    """--token-file, then PATCHBAY_HTTP_TOKEN; None means 'use the channel's token'."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError("cannot read --token-file %s: %s" % (token_file, exc)) from None
        if not token:
            raise UsageError("--token-file %s is empty" % token_file)
        return token
    return os.environ.get(ENV_TOKEN) or None


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: Dict[str, Any] = {"roots": [os.path.abspath(r) for r in args.root or []]}
    for key in ("host", "port", "token_file", "ttl_minutes", "public_base_url", "tunnel",
                "hostname", "tunnel_name"):
        overrides[key] = getattr(args, key, None)
    overrides["allow_hosts"] = getattr(args, "allow_host", None)
    return Config.resolve(resolve_home(args), args.profile, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    app = App(cfg, static_token(cfg.token_file))
    exposed = not is_loopback(cfg.host) or cfg.tunnel != "none"
    if exposed and not app.access.token():
        raise UsageError("%s needs a token: run `patchbay channel register --workspace DIR` "
                         "(or pass --token-file FILE, or set %s)"
                         % ("a tunnel" if cfg.tunnel != "none" else
                            "serving on %s (beyond loopback)" % cfg.host, ENV_TOKEN))
    private_dir(cfg.home)
    if args.save_profile:
        name = args.save_profile if isinstance(args.save_profile, str) else app.workspaces.default
        sys.stderr.write("patchbay: saved launch profile %s (use --profile %s)\n"
                         % (save_profile(cfg.home, name, cfg.settings), _slug(name)))
    tunnel: Optional[Tunnel] = None
    if cfg.tunnel != "none":
        tunnel = Tunnel(cfg.tunnel, cfg.port or 0, lambda url: None,
                        cfg.settings.get("hostname"), cfg.settings.get("tunnel_name"),
                        args.tunnel_bin, cfg.settings.get("cloudflare_token_file"))
    try:
        server = Server((cfg.host, cfg.port), app)
    except OSError as exc:
        raise UsageError("cannot listen on %s:%d: %s (pick another --port, or 0 for any)"
                         % (cfg.host, cfg.port, exc.strerror)) from None
    if app.access.token() is None:
        sys.stderr.write("patchbay: warning: no token set; anything on this machine can call "
                         "this server. `patchbay channel register` creates one.\n")

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stdout.write("patchbay listening on %s\n" % app.local_url)
    sys.stdout.flush()
    if tunnel is not None:
        def on_url(url: str) -> None:
            app.access.tunnel_hosts = [urllib.parse.urlsplit(url).netloc.lower()]
            app.access.tunnel_url = url
            app.channel.update(public_base_url=url)
            sys.stdout.write("patchbay tunnel ready: %s\n%s" % (url, chatgpt_settings(
                url, app.access.token(), args.reveal_token)))
            sys.stdout.flush()

        tunnel.port, tunnel.on_url = app.access.port, on_url
        tunnel.start()
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        if tunnel is not None:
            tunnel.stop()
            forget_tunnel_url(app.channel, tunnel)
        server.server_close()
        app.close()
    return 0


def cmd_stdio(args: argparse.Namespace) -> int:
    app = App(config_from_args(args))
    try:
        return serve_stdio(McpEndpoint(app.dispatcher, "stdio"), sys.stdin.buffer,
                           sys.stdout.buffer)
    finally:
        app.close()


# -- the channel, its token, access and workspaces (SPEC §2, §3) ------------------------

SECRET_KEYS = ("token", "http_token", "password", "secret", "api_key", "apikey",
               "authtoken", "ngrok_authtoken", "tunnel_token", "cloudflare_token",
               "client_secret", "private_key")


def _expiry(ttl_minutes: Optional[int]) -> str:
    if not ttl_minutes:
        return ""
    return iso(utc_now() + datetime.timedelta(minutes=ttl_minutes))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "workspace"


def _workspace_path(path: str) -> str:
    real = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(real):
        raise UsageError("%s is not a directory" % path)
    return real


def _public_url(url: Optional[str]) -> Optional[str]:
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query:
        raise UsageError("--public-base-url must look like https://host.example")
    return url.rstrip("/")


def _access_text(data: Dict[str, Any]) -> str:
    expires = parse_iso(str(data.get("access_expires_at") or ""))
    if expires is None:
        return "active, no expiry"
    return ("expired at %s" if expires <= utc_now() else "active until %s") % iso(expires)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(dumps(data) if args.json else text)


def _announce_token(data: Dict[str, Any]) -> None:
    print("token: %s" % data["token"])
    url = data.get("public_base_url")
    if url:
        print(chatgpt_settings(url, data["token"], reveal=True).rstrip())
    else:
        print("local MCP clients: http://127.0.0.1:%d/mcp with Authorization: Bearer <token>\n"
              "for ChatGPT, start a tunnel: `patchbay serve --tunnel cloudflare` prints the "
              "URLs to paste" % DEFAULT_PORT)


def cmd_channel(args: argparse.Namespace) -> int:
    channel = Channel(resolve_home(args))
    data = dict(channel.load())
    if args.action == "register":
        if data.get("token") and not args.force:
            raise UsageError("a channel already exists in %s; pass --force to replace it "
                             "(with a new token), or use `patchbay channel renew`" % channel.home)
        if not args.workspace:
            raise UsageError("channel register needs --workspace DIR")
        path = _workspace_path(args.workspace)
        name = _slug(args.name or os.path.basename(path))
        data = {"token": new_token(), "workspaces": {name: path}, "active_workspace": name,
                "public_base_url": _public_url(args.public_base_url) or "",
                "access_expires_at": _expiry(args.ttl_minutes), "created": iso()}
        channel.save(data)
        print("channel registered: workspace %s (%s), access %s"
              % (name, path, _access_text(data)))
        _announce_token(data)
        return 0
    channel, data = _registered(args)
    if args.action == "status":
        summary = {"workspaces": data.get("workspaces") or {},
                   "active_workspace": data.get("active_workspace"),
                   "public_base_url": data.get("public_base_url") or None,
                   "access": _access_text(data), "access_expires_at": data.get(
                       "access_expires_at") or None, "token": "set (hidden)"}
        _emit(args, summary, "\n".join("%-18s %s" % (k + ":", v) for k, v in summary.items()))
    elif args.action == "renew":
        if args.rotate_token:
            data["token"] = new_token()
        if args.public_base_url is not None:
            data["public_base_url"] = _public_url(args.public_base_url)
        data["access_expires_at"] = _expiry(args.ttl_minutes)
        channel.save(data)
        print("channel renewed: access %s" % _access_text(data))
        _announce_token(data)
    elif args.action == "revoke":
        data["access_expires_at"] = iso()
        data["token"] = new_token()  # rotated and not printed: the old token is dead
        channel.save(data)
        print("access revoked and the token rotated (not shown). Stop the tunnel too; "
              "`patchbay channel renew` reactivates the channel and prints the new token.")
    return 0


def _registered(args: argparse.Namespace) -> Tuple[Channel, Dict[str, Any]]:
    """The channel and a copy of its data, or the error that says how to create one."""
    channel = Channel(resolve_home(args))
    data = dict(channel.load())
    if not data.get("token"):
        raise UsageError("no channel yet: run `patchbay channel register --workspace DIR`")
    return channel, data


def cmd_token(args: argparse.Namespace) -> int:
    channel, data = _registered(args)
    if args.command == "rotate-token":
        data["token"] = new_token()
        channel.save(data)
    print(data["token"])
    return 0


def cmd_access(args: argparse.Namespace) -> int:
    channel, data = _registered(args)
    if args.action == "grant":
        data["access_expires_at"] = _expiry(args.ttl_minutes)
        channel.save(data)
    elif args.action == "revoke":
        data["access_expires_at"] = iso()
        channel.save(data)
    _emit(args, {"access": _access_text(data),
                 "access_expires_at": data.get("access_expires_at") or None},
          "access: %s" % _access_text(data))
    return 0


def cmd_workspace(args: argparse.Namespace) -> int:
    channel = Channel(resolve_home(args))
    data = dict(channel.load())
    spaces: Dict[str, str] = dict(data.get("workspaces") or {})
    if args.action == "add":
        if not args.name or not args.path:
            raise UsageError("workspace add needs --name N --path DIR")
        spaces[_slug(args.name)] = _workspace_path(args.path)
    elif args.action in ("remove", "switch"):
        name = args.target or args.name
        if name not in spaces:
            raise UsageError("no workspace named %r; registered: %s"
                             % (name, ", ".join(spaces) or "none"))
        if args.action == "remove":
            del spaces[name]
            if data.get("active_workspace") == name:
                data["active_workspace"] = next(iter(spaces), None)
        else:
            data["active_workspace"] = name
    if args.action != "list":
        data["workspaces"] = spaces
        channel.save(data)
    active = data.get("active_workspace")
    _emit(args, {"workspaces": spaces, "active_workspace": active},
          "\n".join("%s %-20s %s" % ("*" if n == active else " ", n, p)
                    for n, p in spaces.items()) or "no workspaces registered")
    return 0


def save_profile(home: str, name: str, settings: Dict[str, Any]) -> str:
    """Write a launch profile; secrets are dropped by an exact list of key names, so keys
    such as token_file or allow_query_token survive."""
    if _slug(name) in BUILTIN_PROFILES:
        raise UsageError("%s is a built-in profile; save under another name "
                         "(--save-profile my-%s)" % (name, name))
    clean = {k: v for k, v in settings.items()
             if k.lower() not in SECRET_KEYS and v not in (None, [], "")}
    directory = private_dir(os.path.join(home, "profiles"))
    path = os.path.join(directory, _slug(name) + ".json")
    atomic_write(path, (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode())
    return path


# -- looking at a running server ----------------------------------------------------------

def http_request(url: str, method: str = "GET", body: Any = None,
                 headers: Optional[Dict[str, str]] = None,
                 timeout: float = 10) -> Tuple[int, Dict[str, str], bytes]:
    import http.client  # only the checking commands need a client
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else \
        http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else dumps(body).encode()
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    try:
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _known_token(args: argparse.Namespace) -> Optional[str]:
    token = static_token(getattr(args, "token_file", None))
    return token or Channel(resolve_home(args)).load().get("token") or None


def _checks_table(args: argparse.Namespace, checks: List[Tuple[str, str, str]]) -> int:
    if args.json:
        print(dumps([{"status": st, "check": name, "detail": detail}
                     for st, name, detail in checks]))
    else:
        for st, name, detail in checks:
            print("%-5s %-18s %s" % (st, name, detail))
    return 1 if any(st == "fail" for st, _, _ in checks) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    base = (args.base_url or Channel(resolve_home(args)).load().get("public_base_url")
            or "http://127.0.0.1:%d" % args.port).rstrip("/")
    token = _known_token(args)
    auth = {"Authorization": "Bearer %s" % token} if token else {}
    json_h = {"Content-Type": "application/json", "Accept": "application/json, "
              "text/event-stream"}
    checks: List[Tuple[str, str, str]] = []

    def check(name: str, fn: Callable[[], Tuple[str, str]]) -> None:
        try:
            st, detail = fn()
        except (OSError, ValueError, KeyError) as exc:
            st, detail = "fail", "%s: %s" % (type(exc).__name__, exc)
        checks.append((st, name, detail))

    def health() -> Tuple[str, str]:
        st, _, body = http_request(base + "/health")
        return ("ok", "reachable") if st == 200 and json.loads(body).get("ok") else (
            "fail", "GET /health answered %d" % st)

    # Through a public URL the schema must name that URL; locally it must name the
    # channel's public URL when one is recorded (a tunnel), else the local one.
    public = Channel(resolve_home(args)).load().get("public_base_url") or ""
    local = is_loopback(urllib.parse.urlsplit(base).hostname or "")
    expected = (public.rstrip("/") if local and public else base)

    def servers() -> Tuple[str, str]:
        st, _, body = http_request(base + "/openapi.json")
        url = json.loads(body)["servers"][0]["url"].rstrip("/")
        return ("ok", url) if url == expected else (
            "fail", "the schema advertises %s, not %s; set it with `patchbay channel renew "
                    "--public-base-url %s`" % (url, expected, expected))

    def unauthorised() -> Tuple[str, str]:
        st, hdrs, _ = http_request(base + "/mcp", "POST", {"jsonrpc": "2.0", "id": 1,
                                                          "method": "ping"}, json_h)
        return ("ok", "401 without a token") if st == 401 else (
            "fail" if token else "warn", "an unauthenticated POST got %d%s" % (
                st, "" if token else " (this server runs without a token)"))

    def mcp() -> Tuple[str, str]:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": MCP_VERSIONS[0], "capabilities": {},
            "clientInfo": {"name": "patchbay-verify", "version": __version__}}}
        st, hdrs, body = http_request(base + "/mcp", "POST", init, dict(json_h, **auth))
        if st != 200:
            return "fail", "initialize answered %d" % st
        sid = hdrs.get("mcp-session-id", "")
        h = dict(json_h, **auth, **{"Mcp-Session-Id": sid,
                                    "MCP-Protocol-Version": MCP_VERSIONS[0]})
        st, _, body = http_request(base + "/mcp", "POST", {"jsonrpc": "2.0", "id": 2,
                                                          "method": "tools/list"}, h)
        http_request(base + "/mcp", "DELETE", None, h)
        tools = json.loads(body)["result"]["tools"]
        return "ok", "%d tools" % len(tools)

    def actions() -> Tuple[str, str]:
        st, _, body = http_request(base + "/actions/workspace", "POST", {}, dict(json_h, **auth))
        return ("ok", "workspace %s" % json.loads(body).get("workspace")) if st == 200 else (
            "fail", "POST /actions/workspace answered %d" % st)

    def host_check() -> Tuple[str, str]:
        st, _, _ = http_request(base + "/health", headers={"Host": "evil.example"})
        return ("ok", "a foreign Host gets 421") if st == 421 else (
            "fail", "a foreign Host got %d" % st)

    check("health", health)
    check("openapi servers", servers)
    check("no token refused", unauthorised)
    check("mcp tools/list", mcp)
    check("actions call", actions)
    if is_loopback(urllib.parse.urlsplit(base).hostname or ""):
        check("host check", host_check)
    return _checks_table(args, checks)


def cmd_doctor(args: argparse.Namespace) -> int:
    home = resolve_home(args)
    checks: List[Tuple[str, str, str]] = []
    checks.append(("ok", "python", sys.version.split()[0]))

    def version(binary: Optional[str], flag: str = "--version") -> Optional[str]:
        if not binary:
            return None
        try:
            out = subprocess.run([binary, flag], capture_output=True, timeout=15,
                                 stdin=subprocess.DEVNULL, env=child_env())
            return (out.stdout or out.stderr).decode("utf-8", "replace").strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return None

    git = version(shutil.which("git"))
    checks.append(("ok", "git", git) if git else ("fail", "git", "not found: install git"))
    rg = shutil.which("rg")
    checks.append(("ok", "ripgrep", rg) if rg else (
        "warn", "ripgrep", "not found; search falls back to git grep (install ripgrep for "
                           "speed)"))
    cfg = Config.resolve(home, args.profile)
    codex = version(shutil.which(cfg.codex["bin"]))
    checks.append(("ok", "codex", codex) if codex else (
        "warn", "codex", "not found: `npm install -g @openai/codex` for Codex workers"))
    for mode in ("cloudflare", "ngrok"):
        info = TUNNEL_PROVIDERS[mode]
        found = version(tunnel_binary(mode), "--version")
        checks.append(("ok", info["bin"], found) if found else (
            "warn", info["bin"], "not found (only for tunnels): %s; PatchBay never downloads "
                                 "it" % info["install"]))
    if os.path.isdir(home):
        mode_bits = stat.S_IMODE(os.stat(home).st_mode)
        checks.append(("ok", "home", "%s (0%o)" % (home, mode_bits)) if not mode_bits & 0o077
                      else ("fail", "home", "%s is 0%o; run chmod 700 %s" % (home, mode_bits,
                                                                           home)))
    else:
        checks.append(("ok", "home", "%s (created on first use)" % home))
    channel = Channel(home)
    if os.path.exists(channel.path):
        bits = stat.S_IMODE(os.stat(channel.path).st_mode)
        if bits & 0o077:
            checks.append(("fail", "config.json", "mode 0%o; run chmod 600 %s"
                           % (bits, channel.path)))
    token = _known_token(args)
    if not token:
        checks.append(("warn", "token", "none: loopback only; `patchbay channel register "
                                        "--workspace DIR` creates one"))
    elif len(token) < 32:
        checks.append(("warn", "token", "only %d characters; `patchbay rotate-token` makes a "
                                        "256-bit one" % len(token)))
    else:
        checks.append(("ok", "token", "set, %d characters (hidden)" % len(token)))
    risk = "full power: no Codex sandbox, inherited environment" if cfg.extends == "full" else (
        "writes and commands enabled" if cfg.extends == "power" else "no writes to the checkout")
    checks.append(("warn" if cfg.extends == "full" else "ok", "profile",
                   "%s (%s)" % (cfg.profile_name, risk)))
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", args.port))
        probe.close()
        checks.append(("ok", "port", "%d is free" % args.port))
    except OSError:
        checks.append(("warn", "port", "%d is in use (a running PatchBay?); `patchbay status` "
                                       "tells" % args.port))
    _checks_table(args, checks)
    return 1 if any(st == "fail" for st, _, _ in checks) else 0


def cmd_status(args: argparse.Namespace) -> int:
    home = resolve_home(args)
    data = Channel(home).load()
    base = (args.base_url or "http://127.0.0.1:%d" % args.port).rstrip("/")
    try:
        st, _, _ = http_request(base + "/health", timeout=3)
        server = "running at %s" % base if st == 200 else "answered %d at %s" % (st, base)
    except OSError:
        server = "not reachable at %s" % base
    counts: Dict[str, int] = {}
    for run in _job_runs(home, None, None):
        counts[run.state] = counts.get(run.state, 0) + 1
    summary = {"server": server,
               "channel": ("registered, access %s" % _access_text(data)) if data.get("token")
               else "not registered",
               "public_base_url": data.get("public_base_url") or None,
               "workspaces": sorted(data.get("workspaces") or {}),
               "active_workspace": data.get("active_workspace"),
               "jobs": counts}
    _emit(args, summary, "\n".join("%-16s %s" % (k + ":", v) for k, v in summary.items()))
    return 0


# Sample arguments for api-smoke, in an order that leaves each tool something to act on.
SMOKE_CALLS: List[Tuple[str, Dict[str, Any]]] = [
    ("workspace", {}), ("list_files", {}), ("read_file", {"path": "README.md"}),
    ("search", {"query": "smoke"}), ("fetch", {"id": "README.md:1"}), ("changes", {}),
    ("write_file", {"path": "smoke/new.txt", "content": "one\n"}),
    ("edit_file", {"path": "smoke/new.txt", "old_text": "one", "new_text": "two"}),
    ("apply_patch", {"patch": "*** Begin Patch\n*** Update File: smoke/new.txt\n@@\n-two\n"
                              "+three\n*** End Patch\n"}),
    ("run_command", {"command": "cat smoke/new.txt", "timeout_s": 10}),
    ("codex_status", {}), ("switch_workspace", {"name": "workspace"}),
]


def cmd_api_smoke(args: argparse.Namespace) -> int:
    """Every enabled tool through both front doors, on a throwaway workspace and home."""
    import tempfile  # only this command needs it
    rows: List[Tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="patchbay-smoke-") as tmp:
        repo = os.path.join(tmp, "workspace")
        os.makedirs(repo)
        with open(os.path.join(repo, "README.md"), "w", encoding="utf-8") as f:
            f.write("# api smoke\n\nA throwaway workspace for the smoke test.\n")
        git = Git()
        if git.available:
            git.run(repo, ["init", "-q"])
            git.run(repo, ["add", "-A"])
            git.run(repo, ["-c", "user.name=patchbay", "-c", "user.email=patchbay@localhost",
                           "commit", "-q", "-m", "smoke"])
        token = new_token()
        cfg = Config.resolve(os.path.join(tmp, "home"), args.profile,
                             {"roots": [repo], "port": 0})
        app = App(cfg, token)
        server = Server(("127.0.0.1", 0), app)
        thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
        thread.start()
        base = app.local_url.rstrip("/")
        auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream"}
        try:
            init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": MCP_VERSIONS[0], "capabilities": {},
                "clientInfo": {"name": "api-smoke", "version": __version__}}}
            _, hdrs, _ = http_request(base + "/mcp", "POST", init, auth)
            mcp_h = dict(auth, **{"Mcp-Session-Id": hdrs.get("mcp-session-id", ""),
                                  "MCP-Protocol-Version": MCP_VERSIONS[0]})
            enabled = set(app.dispatcher.tools)
            for name, sample in SMOKE_CALLS:
                if name not in enabled:
                    continue
                st, _, body = http_request(base + "/mcp", "POST", {
                    "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": name, "arguments": sample}}, mcp_h)
                mcp_ok = st == 200 and not json.loads(body)["result"]["isError"]
                # The Actions door repeats the sequence on its own copy of the files.
                other = json.loads(dumps(sample).replace("smoke/", "smoke-actions/"))
                st, _, _ = http_request(base + "/actions/" + name, "POST", other, auth)
                rows.append((name, "PASS" if mcp_ok else "FAIL", "PASS" if st == 200 else "FAIL"))
            for name in sorted(enabled - {n for n, _ in SMOKE_CALLS}):
                rows.append((name, "SKIP", "SKIP"))  # Codex turns need a model service
        finally:
            server.shutdown()
            server.server_close()
            app.close()
    if args.json:
        print(dumps([{"tool": n, "mcp": m, "actions": a} for n, m, a in rows]))
    else:
        print("%-22s %-6s %s" % ("TOOL", "MCP", "ACTIONS"))
        for row in rows:
            print("%-22s %-6s %s" % row)
    failed = [r for r in rows if "FAIL" in r]
    skipped = [r for r in rows if "SKIP" in r]
    if not args.json:
        print("%d passed, %d failed, %d skipped"
              % (len(rows) - len(failed) - len(skipped), len(failed), len(skipped)))
    return 1 if failed else 0


def cmd_tunnel(args: argparse.Namespace) -> int:
    """A tunnel for a server that already runs: record its URL in the channel."""
    home = resolve_home(args)
    if not _known_token(args):
        raise UsageError("a tunnel exposes the server publicly and needs a token: run "
                         "`patchbay channel register --workspace DIR` first")
    channel = Channel(home)
    done = threading.Event()

    def on_url(url: str) -> None:
        channel.update(public_base_url=url)
        print("patchbay tunnel ready: %s\n%s" % (url, chatgpt_settings(
            url, _known_token(args), args.reveal_token)), flush=True)

    tunnel = Tunnel(args.mode, args.port, on_url, args.hostname, args.tunnel_name,
                    args.tunnel_bin)
    try:
        http_request("http://127.0.0.1:%d/health" % args.port, timeout=3)
    except OSError:
        raise UsageError("no PatchBay server answers on 127.0.0.1:%d; start `patchbay serve` "
                         "first (or pass --port)" % args.port) from None
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    tunnel.start()
    try:
        while not done.wait(0.5):
            pass
    finally:
        tunnel.stop()
        forget_tunnel_url(channel, tunnel)
    return 0


def _job_runs(home: str, name: Optional[str], workspace: Optional[str]) -> List[Run]:
    runs = []
    for path in sorted(glob.glob(os.path.join(home, "runtime", "jobs", "*", "*", "state.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                run = Run(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        run.state_dir = os.path.dirname(path)
        if (name is None or run.name == name) and (workspace is None or run.workspace == workspace):
            runs.append(run)
    if name is not None and not runs:
        raise PatchbayError("no worker or job named %r (see `patchbay jobs list`)" % name)
    if name is not None and len(runs) > 1:
        raise UsageError("%r exists in several workspaces (%s); add --workspace"
                         % (name, ", ".join(r.workspace for r in runs)))
    return runs


def cmd_jobs(args: argparse.Namespace) -> int:
    """The terminal view of workers and jobs, read from their state files."""
    if args.action != "list" and not args.name:
        raise UsageError("jobs %s needs a NAME (see `patchbay jobs list`)" % args.action)
    runs = _job_runs(resolve_home(args), args.name if args.action != "list" else None,
                     args.workspace)
    if args.action == "list":
        if args.json:
            print(dumps([dict(r.report(), workspace=r.workspace) for r in runs]))
            return 0
        print("%-20s %-24s %-7s %-12s %5s  %s" % ("WORKSPACE", "NAME", "KIND", "STATE",
                                                 "TURNS", "UPDATED"))
        for r in runs:
            print("%-20s %-24s %-7s %-12s %5d  %s" % (r.workspace[:20], r.name, r.kind,
                                                     r.state, r.turns, r.updated))
        return 0
    run = runs[0]
    if args.action == "show":
        print(json.dumps(dict(run.report(), workspace=run.workspace), indent=None if args.json
                         else 2))
    elif args.action == "logs":
        for name in ("events.jsonl", "stderr.log"):
            try:
                with open(os.path.join(run.state_dir, name), encoding="utf-8",
                          errors="replace") as f:
                    lines = f.read().splitlines()[-args.lines:]
            except OSError:
                continue
            print("== %s ==" % name)
            print("\n".join(lines))
    elif args.action == "cancel":
        if run.state not in ACTIVE:
            print("%s is %s; nothing to cancel" % (run.name, run.state))
            return 0
        pgid = run.pgid
        run.state, run.pgid, run.error = "cancelled", None, "cancelled from the terminal"
        run.save()  # first, so a serving PatchBay sees why its turn died
        CodexRunner._kill_stale(pgid)
        print("%s cancelled" % run.name)
    return 0


def args_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "logs", "cancel"])
    p.add_argument("name", nargs="?", help="worker or job name (not for list)")
    p.add_argument("--workspace", help="only this workspace")
    p.add_argument("--lines", type=int_flag(1, 100_000), default=40,
                   help="log lines to show (logs)")


def args_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", action="append", metavar="DIR",
                   help="workspace root (repeatable; the first is the default)")
    p.add_argument("--profile", metavar="NAME|FILE",
                   help="readonly, worker (default), power, full, or a .json/.yaml file")


def args_tunnel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostname", help="public hostname (named Cloudflare tunnel, ngrok --url)")
    p.add_argument("--tunnel-name", help="named Cloudflare tunnel to run")
    p.add_argument("--tunnel-bin", metavar="PATH", help="cloudflared or ngrok binary "
                   "(default: $CLOUDFLARED_BIN / $NGROK_BIN, then PATH)")
    p.add_argument("--reveal-token", action="store_true",
                   help="print the real token in the ChatGPT settings")


def args_serve(p: argparse.ArgumentParser) -> None:
    args_common(p)
    p.add_argument("--tunnel", choices=["none"] + list(TUNNEL_PROVIDERS),
                   help="start and supervise a tunnel (needs a token)")
    args_tunnel_flags(p)
    p.add_argument("--save-profile", nargs="?", const=True, metavar="NAME",
                   help="remember these settings as a profile (default name: the workspace)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int_flag(*PORT_RANGE),
                   help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--ttl-minutes", type=int_flag(*TTL_RANGE), metavar="N",
                   help="refuse calls after N minutes")
    p.add_argument("--public-base-url", metavar="URL", help="public https URL (tunnel)")
    p.add_argument("--allow-host", action="append", metavar="HOST",
                   help="extra Host header value to accept (repeatable; host:* for any port)")


def args_channel(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["register", "status", "renew", "revoke"])
    p.add_argument("--workspace", metavar="DIR", help="register: the workspace directory")
    p.add_argument("--name", help="register: the workspace's name (default: its directory)")
    p.add_argument("--public-base-url", metavar="URL", help="the public https URL")
    p.add_argument("--ttl-minutes", type=int_flag(*TTL_RANGE), metavar="M",
                   help="access expires after M minutes")
    p.add_argument("--force", action="store_true", help="register: replace an existing channel")
    p.add_argument("--rotate-token", action="store_true", help="renew: a new token as well")


def args_access(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["status", "grant", "revoke"])
    p.add_argument("--ttl-minutes", type=int_flag(*TTL_RANGE), metavar="M",
                   help="grant: access for M minutes (none: no expiry)")


def args_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "add", "remove", "switch"])
    p.add_argument("target", nargs="?", help="remove/switch: the workspace name")
    p.add_argument("--name", help="add: the new workspace's name")
    p.add_argument("--path", metavar="DIR", help="add: its directory")


def args_none(p: argparse.ArgumentParser) -> None:
    pass


def args_port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int_flag(1, PORT_RANGE[1]), default=DEFAULT_PORT,
                   help="the local server's port")


def args_verify(p: argparse.ArgumentParser) -> None:
    args_port(p)
    p.add_argument("--base-url", metavar="URL", help="check this URL (default: the channel's "
                   "public URL, else the local server)")
    p.add_argument("--token-file", metavar="FILE", help="the token to use")


def args_doctor(p: argparse.ArgumentParser) -> None:
    args_port(p)
    p.add_argument("--profile", metavar="NAME|FILE", help="the profile to judge")


def args_smoke(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="power", metavar="NAME|FILE",
                   help="profile to exercise (default: power, every non-Codex tool)")


def args_tunnel(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", default="cloudflare", choices=list(TUNNEL_PROVIDERS))
    args_port(p)
    args_tunnel_flags(p)
    p.add_argument("--token-file", metavar="FILE", help="the running server's token file")


COMMANDS: List[Tuple[str, Callable[[argparse.Namespace], int], str,
                     Callable[[argparse.ArgumentParser], None]]] = [
    ("serve", cmd_serve, "run the HTTP server (MCP at /mcp, Actions at /actions/<tool>)",
     args_serve),
    ("stdio", cmd_stdio, "speak MCP over stdin/stdout for local MCP hosts", args_common),
    ("jobs", cmd_jobs, "list, show, read the logs of, or cancel Codex workers and jobs",
     args_jobs),
    ("tunnel", cmd_tunnel, "start only a tunnel for a server that is already running",
     args_tunnel),
    ("channel", cmd_channel, "register, inspect, renew or revoke the ChatGPT channel",
     args_channel),
    ("token", cmd_token, "print the current token", args_none),
    ("rotate-token", cmd_token, "replace the token and print the new one", args_none),
    ("access", cmd_access, "show, grant (with a TTL) or revoke access", args_access),
    ("workspace", cmd_workspace, "list, add, remove or switch registered workspaces",
     args_workspace),
    ("status", cmd_status, "is the server up; channel and jobs summary (never the token)",
     args_verify),
    ("doctor", cmd_doctor, "check this machine's setup and say how to fix each problem",
     args_doctor),
    ("verify", cmd_verify, "check a running server, locally or through its public URL",
     args_verify),
    ("api-smoke", cmd_api_smoke, "self-contained end-to-end check of every tool, both doors",
     args_smoke),
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=NAME, description="Let ChatGPT and MCP clients work on local git repositories.")
    parser.add_argument("--home", metavar="DIR",
                        help="state directory (default $%s or ~/.patchbay)" % ENV_HOME)
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--version", action="version", version="%s %s" % (NAME, __version__))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func, help_text, add_args in COMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(func=func)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    log.verbose = bool(args.verbose)
    try:
        return int(args.func(args))
    except PatchbayError as exc:
        sys.stderr.write("patchbay: error: %s\n" % exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

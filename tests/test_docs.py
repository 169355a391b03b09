"""The docs are part of the product: this fails when they drift from the code."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml
from pbtest import ROOT, ServeProcess, make_app, make_repo

import patchbay

DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").rglob("*.md"))]
INSPECTOR = ROOT / ".cache" / "npm" / "node_modules" / ".bin" / "mcp-inspector"


OUTPUT_LINES = ("patchbay listening on", "patchbay tunnel ready", "patchbay: ")


def _code(text: str) -> Iterator[Tuple[str, str]]:
    """(language, line) for each line inside a fenced code block."""
    lang = None
    for line in text.splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
        elif lang is not None:
            yield lang, line


def shown_commands() -> Iterator[Tuple[Path, str]]:
    """Every PatchBay command line shown in a shell block or an inline code span."""
    for doc in DOCS:
        text = doc.read_text()
        lines = [ln for lang, ln in _code(text) if lang in ("sh", "console")]
        joined = "\n".join(lines).replace("\\\n", " ")
        candidates = joined.splitlines() + re.findall(r"`([^`\n]+)`", text)
        for line in candidates:
            line = line.strip()
            if line.startswith(OUTPUT_LINES):
                continue
            m = re.match(r"(?:python3 patchbay\.py|patchbay)\s+(.*)$", line)
            if m and not m.group(1).startswith(("COMMAND", "[")):
                yield doc, m.group(1).split(" #")[0].strip()


def test_docs_show_commands_at_all() -> None:
    commands = [c for _, c in shown_commands()]
    assert len(commands) > 20
    assert any(c.startswith("channel register") for c in commands)


@pytest.mark.parametrize(("doc", "command"), list(shown_commands()),
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_shown_command_parses(doc: Path, command: str) -> None:
    argv = shlex.split(command.replace("…", "x"))
    try:
        args = patchbay.build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail("%s shows `%s`, which the CLI refuses (%s)" % (doc.name, command, exc))
    assert getattr(args, "func", None) is not None, command


def registry_names() -> set:
    return {t[0] for t in patchbay.TOOL_SPECS}


def test_every_tool_named_in_docs_exists() -> None:
    names = registry_names()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Tools"):]
    table = table[: table.index("\n## ", 4)]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert set(listed) == names, "README's tool table differs from the registry"
    for doc in DOCS:
        text = doc.read_text()
        for name in re.findall(r'tools/call"[^}]{0,40}"name"\s*:\s*"([a-z_]+)"', text):
            assert name in names, "%s calls unknown tool %s" % (doc.name, name)
        for name in re.findall(r"/actions/([a-z_]+)", text):
            assert name in names, "%s names unknown action %s" % (doc.name, name)


def test_profiles_example_loads_and_every_key_is_accepted(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "profiles.example.yaml").read_text())
    assert set(patchbay.BUILTIN_PROFILES) <= set(data)
    for name, profile in data.items():
        patchbay.check_profile(profile, name)
        path = tmp_path / ("%s.json" % name)
        path.write_text(json.dumps(profile))
        cfg = patchbay.Config.resolve(str(tmp_path / "home"), str(path), environ={})
        assert cfg.extends == profile.get("extends", "worker")
    assert data["full-power-local"]["command_policy"] is False
    assert "FULL POWER" in (ROOT / "profiles.example.yaml").read_text()


def test_builtin_profiles_in_example_match_the_code() -> None:
    data = yaml.safe_load((ROOT / "profiles.example.yaml").read_text())
    for name, builtin in patchbay.BUILTIN_PROFILES.items():
        example = data[name]
        for key in ("command_policy", "child_env"):
            if key in example:
                assert example[key] == builtin[key], (name, key)
        for key, value in example.get("codex", {}).items():
            assert builtin["codex"].get(key, patchbay.CODEX_DEFAULTS[key]) == value, (name, key)


def test_threat_model_cites_existing_tests() -> None:
    text = (ROOT / "docs" / "security" / "threat-model.md").read_text()
    cited = set(re.findall(r"`(tests/test_[a-z_]+\.py)`", text))
    assert len(cited) >= 8
    for path in cited:
        assert (ROOT / path).is_file(), "threat-model.md cites missing %s" % path
    security = (ROOT / "SECURITY.md").read_text()
    for path in set(re.findall(r"`(tests/test_[a-z_]+\.py)`", security)):
        assert (ROOT / path).is_file(), "SECURITY.md cites missing %s" % path


def test_profile_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z]+)`(?: \(default\))? \|", readme, re.M)
    assert set(patchbay.BUILTIN_PROFILES) <= set(rows)
    assert "`%s` (default)" % patchbay.DEFAULT_PROFILE in readme


def _readme_block(lang: str, marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```%s\n(.*?)```" % lang, readme, re.S):
        if marker in block:
            return block
    raise AssertionError("README has no %s block with %r" % (lang, marker))


def test_readme_sdk_example_runs(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    proc = ServeProcess(tmp_path / "home", [repo])
    try:
        code = _readme_block("python", "streamable_http_client").replace(
            "http://127.0.0.1:8765", proc.url)
        script = tmp_path / "example.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "read_file" in out.stdout and "# Demo" in out.stdout
    finally:
        assert proc.stop() == 0


@pytest.mark.skipif(not INSPECTOR.exists() or not shutil.which("node"),
                    reason="sh tests/run installs the MCP Inspector CLI")
def test_readme_inspector_command_works(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    proc = ServeProcess(tmp_path / "home", [repo])
    try:
        line = _readme_block("sh", "inspector --cli").strip().splitlines()[0]
        argv: List[str] = shlex.split(line.replace("http://127.0.0.1:8765", proc.url))
        assert argv[:2] == ["npx", "@modelcontextprotocol/inspector"]
        out = subprocess.run([str(INSPECTOR), *argv[2:]], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        names = {t["name"] for t in json.loads(out.stdout)["tools"]}
        assert {"read_file", "search", "fetch"} <= names
    finally:
        assert proc.stop() == 0


def test_tool_descriptions_stay_short(tmp_path: Path) -> None:
    app = make_app(make_repo(tmp_path / "repo"), tmp_path / "home", "full")
    for tool in app.registry.tools:
        sentences = [s for s in re.split(r"(?<=[.;])\s", tool.summary) if s]
        assert len(sentences) <= 2 and len(tool.summary) <= 300, tool.name

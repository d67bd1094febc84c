"""The backend registry, the mock and microvm backends, and `silo doctor`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from devsilo.executor._backends import BACKENDS, get_backend
from devsilo.executor._doctor import Check, auto_backend
from devsilo.executor._spec import SandboxSpec
from devsilo.executor._tools import run_tool
from devsilo.protocol import SandboxError, ToolCall


def spec(tmp_path: Path) -> SandboxSpec:
    return SandboxSpec(session_id="s1", workspace=tmp_path, sandbox_uid=64123, sandbox_gid=64123,
                       scratch_root=tmp_path)


async def test_mock_sandbox_answers_tool_calls_from_its_script(tmp_path: Path) -> None:
    sb = get_backend("mock").create(spec(tmp_path), script=[
        {"op": "exec", "command": "make test", "result": {"exit_code": 2, "stdout": "1 failed\n"}},
        {"op": "read", "path": "a.txt", "result": {"content": "hello"}},
    ])
    await sb.start()
    r = await run_tool(sb.helper, ToolCall(call_id="1", name="Bash", input={"command": "make test"}))
    assert r.is_error and "1 failed" in r.content and r.meta["exit_code"] == 2
    r = await run_tool(sb.helper, ToolCall(call_id="2", name="Read", input={"path": "a.txt"}))
    assert r.content == "hello" and not r.is_error
    await sb.close()


async def test_mock_sandbox_reports_a_mismatch_instead_of_guessing(tmp_path: Path) -> None:
    sb = get_backend("mock").create(spec(tmp_path), script=[{"op": "exec", "command": "ls"}])
    await sb.start()
    r = await run_tool(sb.helper, ToolCall(call_id="1", name="Bash", input={"command": "rm -rf /"}))
    assert r.is_error and "script has 'ls'" in r.content
    r = await run_tool(sb.helper, ToolCall(call_id="2", name="Bash", input={"command": "ls"}))
    assert not r.is_error  # the mismatched request consumed nothing
    r = await run_tool(sb.helper, ToolCall(call_id="3", name="Bash", input={"command": "ls"}))
    assert r.is_error and "after the last of 1 steps" in r.content
    await sb.close()


async def test_microvm_is_listed_with_its_reason_and_refuses_to_start(tmp_path: Path) -> None:
    reason = BACKENDS["microvm"].probe()
    assert reason is not None and reason
    sb = get_backend("microvm").create(spec(tmp_path))
    with pytest.raises(SandboxError, match="microvm sandbox unavailable"):
        await sb.start()


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(SandboxError, match="known: bwrap"):
        get_backend("chroot")


def test_auto_picks_the_strongest_working_backend() -> None:
    checks = [Check("sandbox gvisor", False, "runsc missing"), Check("sandbox docker", True, "works"),
              Check("sandbox bwrap", True, "works"), Check("sandbox mock", True, "works")]
    assert auto_backend(checks) == "docker"
    assert auto_backend([Check("sandbox mock", True, "works")]) is None


def test_doctor_json_lists_every_backend_with_a_reason(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(tmp_path / "st"), "doctor",
                        "--json"], capture_output=True, text=True, timeout=120)
    data = json.loads(r.stdout)
    names = {c["name"] for c in data["checks"]}
    assert {"sandbox bwrap", "sandbox gvisor", "sandbox docker", "sandbox microvm", "user namespaces",
            "cgroups", "state directory"} <= names
    for c in data["checks"]:
        assert c["detail"], c
    assert data["auto"] == "bwrap" or data["auto"] in ("gvisor", "docker")
    assert r.returncode == 0

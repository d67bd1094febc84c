"""The bubblewrap sandbox, its helper and the executor's helper client, for real.

Every sandbox here is a real bwrap. As root the sandbox runs as the unused
uid 64123 (so files it makes must be owned by that uid on the host); as any
other user it runs as that user. The attack battery is in test_attacks.py;
this file checks the confinement's parts one by one (seccomp, cgroups,
mounts, environment) and the helper protocol end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from devsilo.executor import _cgroups, _seccomp
from devsilo.executor import _sandbox as sandbox_module
from devsilo.executor._cgroups import CgroupUnavailable, SandboxCgroup
from devsilo.executor._helper_client import HelperClient, HelperRequestError
from devsilo.executor._sandbox import (
    CA_CERT,
    HOME,
    INNER_UID,
    RELAY_SOCKET,
    TMP,
    WORKSPACE,
    BwrapSandbox,
    prepare_workspace_ownership,
    probe,
)
from devsilo.executor._spec import SandboxLimits, SandboxSpec
from devsilo.executor.helper import helper as helper_module
from devsilo.executor.helper.helper import MAX_REQUEST_LINE, OUTPUT_CAP
from devsilo.protocol import SandboxError
from devsilo.runtime._state import StateDir

AS_ROOT = os.geteuid() == 0
SANDBOX_UID = 64123 if AS_ROOT else os.getuid()
SANDBOX_GID = 64123 if AS_ROOT else os.getgid()
root_only = pytest.mark.skipif(not AS_ROOT, reason="only root can give the sandbox another uid")


def _make_workspace(path: Path) -> Path:
    path.mkdir()
    (path / "README").write_text("the user's project\n")
    if AS_ROOT:
        prepare_workspace_ownership(path, SANDBOX_UID, SANDBOX_GID)
    return path


def _spec(workspace: Path, tmp_path: Path, **fields: object) -> SandboxSpec:
    return SandboxSpec(
        session_id="test-session",
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=tmp_path / "scratch",
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace the sandbox uid may write."""
    return _make_workspace(tmp_path / "ws")


@pytest_asyncio.fixture
async def sandbox(workspace: Path, tmp_path: Path) -> AsyncIterator[BwrapSandbox]:
    """A started bwrap sandbox on ``workspace``; closed after the test."""
    sb = BwrapSandbox(_spec(workspace, tmp_path))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.close()


# -- exec -------------------------------------------------------------------


async def test_exec_returns_output_and_exit_code(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not (result.timed_out or result.cancelled or result.truncated)


async def test_hello_reports_the_sandbox_user_in_the_workspace(sandbox: BwrapSandbox) -> None:
    info = await sandbox.helper.hello()
    assert (info.uid, info.cwd, info.workspace) == (INNER_UID, WORKSPACE, WORKSPACE)


async def test_streamed_output_arrives_before_the_result(sandbox: BwrapSandbox) -> None:
    chunks: list[tuple[str, str, float]] = []
    result = await sandbox.helper.exec(
        "echo first; sleep 0.4; echo second >&2",
        on_output=lambda stream, data: chunks.append((stream, data, time.monotonic())),
    )
    finished = time.monotonic()
    assert [(s, d) for s, d, _ in chunks] == [("stdout", "first\n"), ("stderr", "second\n")]
    assert finished - chunks[0][2] >= 0.3, "the first line came only with the result"
    assert (result.stdout, result.stderr) == ("first\n", "second\n")


async def test_timeout_kills_the_whole_process_group(sandbox: BwrapSandbox) -> None:
    started = time.monotonic()
    result = await sandbox.helper.exec("sleep 60 & echo $! > bg.pid; sleep 60", timeout_ms=500)
    assert result.timed_out and result.exit_code == 137
    assert time.monotonic() - started < 5
    # The background job, in the same group, must be gone too (allow init a
    # moment to reap it).
    check = await sandbox.helper.exec(
        "for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 $(cat bg.pid) 2>/dev/null || exit 0; "
        "sleep 0.1; done; exit 1"
    )
    assert check.exit_code == 0, "the background job outlived the timeout"


async def test_cancel_stops_a_running_command(sandbox: BwrapSandbox) -> None:
    handle = await sandbox.helper.start_exec("echo started; sleep 60")
    await asyncio.sleep(0.3)
    assert await handle.cancel()
    result = await asyncio.wait_for(handle.result(), 5)
    assert result.cancelled and not result.timed_out
    assert (result.stdout, result.exit_code) == ("started\n", 137)


async def test_cancelling_the_waiting_task_kills_the_command(sandbox: BwrapSandbox) -> None:
    task = asyncio.create_task(sandbox.helper.exec("echo $$ > victim.pid; exec sleep 60"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    check = await sandbox.helper.exec(
        "for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 $(cat victim.pid) 2>/dev/null || exit 0; "
        "sleep 0.1; done; exit 1"
    )
    assert check.exit_code == 0, "the command kept running after its caller gave up"


async def test_output_over_the_cap_is_truncated_with_a_mark(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("head -c 3000000 /dev/zero | tr '\\0' a; echo small >&2")
    assert result.stdout_truncated and not result.stderr_truncated
    assert result.stdout.startswith("a" * OUTPUT_CAP + "\n[devsilo: stdout truncated")
    assert f"{3000000 - OUTPUT_CAP} more bytes not shown" in result.stdout
    assert result.stderr == "small\n"


# -- read and write ---------------------------------------------------------


async def test_write_then_read_is_binary_safe_and_creates_parents(sandbox: BwrapSandbox) -> None:
    data = bytes(range(256)) * 4096 + b"\x00\xff\xfe"
    written = await sandbox.helper.write("new/deeper/blob.bin", data)
    back = await sandbox.helper.read("new/deeper/blob.bin")
    assert written == len(data)
    assert (back.content, back.size, back.eof) == (data, len(data), True)


async def test_read_pages_through_a_file(sandbox: BwrapSandbox) -> None:
    await sandbox.helper.write("/tmp/digits", "0123456789")
    page = await sandbox.helper.read("/tmp/digits", offset=3, limit=4)
    last = await sandbox.helper.read("/tmp/digits", offset=8, limit=4)
    assert (page.content, page.size, page.eof) == (b"3456", 10, False)
    assert (last.content, last.eof) == (b"89", True)


async def test_write_appends_when_asked(sandbox: BwrapSandbox, workspace: Path) -> None:
    await sandbox.helper.write("log.txt", "one\n")
    await sandbox.helper.write("log.txt", "two\n", append=True)
    assert (workspace / "log.txt").read_text() == "one\ntwo\n"


async def test_reading_a_missing_file_is_a_clear_error(sandbox: BwrapSandbox) -> None:
    with pytest.raises(HelperRequestError, match="no such file: /workspace/nope") as err:
        await sandbox.helper.read("nope")
    assert err.value.code == "not_found"


async def test_a_file_written_inside_appears_in_the_host_workspace(
    sandbox: BwrapSandbox, workspace: Path
) -> None:
    result = await sandbox.helper.exec("cat README > copy.txt && echo made inside >> copy.txt")
    assert result.exit_code == 0, result.stderr
    assert (workspace / "copy.txt").read_text() == "the user's project\nmade inside\n"


async def test_files_made_inside_belong_to_the_sandbox_uid_on_the_host(
    sandbox: BwrapSandbox, workspace: Path
) -> None:
    await sandbox.helper.exec("touch owned-by-whom")
    owner = (workspace / "owned-by-whom").stat().st_uid
    assert owner == SANDBOX_UID
    if AS_ROOT:
        assert owner != 0


async def test_scratch_home_and_tmp_are_writable(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec('echo h > "$HOME/f" && echo t > "$TMPDIR/f" && pwd')
    assert (result.exit_code, result.stdout) == (0, f"{WORKSPACE}\n"), result.stderr
    info = await sandbox.helper.exec('echo "$HOME $TMPDIR"')
    assert info.stdout == f"{HOME} {TMP}\n"


async def test_allow_listed_path_is_readable_but_not_writable(
    workspace: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "reference"
    ref.mkdir()
    (ref / "doc.txt").write_text("shared docs\n")
    ref.chmod(0o755)
    async with BwrapSandbox(_spec(workspace, tmp_path, allow_read=(ref,))) as sb:
        read = await sb.helper.exec(f"cat {ref}/doc.txt")
        write = await sb.helper.exec(f"echo x > {ref}/doc.txt")
    assert (read.exit_code, read.stdout) == (0, "shared docs\n")
    assert write.exit_code != 0 and "Read-only file system" in write.stderr
    assert (ref / "doc.txt").read_text() == "shared docs\n"


# -- attacks from inside ----------------------------------------------------


async def test_host_root_home_is_not_visible(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("cat /root/.bashrc; ls -a /root")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert "No such file or directory" in result.stderr


async def test_the_project_tree_is_not_visible(sandbox: BwrapSandbox) -> None:
    here = Path(__file__).resolve()
    result = await sandbox.helper.exec(f"cat {here}; ls {here.parent.parent} /work")
    assert result.exit_code != 0
    assert result.stdout == ""


async def test_the_state_directory_is_not_visible(state_dir: StateDir, workspace: Path) -> None:
    # The hard case: the sandbox's own scratch lives inside the state dir.
    async with BwrapSandbox(_spec(workspace, state_dir.root)) as sb:
        result = await sb.helper.exec(
            f"cat {state_dir.roster_path}; ls {state_dir.keys_dir} {state_dir.root}"
        )
    assert state_dir.roster_path.exists()
    assert result.exit_code != 0
    assert result.stdout == ""


@pytest.mark.parametrize("target", ["/usr/devsilo-probe", "/devsilo-probe", "/etc/devsilo-probe"])
async def test_writing_outside_workspace_and_scratch_fails(
    sandbox: BwrapSandbox, target: str
) -> None:
    result = await sandbox.helper.exec(f"echo pwned > {target}")
    assert result.exit_code != 0
    assert "Read-only file system" in result.stderr
    assert not Path(target).exists()


async def test_only_loopback_exists(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.stdout == "lo\n"


async def test_a_listener_on_host_loopback_is_unreachable(sandbox: BwrapSandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = await sandbox.helper.exec(
            'python3 -c \'import socket; socket.create_connection(("127.0.0.1", '
            f'{port}), timeout=2); print("connected")\''
        )
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert result.exit_code != 0
    assert "connected" not in result.stdout
    assert "ConnectionRefusedError" in result.stderr


async def test_commands_have_no_capabilities_and_no_new_privileges(
    sandbox: BwrapSandbox,
) -> None:
    result = await sandbox.helper.exec("grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status")
    assert result.stdout.split() == [
        "CapEff:",
        "0000000000000000",
        "CapBnd:",
        "0000000000000000",
        "NoNewPrivs:",
        "1",
    ]


async def test_new_user_namespaces_are_refused(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("unshare --user --map-root-user id -u")
    assert result.exit_code != 0
    assert result.stdout == ""


async def test_the_helper_holds_no_directory_descriptor(sandbox: BwrapSandbox) -> None:
    # An inherited descriptor of a host directory would let openat(fd, "..")
    # walk out of the sandbox.
    # The helper loads most of itself on a background thread after it answers, and
    # importing opens (and closes) directories of its own: wait until that is done (a
    # list needs it), and let a descriptor that closes while we look go.
    await sandbox.helper.list_dir(".")
    script = (
        'import os, stat, sys; d = "/proc/%s/fd" % sys.argv[1]\n'
        "def isdir(n):\n"
        "    try:\n"
        '        return stat.S_ISDIR(os.stat(d + "/" + n).st_mode)\n'
        "    except FileNotFoundError:\n"
        "        return False\n"
        "print([n for n in os.listdir(d) if isdir(n)])"
    )
    result = await sandbox.helper.exec(f"python3 -c '{script}' $PPID")
    assert (result.exit_code, result.stdout) == (0, "[]\n"), result.stderr


# -- the confinement's parts ------------------------------------------------


def test_probe_finds_bwrap_working_here() -> None:
    assert probe() is None


def test_probe_names_a_missing_bwrap() -> None:
    assert probe(bwrap="/nonexistent/bwrap") == (
        "bwrap not installed (/nonexistent/bwrap; apt-get install bubblewrap)"
    )


async def test_commands_run_under_the_seccomp_filter(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("grep -E '^Seccomp(_filters)?:' /proc/self/status")
    assert result.stdout.split() == ["Seccomp:", "2", "Seccomp_filters:", "1"]


async def test_the_filter_refuses_namespace_flags_but_not_plain_clone(
    sandbox: BwrapSandbox,
) -> None:
    # Threads and subprocesses (clone without namespace flags, clone3 falling
    # back to clone) keep working; a mount namespace does not.
    script = (
        "import subprocess, threading, ctypes; t = threading.Thread(target=print); "
        "t.start(); t.join(); print(subprocess.run(['echo', 'child'], capture_output=True)"
        ".stdout.decode().strip()); libc = ctypes.CDLL(None, use_errno=True); "
        "print(libc.unshare(0x20000), ctypes.get_errno())"
    )
    result = await sandbox.helper.exec(f'python3 -c "{script}"')
    assert (result.exit_code, result.stdout) == (0, "\nchild\n-1 1\n"), result.stderr


def test_the_filter_is_a_whole_bpf_program() -> None:
    program = _seccomp.build_filter()
    assert len(program) % 8 == 0 and len(program) // 8 > len(_seccomp.DENIED_SYSCALLS)


async def test_tmp_is_a_private_tmpfs_only_the_sandbox_user_may_enter(
    sandbox: BwrapSandbox,
) -> None:
    result = await sandbox.helper.exec("stat -f -c %T /tmp; stat -c '%a %U' /tmp $HOME")
    assert result.stdout == "tmpfs\n700 silo\n700 silo\n", result.stderr


async def test_tmp_is_capped_at_half_the_memory_limit(workspace: Path, tmp_path: Path) -> None:
    limits = SandboxLimits(memory_bytes=128 * 1024**2)
    async with BwrapSandbox(_spec(workspace, tmp_path, limits=limits)) as sb:
        result = await sb.helper.exec("head -c 80000000 /dev/zero > /tmp/fill; echo rc=$?")
    assert "No space left on device" in result.stderr
    assert result.stdout == "rc=1\n"


async def test_proc_and_dev_are_the_sandbox_own(sandbox: BwrapSandbox) -> None:
    result = await sandbox.helper.exec("ls /dev; echo; ls /proc | grep -c '^[0-9]'")
    devices, count = result.stdout.split("\n\n")
    assert set(devices.split()) <= {
        "console",
        "core",
        "fd",
        "full",
        "mqueue",
        "null",
        "ptmx",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    }
    # init, the helper, the shell, ls and grep: no host process is listed.
    assert int(count) <= 6


async def test_the_environment_is_the_spec(workspace: Path, tmp_path: Path) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca.pem").write_bytes(b"CERT\n")
    spec = _spec(workspace, tmp_path, env={"PROJECT": "demo"}, trust_dir=trust)
    async with BwrapSandbox(spec) as sb:
        result = await sb.helper.exec(
            'echo "$HTTPS_PROXY $SSL_CERT_FILE $PROJECT $HOME $TMPDIR"; cat "$SSL_CERT_FILE"; '
            "echo x >> $SSL_CERT_FILE"
        )
    lines = result.stdout.splitlines()
    assert lines == [f"http://127.0.0.1:3128 {CA_CERT} demo {HOME} {TMP}", "CERT"]
    assert f"cannot create {CA_CERT}" in result.stderr


async def test_a_trust_directory_that_is_no_directory_is_refused(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"CERT\n")
    with pytest.raises(SandboxError, match="is not a directory"):
        await BwrapSandbox(_spec(workspace, tmp_path, trust_dir=tmp_path / "ca.pem")).start()


async def test_the_relay_socket_is_the_one_way_out(workspace: Path, tmp_path: Path) -> None:
    path = tmp_path / "relay.sock"
    server = await asyncio.start_unix_server(_answer_pong, path=str(path))
    path.chmod(0o666)  # the sandbox uid must be able to connect
    try:
        async with BwrapSandbox(_spec(workspace, tmp_path, relay_socket=path)) as sb:
            script = (
                "import socket; s = socket.socket(socket.AF_UNIX); "
                f"s.connect('{RELAY_SOCKET}'); s.sendall(b'ping\\n'); print(s.recv(10).decode())"
            )
            result = await sb.helper.exec(f'python3 -c "{script}"')
            gone = await sb.helper.exec(f"rm -f {RELAY_SOCKET}")
    finally:
        server.close()
        await server.wait_closed()
    assert (result.exit_code, result.stdout) == (0, "pong\n\n"), result.stderr
    assert gone.exit_code != 0 and path.exists()


async def _answer_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"pong\n")
    await writer.drain()
    writer.close()


async def test_a_relay_socket_that_is_no_socket_is_refused(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="is not a unix socket"):
        await BwrapSandbox(_spec(workspace, tmp_path, relay_socket=workspace / "README")).start()


@root_only
async def test_the_sandbox_gets_its_own_cgroup_with_the_spec_limits(
    workspace: Path, tmp_path: Path
) -> None:
    limits = SandboxLimits(memory_bytes=300 * 1024**2, cpus=0.5, pids=77)
    sb = BwrapSandbox(_spec(workspace, tmp_path, limits=limits))
    await sb.start()
    try:
        group = sb.cgroup
        assert group is not None and sb.warnings == []
        inside = await sb.helper.exec("cat /proc/self/cgroup")
        assert group.name in inside.stdout
        # init and the helper, from before the helper's first instruction.
        assert sb.init_pid in group.pids() and len(group.pids()) == 2
        if group.version == 1:
            memory = group.dirs["memory"] / "memory.limit_in_bytes"
            cpu = group.dirs["cpu"] / "cpu.cfs_quota_us"
            assert (memory.read_text(), cpu.read_text()) == ("314572800\n", "50000\n")
        else:
            memory = group.dirs["memory"] / "memory.max"
            assert memory.read_text() == "314572800\n"
        assert (group.dirs["pids"] / "pids.max").read_text() == "77\n"
    finally:
        await sb.close()
    assert not any(path.exists() for path in group.dirs.values())


@root_only
async def test_the_pids_limit_stops_a_fork_bomb_and_is_counted(
    workspace: Path, tmp_path: Path
) -> None:
    limits = SandboxLimits(pids=40)
    async with BwrapSandbox(_spec(workspace, tmp_path, limits=limits)) as sb:
        result = await sb.helper.exec(
            "for i in $(seq 60); do sleep 5 & done; wait", timeout_ms=2000
        )
        assert sb.cgroup is not None
        events = sb.cgroup.events()
    assert "Cannot fork" in result.stderr
    assert events["pids_max"] > 0


@root_only
async def test_the_memory_limit_kills_the_biggest_process_not_the_sandbox(
    workspace: Path, tmp_path: Path
) -> None:
    limits = SandboxLimits(memory_bytes=128 * 1024**2)
    async with BwrapSandbox(_spec(workspace, tmp_path, limits=limits)) as sb:
        bomb = await sb.helper.exec("python3 -c \"x = b'1' * (400 << 20)\"")
        after = await sb.helper.exec("echo still here")
        assert sb.cgroup is not None
        events = sb.cgroup.events()
    assert bomb.exit_code == 137  # SIGKILL, as the shell reports it
    assert after.stdout == "still here\n"
    assert events["oom_kill"] >= 1


async def test_without_a_cgroup_the_sandbox_runs_and_says_so(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(session_id: str, limits: SandboxLimits) -> SandboxCgroup:
        raise CgroupUnavailable("no permission to make a cgroup (test)")

    monkeypatch.setattr(SandboxCgroup, "create", staticmethod(refuse))
    async with BwrapSandbox(_spec(workspace, tmp_path)) as sb:
        result = await sb.helper.exec("echo fine")
    assert result.stdout == "fine\n"
    assert sb.warnings == [
        "no memory, CPU or pids limits for this sandbox: no permission to make a cgroup (test)"
    ]


_V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup_mounts_and_own_paths_are_parsed() -> None:
    mounts = _cgroups._mounts(_V1_MOUNTINFO)
    assert [(m.point.name, m.fstype) for m in mounts] == [
        ("cpu,cpuacct", "cgroup"),
        ("memory", "cgroup"),
        ("pids", "cgroup"),
        ("unified", "cgroup2"),
    ]
    own = _cgroups._own_paths("4:memory:/svc/x\n2:cpu,cpuacct:/\n0::/user.slice\n")
    assert own == {"memory": "/svc/x", "cpu": "/", "cpuacct": "/", "": "/user.slice"}
    memory = mounts[1]
    assert _cgroups._below(memory, "/svc/x") == Path("/sys/fs/cgroup/memory/svc/x")
    # Under a cgroup namespace the mount's root is not "/".
    namespaced = dataclasses.replace(memory, root="/svc")
    assert _cgroups._below(namespaced, "/svc/x") == Path("/sys/fs/cgroup/memory/x")
    assert _cgroups._below(namespaced, "/other") == Path("/sys/fs/cgroup/memory")


# -- a helper that dies or misbehaves ---------------------------------------


async def test_a_killed_helper_fails_pending_requests_with_sandbox_error(
    sandbox: BwrapSandbox,
) -> None:
    pending = await sandbox.helper.start_exec("sleep 60")
    with pytest.raises(SandboxError, match="sandbox helper lost"):
        await sandbox.helper.exec("kill -9 $PPID; sleep 60")
    with pytest.raises(SandboxError, match="sandbox helper lost"):
        await asyncio.wait_for(pending.result(), 5)


async def test_requests_after_the_helper_died_fail_at_once(sandbox: BwrapSandbox) -> None:
    with pytest.raises(SandboxError):
        await sandbox.helper.exec("kill -9 $PPID; sleep 60")
    with pytest.raises(SandboxError, match="sandbox helper lost"):
        await asyncio.wait_for(sandbox.helper.hello(), 1)


@pytest.mark.parametrize(
    "garbage",
    [
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"id": 4242, "ok": true}\n',
        b'{"id": 1, "ok": "yes"}\n',
        (
            b'{"id": 1, "ok": true, "pid": "one", "uid": 0, "gid": 0, "cwd": "/",'
            b' "workspace": "/", "python": "3"}\n'
        ),
        b'{"id": 1, "stream": "stdout", "data": "unasked"}\n',
        b"x" * (17 * 1024 * 1024),
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-id",
        "bad-ok",
        "bad-field",
        "unasked-stream",
        "overlong-line",
    ],
)
async def test_garbage_from_the_helper_fails_the_request_with_sandbox_error(
    garbage: bytes,
) -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    client = HelperClient(ours)
    await client.start()
    try:
        hello = asyncio.create_task(client.hello())
        await asyncio.sleep(0.05)
        # The client hangs up as soon as it has seen enough of an overlong line.
        with contextlib.suppress(ConnectionError):
            await asyncio.get_running_loop().sock_sendall(theirs, garbage)
        with pytest.raises(SandboxError, match="broke the protocol"):
            await asyncio.wait_for(hello, 5)
        assert client.closed
    finally:
        theirs.close()
        await client.close()


async def test_a_helper_streaming_past_the_cap_is_cut_off() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    client = HelperClient(ours)
    await client.start()
    seen: list[int] = []
    try:
        handle = await client.start_exec("yes", on_output=lambda _s, data: seen.append(len(data)))
        chunk = {"id": handle.id, "stream": "stdout", "data": "y" * (OUTPUT_CAP // 2 + 1)}
        line = json.dumps(chunk).encode() + b"\n"
        with contextlib.suppress(ConnectionError):
            await asyncio.get_running_loop().sock_sendall(theirs, line * 3)
        with pytest.raises(SandboxError, match="more than 1048576 characters of stdout"):
            await asyncio.wait_for(handle.result(), 5)
        assert seen == [OUTPUT_CAP // 2 + 1]
    finally:
        theirs.close()
        await client.close()


@pytest.fixture
def raw_helper(tmp_path: Path) -> Iterator[socket.socket]:
    """The helper script run directly (no sandbox), talked to over a raw socket."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            helper_module.__file__,
            "--fd",
            str(theirs.fileno()),
            "--workspace",
            str(tmp_path),
        ],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    ours.settimeout(10)
    try:
        yield ours
    finally:
        ours.close()
        proc.wait(10)


def _lines(sock: socket.socket, count: int) -> list[dict[str, object]]:
    buf = b""
    while buf.count(b"\n") < count:
        data = sock.recv(65536)
        assert data, "the helper closed the connection"
        buf += data
    return [json.loads(line) for line in buf.splitlines()[:count]]


def test_the_helper_answers_bad_requests_with_errors_and_keeps_serving(
    raw_helper: socket.socket,
) -> None:
    raw_helper.sendall(
        b"{not json\n"
        b'{"id": "seven", "op": "hello"}\n'
        b'{"id": 1, "op": "format-disk"}\n'
        + b"y" * (MAX_REQUEST_LINE + 10)
        + b"\n"
        + b'{"id": 2, "op": "exec", "command": "true", "timeout_ms": 99999999}\n'
        b'{"id": 3, "op": "hello"}\n'
    )
    answers = _lines(raw_helper, 6)
    codes = sorted(
        (a["id"] if isinstance(a["id"], int) else 0, a["error"]["code"])  # type: ignore[index]
        for a in answers
        if a["ok"] is False
    )
    assert codes == [
        (0, "bad_request"),
        (0, "bad_request"),
        (0, "too_large"),
        (1, "unknown_op"),
        (2, "bad_request"),
    ]
    assert [a["id"] for a in answers if a["ok"] is True] == [3]


def test_the_helper_decodes_invalid_utf8_output_with_replacement(
    raw_helper: socket.socket,
) -> None:
    raw_helper.sendall(b'{"id": 1, "op": "exec", "command": "printf \'ok\\\\377\\\\n\'"}\n')
    (answer,) = _lines(raw_helper, 1)
    assert answer["stdout"] == "ok\ufffd\n"


def test_the_helper_writes_base64_content_verbatim(
    raw_helper: socket.socket, tmp_path: Path
) -> None:
    data = b"\x00\x01binary\xff"
    request = {
        "id": 1,
        "op": "write",
        "path": "b.bin",
        "encoding": "base64",
        "content": base64.b64encode(data).decode(),
    }
    raw_helper.sendall(json.dumps(request).encode() + b"\n")
    (answer,) = _lines(raw_helper, 1)
    assert answer["ok"] is True
    assert (tmp_path / "b.bin").read_bytes() == data


# -- lifecycle --------------------------------------------------------------


async def test_close_removes_scratch_and_ends_every_process(
    workspace: Path, tmp_path: Path
) -> None:
    sb = BwrapSandbox(_spec(workspace, tmp_path))
    await sb.start()
    scratch = sb.scratch_dir
    assert scratch is not None and scratch.is_dir()
    # One job escapes the command's process group, one stays in it.
    await sb.helper.exec("(setsid sleep 300 &) ; sleep 300 & echo started")
    assert sb.pid is not None
    pid_ns, pids = _sandbox_processes(sb.pid)
    assert len(pids) >= 4  # init, helper, two sleeps
    await sb.close()
    assert not scratch.exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    assert [p for p in pids if _running_in(p, pid_ns)] == []
    with pytest.raises(SandboxError, match="not running"):
        sb.helper  # noqa: B018


async def test_a_python_that_cannot_run_the_helper_is_named(
    workspace: Path, tmp_path: Path
) -> None:
    sb = BwrapSandbox(_spec(workspace, tmp_path), python="/usr/bin/true")
    with pytest.raises(
        SandboxError, match="did not start: /usr/bin/true cannot compile the helper"
    ):
        await sb.start()
    assert not (tmp_path / "scratch").exists() or list((tmp_path / "scratch").iterdir()) == []


async def test_a_bwrap_that_fails_says_why_and_leaves_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    # As root it runs as the sandbox uid: it must be where that uid can read it.
    place = Path(tempfile.mkdtemp(prefix="devsilo-fake-bwrap-"))
    place.chmod(0o755)
    fake = place / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: no luck today' >&2\nexit 1\n")
    fake.chmod(0o755)
    try:
        sb = BwrapSandbox(_spec(workspace, tmp_path), bwrap=str(fake))
        with pytest.raises(SandboxError, match="did not start.*status 1.*no luck today"):
            await sb.start()
    finally:
        shutil.rmtree(place)
    assert list((tmp_path / "scratch").iterdir()) == []
    if AS_ROOT:
        assert not list(Path("/sys/fs/cgroup/pids/devsilo").glob("test-session-*"))


async def test_a_missing_workspace_is_refused(tmp_path: Path) -> None:
    sb = BwrapSandbox(_spec(tmp_path / "nowhere", tmp_path))
    with pytest.raises(SandboxError, match="nowhere is not a directory"):
        await sb.start()


@root_only
def test_ownership_handover_skips_hard_links_to_outside_files(tmp_path: Path) -> None:
    outside = tmp_path / "host-secret"
    outside.write_text("root's file")
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    os.link(outside, ws / "sub" / "link")
    (ws / "sub" / "mine").write_text("x")
    skipped = prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    assert skipped == ["sub/link"]
    assert outside.stat().st_uid == 0
    assert (ws / "sub" / "mine").stat().st_uid == SANDBOX_UID


def _status_field(pid: int, key: str) -> str:
    """A field of /proc/PID/status, or "" when the process went away meanwhile."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in text.splitlines())
    return fields.get(key, "").strip()


def _pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _sandbox_processes(bwrap_pid: int) -> tuple[str, list[int]]:
    """The pid namespace of bwrap's sandbox and the host pids of every process in it."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    (init,) = [p for p in pids if _status_field(p, "PPid") == str(bwrap_pid)]
    pid_ns = _pid_ns(init)
    return pid_ns, [p for p in pids if _running_in(p, pid_ns)]


def _running_in(pid: int, pid_ns: str) -> bool:
    # A zombie runs nothing; the host's init reaps it in its own time.
    state = _status_field(pid, "State")
    return bool(state) and not state.startswith("Z") and _pid_ns(pid) == pid_ns


def test_cgroups_orphaned_by_a_dead_executor_are_swept(tmp_path: Path) -> None:
    old = time.time() - 3600
    for name in ("gone-0123abcd", "fresh-89abcdef", "gvisor"):
        (tmp_path / name).mkdir()
    os.utime(tmp_path / "gone-0123abcd", (old, old))
    os.utime(tmp_path / "gvisor", (old, old))
    _cgroups._sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh-89abcdef", "gvisor"]


@root_only
async def test_a_source_swapped_during_start_is_refused(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the stage finds at the path is not what the executor opened.
    real_open = sandbox_module._Source.open

    def swapped(host: Path, dest: str, *, writable: bool, directory: bool) -> object:
        source = real_open(host, dest, writable=writable, directory=directory)
        return dataclasses.replace(source, identity=(0, 0)) if dest == WORKSPACE else source

    monkeypatch.setattr(sandbox_module._Source, "open", staticmethod(swapped))
    with pytest.raises(SandboxError, match=f"{workspace} was replaced while the sandbox started"):
        await BwrapSandbox(_spec(workspace, tmp_path)).start()


_DIES_WITH_EXECUTOR = """
import asyncio, os, sys
from pathlib import Path
from devsilo.executor._sandbox import BwrapSandbox
from devsilo.executor._spec import SandboxSpec

async def main():
    spec = SandboxSpec("orphan", Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]),
                       Path(sys.argv[3]))
    sandbox = BwrapSandbox(spec)
    await sandbox.start()
    groups = sorted(set(sandbox.cgroup.dirs.values())) if sandbox.cgroup else []
    print(sandbox.init_pid, *groups, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_the_sandbox_dies_with_the_executor(workspace: Path, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DIES_WITH_EXECUTOR,
        str(workspace),
        str(SANDBOX_UID),
        str(tmp_path / "scratch"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    pid, *groups = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    pidfd = os.pidfd_open(int(pid))
    try:
        proc.kill()
        await proc.wait()
        # The launcher thread died with the executor: PR_SET_PDEATHSIG fires.
        assert await sandbox_module._readable(pidfd, 5.0), "the sandbox outlived its executor"
    finally:
        os.close(pidfd)
        # A killed executor cannot remove its cgroups (a later one sweeps them);
        # they empty once the host's init reaps the orphaned processes.
        for group in groups:
            for _ in range(200):
                with contextlib.suppress(FileNotFoundError):
                    try:
                        Path(group).rmdir()
                    except OSError:
                        await asyncio.sleep(0.05)
                        continue
                break


def _gone(pid: int) -> bool:
    """The process is gone, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["abandoned start", "close"])
def test_a_killed_bwrap_leaves_no_child_of_its_group_behind(how: str) -> None:
    """bwrap's child blocks until the outer process has mapped its uids, and only then asks to die
    with it: killed in between, the outer left it parented to init for ever (found after a suite
    run). A stand-in outer here leaves a child in its process group exactly like that."""
    import concurrent.futures

    outer = subprocess.Popen(
        [sys.executable, "-c", ("import os, time\npid = os.fork()\nif pid: print(pid, flush=True)\n"
         "time.sleep(600)")],
        stdout=subprocess.PIPE, start_new_session=True)
    assert outer.stdout is not None
    child = int(outer.stdout.readline())
    spawned = sandbox_module._Spawned(outer, os.pidfd_open(outer.pid))
    try:
        assert os.getpgid(child) == outer.pid
        if how == "abandoned start":  # the caller of a spawn gave up: the spawn is killed
            future: concurrent.futures.Future[sandbox_module._Spawned] = concurrent.futures.Future()
            future.set_result(spawned)
            sandbox_module._kill_orphan(future)
        else:  # BwrapSandbox.close's last step: SIGKILL, then reap once exited
            os.kill(outer.pid, 9)
            os.waitid(os.P_PIDFD, spawned.pidfd, os.WEXITED | os.WNOWAIT)
            spawned.reap()
            os.close(spawned.pidfd)
        for _ in range(100):
            if _gone(child):
                break
            time.sleep(0.05)
        assert _gone(child), f"pid {child} of the killed outer's group is still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)
        with contextlib.suppress(ProcessLookupError):
            os.kill(outer.pid, 9)
        outer.wait()
        outer.stdout.close()

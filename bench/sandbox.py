"""Sandbox latency per backend, each figure beside a bare baseline measured in the same run.

    .venv/bin/python bench/sandbox.py [-n N] [--backends bwrap,gvisor,docker-runc,docker-runsc]

Measured, per backend that works here (a backend whose probe fails is skipped
with the probe's reason):

- **cold start**: ``await sandbox.start()`` of a new sandbox
  (``BACKENDS[name].create(spec, **config)``) until its helper answered hello;
- **exec**: the round trip of ``helper.exec("true")`` (the helper runs
  ``sh -c true`` inside) in one started sandbox;
- **close**: ``await sandbox.close()`` of a started, idle sandbox (the helper
  shut down, everything inside killed, scratch removed);
- **warm take** (every backend, when ``devsilo.executor._warm.WarmPool``
  exists): ``await pool.take(spec, relay)`` from a pool (size 1) that has a
  started sandbox ready, with the session's relay running as the executor
  has it; the lease must be served warm, and the leased sandbox is checked
  (untimed) to see the session's workspace. bwrap and docker-runc attach the
  workspace and relay socket at the lease; gvisor and docker-runsc pools are
  keyed by the workspace (the benchmark's one) and hand over the relay socket.

Baselines, in every backend's section of the table, measured in the same run
and interleaved with what they are compared to (so both see the same load):

- ``subprocess.run(["true"])``: for exec, close and warm take, and for the
  backend's own baseline;
- ``bwrap --ro-bind /usr /usr … true`` with the sandbox's namespaces, run as
  the sandbox uid through ``setpriv``: for bwrap's cold start;
- ``runsc --network=none do true`` (as root, runsc's state in a temporary
  directory, the sandbox's platform): for gvisor's cold start;
- the docker SDK's ``containers.run(image, "true", remove=True)`` on the same
  private daemon with the same runtime (``network_mode="none"``, the host's
  ``/usr`` bound read-only into the locally imported base image, which has
  no binaries of its own): for docker-runc's and docker-runsc's cold start.

The table gives, per row, the number of samples, p50 and p99 (linear
interpolation between the nearest ranks; with few samples p99 is close to the
maximum), the ratios of p50 and p99 to the row's baseline, and the p50
difference. ``-n`` sets the cold starts (and closes) per backend; exec round
trips are ``--exec-n`` (default ``10 * n``). A few unmeasured warm-up rounds
come first (``--warmup``): helper compilation, image import, page cache.

Run as root: the sandbox runs as the unprivileged ``--uid`` (default 64123),
which is given the workspace as the executor does
(``prepare_workspace_ownership``); gvisor and docker need root anyway. The
docker rows use a private ``dockerd`` (``devsilo.testing.Dockerd``) started
and stopped by this script. Everything lives in one temporary directory and
is removed at the end, also after Ctrl-C or SIGTERM (a second Ctrl-C does
not cut the clean-up short).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from devsilo.executor._backends import BACKENDS
from devsilo.executor._relay import SessionRelay
from devsilo.executor._sandbox import (
    _USR_ALIASES,
    Sandbox,
    _usr_alias_args,
    prepare_workspace_ownership,
)
from devsilo.executor._spec import SandboxSpec

_T = TypeVar("_T")

TARGETS = ("bwrap", "gvisor", "docker-runc", "docker-runsc")
"""What can be benchmarked: a backend, and for docker the runtime."""

_LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_GVISOR_PLATFORM = "ptrace"  # GvisorSandbox's default; the runsc baseline uses the same
TRUE_LABEL = "bare: subprocess.run(['true'])"


# -- samples and the table -------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0…1) of ``samples``, linearly interpolated between ranks."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclasses.dataclass
class Row:
    """One line of the table: what was timed, its samples (ms), and what it is compared to."""

    label: str
    samples: list[float] = dataclasses.field(default_factory=list)
    baseline: Row | None = None
    short: str = ""
    """How rows compared to this one name it in the baseline column (default: ``label``)."""


@dataclasses.dataclass
class Section:
    """One backend's rows under its name: its baselines first, then what was measured."""

    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    note: str = ""


def render(sections: list[Section]) -> str:
    """The table: n, p50, p99, ratios and p50 difference to each row's baseline."""
    width = max([len(r.label) for s in sections for r in s.rows] + [30]) + 2
    head = (
        f"{'':{width}}{'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'x p50':>8} {'x p99':>8}"
        f" {'d p50 ms':>9}  baseline"
    )
    lines = [head]
    for section in sections:
        lines.append(section.title + (f"  ({section.note})" if section.note else ""))
        for row in section.rows:
            if not row.samples:
                continue
            p50, p99 = percentile(row.samples, 0.5), percentile(row.samples, 0.99)
            text = f"  {row.label:{width - 2}}{len(row.samples):5d} {p50:9.2f} {p99:9.2f}"
            base = row.baseline
            if base is not None and base.samples:
                b50, b99 = percentile(base.samples, 0.5), percentile(base.samples, 0.99)
                name = base.short or base.label
                text += f" {p50 / b50:7.1f}x {p99 / b99:7.1f}x {p50 - b50:+9.2f}  {name}"
            lines.append(text)
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule, *lines[1:]])


def timed(call: Callable[[], object]) -> float:
    """Milliseconds ``call()`` took."""
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


async def atimed(call: Callable[[], Awaitable[object]]) -> float:
    """Milliseconds ``await call()`` took."""
    began = time.perf_counter()
    await call()
    return (time.perf_counter() - began) * 1000


# -- clean-up that a Ctrl-C cannot cut short -------------------------------------------


async def finish(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end even if this task is cancelled meanwhile; then re-raise that."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def install_stop_signals(task: asyncio.Task[Any]) -> None:
    """Ctrl-C or SIGTERM cancels ``task`` once; later ones only say that clean-up is running.

    The handlers run on the event loop, so a synchronous step (a baseline run,
    dockerd starting or stopping) is never interrupted halfway: the
    cancellation lands at the next ``await`` and every ``finally`` runs.
    """
    loop = asyncio.get_running_loop()
    hits = 0

    def stop(signame: str) -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            print(f"\n{signame}: stopping, cleaning up…", file=sys.stderr, flush=True)
            task.cancel()
        else:
            print(
                f"{signame}: still cleaning up (sandboxes, dockerd, temp files); "
                f"kill -9 {os.getpid()} to abandon them",
                file=sys.stderr,
                flush=True,
            )

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)


# -- baselines ---------------------------------------------------------------------


def bare_true() -> None:
    """One bare ``subprocess.run(["true"])``."""
    subprocess.run(["true"], check=False)


def _run_quiet(argv: list[str], what: str, cwd: str | None = None) -> None:
    # Its own session, as the sandboxes' own processes: a Ctrl-C reaches this
    # script only, which finishes the run and then cleans up.
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
        start_new_session=True,
        check=False,
    )
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what} failed ({done.returncode}): {said[-1] if said else ''}")


def bare_bwrap_argv(uid: int, as_root: bool) -> list[str]:
    """``bwrap … true`` with the sandbox's namespaces and nothing else (as ``uid`` when root)."""
    # fmt: off
    argv = [
        shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
        *_usr_alias_args(), "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true",
    ]
    if as_root:
        argv = [
            shutil.which("setpriv", path=_LAUNCH_PATH) or "setpriv",
            f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv,
        ]
    # fmt: on
    return argv


def bare_runsc_argv(root: Path) -> list[str]:
    """``runsc --network=none do true`` with runsc's state under ``root``."""
    runsc = shutil.which("runsc") or "runsc"
    # fmt: off
    return [runsc, f"--root={root}", "--network=none", f"--platform={_GVISOR_PLATFORM}",
            "do", "true"]
    # fmt: on


# -- one backend -----------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One backend (and configuration) to benchmark, with its cold-start baseline."""

    name: str
    backend: str
    config: dict[str, Any]
    baseline_label: str
    baseline_short: str
    baseline: Callable[[], None]
    note: str = ""


class Bench:
    """The run's options, its temporary directory and workspace, and how to make specs."""

    def __init__(self, args: argparse.Namespace, tmp: Path, workspace: Path) -> None:
        self.n: int = args.n
        self.exec_n: int = args.exec_n if args.exec_n is not None else 10 * args.n
        self.warmup: int = args.warmup
        self.uid: int = args.uid if os.geteuid() == 0 else os.getuid()
        self.gid: int = args.uid if os.geteuid() == 0 else os.getgid()
        self.tmp = tmp
        self.workspace = workspace
        self._count = 0

    def spec(self, target: Target) -> SandboxSpec:
        """A fresh spec (own session id, own scratch root) on the shared workspace."""
        self._count += 1
        return SandboxSpec(
            session_id=f"bench-{os.getpid()}-{target.name}-{self._count}",
            workspace=self.workspace,
            sandbox_uid=self.uid,
            sandbox_gid=self.gid,
            scratch_root=self.tmp / "scratch" / target.name,
        )

    def create(self, target: Target) -> Sandbox:
        """A new, unstarted sandbox of ``target``."""
        return BACKENDS[target.backend].create(self.spec(target), **target.config)

    async def started(self, target: Target) -> Sandbox:
        """A started sandbox of ``target`` (closed again if its start fails or is cancelled)."""
        sandbox = self.create(target)
        try:
            await sandbox.start()
        except BaseException:
            await finish(sandbox.close())
            raise
        return sandbox

    async def exec_true(self, sandbox: Sandbox) -> None:
        """One ``exec true`` through the helper; it must succeed."""
        result = await sandbox.helper.exec("true")
        if result.exit_code != 0:
            raise RuntimeError(f"exec true in the sandbox: exit {result.exit_code} {result.stderr}")

    async def run(self, target: Target) -> Section:
        """Warm up, then n rounds of (baselines, cold start, close), then exec round trips.

        The section's rows: the bare ``true``, the backend's bare baseline,
        cold start, exec round trip and close; every ``true`` sample is taken
        between two measured steps of this backend.
        """
        true = Row(TRUE_LABEL, short="bare true")
        base = Row(f"bare: {target.baseline_label}", baseline=true, short=target.baseline_short)
        cold = Row("cold start to helper hello", baseline=base)
        execs = Row("helper.exec('true') round trip", baseline=true)
        close = Row("close", baseline=true)
        section = Section(target.name, [true, base, cold, execs, close], target.note)
        for _ in range(self.warmup):
            target.baseline()
            sandbox = await self.started(target)
            try:
                await self.exec_true(sandbox)
            finally:
                await finish(sandbox.close())
        for _ in range(self.n):
            true.samples.append(timed(bare_true))
            base.samples.append(timed(target.baseline))
            sandbox = self.create(target)
            try:
                cold.samples.append(await atimed(sandbox.start))
            except BaseException:
                await finish(sandbox.close())
                raise
            close.samples.append(await finish(atimed(sandbox.close)))
        sandbox = await self.started(target)
        try:
            for _ in range(max(10, self.exec_n // 10)):
                await self.exec_true(sandbox)
            for _ in range(self.exec_n):
                execs.samples.append(await atimed(lambda: self.exec_true(sandbox)))
                true.samples.append(timed(bare_true))
        finally:
            await finish(sandbox.close())
        return section


# -- the warm pool ------------------------------------------------------------------------


def warm_pool_class() -> type[Any] | None:
    """``devsilo.executor._warm.WarmPool`` when that module exists, else None."""
    try:
        module = importlib.import_module("devsilo.executor._warm")
    except ModuleNotFoundError as exc:
        if exc.name in ("devsilo.executor._warm",):
            return None
        raise
    pool: type[Any] | None = getattr(module, "WarmPool", None)
    return pool


async def bench_warm_take(
    bench: Bench, target: Target, pool_cls: type[Any], true: Row
) -> tuple[Row, str | None]:
    """``await pool.take(spec, relay)`` from a warm pool of ``target`` with a sandbox ready, n times.

    The pool (size 1) starts its sandboxes from the same template as the
    cold starts; each timed take waits, untimed, until the pool is full
    again, and must be served warm (not cold-started). Each session gets its
    own relay (no egress), started untimed, as the executor starts it before
    the lease. The leased sandbox then runs ``test -f /workspace/README``
    (the session's workspace is there) and is closed, both untimed. Returns
    the row and, when a leased sandbox did not see that workspace, what was
    wrong (the timings are kept: the take itself completed).
    """
    row = Row("warm pool take()", baseline=true)
    problem: str | None = None
    pool = pool_cls(lambda: bench.spec(target), 1, backend=target.backend, **target.config)
    relays = bench.tmp / "relays"
    relays.mkdir(mode=0o711, exist_ok=True)
    try:
        await pool.start()
        for i in range(bench.warmup + bench.n):
            await pool.wait_ready(1, timeout=120.0)
            warm_before = pool.stats.warm_leases
            spec = bench.spec(target)
            relay = SessionRelay(
                spec.session_id, relays / f"{spec.session_id}.sock", None, uid=bench.uid
            )
            await relay.start()
            spec = dataclasses.replace(spec, relay_socket=relay.socket_path)
            try:
                began = time.perf_counter()
                sandbox = await pool.take(spec, relay)
                took = (time.perf_counter() - began) * 1000
            except BaseException:
                await finish(relay.close())
                raise
            try:
                if pool.stats.warm_leases != warm_before + 1:
                    raise RuntimeError(f"take() cold-started instead: {pool.stats.last_error}")
                result = await sandbox.helper.exec("test -f /workspace/README")
                if result.exit_code != 0 and problem is None:
                    seen = await sandbox.helper.exec("grep ' /workspace ' /proc/self/mountinfo")
                    problem = (
                        "take() served the lease warm, but /workspace in the leased sandbox is "
                        f"not the session's workspace; its mount: {seen.stdout.strip()[:200]}"
                    )
            finally:
                await finish(sandbox.close())
                await finish(relay.close())
            if i >= bench.warmup:
                row.samples.append(took)
                true.samples.append(timed(bare_true))
    finally:
        await finish(pool.close())
    return row, problem


# -- docker ------------------------------------------------------------------------------


class DockerSide:
    """The private dockerd, an SDK client of it, and the base image; stopped by :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        from devsilo.testing._dockerd import Dockerd

        self.daemon = Dockerd(root)
        self.client: Any = None
        self.image = ""

    def start(self) -> None:
        """Start dockerd, import the base image, connect a client."""
        import docker

        self.daemon.start()
        self.image = self.daemon.build_base_image()
        self.client = docker.DockerClient(base_url=self.daemon.url, timeout=60)

    def stop(self) -> None:
        """Close the client; stop dockerd (removing every container it has)."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        self.daemon.stop()

    def bare_run(self, runtime: str) -> Callable[[], None]:
        """One SDK ``containers.run(image, "true", remove=True)`` with ``runtime``."""
        from docker.types import Mount

        # The base image is a skeleton: /bin, /lib… point into /usr, bound here.
        mounts = [Mount("/usr", "/usr", type="bind", read_only=True)]
        mounts += [
            Mount(f"/{d}", f"/{d}", type="bind", read_only=True)
            for d in _USR_ALIASES
            if os.path.isdir(f"/{d}") and not os.path.islink(f"/{d}")
        ]

        def run() -> None:
            self.client.containers.run(
                self.image,
                "true",
                remove=True,
                runtime=runtime,
                network_mode="none",
                mounts=mounts,
            )

        return run


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="cold starts (and closes) per backend")
    parser.add_argument(
        "--exec-n", type=int, default=None, help="exec round trips per backend (default 10*n)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds per backend")
    parser.add_argument(
        "--backends",
        default=",".join(TARGETS),
        help=f"comma-separated, of {','.join(TARGETS)} (default: all)",
    )
    parser.add_argument("--uid", type=int, default=64123, help="sandbox uid/gid when run as root")
    args = parser.parse_args()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in TARGETS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.n < 1 or args.warmup < 0 or (args.exec_n is not None and args.exec_n < 1):
        parser.error("-n and --exec-n must be at least 1, --warmup at least 0")
    if args.uid <= 0:
        parser.error("--uid must not be 0: the sandbox never runs as root")
    args.backends = wanted
    return args


async def main() -> int:
    """Run every selected backend that works here and print the table; the exit status."""
    args = parse_args()
    install_stop_signals(asyncio.current_task())  # type: ignore[arg-type]
    logging.disable(logging.WARNING)
    as_root = os.geteuid() == 0
    if not as_root:
        print("not root: the sandbox runs as this uid; gvisor and docker need root", flush=True)
    load_before = os.getloadavg()
    skipped: list[str] = []
    failed: list[str] = []
    sections: list[Section] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="devsilo-bench-")))
        workspace = tmp / "workspace"
        workspace.mkdir()
        (workspace / "README").write_text("benchmark workspace\n")
        bench = Bench(args, tmp, workspace)
        if as_root:
            prepare_workspace_ownership(workspace, bench.uid, bench.gid)

        targets: list[Target] = []
        for name in args.backends:
            if name == "bwrap":
                argv = bare_bwrap_argv(bench.uid, as_root)
                targets.append(
                    Target(
                        name="bwrap",
                        backend="bwrap",
                        config={},
                        baseline_label="bwrap --ro-bind /usr /usr … true",
                        baseline_short="bare bwrap",
                        baseline=functools.partial(_run_quiet, argv, "bare bwrap"),
                    )
                )
            elif name == "gvisor":
                runsc_root = tmp / "runsc-bare"
                argv = bare_runsc_argv(runsc_root)

                def runsc_do(argv: list[str] = argv, root: Path = runsc_root) -> None:
                    root.mkdir(exist_ok=True)
                    _run_quiet(argv, "runsc do true", cwd="/")

                targets.append(
                    Target(
                        name="gvisor",
                        backend="gvisor",
                        config={"platform": _GVISOR_PLATFORM},
                        baseline_label=f"runsc --network=none do true ({_GVISOR_PLATFORM})",
                        baseline_short="runsc do",
                        baseline=runsc_do,
                        note=f"runsc platform {_GVISOR_PLATFORM}",
                    )
                )
        docker_runtimes = [
            n.removeprefix("docker-") for n in args.backends if n.startswith("docker-")
        ]
        docker_side: DockerSide | None = None
        if docker_runtimes:
            try:
                docker_side = DockerSide(tmp / "dockerd")
            except ImportError as exc:
                skipped += [f"docker-{rt}: not installed: {exc}" for rt in docker_runtimes]
            if docker_side is not None:
                stack.callback(docker_side.stop)
                print("starting a private dockerd…", flush=True)
                try:
                    docker_side.start()
                except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
                    why = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    skipped += [f"docker-{rt}: private dockerd: {why}" for rt in docker_runtimes]
                    docker_side = None
                await asyncio.sleep(0)  # a Ctrl-C during the start lands here
        if docker_side is not None:
            for rt in docker_runtimes:
                targets.append(
                    Target(
                        name=f"docker-{rt}",
                        backend="docker",
                        config={"runtime": rt, "docker_url": docker_side.daemon.url},
                        baseline_label=f"containers.run(image, 'true', remove=True) [{rt}]",
                        baseline_short="containers.run",
                        baseline=docker_side.bare_run(rt),
                        note="private dockerd",
                    )
                )
        targets.sort(key=lambda t: args.backends.index(t.name))

        for target in targets:
            reason = BACKENDS[target.backend].probe(**target.config)
            if reason is not None:
                skipped.append(f"{target.name}: {reason}")
                continue
            print(f"measuring {target.name}…", flush=True)
            try:
                section = await bench.run(target)
            except Exception as exc:  # noqa: BLE001 - one backend's failure
                failed.append(f"{target.name}: {type(exc).__name__}: {exc}")
                continue
            sections.append(section)
            pool_cls = warm_pool_class()
            if pool_cls is None:
                section.note = "no services/executor/_warm.py: warm take not measured"
                continue
            try:
                row, problem = await bench_warm_take(bench, target, pool_cls, section.rows[0])
            except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
                failed.append(f"{target.name} warm pool: {type(exc).__name__}: {exc}")
                continue
            section.rows.append(row)
            if problem is not None:
                failed.append(f"{target.name} warm pool: {problem}")

    load_after = os.getloadavg()
    print()
    print(
        f"sandbox benchmark: n={args.n} cold starts, {bench.exec_n} exec round trips per backend; "
        f"{os.cpu_count()} CPUs; load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
        f"{'root, sandbox uid ' + str(bench.uid) if as_root else 'uid ' + str(bench.uid)}"
    )
    for line in skipped:
        print(f"skipped {line}")
    for line in failed:
        print(f"FAILED {line}")
    print()
    print(render(sections) if sections else "no backend measured")
    return 1 if failed or not sections else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except asyncio.CancelledError:
        print("interrupted; everything started was cleaned up", file=sys.stderr)
        sys.exit(130)

"""The attack battery (devsilo.testing._attacks) against every real sandbox backend.

Each attack is its own test, per backend (``[bwrap-read_etc_shadow]``…), in a
sandbox started through the backend registry, with the battery's small
limits so the bombs hit them fast. A test fails when its attack succeeds or
is stopped for a reason nobody expected. The bombs, which may exhaust or end
their sandbox, each get a fresh one; every other attack of a backend runs in
one sandbox started for the module (next to one victim session's sandbox),
as an agent's commands would — one attack left standing cannot make another
look blocked, since each is judged by its own output and the host's state.

A backend whose module does not exist yet is skipped with its probe's
reason; one that exists must work on this host (CI runs as root with
bubblewrap, runsc and docker.io installed). The docker variants need a
private daemon: :func:`backend_config` starts one with
``devsilo.testing._dockerd`` for the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from devsilo.executor._backends import BACKENDS
from devsilo.executor._sandbox import HOME, Sandbox, prepare_workspace_ownership
from devsilo.executor._spec import SandboxSpec
from devsilo.runtime._state import StateDir
from devsilo.testing._attacks import ATTACKS, BOMB_LIMITS, Attack, Bait, plant_bait, run_attack
from devsilo.testing._nats import init_state

AS_ROOT = os.geteuid() == 0
SANDBOX_UID = 64123 if AS_ROOT else os.getuid()
SANDBOX_GID = 64123 if AS_ROOT else os.getgid()

# (test id, registry name, backend settings)
VARIANTS = [
    ("bwrap", "bwrap", {}),
    ("gvisor", "gvisor", {}),
    ("docker-runc", "docker", {"runtime": "runc"}),
    ("docker-runsc", "docker", {"runtime": "runsc"}),
]
_VICTIM_FIELDS = frozenset({"other_workspace_file", "other_scratch_file"})


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend under test and the settings its sandboxes get."""

    name: str
    config: dict[str, Any]

    async def start(self, spec: SandboxSpec) -> Sandbox:
        sandbox = BACKENDS[self.name].create(spec, **self.config)
        await sandbox.start()
        return sandbox


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private Docker daemon for this module (root only), stopped after it."""
    if not AS_ROOT:
        pytest.skip("the docker backend's test daemon needs root")
    try:
        from devsilo.testing._dockerd import Dockerd
    except ImportError as exc:
        pytest.skip(f"no test Docker daemon (devsilo.testing._dockerd): {exc}")
    with Dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture(scope="module", params=VARIANTS, ids=[v[0] for v in VARIANTS])
def backend_config(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The registry name and keyword arguments of the backend under test.

    The hook for backends that need something running first: docker gets
    the module's own daemon (``docker_url``).
    """
    _, name, settings = request.param
    config = dict(settings)
    if name == "docker" and importlib.util.find_spec(BACKENDS[name].module, "devsilo.executor"):
        config["docker_url"] = request.getfixturevalue("dockerd").url
    return name, config


@pytest.fixture(scope="module")
def backend(backend_config: tuple[str, dict[str, Any]]) -> Backend:
    """The backend under test, probed: skipped only when its module does not exist yet."""
    name, config = backend_config
    reason = BACKENDS[name].probe(**config)
    if reason is not None:
        if importlib.util.find_spec(BACKENDS[name].module, "devsilo.executor") is None:
            pytest.skip(f"{name}: {reason}")
        pytest.fail(f"the {name} backend does not work on this host: {reason}")
    return Backend(name, config)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> StateDir:
    """Services' state: the attacks try to read it; the sandboxes' scratch lives inside it."""
    return init_state(tmp_path_factory.mktemp("attack-state") / "state")


@pytest.fixture(scope="module")
def bait(tmp_path_factory: pytest.TempPathFactory, state: StateDir) -> Iterator[Bait]:
    """The module's bait: secrets, host listeners, a test network, a host process."""
    with plant_bait(
        tmp_path_factory.mktemp("bait"), state_dir=state.root, state_file=state.roster_path
    ) as planted:
        yield planted


def _workspace(path: Path) -> Path:
    path.mkdir()
    (path / "README").write_text("a project\n")
    if AS_ROOT:
        prepare_workspace_ownership(path, SANDBOX_UID, SANDBOX_GID)
    return path


def _spec(session: str, workspace: Path, state: StateDir) -> SandboxSpec:
    return SandboxSpec(
        session_id=session,
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=state.root / "scratch",
        limits=BOMB_LIMITS,
    )


def _host_scratch_home(sandbox: Sandbox) -> Path | None:
    """Where a sandbox keeps its scratch home on the host, for backends that say."""
    scratch = getattr(sandbox, "scratch_dir", None)
    return Path(scratch) / "home" if scratch is not None else None


@contextlib.asynccontextmanager
async def _victim(
    backend: Backend, bait: Bait, tmp_path: Path, state: StateDir
) -> AsyncIterator[Bait]:
    """Another session's sandbox with the secret in its workspace and scratch home."""
    workspace = _workspace(tmp_path / "victim")
    (workspace / "secret.txt").write_text(bait.secret + "\n")
    sandbox = await backend.start(_spec("victim", workspace, state))
    try:
        await sandbox.helper.write(f"{HOME}/secret.txt", bait.secret + "\n")
        home = _host_scratch_home(sandbox)
        scratch_file = home / "secret.txt" if home is not None else None
        yield dataclasses.replace(
            bait,
            other_workspace_file=str(workspace / "secret.txt"),
            other_scratch_file=str(scratch_file)
            if scratch_file is not None and scratch_file.exists()
            else None,
        )
    finally:
        await sandbox.close()


@dataclasses.dataclass
class Attacker:
    """A backend's shared attacker sandbox and the bait aimed at its victim."""

    sandbox: Sandbox
    bait: Bait


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def attacker(backend: Backend, bait: Bait, state: StateDir,
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Attacker]:
    """The backend's attacker sandbox for the module, beside a victim session's sandbox."""
    root = tmp_path_factory.mktemp(f"attack-{backend.name}")
    async with contextlib.AsyncExitStack() as stack:
        aimed = await stack.enter_async_context(_victim(backend, bait, root, state))
        workspace = _workspace(root / "attacker")
        aimed.arm_workspace(workspace)
        sandbox = await backend.start(_spec("attacker", workspace, state))
        stack.push_async_callback(sandbox.close)
        yield Attacker(sandbox, aimed)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_fails_for_the_right_reason(
    attack: Attack, backend: Backend, bait: Bait, state: StateDir, tmp_path: Path, attacker: Attacker,
) -> None:
    if attack.bomb:  # a sandbox of its own: the bomb may use it up or end it
        assert not attack.bait_fields & _VICTIM_FIELDS
        workspace = _workspace(tmp_path / "attacker")
        bait.arm_workspace(workspace)
        sandbox = await backend.start(_spec("bomber", workspace, state))
        try:
            outcome = await run_attack(sandbox, attack, bait)
        finally:
            await sandbox.close()
    else:
        outcome = await run_attack(attacker.sandbox, attack, attacker.bait)
    if outcome.verdict == "not-applicable":
        pytest.skip(f"{attack.name}: {outcome.detail}")
    assert outcome.blocked, f"{attack.name} ({attack.goal}): {outcome.verdict}: {outcome.detail}"


def test_the_battery_is_at_least_forty_attacks_with_unique_names() -> None:
    names = [a.name for a in ATTACKS]
    assert len(names) >= 40
    assert len(set(names)) == len(names)

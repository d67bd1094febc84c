"""Deployment: per-host bundles (`silo init --export`), and a service started from one."""

from __future__ import annotations

import asyncio
import base64
import configparser
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml  # type: ignore[import-untyped]
from devsilo.cli.main import build_parser
from devsilo.cli.main import main as silo_main
from devsilo.harness._failover import SessionOwners
from devsilo.harness._service import ensure_streams
from devsilo.protocol import ConfigError, ExecutorAnnounce, Role, subjects
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._natsserver import find_nats_server
from devsilo.runtime._service import ServiceContext
from devsilo.runtime._state import StackConfig, StateDir
from devsilo.testing._nats import free_port, init_state, running_nats

CRED_SECRET = "ghp_deploytestsecret_0123456789abcdef"
MODEL_KEY = "sk-ant-deploytest-modelkey-9876543210"
ROLES = ("gateway", "harness", "executor", "egress", "nats")
SERVICE_ROLES = ("gateway", "harness", "executor", "egress")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> StateDir:
    """A full state directory whose egress has a credential store and harness a model key file."""
    root = tmp_path_factory.mktemp("deploy")
    state = init_state(root / "state")
    (root / "gh-token").write_text(CRED_SECRET)
    (root / "anthropic-key").write_text(MODEL_KEY)
    cfg = state.config().model_dump(mode="json")
    cfg["services"]["egress"]["options"] = {"credentials": {"github": {
        "file": str(root / "gh-token"), "hosts": ["api.github.com"],
        "header": "Authorization: Bearer {secret}", "users": ["alice"]}}}
    cfg["services"]["harness"]["options"] = {"models": {"anthropic": {
        "api_key_file": str(root / "anthropic-key"), "base_url": "https://models.internal.example"}}}
    state.config_path.write_text(json.dumps(cfg))
    state.initialize()
    return state


@pytest.fixture(scope="module")
def bundles(source: StateDir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for role in ROLES:
        made[role] = out / role
        code = silo_main(["--state-dir", str(source.root), "init", "--export", f"host-{role}",
                          "--roles", role, "-o", str(made[role])])
        assert code == 0
    return made


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def secrets_of(source: StateDir) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """Every secret in the source by the role allowed to hold it: as stored, and in other forms
    it could be copied in (a raw seed, a PEM body without its armour)."""
    out: dict[str, list[bytes]] = {r: [] for r in ROLES}
    raw: dict[str, list[bytes]] = {r: [] for r in ROLES}
    cfg = source.config()
    for sid in cfg.service_ids():
        role = cfg.role_of(sid).value
        seed_b64 = source.signing_key_path(sid).read_bytes().strip()
        out[role] += [seed_b64, source.nkey_path(sid).read_bytes().strip()]
        raw[role].append(base64.b64decode(seed_b64))
    out["gateway"] += [source.token_path.read_bytes().strip(), source.gateway_key_path.read_bytes()]
    raw["gateway"].append(b"".join(source.gateway_key_path.read_bytes().splitlines()[1:3]))
    # the egress's credential store (its config) and the harness's model settings
    out["egress"] += [b"api.github.com", b"Authorization: Bearer", b"gh-token"]
    out["harness"] += [b"models.internal.example", b"anthropic-key"]
    return out, raw


def test_each_bundle_holds_exactly_what_its_role_needs(bundles: dict[str, Path]) -> None:
    common = {"bundle.json", "config.json", "roster.json", "tls/ca.crt"}
    own = {
        "gateway": {"keys/gateway.sign", "nats/gateway.nk", "tls/gateway.crt", "tls/gateway.key",
                    "gateway/token"},
        "harness": {"keys/harness.sign", "nats/harness.nk"},
        "executor": {"keys/executor.sign", "nats/executor.nk"},
        "egress": {"keys/egress.sign", "nats/egress.nk"},
        "nats": {"tls/nats.crt", "tls/nats.key", "nats/server.conf"},
    }
    for role, root in bundles.items():
        assert set(files_of(root)) == common | own[role], role
        cfg = StackConfig.model_validate_json((root / "config.json").read_bytes())
        assert sorted(cfg.services) == ([] if role == "nats" else [role])
        manifest = json.loads((root / "bundle.json").read_text())
        assert manifest["host"] == f"host-{role}" and manifest["roles"] == [role]
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), path


def test_no_bundle_holds_another_roles_secrets(source: StateDir, bundles: dict[str, Path]) -> None:
    secrets, raw = secrets_of(source)
    everywhere_forbidden = [source.ca_key_path.read_bytes(), source.nats_key_path.read_bytes(),
                            CRED_SECRET.encode(), MODEL_KEY.encode()]
    for role, root in bundles.items():
        blob = b"\0".join(files_of(root).values())
        forbidden = [s for kind in (secrets, raw) for r, ss in kind.items() if r != role for s in ss]
        forbidden += everywhere_forbidden
        leaked = [s[:12] for s in forbidden if s in blob]
        assert not leaked, f"{role} bundle holds {leaked}"
        for s in secrets[role]:  # the test can fail: the role's own secrets are found this way
            assert s in blob, (role, s[:12])


def test_the_executor_host_has_host_file_hints_only_where_due(bundles: dict[str, Path]) -> None:
    hints = {r: json.loads((b / "bundle.json").read_text())["host_files"] for r, b in bundles.items()}
    assert [Path(p).name for p in hints["egress"]] == ["gh-token"]
    assert [Path(p).name for p in hints["harness"]] == ["anthropic-key"]
    assert hints["executor"] == hints["gateway"] == hints["nats"] == []


def test_bundles_load_as_state_directories(source: StateDir, bundles: dict[str, Path]) -> None:
    for role in ("gateway", "harness", "executor", "egress"):
        b = StateDir(bundles[role])
        assert b.identity(role).kid == source.identity(role).kid
        assert b.roster().to_json() == source.roster().to_json()
        assert b.nats_public_key(role) == source.nats_public_key(role)
        b.nats_client_tls()
    gw = StateDir(bundles["gateway"])
    assert gw.client_token() == source.client_token()
    assert gw.gateway_fingerprint() == source.gateway_fingerprint()
    with pytest.raises(ConfigError, match="unknown service id 'egress'"):
        StateDir(bundles["executor"]).identity("egress")
    with pytest.raises(ConfigError, match="missing"):
        StateDir(bundles["executor"]).nats_seed("egress")


def test_export_refuses_what_it_cannot_do_safely(source: StateDir, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    base = ["--state-dir", str(source.root), "init", "--export", "h"]
    assert silo_main([*base, "--roles", "executor", "-o", str(tmp_path / "full")]) == 1
    assert silo_main([*base, "--roles", "executor,wizard", "-o", str(tmp_path / "a")]) == 1
    assert silo_main([*base, "--roles", "executor"]) == 1
    assert not (tmp_path / "a").exists()
    cfg = source.config().model_dump(mode="json")
    del cfg["services"]["egress"]
    other = init_state(tmp_path / "noegress")
    other.config_path.write_text(json.dumps(cfg))
    assert silo_main(["--state-dir", str(other.root), "init", "--export", "h", "--roles", "egress",
                      "-o", str(tmp_path / "b")]) == 1
    assert silo_main([*base, "--roles", "executor", "--ids", "egress", "-o", str(tmp_path / "c")]) == 1
    assert silo_main([*base, "--roles", "executor", "--ids", "nobody", "-o", str(tmp_path / "d")]) == 1
    # a file missing half-way: nothing is left behind, not even the temporary directory
    other.nkey_path("harness").unlink()
    assert silo_main(["--state-dir", str(other.root), "init", "--export", "h", "--roles", "executor,harness",
                      "-o", str(tmp_path / "e")]) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".e", "e"))]


def test_one_executor_of_several_gets_only_its_own_keys(tmp_path: Path) -> None:
    master = init_state(tmp_path / "m")
    cfg = master.config().model_dump(mode="json")
    cfg["services"]["executor-a"] = {"role": "executor", "metrics_port": 9305}
    master.config_path.write_text(json.dumps(cfg))
    master.initialize()
    out = tmp_path / "a"
    assert silo_main(["--state-dir", str(master.root), "init", "--export", "A", "--roles", "executor",
                      "--ids", "executor-a", "-o", str(out)]) == 0
    blob = b"\0".join(files_of(out).values())
    assert master.signing_key_path("executor-a").read_bytes().strip() in blob
    assert master.signing_key_path("executor").read_bytes().strip() not in blob
    assert master.nkey_path("executor").read_bytes().strip() not in blob
    assert StateDir(out).config().service_ids() == ["executor-a"]


async def _healthy(port: int, proc: asyncio.subprocess.Process, attempts: int = 300) -> dict[str, Any]:
    """The service's /healthz once it says ok; fails at once if the service exits."""
    async with aiohttp.ClientSession() as http:
        for _ in range(attempts):
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"service exited with {proc.returncode}: {err.decode()[-2000:]}")
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        status: dict[str, Any] = await resp.json()
                        return status
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
    raise AssertionError(f"no healthy service on port {port}")


async def _pool_executors(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("silo_pool_executors "))


async def test_every_service_runs_from_its_own_bundle(source: StateDir, bundles: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """`silo service ROLE --state-dir BUNDLE --nats URL` for all four roles, each from its own bundle
    only: all come up healthy, the harness counts the executor's (verified) announcements, and a
    third party holding the full state verifies them too."""
    async with running_nats(source, store_dir=tmp_path / "js") as server:
        nc = await connect_nats(source, "gateway", server.url)
        bus = Bus(nc, source.identity("gateway"), source.roster(), ServiceMetrics("gateway", "gateway"),
                  log=structlog.get_logger())
        got: asyncio.Queue[ExecutorAnnounce] = asyncio.Queue()

        async def on_announce(env, msg):  # type: ignore[no-untyped-def]
            await got.put(env.expect(ExecutorAnnounce))

        await bus.subscribe(subjects.POOL_ANNOUNCE_ALL, on_announce)
        env = {**os.environ, "DEVSILO_STATE_DIR": "/nonexistent"}
        extra = {"gateway": ["--listen", f"127.0.0.1:{free_port()}"], "executor": ["--backends", "bwrap"],
                 "harness": [], "egress": []}
        ports = {role: free_port() for role in SERVICE_ROLES}
        procs: dict[str, asyncio.subprocess.Process] = {}
        try:
            for role in SERVICE_ROLES:
                procs[role] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "devsilo.cli.main", "service", role, "--state-dir",
                    # a cluster's URLs, one of them down: the service connects to the other
                    str(bundles[role]), "--nats", f"tls://127.0.0.1:{free_port()},{server.url}",
                    "--metrics-port", str(ports[role]), "--log-level", "warning", *extra[role],
                    env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            for role in SERVICE_ROLES:
                status = await _healthy(ports[role], procs[role])
                assert status["nats_connected"] and status["role"] == role
            ann = await asyncio.wait_for(got.get(), 30)
            assert ann.executor_id == "executor" and not ann.stopping and "bwrap" in ann.backends
            for _ in range(300):
                if await _pool_executors(ports["harness"]) == 1:
                    break
                await asyncio.sleep(0.1)
            assert await _pool_executors(ports["harness"]) == 1
        finally:
            errors = {}
            for role, proc in procs.items():
                if proc.returncode is None:
                    proc.terminate()
                _, err = await asyncio.wait_for(proc.communicate(), 30)
                errors[role] = (proc.returncode, err.decode()[-2000:])
            await bus.close()
            await nc.close()
        assert all(code == 0 for code, _ in errors.values()), errors


# --------------------------------------------------------------------------- single host

REPO = Path(__file__).resolve().parent.parent
SINGLE = REPO / "deploy" / "single-host"
VENV_BIN = "/opt/devsilo/.venv/bin"
SILO_ROLES = ("gateway", "harness", "executor", "egress")


def unit(path: Path) -> configparser.ConfigParser:
    """A unit file as sections of keys (a repeated key keeps its last value)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_units_pass_systemd_analyze_and_run_real_silo_commands(tmp_path: Path) -> None:
    units = sorted((SINGLE / "systemd").glob("*.service"))
    assert [u.stem for u in units] == sorted(f"devsilo-{r}" for r in (*SILO_ROLES, "nats"))
    for u in units:  # verify resolves ExecStart's binary: point it at this checkout's venv
        text = u.read_text().replace(VENV_BIN, str(Path(sys.executable).parent))
        (tmp_path / u.name).write_text(text)
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                               *sorted(str(p) for p in tmp_path.glob("*.service"))],
                              check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
        (tmp_path / "broken.service").write_text("[Service]\nExecStart=/bin/true\nProtectClok=yes\n")
        bad = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "broken.service")],
                             check=False, capture_output=True, text=True, timeout=60)
        assert "ProtectClok" in bad.stderr  # the check above would have seen a misspelt option
    parser = build_parser()
    for role in SILO_ROLES:
        cp = unit(SINGLE / "systemd" / f"devsilo-{role}.service")
        svc = cp["Service"]
        argv = shlex.split(svc["ExecStart"])
        assert argv[0] == f"{VENV_BIN}/silo"
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown option
        assert (args.command, args.name) == ("service", role)
        assert args.state_dir == "/etc/" + svc["ConfigurationDirectory"]
        assert args.nats == "tls://127.0.0.1:4222"
        assert svc["NoNewPrivileges"] == "yes"
        assert "devsilo-nats.service" in cp["Unit"]["Requires"]
        if role == "executor":
            assert svc["User"] == "root" and svc["ProtectSystem"] == "full"
        else:
            assert svc["User"] == f"devsilo-{role}" and svc["CapabilityBoundingSet"] == ""
            assert (svc["ProtectSystem"], svc["ProtectHome"], svc["PrivateTmp"]) == ("strict", "yes", "yes")
    nats = unit(SINGLE / "systemd" / "devsilo-nats.service")["Service"]
    argv = shlex.split(nats["ExecStart"])
    assert argv[:2] == [f"{VENV_BIN}/nats-server", "-c"]
    assert argv[2] == f"/etc/{nats['ConfigurationDirectory']}/nats/server.conf"


def test_an_exported_nats_config_is_one_nats_server_accepts(source: StateDir, tmp_path: Path) -> None:
    out = tmp_path / "nats"
    assert silo_main(["--state-dir", str(source.root), "init", "--export", "localhost", "--roles", "nats",
                      "--install-dir", str(out), "--nats-store", str(tmp_path / "js"), "-o", str(out)]) == 0
    conf = json.loads((out / "nats" / "server.conf").read_text().split("\n", 1)[1])
    assert conf["host"] == "127.0.0.1" and conf["jetstream"]["store_dir"] == str(tmp_path / "js")
    assert {u["nkey"] for u in conf["authorization"]["users"]} == {
        source.nats_public_key(s) for s in source.config().service_ids()}
    test = subprocess.run([find_nats_server(), "-t", "-c", str(out / "nats" / "server.conf")],
                          check=False, capture_output=True, text=True, timeout=30)
    assert test.returncode == 0, test.stdout + test.stderr
    (out / "tls" / "nats.key").unlink()  # the check can fail: a config naming a missing key
    test = subprocess.run([find_nats_server(), "-t", "-c", str(out / "nats" / "server.conf")],
                          check=False, capture_output=True, text=True, timeout=30)
    assert test.returncode != 0


def compose(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", *args], check=False, capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"})


def test_compose_file_is_valid_and_runs_real_silo_commands(tmp_path: Path) -> None:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (./setup.sh --dev installs it)")
    done = compose("-f", "docker-compose.yml", "config", cwd=SINGLE)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert set(cfg["services"]) == {"nats", *SILO_ROLES}
    assert cfg["services"]["nats"]["build"]["dockerfile"] == "deploy/single-host/Dockerfile"
    assert Path(cfg["services"]["nats"]["build"]["context"]) == REPO
    parser = build_parser()
    for role in SILO_ROLES:
        svc = cfg["services"][role]
        assert svc["image"] == "devsilo:local"
        args = parser.parse_args(svc["command"][1:])
        assert (svc["command"][0], args.name, args.state_dir, args.nats) == (
            "silo", role, "/state", "tls://nats:4222")
        assert f"{SINGLE}/state/{role}:/state:ro" in svc["volumes"]
        if role != "executor":
            assert svc["cap_drop"] == ["ALL"] and svc["read_only"] is True and "user" not in svc
    assert cfg["services"]["nats"]["command"] == ["nats-server", "-c", "/state/nats/server.conf"]
    # the check can fail: Debian's docker-compose refuses a top-level name (compose spec only)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("name: devsilo\n" + (SINGLE / "docker-compose.yml").read_text())
    assert compose("-f", str(broken), "config", cwd=tmp_path).returncode != 0


BASE_IMAGE = "debian:bookworm-slim"


def test_the_image_builds_where_its_base_image_is_present(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builds only offline-capable: a fresh private dockerd has no images and there is no registry."""
    if os.geteuid() != 0 or not Path("/usr/sbin/dockerd").exists():
        pytest.skip("building the image needs root and Debian's dockerd (apt-get install docker.io)")
    import docker
    from devsilo.testing._dockerd import Dockerd

    base = (SINGLE / "Dockerfile").read_text()
    assert f"ARG BASE={BASE_IMAGE}" in base
    with Dockerd(tmp_path_factory.mktemp("dockerd"), runsc=None) as daemon:
        client = docker.DockerClient(base_url=daemon.url)
        try:
            tags = {t for img in client.images.list() for t in img.tags}
            if BASE_IMAGE not in tags:
                pytest.skip(f"the base image {BASE_IMAGE} is not in the local dockerd ({sorted(tags) or 'no images'})"
                            " and there is no registry to pull it from: the image build cannot run offline")
            image, _ = client.images.build(path=str(REPO), dockerfile="deploy/single-host/Dockerfile",
                                           tag="devsilo:test", rm=True)
            out = client.containers.run(image.id, ["silo", "service", "--help"], remove=True)
            assert b"executor" in out
        finally:
            client.close()


# --------------------------------------------------------------------------- multi host


async def _start_node(conf: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        find_nats_server(), "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)


async def _retry(what: Any, attempts: int = 200) -> Any:
    """``await what()`` until it stops raising (a cluster electing leaders); the last error if never."""
    for attempt in range(attempts):
        try:
            return await what()
        except Exception:  # NATS and JetStream errors while leaders are elected
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def test_a_three_node_cluster_keeps_r3_streams_and_buckets_through_a_node_loss(
        tmp_path: Path) -> None:
    """Three nats-server nodes from exported bundles, one cluster over TLS routes; the harness's own
    stream creation makes R3 streams and buckets; one node stops and publishing and reading go on."""
    master = init_state(tmp_path / "master")
    cfg = master.config().model_dump(mode="json")
    cfg["nats"]["replicas"] = 3
    master.config_path.write_text(json.dumps(cfg))
    master.initialize()
    client_ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    confs = []
    for i in range(3):
        out = tmp_path / f"n{i}"
        routes = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i)
        assert silo_main(["--state-dir", str(master.root), "init", "--export", f"n{i}", "--roles", "nats",
                          "--install-dir", str(out), "-o", str(out), "--nats-listen", "127.0.0.1",
                          "--nats-port", str(client_ports[i]), "--cluster-port", str(cluster_ports[i]),
                          "--cluster-routes", routes]) == 0
        confs.append(out / "nats" / "server.conf")
    conf0 = json.loads(confs[0].read_text().split("\n", 1)[1])
    assert conf0["cluster"]["tls"]["verify"] is True
    assert len(conf0["cluster"]["routes"]) == 2
    nodes = [await _start_node(c) for c in confs]
    harness_bundle = tmp_path / "harness"
    assert silo_main(["--state-dir", str(master.root), "init", "--export", "h", "--roles", "harness",
                      "-o", str(harness_bundle)]) == 0
    state = StateDir(harness_bundle)  # the harness runs from its bundle: replicas come with it
    urls = [f"tls://127.0.0.1:{p}" for p in client_ports]
    nc = None
    try:
        nc = await connect_nats(state, "harness", urls)
        bus = Bus(nc, state.identity("harness"), state.roster(), ServiceMetrics("harness", "harness"),
                  log=structlog.get_logger(), replicas=state.config().nats.replicas)
        ctx = ServiceContext("harness", Role.HARNESS, state, bus, structlog.get_logger(),
                             bus.metrics, asyncio.Event())
        await _retry(lambda: ensure_streams(ctx))
        owners = SessionOwners(bus, "harness", "i-1", structlog.get_logger())
        await _retry(owners.open)
        for stream in (subjects.EVENTS_STREAM, subjects.JOURNAL_STREAM, f"KV_{subjects.SESSION_OWNERS}"):
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
        subject = subjects.session_events("s1")
        await bus.js.publish(subject, b"before")
        await owners.kv.put("k", b"v1")
        # stop the events stream's leader: the others must elect a new one and keep the data
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        victim = next(i for i in range(3) if f"n{i}" == info.cluster.leader)
        nodes[victim].terminate()
        await nodes[victim].wait()
        ack = await _retry(lambda: bus.js.publish(subject, b"after"))
        assert ack.seq == 2
        await _retry(lambda: owners.kv.put("k", b"v2"))
        got = [await _retry(lambda s=s: bus.js.get_msg(subjects.EVENTS_STREAM, s, direct=True)) for s in (1, 2)]
        assert [m.data for m in got] == [b"before", b"after"]
        assert (await _retry(lambda: owners.kv.get("k"))).value == b"v2"
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.leader != f"n{victim}"
        await bus.close()
    finally:
        if nc is not None:
            await nc.close()
        for proc in nodes:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()

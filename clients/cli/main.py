"""`silo`: devsilo's command line.

Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 ended by model failures
or quota, 4 replay mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

from devsilo.protocol import ConfigError, Role, SiloError
from devsilo.runtime._state import StateDir

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
# --metrics-port-base hands out consecutive ports in this role order.
ROLE_ORDER = (Role.GATEWAY, Role.HARNESS, Role.EXECUTOR, Role.EGRESS)


def metrics_port_plan(cfg: Any, base: int) -> dict[str, int]:
    """Consecutive metrics ports from ``base``: gateway, harness, executors, egresses, by id."""
    order = sorted(cfg.services, key=lambda s: (ROLE_ORDER.index(cfg.role_of(s)), s))
    return {sid: base + i for i, sid in enumerate(order)}


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir.resolve(args.state_dir)


def _quiet_logging(state: StateDir | None = None) -> None:
    """CLI processes log warnings to stderr; `silo up` logs everything to its own file."""
    import sys as _sys

    from devsilo.runtime import configure_logging

    if state is None:
        configure_logging("cli", level="warning", stream=_sys.stderr)
        return
    logs = state.root / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    configure_logging("supervisor", level="info", stream=open(logs / "supervisor.log", "a", buffering=1))


def cmd_init(args: argparse.Namespace) -> int:
    """Create (or rotate) keys, roster, certificates, NATS config and token."""
    state = _state(args)
    if args.export is not None:
        from devsilo.runtime._export import DEFAULT_INSTALL_DIR, NatsNode, export_bundle

        if not args.output or not args.roles:
            raise ConfigError("--export HOST needs --roles ROLE[,ROLE] and -o DIR")
        for line in export_bundle(state, Path(args.output), args.export, args.roles.split(","),
                                  install_dir=args.install_dir or DEFAULT_INSTALL_DIR,
                                  nats_store=args.nats_store, node=NatsNode(
                                      listen=args.nats_listen, port=args.nats_port,
                                      routes=tuple(r for r in (args.cluster_routes or "").split(",") if r),
                                      cluster_port=args.cluster_port, cluster_name=args.cluster_name),
                                  service_ids=args.ids.split(",") if args.ids else None):
            print(line)
        return EXIT_OK
    if args.roles or args.output or args.install_dir or args.nats_store or args.ids:
        raise ConfigError("--roles, --ids, -o, --install-dir and --nats-store go with --export HOST")
    for line in state.initialize(rotate=args.rotate):
        print(line)
    print(f"gateway certificate fingerprint: SHA256 {state.gateway_fingerprint()}")
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    """Run the whole stack on this machine."""
    from ._supervisor import StackPorts, Supervisor

    state = _state(args)
    for line in state.initialize(rotate=False):
        print(line)
    _quiet_logging(state)
    cfg = state.config()
    metrics = dict(cfg.metrics_ports)
    if args.metrics_port_base:
        metrics = metrics_port_plan(cfg, args.metrics_port_base)
    ports = StackPorts(nats=args.nats_port or cfg.nats.port, gateway=args.gateway_port or cfg.gateway.port,
                       metrics=metrics, gateway_host=args.host or cfg.gateway.host)
    sup = Supervisor(state, ports, nats_url=args.nats, say=lambda s: print(s, flush=True),
                     max_message_bytes=args.max_message_bytes)
    asyncio.run(sup.run())
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    """Run one service in this process."""
    from devsilo.runtime import run_service

    state = _state(args)
    role = Role(args.name)
    body: Any
    if role is Role.GATEWAY:
        from devsilo.gateway._server import serve as body
    elif role is Role.HARNESS:
        from devsilo.harness._service import serve as body
    elif role is Role.EXECUTOR:
        from devsilo.executor._service import serve as body
    else:
        from devsilo.egress._service import serve as body
    configured = state.config().services[args.id or role.value]
    options: dict[str, Any] = dict(configured.options)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        options.update(host=host.strip("[]") or "127.0.0.1", port=int(port))
    if role is Role.EXECUTOR:
        options.update(executor_options(args, state.config().services[args.id or role.value].options))
        from devsilo.executor._ext4 import enter_private_mounts

        # Still one thread here: the whole executor (and every sandbox) lives in this namespace.
        options["private_mounts_error"] = enter_private_mounts()
        options["private_mounts"] = options["private_mounts_error"] is None
    # several URLs (a cluster's nodes), comma-separated: the client fails over between them
    urls = [u.strip() for u in (args.nats or state.config().nats.url).split(",") if u.strip()]
    nats_url: str | list[str] = urls[0] if len(urls) == 1 else urls
    asyncio.run(run_service(role, args.id or role.value, state, nats_url, body,
                            metrics_host=configured.metrics_host, metrics_port=args.metrics_port,
                            options=options, log_level=args.log_level,
                            max_message_bytes=args.max_message_bytes))
    return EXIT_OK


def executor_options(args: argparse.Namespace, configured: dict[str, Any]) -> dict[str, Any]:
    """The executor's settings: config.json's ``options`` for it, then `silo service` flags."""
    docker: dict[str, Any] = {"runtime": args.docker_runtime or configured.get("docker_runtime", "runc")}
    if args.docker_url or configured.get("docker_url"):
        docker["docker_url"] = args.docker_url or configured["docker_url"]
    backends = args.backends or configured.get("backends") or ""
    if isinstance(backends, str):
        backends = [b for b in backends.split(",") if b]
    return {
        "backends": list(backends) or None,
        "capacity": args.capacity or configured.get("capacity"),
        "per_user": args.per_user or configured.get("per_user"),
        "backend_config": {"docker": docker},
    }


def _read_script(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read script {path}: {exc.strerror}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """Start a session and follow it."""
    from devsilo.protocol.client import CreateSession

    from ._sessions import local_gateway, run_session

    if args.deterministic:
        return _replay_run(args)
    if args.mock_egress:
        print("error: --mock-egress is for replays: add --deterministic (with --llm mock --sandbox mock)",
              file=sys.stderr)
        return EXIT_USAGE
    if not args.workspace:
        print("error: --workspace DIR is required", file=sys.stderr)
        return EXIT_USAGE
    if not args.headless:
        print("error: only --headless sessions exist so far (the terminal UI is not built yet)",
              file=sys.stderr)
        return EXIT_USAGE
    if not args.prompt:
        print("error: --headless needs --prompt TEXT", file=sys.stderr)
        return EXIT_USAGE
    if args.llm == "mock" and not args.script:
        print("error: --llm mock needs --script FILE", file=sys.stderr)
        return EXIT_USAGE
    if (args.quota_tokens is not None and args.quota_tokens < 0) or (
            args.quota_usd is not None and not args.quota_usd >= 0):
        print("error: --quota-tokens and --quota-usd must not be negative", file=sys.stderr)
        return EXIT_USAGE
    workspace = Path(args.workspace).resolve()
    if not workspace.is_dir():
        print(f"error: workspace {workspace} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    req = CreateSession(workspace=str(workspace), workspace_host=socket.gethostname(), sandbox=args.sandbox, llm=args.llm, model=args.model,
                        script=_read_script(args.script), headless=True, prompt=args.prompt,
                        allow_read=tuple(args.allow_read), allow_domains=tuple(args.allow_domain),
                        credentials=tuple(args.credential), quota_tokens=args.quota_tokens,
                        quota_usd=args.quota_usd)
    target = local_gateway(_state(args), args.gateway)
    return asyncio.run(run_session(target, req, sys.stdout, as_json=args.json))


def _replay_run(args: argparse.Namespace) -> int:
    """`silo run --deterministic`: replay a `silo replay-test` script in this process."""
    import json as _json

    from devsilo.harness._replay import ReplayScript, replay
    from pydantic import ValidationError

    if args.llm != "mock" or args.sandbox != "mock" or not args.mock_egress or not args.script:
        print("error: --deterministic replays a script: give --llm mock --sandbox mock --mock-egress "
              "--script SCRIPT (made by `silo replay-test`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        script = ReplayScript.model_validate_json(_read_script(args.script) or "")
    except ValidationError as exc:
        print(f"error: {args.script} is not a replay script ({exc.errors()[0]['msg']}); "
              "make one with `silo replay-test JOURNAL -o SCRIPT`", file=sys.stderr)
        return EXIT_USAGE
    outcome = asyncio.run(replay(script))
    for event in outcome.events:
        if args.json:
            print(_json.dumps(event.model_dump(mode="json"), sort_keys=True))
        else:
            print(f"{event.seq:>4} {event.kind} {_json.dumps(event.data, ensure_ascii=False)[:200]}")
    if args.journal:
        Path(args.journal).write_text(outcome.journal, encoding="utf-8")
    if outcome.code:
        print(f"replay failed:\n{outcome.summary}", file=sys.stderr)
    else:
        print("replay matched every recorded step", file=sys.stderr)
    return outcome.code


def cmd_replay_test(args: argparse.Namespace) -> int:
    """Turn an exported journal into a replay script."""
    from devsilo.harness._replay import script_from_journal

    script = script_from_journal(Path(args.journal))
    Path(args.output).write_text(script.model_dump_json(indent=1) + "\n", encoding="utf-8")
    print(f"{args.output}: {len(script.steps)} model steps, {len(script.tools)} tool results, "
          f"{sum(len(t.network) for t in script.tools)} network records")
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace) -> int:
    """List or attach to sessions."""
    from ._sessions import attach_session, list_sessions, local_gateway, stop_session

    target = local_gateway(_state(args), args.gateway)
    if args.action in ("attach", "stop") and not args.session:
        print(f"error: {args.action} needs a session id", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "attach":
        return asyncio.run(attach_session(target, args.session, args.from_seq, sys.stdout, as_json=args.json))
    if args.action == "stop":
        asyncio.run(stop_session(target, args.session, sys.stdout))
        return EXIT_OK
    return asyncio.run(list_sessions(target, sys.stdout))


def cmd_journal(args: argparse.Namespace) -> int:
    """Export a session's journal as JSONL."""
    from ._journal import export_journal
    from ._sessions import local_gateway

    target = local_gateway(_state(args), args.gateway)
    if args.output in (None, "-"):
        asyncio.run(export_journal(target, args.session, sys.stdout))
        return EXIT_OK
    out = Path(args.output)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        asyncio.run(export_journal(target, args.session, f))
    partial.replace(out)
    return EXIT_OK


def cmd_workspace(args: argparse.Namespace) -> int:
    """Lock, unlock, describe or list workspaces."""
    from devsilo.protocol.client import WorkspaceCommand

    from ._sessions import local_gateway, workspace_command

    if args.action != "list" and not args.path:
        print(f"error: workspace {args.action} needs a PATH", file=sys.stderr)
        return EXIT_USAGE
    path = str(Path(args.path).resolve()) if args.path else None
    if args.action == "lock" and (path is None or not Path(path).is_dir()):
        print(f"error: {args.path} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    cmd = WorkspaceCommand(op=args.action, path=path, workspace_host=socket.gethostname(),
                           executor=args.executor, accept=args.accept)
    state = _state(args)
    target = local_gateway(state, args.gateway)
    if path is not None:  # lock may turn into an upload; uploaded ones unlock by download
        from ._workspace_transfer import workspace_on_gateway

        return asyncio.run(workspace_on_gateway(
            target, state.root / "transfers", cmd, sys.stdout, as_json=args.json, upload=args.upload,
            chunk_size=args.chunk_size, state_dirs=[state.root]))
    return asyncio.run(workspace_command(target, cmd, sys.stdout, as_json=args.json))


def cmd_shell(args: argparse.Namespace) -> int:
    """A shell (or one command) in a sandbox on a locked workspace or a session's workspace."""
    from devsilo.protocol.client import ShellOpenFrame

    from ._sessions import local_gateway
    from ._shell import run_shell, wants_tty

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.session and args.workspace:
        print("error: give --workspace PATH or --session ID, not both", file=sys.stderr)
        return EXIT_USAGE
    workspace = None if args.session else str(Path(args.workspace or ".").resolve())
    req = ShellOpenFrame(
        workspace=workspace, session_id=args.session,
        # Like ssh: the words are joined and the sandbox's shell parses them.
        command=" ".join(command) if command else None, tty=wants_tty(command),
        sandbox=args.sandbox, allow_read=tuple(args.allow_read) if args.allow_read is not None else None,
        allow_domains=tuple(args.allow_domain) if args.allow_domain is not None else None,
    )
    target = local_gateway(_state(args), args.gateway)
    return asyncio.run(run_shell(target, req))


def cmd_pair(args: argparse.Namespace) -> int:
    """Print a pairing code for a new client."""
    from devsilo.protocol.client import PairingCodeRequest

    from ._pairing import pair_command
    from ._sessions import local_gateway

    req = PairingCodeRequest(user=args.user, client_name=args.name, operator=args.operator)
    target = local_gateway(_state(args), args.gateway)
    return asyncio.run(pair_command(target, req, sys.stdout, as_json=args.json))


def cmd_clients(args: argparse.Namespace) -> int:
    """List or revoke paired client keys."""
    from ._pairing import clients_command
    from ._sessions import local_gateway

    if args.action == "revoke" and not args.key_id:
        print("error: clients revoke needs a key id (see `silo clients list`)", file=sys.stderr)
        return EXIT_USAGE
    target = local_gateway(_state(args), args.gateway)
    return asyncio.run(clients_command(target, args.action, args.key_id, sys.stdout, as_json=args.json))


def cmd_tui(args: argparse.Namespace) -> int:
    """The terminal UI: the local stack's gateway (when one runs) and every paired remote gateway."""
    from devsilo.tui.app import run_tui

    from ._sessions import local_gateway

    state = _state(args)
    try:
        local = local_gateway(state, args.gateway)
    except SiloError as exc:
        if args.gateway:
            raise
        print(f"note: {exc}; showing paired remote gateways only", file=sys.stderr)
        local = None
    asyncio.run(run_tui(local))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Preflight: sandbox backends, namespaces, cgroups, clock, state directory, NATS."""
    import json as _json

    from devsilo.executor._doctor import Check, auto_backend, host_checks

    from ._supervisor import read_stack_file

    docker: dict[str, Any] = {"runtime": args.docker_runtime}
    if args.docker_url:
        docker["docker_url"] = args.docker_url
    checks = host_checks({"docker": docker})
    state = _state(args)
    try:
        state.check_root()
        state.config()
        state.roster()
        state.client_token()
        checks.append(Check("state directory", True, f"{state.root}: keys and files private"))
    except SiloError as exc:
        checks.append(Check("state directory", False, str(exc)))
    stack = read_stack_file(state) if state.root.exists() else None
    checks.append(Check("stack", stack is not None,
                        f"running, gateway {stack['gateway_url']}" if stack else "not running (`silo up`)"))
    auto = auto_backend(checks)
    if args.json:
        print(_json.dumps({"checks": [c.as_dict() for c in checks], "auto": auto}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:22} {c.detail}")
        print(f"--sandbox auto picks: {auto or 'nothing works here'}")
    return EXIT_OK if auto else EXIT_RUNTIME


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the built-in demo session."""
    from ._sessions import demo

    state = _state(args)
    state.initialize(rotate=False)
    return asyncio.run(demo(state, args.workspace, sys.stdout, as_json=args.json))


def build_parser() -> argparse.ArgumentParser:
    """The `silo` argument parser."""
    p = argparse.ArgumentParser(prog="silo", description="devsilo: LLM coding agents behind static boundaries")
    p.add_argument("--state-dir", help="state directory (default $DEVSILO_STATE_DIR or ~/.devsilo)")
    # --state-dir is accepted after the command name too
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", parents=[common], help="create keys, roster, certificates, NATS config and token")
    s.add_argument("--rotate", action="store_true", help="replace existing keys and certificates")
    s.add_argument("--export", metavar="HOST",
                   help="write the bundle HOST needs for --roles into -o DIR (keys, roster, CA, config)")
    s.add_argument("--roles", help="with --export: gateway, harness, executor, egress, nats (comma-separated)")
    s.add_argument("-o", "--output", metavar="DIR", help="with --export: a new or empty directory")
    s.add_argument("--ids", help="with --export: only these service ids of the roles (e.g. one executor)")
    s.add_argument("--install-dir", help="with --export: where the bundle will live on HOST "
                   "(the NATS server config names it; default /etc/devsilo/nats)")
    s.add_argument("--nats-store", help="with --export --roles nats: the node's JetStream directory "
                   "(default INSTALL_DIR/nats/jetstream)")
    s.add_argument("--nats-listen", help="with --roles nats: client listen address "
                   "(default 127.0.0.1 for a loopback HOST, else 0.0.0.0)")
    s.add_argument("--nats-port", type=int, help="with --roles nats: client port (default config.json's)")
    s.add_argument("--cluster-routes", help="with --roles nats: the OTHER nodes' HOST:PORT cluster "
                   "addresses, comma-separated (makes a cluster)")
    s.add_argument("--cluster-port", type=int, default=6222, help="with --roles nats: this node's cluster port")
    s.add_argument("--cluster-name", default="devsilo", help="with --roles nats: the cluster's name")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("up", parents=[common], help="run everything on this machine (embedded NATS)")
    s.add_argument("--nats", help="use this NATS server or cluster instead of an embedded one")
    s.add_argument("--nats-port", type=int)
    s.add_argument("--gateway-port", type=int)
    s.add_argument("--host", help="address the gateway listens on (default 127.0.0.1)")
    s.add_argument("--metrics-port-base", type=int, help="first of four consecutive metrics ports")
    s.add_argument("--max-message-bytes", type=int, help="largest signed message services accept")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("service", parents=[common], help="run one service (multi-machine deployments, systemd)")
    s.add_argument("name", choices=[r.value for r in Role])
    s.add_argument("--id", help="service id (default: the role name)")
    s.add_argument("--nats", help="NATS URL, e.g. tls://host:4222; a cluster's nodes comma-separated")
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--listen", help="gateway only: HOST:PORT to listen on")
    s.add_argument("--log-level", default="info")
    s.add_argument("--max-message-bytes", type=int, help="largest signed message accepted")
    s.add_argument("--backends", help="executor: comma-separated sandbox backends to offer (default: all that work)")
    s.add_argument("--capacity", type=int, help="executor: most sandboxes at once (default 16)")
    s.add_argument("--per-user", type=int, help="executor: most sandboxes per user (default 8)")
    s.add_argument("--docker-url", help="executor: Docker daemon URL (default: the environment's)")
    s.add_argument("--docker-runtime", choices=["runc", "runsc"],
                   help="executor: Docker runtime for the docker backend")
    s.set_defaults(func=cmd_service)

    s = sub.add_parser("run", parents=[common], help="start a session")
    s.add_argument("--workspace")
    s.add_argument("--llm", default="mock", choices=["anthropic", "openai", "openai-ws", "local", "mock"])
    s.add_argument("--model", default="mock")
    s.add_argument("--sandbox", default="bwrap", choices=["bwrap", "gvisor", "docker", "microvm", "mock", "auto"])
    s.add_argument("--script", help="the mock model's script (JSON)")
    s.add_argument("--prompt")
    s.add_argument("--headless", action="store_true")
    s.add_argument("--allow-read", action="append", default=[])
    s.add_argument("--allow-domain", action="append", default=[])
    s.add_argument("--credential", action="append", default=[],
                   help="an egress credential the session may use, by name (the egress config says who may)")
    s.add_argument("--quota-tokens", type=int, help="stop the session (exit 3) once its models used this "
                   "many tokens (input plus output)")
    s.add_argument("--quota-usd", type=float, help="stop the session (exit 3) once its models cost this "
                   "many US dollars")
    s.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    s.add_argument("--json", action="store_true", help="print events as JSON lines")
    s.add_argument("--mock-egress", action="store_true", help="replay: recorded network records, no network")
    s.add_argument("--deterministic", action="store_true",
                   help="replay a `silo replay-test` script here, under a fake clock (exit 4 on a mismatch)")
    s.add_argument("--journal", help="with --deterministic: write the replay's journal (JSONL) here")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("replay-test", parents=[common], help="turn an exported journal into a replay script")
    s.add_argument("journal", help="JSONL from `silo journal export`")
    s.add_argument("-o", "--output", required=True, help="the replay script to write")
    s.set_defaults(func=cmd_replay_test)

    s = sub.add_parser("sessions", parents=[common], help="list sessions or attach to one")
    s.add_argument("action", choices=["list", "attach", "stop"])
    s.add_argument("session", nargs="?")
    s.add_argument("--from-seq", type=int, default=0)
    s.add_argument("--gateway")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sessions)

    s = sub.add_parser("journal", parents=[common], help="export a session's journal as JSONL")
    s.add_argument("action", choices=["export"])
    s.add_argument("session")
    s.add_argument("-o", "--output", help="file to write (default: standard output)")
    s.add_argument("--gateway")
    s.set_defaults(func=cmd_journal)

    s = sub.add_parser("workspace", parents=[common], help="lock, unlock (with a change report), status, list")
    s.add_argument("action", choices=["lock", "unlock", "status", "list"])
    s.add_argument("path", nargs="?")
    s.add_argument("--executor", help="lock on this executor (default: one on this machine)")
    s.add_argument("--accept", action="store_true", help="unlock: exit 0 even when an auto-exec surface changed")
    s.add_argument("--upload", action="store_true",
                   help="lock: upload the workspace to the executor (automatic when it runs on another host)")
    s.add_argument("--chunk-size", type=int, default=512 * 1024, help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true")
    s.add_argument("--gateway")
    s.set_defaults(func=cmd_workspace)

    s = sub.add_parser("shell", parents=[common],
                       help="a shell in a sandbox on a locked workspace (or a session's); `-- CMD` runs one command")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--workspace", help="a locked workspace (default: the current directory)")
    where.add_argument("--session", help="the workspace of this running session, with its policy")
    s.add_argument("--sandbox", choices=["bwrap", "gvisor", "docker", "microvm", "mock", "auto"],
                   help="override the policy's sandbox backend")
    s.add_argument("--allow-read", action="append", default=None,
                   help="override the policy's read allow-list (repeat for several paths)")
    s.add_argument("--allow-domain", action="append", default=None,
                   help="override the policy's allowed domains (repeat for several)")
    s.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD: run one command instead of a shell")
    s.set_defaults(func=cmd_shell)

    s = sub.add_parser("pair", parents=[common], help="a pairing code (8 characters, 120 s, once) for a new client")
    s.add_argument("--user", help="the user the new client acts for (default: yours)")
    s.add_argument("--name", default="client", help="the new client's name, shown in `silo clients list`")
    s.add_argument("--operator", action="store_true", help="the new client is an operator (sees every session)")
    s.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pair)

    s = sub.add_parser("clients", parents=[common], help="list or revoke paired client keys")
    s.add_argument("action", choices=["list", "revoke"])
    s.add_argument("key_id", nargs="?")
    s.add_argument("--gateway", help="gateway URL (default: the local stack's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_clients)

    s = sub.add_parser("tui", parents=[common], help="the terminal UI: sessions, chat, questions, unlock review")
    s.add_argument("--gateway", help="local gateway URL (default: the local stack's)")
    s.set_defaults(func=cmd_tui)

    s = sub.add_parser("doctor", parents=[common], help="what works on this host, and why not")
    s.add_argument("--json", action="store_true")
    s.add_argument("--docker-url")
    s.add_argument("--docker-runtime", default="runc", choices=["runc", "runsc"])
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("demo", parents=[common], help="run a built-in scripted session end to end")
    s.add_argument("--workspace", help="use this directory instead of a throw-away one")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `silo`."""
    args = build_parser().parse_args(argv)
    if args.command not in ("up", "service"):
        _quiet_logging()
    try:
        code: int = args.func(args)
    except SiloError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

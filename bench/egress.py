"""The egress proxy against a direct connection and mitmdump, in one run.

Builds the test internet (a network namespace with a public-looking
address; needs root), then measures, with one Python client for all three
paths:

* a large HTTPS download (default 256 MiB) served by ``openssl s_server
  -WWW`` (C, so the server is not the bottleneck): direct, through devsilo's
  egress (client → egress with the relay's preamble → upstream), and through
  ``mitmdump`` configured the same way (intercepting TLS, verifying the
  upstream, ``stream_large_bodies`` so it does not buffer);
* 1 KiB requests over one keep-alive connection (aiohttp upstream): the
  time per request, and what each proxy adds;
* new connections, each with one request: the time per connection;
* each proxy's peak memory (VmHWM of its process).

mitmproxy is installed on first use into ``bench/.mitm-venv`` (its pins
clash with devsilo's own dependencies); ``--no-mitm`` skips it.

    .venv/bin/python bench/egress.py [--mib 256] [-n 200] [--no-mitm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devsilo.testing._internet import ZONE, TestInternet

HERE = Path(__file__).resolve().parent
MITM_VENV = HERE / ".mitm-venv"
SESSION = "bench"
WWW = f"www.{ZONE}"
FILE_PORT = 8443

EGRESS_MAIN = r"""
import asyncio, json, sys, time
from devsilo.egress._policy import PolicyTable
from devsilo.egress._service import make_proxy
from devsilo.protocol import SessionGrant

async def main():
    cfg = json.loads(sys.argv[1])
    policies = PolicyTable()
    proxy = make_proxy({"nameservers": [cfg["dns"]], "ca_bundles": [cfg["ca"]]}, policies)
    now = time.time()
    grant = SessionGrant(grant_id="bench", session_id="bench", user="bench", workspace="/w",
                         allow_domains=(cfg["domain"],), issued_at=now, expires_at=now + 86400)
    pem = proxy.open_session(policies.install(grant))
    open(cfg["ca_out"], "wb").write(pem)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, limit=1 << 20)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

CLIENT_MAIN = r"""
import asyncio, json, ssl, sys, time

async def open_path(cfg):
    if cfg["mode"] == "direct":
        r, w = await asyncio.open_connection(cfg["addr"], cfg["port"], limit=1 << 20)
    else:
        r, w = await asyncio.open_connection("127.0.0.1", cfg["proxy_port"], limit=1 << 20)
        if cfg["mode"] == "egress":
            w.write(b"SILO-SESSION bench\nTCP\n")
        w.write(f"CONNECT {cfg['host']}:{cfg['port']} HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=cfg["cafile"])
    await w.start_tls(ctx, server_hostname=cfg["host"])
    return r, w

async def request(r, w, cfg, path):
    w.write(f"GET {path} HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    got = 0
    if b"transfer-encoding: chunked" in head.lower():
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                return got
            left = size
            while left:
                data = await r.read(min(1 << 20, left))
                if not data:
                    raise ConnectionError("short chunk")
                left -= len(data)
            got += size
            await r.readexactly(2)
    if length is None:
        while True:
            data = await r.read(1 << 20)
            if not data:
                break
            got += len(data)
    else:
        while got < length:
            data = await r.read(min(1 << 20, length - got))
            if not data:
                raise ConnectionError("short body")
            got += len(data)
    return got

async def main():
    cfg = json.loads(sys.argv[1])
    out = {}
    if cfg["test"] == "download":
        r, w = await open_path(cfg)
        t = time.perf_counter()
        got = await request(r, w, cfg, cfg["path"])
        out = {"bytes": got, "seconds": time.perf_counter() - t}
        w.close()
    elif cfg["test"] == "keepalive":
        r, w = await open_path(cfg)
        await request(r, w, cfg, cfg["path"])
        times = []
        for _ in range(cfg["n"]):
            t = time.perf_counter()
            await request(r, w, cfg, cfg["path"])
            times.append((time.perf_counter() - t) * 1000)
        out = {"ms": times}
        w.close()
    else:
        times = []
        for _ in range(cfg["n"]):
            t = time.perf_counter()
            r, w = await open_path(cfg)
            await request(r, w, cfg, cfg["path"])
            times.append((time.perf_counter() - t) * 1000)
            w.close()
        out = {"ms": times}
    print(json.dumps(out))

asyncio.run(main())
"""


async def run_client(cfg: dict[str, object]) -> dict[str, object]:
    """One client run in a process of its own (this process's loop serves the test internet)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT_MAIN, json.dumps(cfg),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 900)
    if proc.returncode != 0:
        raise RuntimeError(f"client ({cfg['mode']}, {cfg['test']}) failed: {err.decode()[-2000:]}")
    return json.loads(out)  # type: ignore[no-any-return]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ensure_mitm() -> Path | None:
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    print("bench: installing mitmproxy into bench/.mitm-venv (once)", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
        subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy"], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"bench: cannot install mitmproxy ({exc}); skipping it", file=sys.stderr)
        return None
    return mitmdump


def start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """A helper process (the servers and proxies run beside this loop, never in it)."""
    return subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload,no-any-return]


def write_random(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    path.write_bytes(b"")
    with path.open("ab") as f:
        f.writelines(block for _ in range(mib))


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="download size (MiB)")
    parser.add_argument("-n", type=int, default=200, help="requests / connections per latency test")
    parser.add_argument("--no-mitm", action="store_true", help="skip mitmdump")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/egress.py builds a network namespace: run it as root")

    mitmdump = None if args.no_mitm else ensure_mitm()
    work = Path(tempfile.mkdtemp(prefix="silo-bench-egress-"))
    procs: list[subprocess.Popen[bytes]] = []
    async with TestInternet() as inet:
        site = inet.sites["www"]
        # the big file, served by openssl (C) inside the namespace
        www_root = work / "www"
        www_root.mkdir()
        write_random(www_root / "big", args.mib)
        cert, key = inet.issue(site)
        (work / "cert.pem").write_bytes(cert)
        (work / "key.pem").write_bytes(key)
        procs.append(start(
            ["ip", "netns", "exec", inet.ns, "openssl", "s_server", "-quiet", "-WWW", "-accept",
             f"{site.address}:{FILE_PORT}", "-cert", str(work / "cert.pem"), "-key", str(work / "key.pem")],
            cwd=www_root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(0.5)

        egress = start(
            [sys.executable, "-c", EGRESS_MAIN, json.dumps({
                "dns": inet.dns_addr, "ca": str(inet.ca_file), "domain": WWW, "ca_out": str(work / "egress-ca.pem")})],
            stdout=subprocess.PIPE)
        procs.append(egress)
        assert egress.stdout is not None
        egress_port = int(egress.stdout.readline())

        mitm = None
        mitm_port = free_port()
        if mitmdump is not None:
            confdir = work / "mitm"
            # mitmdump resolves with the host's resolver: give it the test internet's names in
            # an /etc/hosts of its own mount namespace
            (work / "hosts").write_text("127.0.0.1 localhost\n" + inet.hosts_file())
            mitm = start(
                ["unshare", "-m", "sh", "-c", f'mount --bind {work / "hosts"} /etc/hosts && exec "$0" "$@"',
                 str(mitmdump), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(mitm_port),
                 "--set", f"confdir={confdir}", "--set", "stream_large_bodies=1m",
                 "--set", f"ssl_verify_upstream_trusted_ca={inet.ca_file}",
                 "--set", "connection_strategy=lazy"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(mitm)
            wait_port(mitm_port, mitm, "mitmdump")

        try:
            paths: dict[str, dict[str, object]] = {
                "direct": {"mode": "direct", "addr": site.address, "cafile": str(inet.ca_file)},
                "devsilo egress": {"mode": "egress", "proxy_port": egress_port,
                                   "cafile": str(work / "egress-ca.pem")},
            }
            if mitm is not None:
                paths["mitmdump"] = {"mode": "proxy", "proxy_port": mitm_port,
                                     "cafile": str(work / "mitm" / "mitmproxy-ca-cert.pem")}
            results: dict[str, dict[str, float]] = {}
            for name, base in paths.items():
                common = {**base, "host": WWW}
                dl = await run_client({**common, "test": "download", "port": FILE_PORT, "path": "/big"})
                assert dl["bytes"] == args.mib << 20, dl
                ka = await run_client({**common, "test": "keepalive", "port": 443, "path": "/bytes?n=1024", "n": args.n})
                nc = await run_client({**common, "test": "newconn", "port": 443, "path": "/bytes?n=1024",
                                 "n": max(20, args.n // 4)})
                pid = {"devsilo egress": egress.pid, "mitmdump": mitm.pid if mitm else 0}.get(name)
                results[name] = {
                    "mibs": args.mib / float(dl["seconds"]),  # type: ignore[arg-type]
                    "ka": statistics.median(ka["ms"]),  # type: ignore[arg-type]
                    "ka99": pct(ka["ms"], 99),  # type: ignore[arg-type]
                    "nc": statistics.median(nc["ms"]),  # type: ignore[arg-type]
                    "rss": peak_rss_mib(pid) if pid else float("nan"),
                }
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    d = results["direct"]
    print(f"\negress benchmark: {args.mib} MiB download, {args.n} keep-alive 1 KiB requests, "
          f"{max(20, args.n // 4)} new connections\n")
    print(f"{'path':<16} {'MiB/s':>8} {'× direct':>9} {'keep-alive p50 ms':>18} {'added':>7} "
          f"{'p99':>7} {'new conn p50 ms':>16} {'added':>7} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<16} {r['mibs']:>8.0f} {r['mibs'] / d['mibs']:>8.2f}× {r['ka']:>18.2f} "
              f"{r['ka'] - d['ka']:>+7.2f} {r['ka99']:>7.2f} {r['nc']:>16.2f} {r['nc'] - d['nc']:>+7.2f} "
              f"{r['rss']:>13.0f}")
    if "mitmdump" in results:
        m, e = results["mitmdump"], results["devsilo egress"]
        print(f"\ndevsilo egress vs mitmdump: throughput {e['mibs'] / m['mibs']:.2f}× (goal ≥ 2×), "
              f"keep-alive added {e['ka'] - d['ka']:.2f} ms (goal < 1), new connection added "
              f"{e['nc'] - d['nc']:.2f} ms (goal < 5)")


if __name__ == "__main__":
    asyncio.run(main())

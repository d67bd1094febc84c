"""Lock and unlock of an uploaded workspace, against copying the same tree there and back with tar.

Generates FILES files totalling about MB megabytes, starts a stack (`silo
up`), then times `silo workspace lock --upload` (pack, upload through the
gateway into the object store, executor fetch, extract, snapshot) and
`silo workspace unlock --accept` (report, pack, object store, download,
extract, apply), as a user runs them. The baselines in the same run: a local
lock and unlock of the same tree through the same stack, and `tar c | tar x`
of the tree twice (the bytes moved there and back with nothing checked).

    .venv/bin/python bench/workspace_remote.py [--files 2000] [--mb 50]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devsilo.testing import Stack

sys.path.insert(0, str(Path(__file__).parent))
from workspace import generate


def silo(stack: Stack, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                       capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"silo {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return took


def tar_copy(src: Path, dst: Path) -> float:
    dst.mkdir()
    t0 = time.perf_counter()
    subprocess.run(f"tar -C {src} -cf - . | tar -C {dst} -xf -", shell=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="silo-bench-remote-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        tree, local = base / "tree", base / "local"
        tree.mkdir()
        generate(tree, args.files, args.mb * 1024 * 1024)
        shutil.copytree(tree, local, symlinks=True)
        tar_s = tar_copy(tree, base / "there") + tar_copy(base / "there", base / "back")

        stack = Stack(base / "state")
        stack.start()
        try:
            local_s = silo(stack, "workspace", "lock", str(local)) + silo(
                stack, "workspace", "unlock", str(local), "--accept")
            up_s = silo(stack, "workspace", "lock", str(tree), "--upload")
            down_s = silo(stack, "workspace", "unlock", str(tree), "--accept")
        finally:
            stack.stop()

    print(f"tree: {args.files} files, {args.mb} MB")
    print(f"{'':48} {'seconds':>8}")
    print(f"{'tar c | tar x, there and back':48} {tar_s:8.2f}")
    print(f"{'silo lock + unlock, same machine':48} {local_s:8.2f}")
    print(f"{'silo lock --upload (through the object store)':48} {up_s:8.2f}")
    print(f"{'silo unlock of it (report, download, apply)':48} {down_s:8.2f}")
    print(f"{'ratio upload+download / tar there and back':48} {(up_s + down_s) / tar_s:8.2f}x")
    print(f"{'ratio upload+download / local lock+unlock':48} {(up_s + down_s) / local_s:8.2f}x")


if __name__ == "__main__":
    main()

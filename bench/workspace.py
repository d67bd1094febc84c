"""Lock then unlock of a generated tree, against `git add -A && git status --porcelain`.

Generates FILES files totalling about MB megabytes in a fresh directory,
locks it into a workspace store (snapshot with hashes, originals, move),
changes 1% of the files as a session would (in the stored copy), unlocks
(move back, diff, report rendered), and times that against git indexing and
diffing the same tree in the same run.

    .venv/bin/python bench/workspace.py [--files 50000] [--mb 500] [--storage ext4] [--store DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from devsilo.executor._workspace_lock import WorkspaceStore


def generate(root: Path, files: int, total_bytes: int) -> list[Path]:
    size = max(1, total_bytes // files)
    block = os.urandom(size)
    paths = []
    for i in range(files):
        d = root / f"d{i // 500:03d}"
        d.mkdir(exist_ok=True)
        p = d / f"f{i:06d}.txt"
        p.write_bytes(block[: size - 8] + f"{i:08d}".encode())
        paths.append(p.relative_to(root))
    return paths


def change(root: Path, paths: list[Path]) -> None:
    """Append to 1% of the files, as a session would."""
    for rel in paths[:: 100]:  # 1%
        with open(root / rel, "ab") as f:
            f.write(b"changed by the session\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--storage", choices=["directory", "ext4"], default="directory",
                    help="how the store keeps the locked tree (ext4: an image, root only; the executor's "
                         "default as root)")
    ap.add_argument("--store", type=Path, default=None,
                    help="where the workspace store goes (default: beside the tree, on its filesystem; "
                         "another filesystem makes an ext4 lock copy the tree back out at unlock)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="silo-bench-ws-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        tree, gtree = base / "tree", base / "gtree"
        tree.mkdir()
        paths = generate(tree, args.files, args.mb * 1024 * 1024)
        shutil.copytree(tree, gtree, symlinks=True)
        # Each timed part starts with nothing dirty: a sync inside one (the lock makes its
        # originals and image durable before it removes anything) must not write back what
        # generating the trees, or git before it, left in the page cache.
        os.sync()

        # The baseline the issue names: git hashing and listing the same fresh tree.
        subprocess.run(["git", "init", "-q", str(gtree)], check=True)
        t0 = time.perf_counter()
        subprocess.run(["git", "-C", str(gtree), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(gtree), "status", "--porcelain"], check=True,
                       stdout=subprocess.DEVNULL)
        git_s = time.perf_counter() - t0
        os.sync()

        store_root = (args.store / f"silo-bench-store-{os.getpid()}") if args.store else base / "store"
        store = WorkspaceStore(store_root, args.storage)
        t0 = time.perf_counter()
        locked = store.lock(tree, state_dirs=[base / "no-state"])
        lock_s = time.perf_counter() - t0
        change(locked.files_dir, paths)
        os.sync()
        t0 = time.perf_counter()
        report = store.unlock(tree)
        report.render(store.originals_dir(tree), tree)
        unlock_s = time.perf_counter() - t0
        if args.store:
            shutil.rmtree(store_root)

    silo_total = lock_s + unlock_s
    print(f"tree: {args.files} files, {args.mb} MB; 1% changed ({len(report.changed_paths)} files); "
          f"storage: {args.storage}{' in ' + str(args.store) if args.store else ''}; "
          f"load average before: {load:.2f}")
    print(f"{'':44} {'seconds':>8}")
    print(f"{'git add -A && git status --porcelain':44} {git_s:8.2f}")
    print(f"{'silo lock (snapshot, store the tree)':44} {lock_s:8.2f}")
    print(f"{'silo unlock (bring back, diff, report)':44} {unlock_s:8.2f}")
    print(f"{'ratio lock+unlock / git':44} {silo_total / git_s:8.2f}x  (goal: within 1.5x)")


if __name__ == "__main__":
    main()

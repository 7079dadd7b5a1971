"""Mirror the working tree, as git sees it, into another folder (for `make test-compat`).

    python tools/sync_tree.py DEST

Copies every tracked file and every new file git does not ignore (`git ls-files
--cached --others --exclude-standard`) into DEST when its size or mtime differ,
keeping mtimes, so a build in DEST recompiles only the sources that changed. Files
copied by an earlier run that are no longer in the tree are removed (DEST/.synced
lists them); whatever else lives in DEST (build outputs, caches) is left alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = ".synced"


def tree_files(root: Path) -> list[str]:
    """Relative paths of the files in the working tree (deleted tracked files left out)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = sorted({name for name in out.split("\0") if name})
    return [name for name in names if (root / name).is_file()]


def sync(root: Path, dest: Path) -> tuple[int, int]:
    """Mirror root's tree files into dest; returns (files copied, files removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = tree_files(root)
    copied = 0
    for name in files:
        src, dst = root / name, dest / name
        st = src.stat()
        if dst.is_file():
            dt = dst.stat()
            if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    manifest = dest / MANIFEST
    before = set(manifest.read_text().splitlines()) if manifest.exists() else set()
    removed = 0
    for name in sorted(before - set(files)):
        stale = dest / name
        if stale.is_file():
            stale.unlink()
            removed += 1
    manifest.write_text("\n".join(files) + "\n")
    return copied, removed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/sync_tree.py DEST", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    dest = Path(argv[0]).resolve()
    if dest == root or dest in root.parents:
        print(f"sync_tree: DEST {dest} must not be the tree or hold it", file=sys.stderr)
        return 2
    copied, removed = sync(root, dest)
    print(f"sync_tree: {dest}: {copied} files copied, {removed} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

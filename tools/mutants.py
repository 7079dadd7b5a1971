"""Mutation check: do the tests catch the bugs they claim to?

Plants each bug of a list kept in the repository (tools/mutants.toml) in a copy
of the working tree, one at a time, runs the tests named for it, and reports
the mutants no test caught (survivors). Not part of CI: C++ mutants rebuild the
extension in the copy (the first build compiles everything, later ones only the
changed file).

A list entry:

    [[mutant]]
    name = "cpp-compose-dU-drops-s"     # unique, used by --only
    file = "csrc/cpu/kernels.cpp"        # relative to the repository root
    find = "at::mul_out(dU, G, s);"      # exact text, must occur exactly once
    replace = "dU.copy_(G);"             # the planted bug
    backend = "cpu"                      # "cpu": C++ kernels; "interp": Triton kernels
                                         #   under TRITON_INTERPRET=1
    tests = [["tests/ops/test_ops.py", "-k", "compose and bf16"], ...]
    description = "..."

Each entry of `tests` is one pytest selection (arguments after `pytest -x -q`);
a mutant is killed only when every selection fails on it, so an entry can claim
"the bf16 tests catch it" and "the fp16 tests catch it" separately. Every
selection must first pass on the unchanged tree (the baseline), or the check
stops: a failure there proves nothing about a mutant.

Exit status: 0 when every mutant is killed; 1 when one survives or cannot be
planted (its snippet is not found: the code changed, update the list); 2 when
the baseline fails.

Usage: python tools/mutants.py [--only NAME ...] [--list] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tools" / "mutants.toml"
BACKENDS = {
    "cpu": {},
    "interp": {"TRITON_INTERPRET": "1", "SVDKERN_BACKEND": "triton"},
}
CPP_SUFFIXES = (".cpp", ".h")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    backend: str
    tests: tuple[tuple[str, ...], ...]
    description: str

    @property
    def needs_build(self) -> bool:
        return self.file.endswith(CPP_SUFFIXES)


def load(path: Path) -> list[Mutant]:
    """The mutants of the list, checked for the fields and values the tool needs."""
    with open(path, "rb") as f:
        entries = tomllib.load(f).get("mutant", [])
    mutants, names = [], set()
    for i, e in enumerate(entries):
        missing = {"name", "file", "find", "replace", "backend", "tests", "description"} - set(e)
        if missing:
            raise SystemExit(f"{path}: mutant #{i} lacks {sorted(missing)}")
        if e["name"] in names:
            raise SystemExit(f"{path}: mutant name {e['name']!r} is used twice")
        if e["backend"] not in BACKENDS:
            raise SystemExit(f"{path}: {e['name']}: backend must be one of {sorted(BACKENDS)}")
        if e["find"] == e["replace"]:
            raise SystemExit(f"{path}: {e['name']}: replace equals find (not a mutant)")
        if not e["tests"] or not all(isinstance(t, list) and t for t in e["tests"]):
            raise SystemExit(f"{path}: {e['name']}: tests must be a non-empty list of selections")
        names.add(e["name"])
        tests = tuple(tuple(str(a) for a in t) for t in e["tests"])
        mutants.append(Mutant(**{**e, "tests": tests}))
    return mutants


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked, not ignored files, and the built extension."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    for rel in sorted(set(filter(None, out.decode().split("\0")))):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    built = sorted((ROOT / "svdkern").glob("_C*.so"))
    if not built:
        raise SystemExit("svdkern/_C*.so is missing: build the extension first (make install)")
    for so in built:
        shutil.copy2(so, dst / "svdkern" / so.name)


def plant(tree: Path, m: Mutant) -> str:
    """Writes the mutant into the copy; returns the original text. Fails loudly when the
    snippet is not there exactly once."""
    path = tree / m.file
    if not path.is_file():
        raise LookupError(f"file {m.file} not found")
    text = path.read_text()
    count = text.count(m.find)
    if count != 1:
        what = "snippet not found" if count == 0 else f"snippet found {count} times"
        raise LookupError(f"{what} in {m.file}: {m.find!r}")
    path.write_text(text.replace(m.find, m.replace))
    return text


def run_pytest(tree: Path, backend: str, selection: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **BACKENDS[backend]}
    for key in ("TRITON_INTERPRET", "SVDKERN_BACKEND"):
        if key not in BACKENDS[backend]:
            env.pop(key, None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr)[-1500:]


def build(tree: Path) -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def check_copy_is_imported(tree: Path) -> None:
    """The tests in the copy must import the copy's svdkern, not the installed one."""
    code = "import svdkern, sys; sys.stdout.write(svdkern.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True
    ).stdout
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the copy imports svdkern from {out}, not from {tree}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--mutants", type=Path, default=LIST, help="the list (TOML)")
    args = parser.parse_args()

    mutants = load(args.mutants)
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.backend:6s} {m.file}: {m.description}")
        return 0
    # Python mutants first: they use the copied extension; C++ mutants rebuild it.
    mutants.sort(key=lambda m: m.needs_build)

    start = time.monotonic()
    tree = Path(tempfile.mkdtemp(prefix="svdkern-mutants-"))
    print(f"copy of the working tree: {tree}", flush=True)
    try:
        copy_tree(tree)
        check_copy_is_imported(tree)
        original_so = {p.name: p.read_bytes() for p in (tree / "svdkern").glob("_C*.so")}

        selections = sorted({(m.backend, t) for m in mutants for t in m.tests})
        print(f"baseline: {len(selections)} test selections on the unchanged tree", flush=True)
        for backend, sel in selections:
            rc, tail = run_pytest(tree, backend, sel)
            if rc != 0:
                print(f"BASELINE FAILS ({backend}: pytest {' '.join(sel)}, exit {rc}):\n{tail}")
                return 2
        print(f"baseline passes ({time.monotonic() - start:.0f} s)\n", flush=True)

        results = []
        for m in mutants:
            t0 = time.monotonic()
            try:
                text = plant(tree, m)
            except LookupError as exc:
                results.append((m, "NOT PLANTED", str(exc)))
                print(f"NOT PLANTED  {m.name}: {exc}", flush=True)
                continue
            try:
                status, detail = "killed", ""
                if m.needs_build:
                    ok, log = build(tree)
                    if not ok:
                        status, detail = "DID NOT BUILD", log
                if status == "killed":
                    for sel in m.tests:
                        rc, tail = run_pytest(tree, m.backend, sel)
                        if rc == 0:
                            status, detail = "SURVIVED", f"passes: pytest {' '.join(sel)}"
                            break
                        if rc != 1:
                            status, detail = "ERROR", f"exit {rc}: pytest {' '.join(sel)}\n{tail}"
                            break
            finally:
                (tree / m.file).write_text(text)
                if m.needs_build:
                    for name, data in original_so.items():
                        (tree / "svdkern" / name).write_bytes(data)
            results.append((m, status, detail))
            print(f"{status:12s} {m.name} ({time.monotonic() - t0:.0f} s)", flush=True)
            if status != "killed":
                print(f"    {detail}", flush=True)

        bad = [(m, s, d) for m, s, d in results if s != "killed"]
        print(
            f"\n{len(results) - len(bad)} of {len(results)} mutants killed, {len(bad)} not "
            f"({time.monotonic() - start:.0f} s in all)"
        )
        for m, s, d in bad:
            print(
                f"  {s}: {m.name} ({m.file}): {m.description}\n    {d.splitlines()[0] if d else ''}"
            )
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"kept {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""A small mutation check: plant plausible bugs one at a time and see whether the tests notice.

    .venv/bin/python tests/mutation_check.py                 # every mutation (~15-25 min on 2 cores)
    .venv/bin/python tests/mutation_check.py --list
    .venv/bin/python tests/mutation_check.py --only cfg_halves_swapped rank_normalisation_n

Not part of the default suite (the file name does not start with ``test_``). Each mutation edits one exact
text (listed in ``tests/mutations.yaml``) in one file of a scratch copy of the repository (the edit must match exactly once, so a mutation whose
anchor has moved is reported as ``stale``, never as killed), checks the edited file still compiles, and runs the
test files that should catch it (``-m "not slow and not slurm"``, stopping at the first failure). Before the
mutations, the same test files run once on the unmutated copy: a mutation only counts as killed if that baseline
passed. Prints one row per mutation: killed / SURVIVED / stale / error, and exits 1 if any survived.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def load_mutations(path: Path = REPO / "tests" / "mutations.yaml") -> tuple[Mutation, ...]:
    import yaml

    return tuple(Mutation(m["name"], m["file"], m["old"], m["new"], tuple(m["tests"]), m["what"])
                 for m in yaml.safe_load(path.read_text()))


MUTATIONS = load_mutations()


def copy_tree(dest: Path) -> Path:
    """The files the tests need (no results, no venv): like tests/workflow_helpers.copy_repo plus tests/."""
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for part in ("workflow", "config", "resources", "envs", "tests"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "raw", ".pytest_cache"))
    return dest


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ, PERTURB_REPRO_SEEDS=os.environ.get("PERTURB_REPRO_SEEDS", str(REPO.parent / "shared" / "seeds")))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not slurm", *tests],
        cwd=root, capture_output=True, text=True, env=env,
    )
    last = [line for line in done.stdout.splitlines() if line.strip()][-1:] or [done.stderr[-200:]]
    return done.returncode, last[0]


def plant(root: Path, m: Mutation) -> str | None:
    """Apply the edit; None when it applied, else why it could not."""
    path = root / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return f"anchor found {text.count(m.old)} times in {m.file}"
    path.write_text(text.replace(m.old, m.new))
    try:
        py_compile.compile(str(path), doraise=True)
    except py_compile.PyCompileError as exc:
        return f"mutated file does not compile: {exc.msg.splitlines()[0]}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.what}  [{', '.join(m.tests)}]")
        return 0 if chosen or args.list else 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        baseline_root = Path(tmp) / "baseline"
        baseline_root.mkdir()
        copy_tree(baseline_root)
        baseline = {}
        for tests in sorted({m.tests for m in chosen}):
            baseline[tests] = run_tests(baseline_root, tests)
        for m in chosen:
            start = time.time()
            root = Path(tmp) / m.name
            root.mkdir()
            copy_tree(root)
            problem = plant(root, m)
            base_rc, base_last = baseline[m.tests]
            if problem:
                verdict, detail = "stale", problem
            elif base_rc != 0:
                verdict, detail = "error", f"baseline fails: {base_last}"
            else:
                rc, last = run_tests(root, m.tests)
                verdict = {0: "SURVIVED", 1: "killed"}.get(rc, "error")
                detail = last
            rows.append((m.name, verdict, f"{time.time() - start:.0f} s", detail))
            print(f"{m.name:34} {verdict:9} {rows[-1][2]:>6}  {detail}", flush=True)
            shutil.rmtree(root, ignore_errors=True)

    print("\n| mutation | planted bug | tests | result |\n|---|---|---|---|")
    for (name, verdict, _, _), m in zip(rows, chosen):
        print(f"| `{name}` | {m.what} | {', '.join(Path(t).name for t in m.tests)} | {verdict} |")
    return 1 if any(v != "killed" for _, v, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

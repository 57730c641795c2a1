"""Mutation testing: plant each mutation of a list, one at a time, in a temporary copy of
the repository, run the tests that cover it, and report whether they caught it.

    python -m tools.mutate --mutations tests/mutations.txt
    python -m tools.mutate --mutations tests/mutations.txt --only batcher --skip_baseline
    python -m tools.mutate --mutations tests/mutations.txt --check

A mutation is a realistic bug written out by hand: an exact piece of a file and what to
put in its place (a comparison turned around, a boundary moved, a result handed to the
wrong request, a default changed, a case dropped). The list is a plain text file of
blocks (tests/mutations.txt documents the format):

    == a name for the report
    file: engine/train/checkpoints.py
    tests: tests/test_monitors.py -k direction
    - the original line(s), exactly as in the file
    + what replaces them (a lone '+' is an empty line)

`tests:` is what pytest is given (paths, node ids, -k or -m expressions). Before any
mutation, every covering test set is run once on the unmutated copy (--skip_baseline to
save that time): a test that already fails would "catch" everything. The working tree
is never touched. Exit codes: 0 every mutation caught; 1 some survived, timed out or
could not be run; 2 bad usage (a missing file, a block that does not parse, an original
text that is not in its file exactly once), reported before anything runs.
"""
if not __package__:  # run by path (python tools/mutate.py): run as python -m tools.mutate
    import _by_path
    _by_path.run_as_module(__file__)

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from engine.flags import ArgumentParser
from fileio import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", "node_modules"}
CAUGHT, SURVIVED, TIMEOUT, ERROR = "caught", "SURVIVED", "TIMEOUT", "ERROR"


class MutationFileError(ValueError):
    """A mutation list that cannot be used; the message names the file and line."""


@dataclass
class Mutation:
    name: str
    line: int                        # where its block starts in the list
    file: str = ""
    tests: list = field(default_factory=list)
    original: list = field(default_factory=list)
    replacement: list = field(default_factory=list)

    @property
    def old(self) -> str:
        return "\n".join(self.original)

    @property
    def new(self) -> str:
        return "\n".join(self.replacement)


def parse_mutations(text: str, source: str = "mutations") -> list:
    """The Mutations of a list's text; raises MutationFileError naming each bad line."""
    mutations, problems, current = [], [], None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\n")
        if line.startswith("== "):
            current = Mutation(name=line[3:].strip(), line=number)
            mutations.append(current)
        elif not line.strip() or line.startswith("#"):
            continue
        elif current is None:
            problems.append(f"{source}:{number}: text before the first '== name' line")
        elif line.startswith("file:"):
            current.file = line[len("file:"):].strip()
        elif line.startswith("tests:"):
            current.tests = shlex.split(line[len("tests:"):])
        elif line.startswith("- ") or line == "-":
            current.original.append(line[2:])
        elif line.startswith("+ ") or line == "+":
            current.replacement.append(line[2:])
        else:
            problems.append(f"{source}:{number}: expected 'file:', 'tests:', '- ' or '+ ', got {line[:60]!r}")
    for m in mutations:
        missing = [what for what, ok in (("file:", m.file), ("tests:", m.tests), ("'- ' lines", m.original)) if not ok]
        if missing:
            problems.append(f"{source}:{m.line}: mutation {m.name!r} has no {', '.join(missing)}")
        elif m.original == m.replacement:
            problems.append(f"{source}:{m.line}: mutation {m.name!r} replaces its text with the same text")
    names = [m.name for m in mutations]
    problems += [f"{source}: two mutations are named {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise MutationFileError("\n".join(problems))
    if not mutations:
        raise MutationFileError(f"{source}: no mutations (each starts with a '== name' line)")
    return mutations


def check_applicable(mutations, repo) -> None:
    """Raise MutationFileError unless each original text is in its file exactly once."""
    problems = []
    for m in mutations:
        path = os.path.join(repo, m.file)
        if not os.path.isfile(path):
            problems.append(f"line {m.line}: {m.name!r}: no file {m.file}")
            continue
        with open(path, encoding="utf-8") as f:
            count = f.read().count(m.old)
        if count != 1:
            problems.append(f"line {m.line}: {m.name!r}: its '- ' text is in {m.file} {count} times, not once "
                            f"(the file changed since the list was written? update the list)")
    if problems:
        raise MutationFileError("\n".join(problems))


def repository_files(repo) -> list:
    """The files a copy needs: git's tracked and untracked-but-not-ignored files, or, outside
    git, every file not in a hidden or cache folder."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True, timeout=60).stdout
        return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p and os.path.isfile(os.path.join(repo, p))]
    except (OSError, subprocess.SubprocessError):
        files = []
        for folder, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
            files += [os.path.relpath(os.path.join(folder, n), repo) for n in names]
        return files


def copy_repository(repo, dest) -> None:
    for rel in repository_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target)


def run_tests(copy, tests, python, timeout_s) -> tuple:
    """(pytest's exit code or None on timeout, seconds, last lines of its output)."""
    # No bytecode caches: a mutation the same size as the original, written within the
    # same second, would otherwise be imported from the stale cache of the original.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    try:
        proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - start, ""
    tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
    return proc.returncode, time.monotonic() - start, tail


def verdict(code) -> str:
    """pytest's exit code -> the mutation's fate: 1 (tests failed) and 2 (collection
    failed: the mutant does not even import) catch it; 0 lets it survive."""
    if code is None:
        return TIMEOUT
    return {0: SURVIVED, 1: CAUGHT, 2: CAUGHT}.get(code, ERROR)


def get_args_parser():
    p = ArgumentParser(description="Plant each mutation of a list alone in a copy of the repository and "
                       "report whether its tests catch it.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--mutations", default=os.path.join("tests", "mutations.txt"),
                   help="the mutation list (relative paths: from --repo)")
    p.add_argument("--repo", default=ROOT, help="the repository to copy (the one this tool is in)")
    p.add_argument("--only", default=None, metavar="TEXT", help="run only the mutations whose name contains TEXT")
    p.add_argument("--timeout", type=int, default=900, help="seconds one test run may take (a longer one: TIMEOUT)")
    p.add_argument("--skip_baseline", action="store_true",
                   help="do not first run each test set on the unmutated copy (faster; a failing test then "
                        "looks like a catch)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--out", default=None, metavar="JSONL", help="also write one JSON line per mutation here")
    p.add_argument("--check", action="store_true",
                   help="only check the list: every block parses and its text is in its file once (seconds)")
    return p


def main(args) -> int:
    mutations_path = args.mutations if os.path.isabs(args.mutations) else os.path.join(args.repo, args.mutations)
    if args.timeout < 1:
        print(f"error: --timeout must be >= 1 second, got {args.timeout}", file=sys.stderr)
        return 2
    try:
        with open(mutations_path, encoding="utf-8") as f:
            mutations = parse_mutations(f.read(), mutations_path)
        mutations = [m for m in mutations if args.only is None or args.only in m.name]
        if not mutations:
            raise MutationFileError(f"--only {args.only!r}: no mutation's name contains it")
        check_applicable(mutations, args.repo)
    except OSError as exc:
        print(f"error: --mutations {mutations_path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except MutationFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutations)} mutation(s) in {mutations_path}: each applies to {args.repo}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as copy:
        copy_repository(args.repo, copy)
        print(f"{len(mutations)} mutation(s) from {mutations_path}, in a copy of {args.repo} at {copy}", flush=True)
        if not args.skip_baseline:
            for tests in dict.fromkeys(tuple(m.tests) for m in mutations):
                code, seconds, tail = run_tests(copy, list(tests), args.python, args.timeout)
                if code != 0:
                    print(f"error: the unmutated copy fails (or times out on) `pytest {shlex.join(tests)}` "
                          f"(exit {code}, {seconds:.0f} s); fix that first:\n{tail}", file=sys.stderr)
                    return 2
            print("baseline: every test set passes on the unmutated copy", flush=True)
        for n, m in enumerate(mutations, start=1):
            path = os.path.join(copy, m.file)
            with open(path, encoding="utf-8") as f:
                original = f.read()
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.old, m.new, 1))
                code, seconds, tail = run_tests(copy, m.tests, args.python, args.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
            fate = verdict(code)
            results.append({"name": m.name, "file": m.file, "tests": m.tests, "result": fate,
                            "pytest_exit": code, "seconds": round(seconds, 1)})
            print(f"[{n}/{len(mutations)}] {fate:<8} {seconds:6.1f} s  {m.name}  ({m.file})", flush=True)
            if fate == ERROR:
                print(f"    pytest exit {code}: {tail}", flush=True)
    counts = {fate: sum(r["result"] == fate for r in results) for fate in (CAUGHT, SURVIVED, TIMEOUT, ERROR)}
    print(f"total: {len(results)} mutations, {counts[CAUGHT]} caught, {counts[SURVIVED]} survived"
          + "".join(f", {counts[f]} {f.lower()}" for f in (TIMEOUT, ERROR) if counts[f]))
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in results))
    return 0 if counts[CAUGHT] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

"""What a command of tools/ or bench/ does when it is run by its path
(`python tools/ava_to_csv.py ...`) rather than as a module (`python -m tools.ava_to_csv
...`): Python then puts tools/ on sys.path instead of the repository root, so the
project's packages cannot be imported. Each command starts with

    if not __package__:  # run by path: run as python -m tools.<name>
        import _by_path
    _by_path.run_as_module(__file__)


which re-runs it exactly as `python -m`, with the same arguments."""
import os
import runpy
import sys


def _module_of(path) -> tuple:
    """(repository root, dotted module name) of a file in tools/ or bench/."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    return os.path.dirname(folder), f"{os.path.basename(folder)}.{os.path.splitext(os.path.basename(path))[0]}"


def run_as_module(path) -> None:
    root, module = _module_of(path)
    sys.path[0] = root
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    sys.exit(0)


def refuse_library(path) -> None:
    """For a helper module of the benchmarks (no command of its own): one line, exit 2."""
    _, module = _module_of(path)
    print(f"{os.path.relpath(path)} holds helpers of the benchmarks, not a command; run one of the bench "
          f"commands as a module, for example: python -m bench.bench --help", file=sys.stderr)
    sys.exit(2)

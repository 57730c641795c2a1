"""Exit 0 when every requirement in the given requirements files is installed at an
allowed version; otherwise print what is missing (and what it is for) and exit 1, so
that `make` runs pip only when something is missing (pip takes ~10 s to say nothing is;
this check takes ~1 s).

    python tools/check_requirements.py requirements.txt [requirements-test.txt ...]
    python tools/check_requirements.py --constraints constraints.txt requirements.txt

With --constraints (what `make` passes), a package that the constraints file pins must
be installed at that version, and so must every package it depends on: the checked set
is what `pip install -c constraints.txt -r requirements.txt` would install.
"""
if not __package__:  # run by path (python tools/check_requirements.py): run as python -m tools.check_requirements
    import _by_path
    _by_path.run_as_module(__file__)

import argparse
import sys
from importlib import metadata

from engine.flags import ArgumentParser

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a fresh virtual environment has no `packaging`, but pip carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

# Why a download may be large, printed before pip starts.
LARGE = {"torch": "about 5.5 GB with its CUDA libraries; a few minutes",
         "torchvision": "pairs with torch", "onnxruntime": "about 20 MB"}


def read_requirements(path) -> list:
    """The Requirements of a requirements (or constraints) file: one a line, # comments."""
    with open(path, encoding="utf-8") as f:
        return [Requirement(line) for line in (raw.split("#", 1)[0].strip() for raw in f) if line]


def installed_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def dependencies(name) -> list:
    """The Requirements an installed package declares for this platform (no extras)."""
    out = []
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def missing_requirements(path, constraints=None, constraints_path="constraints.txt") -> list:
    """[(name, why)] for each requirement of `path` that is not installed at an allowed
    version; with `constraints` ({canonical name: Requirement}), also each package of
    their dependency tree that is installed at another version than the one pinned."""
    missing, seen = [], set()
    todo = [(req, None) for req in read_requirements(path)]
    while todo:
        req, needed_by = todo.pop(0)
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        seen.add(key)
        by = f"; needed by {needed_by}" if needed_by else ""
        version = installed_version(req.name)
        if version is None:
            missing.append((req.name, "not installed" + by))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append((req.name, f"{version} installed, need {req.specifier}{by}"))
            continue
        if constraints is None:
            continue
        pin = constraints.get(key)
        if pin is not None and not pin.specifier.contains(version, prereleases=True):
            missing.append((req.name, f"{version} installed, {constraints_path} pins {pin.specifier}{by}"))
            continue
        todo.extend((dep, req.name) for dep in dependencies(req.name))
    return missing


def get_args_parser():
    p = ArgumentParser(description="Exit 0 when every requirement of the files is installed at an allowed "
                       "version; otherwise list what is missing and exit 1 (make then runs pip). "
                       "Exit 2 for a requirements file that cannot be read.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("paths", nargs="*", default=["requirements.txt"], metavar="REQUIREMENTS",
                   help="requirements files (one requirement per line, # comments)")
    p.add_argument("--constraints", default=None, metavar="FILE",
                   help="a pip constraints file of exact versions: the requirements and everything they depend on must "
                        "be installed at the versions it pins (make passes constraints.txt)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    constraints = None
    if args.constraints:
        try:
            constraints = {canonicalize_name(r.name): r for r in read_requirements(args.constraints)}
        except OSError as exc:
            print(f"error: constraints file {args.constraints}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    code = 0
    for path in args.paths:
        try:
            missing = missing_requirements(path, constraints, args.constraints)
        except OSError as exc:
            print(f"error: requirements file {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if missing:
            code = 1
            print(f"{path}: installing what is missing" + (f" (at the versions of {args.constraints})" if constraints else "") + ":")
            for name, why in missing:
                print(f"  {name} ({why}" + (f"; {LARGE[name]}" if name in LARGE else "") + ")")
    return code


if __name__ == "__main__":
    sys.exit(main())

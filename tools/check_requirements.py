"""Exit 0 when every requirement in the given requirements files is installed at an
allowed version; otherwise print what is missing (and what it is for) and exit 1, so
that `make` runs pip only when something is missing (pip takes ~10 s to say nothing is;
this check takes ~1 s).

    python tools/check_requirements.py requirements.txt [requirements-test.txt ...]
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
except ImportError:  # a fresh virtual environment has no `packaging`, but pip carries a copy
    from pip._vendor.packaging.requirements import Requirement

# Why a download may be large, printed before pip starts.
LARGE = {"torch": "about 5.5 GB with its CUDA libraries; a few minutes",
         "torchvision": "pairs with torch", "onnxruntime": "about 20 MB"}


def missing_requirements(path) -> list:
    missing = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                missing.append((req.name, "not installed"))
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                missing.append((req.name, f"{version} installed, need {req.specifier}"))
    return missing


def get_args_parser():
    p = ArgumentParser(description="Exit 0 when every requirement of the files is installed at an allowed "
                       "version; otherwise list what is missing and exit 1 (make then runs pip). "
                       "Exit 2 for a requirements file that cannot be read.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("paths", nargs="*", default=["requirements.txt"], metavar="REQUIREMENTS",
                   help="requirements files (one requirement per line, # comments)")
    return p


def main(argv=None) -> int:
    paths = get_args_parser().parse_args(argv).paths
    code = 0
    for path in paths:
        try:
            missing = missing_requirements(path)
        except OSError as exc:
            print(f"error: requirements file {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if missing:
            code = 1
            print(f"{path}: installing what is missing:")
            for name, why in missing:
                print(f"  {name} ({why}" + (f"; {LARGE[name]}" if name in LARGE else "") + ")")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Exit 0 when every requirement in a requirements file is installed at an allowed
version, 1 otherwise (so `make` installs only what is missing)."""
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging ships with pip/setuptools almost everywhere; if not, install
    sys.exit(1)


def main(path) -> int:
    missing = []
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req.name} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req.name} {version} (need {req.specifier})")
    if missing:
        print("installing missing requirements: " + ", ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements.txt"))

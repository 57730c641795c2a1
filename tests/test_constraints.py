"""constraints.txt (the exact versions tested, which `make` installs) against the ranges of
requirements*.txt, and tools/check_requirements.py --constraints, which tells `make`
whether pip has anything to do."""
import os
import shutil
import subprocess
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT
from tools import check_requirements

REQUIREMENT_FILES = ["requirements.txt", "requirements-test.txt", "requirements-export.txt", "requirements-serve.txt",
                     "requirements-parquet.txt"]


def requirements(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return [Requirement(line) for line in (raw.split("#", 1)[0].strip() for raw in f) if line]


def test_constraints_pin_every_requirement_within_its_range():
    pins = {canonicalize_name(r.name): r for r in requirements("constraints.txt")}
    for r in pins.values():
        assert str(r.specifier).startswith("==") and "," not in str(r.specifier), r  # exact versions only
    for path in REQUIREMENT_FILES:
        for req in requirements(path):
            pin = pins.get(canonicalize_name(req.name))
            assert pin is not None, f"{path}: {req.name} has no pin in constraints.txt"
            version = str(pin.specifier)[2:]
            assert req.specifier.contains(version, prereleases=True), f"{req.name}: pin {version} outside {path}'s {req.specifier}"


def write(path, text):
    path.write_text(text)
    return str(path)


def test_check_requirements_against_constraints(tmp_path, capsys):
    pytest_version, pluggy_version = metadata.version("pytest"), metadata.version("pluggy")
    req = write(tmp_path / "req.txt", "pytest>=1  # the range\n")
    exact = write(tmp_path / "exact.txt", f"pytest=={pytest_version}\npluggy=={pluggy_version}\nno-such-package==1.0\n")
    assert check_requirements.main([req, "--constraints", exact]) == 0  # a pin of a package not needed is no matter
    other = write(tmp_path / "other.txt", "pytest==0.0.1\n")
    assert check_requirements.main([req, "--constraints", other]) == 1
    assert f"pytest ({pytest_version} installed, {other} pins ==0.0.1)" in capsys.readouterr().out
    # A package the requirement depends on (pytest needs pluggy), at another version than pinned.
    dep = write(tmp_path / "dep.txt", f"pytest=={pytest_version}\npluggy==0.0.1\n")
    assert check_requirements.main([req, "--constraints", dep]) == 1
    assert f"pluggy ({pluggy_version} installed, {dep} pins ==0.0.1; needed by pytest)" in capsys.readouterr().out
    # Without --constraints only the ranges count.
    assert check_requirements.main([req]) == 0


def test_check_requirements_names_an_unreadable_constraints_file(tmp_path, capsys):
    req = write(tmp_path / "req.txt", "pytest>=1\n")
    assert check_requirements.main([req, "--constraints", str(tmp_path / "none.txt")]) == 2
    assert f"constraints file {tmp_path / 'none.txt'}" in capsys.readouterr().err


@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_installs_with_the_constraints_unless_told_not_to():
    # A make of its own: under `make test CONSTRAINTS=` the outer make's variables would
    # reach this one through MAKEFLAGS.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONSTRAINTS")}
    pinned = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env).stdout
    assert "tools/check_requirements.py --constraints constraints.txt requirements.txt" in pinned
    assert "pip install --progress-bar on -c constraints.txt -r requirements.txt" in pinned
    assert "--device cpu" in pinned and "OMP_NUM_THREADS=2" in pinned
    ranges = subprocess.run(["make", "-n", "demo", "CONSTRAINTS="], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=env).stdout
    assert "tools/check_requirements.py  requirements.txt" in ranges or "tools/check_requirements.py requirements.txt" in ranges
    assert "constraints" not in ranges

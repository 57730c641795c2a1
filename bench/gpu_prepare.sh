#!/usr/bin/env bash
# Before the GPU check's device calls, on a machine with pip access and this project's
# requirements installed: download into .gpu_wheels/ (ignored by git, carried to the GPU
# machine) the Python 3.12 wheels of what the GPU machine's image lacks, at the
# versions installed here (the tested combination), check that the working tree and
# the wheels fit the 64 MiB a device call carries, and print the calls to make.
#
#   bash bench/gpu_prepare.sh
#
# What is needed: tensorboardX (main.py's TensorBoard logs) and the serving stack
# (fastapi, uvicorn, python-multipart, prometheus-client, fastapi-offline: serve.py and its tests), with every dependency
# they declare for Python 3.12 on Linux, found from the installed packages' metadata.
# numpy is left out: the GPU image's torch comes with it, and its wheel alone is 16 MB.
# On the GPU machine, bench/gpu_check.sh installs them with
# `pip install --no-index --find-links .gpu_wheels NAME`, so pip takes from the folder
# only what the image does not already satisfy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GPU_CHECK_WHEELS:-.gpu_wheels}
TOP=(tensorboardX fastapi uvicorn python-multipart prometheus-client fastapi-offline)
LIMIT=$((64 * 1024 * 1024))

# name==version of the top-level packages and their declared dependencies, as installed here.
mapfile -t SPECS < <("$PY" - "${TOP[@]}" <<'EOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

# The GPU machine: CPython 3.12 on x86-64 Linux; no extras.
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
SKIP = {"numpy"}
todo, found = list(sys.argv[1:]), {}
while todo:
    name = todo.pop()
    key = name.lower().replace("_", "-")
    if key in found or key in SKIP:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"{name} is not installed here: install the project's requirements (requirements*.txt) first")
    found[key] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(ENV):
            todo.append(req.name)
for key, version in sorted(found.items()):
    print(f"{key}=={version}")
EOF
)
echo "# wheels for Python 3.12 (x86-64 Linux) into $DEST: ${SPECS[*]}"
rm -rf "$DEST"
mkdir -p "$DEST"
# Pure-Python wheels match any platform; the compiled ones (pydantic-core, protobuf) need
# a manylinux tag the GPU machine accepts.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${SPECS[@]}"
ls -l "$DEST"

wheels=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + tree))
echo "# carried: working tree $((tree / 1024)) KiB + $DEST $((wheels / 1024)) KiB = $((total / 1024)) KiB of $((LIMIT / 1024)) KiB"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: over the 64 MiB a device call carries: remove large untracked files from the working tree"
  exit 1
fi

cat <<EOF

# The device calls, one per step, in this order (bench/GPU.md says what each shows and
# where the results go). Each: the \`run\` tool with
#   command:   bash bench/gpu_check.sh "\$OUT" STEP
#   carry:     ["$DEST"]
#   timeout_s: 600
# for STEP = suite, bench, e2e, infer, train, parity, compile, serve (then, if a target is missed,
# profile). For example:
#   run(command='bash bench/gpu_check.sh "\$OUT" suite', carry=["$DEST"], timeout_s=600)
# After each call, append the returned <date>_<card>.jsonl to bench/results/<date>_<card>.jsonl.
EOF

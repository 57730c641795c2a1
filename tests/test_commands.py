"""Commands as people run them: every command of tools/ and bench/ by its path as well as
with `python -m`, and every command the README and docs/ show, parsed by its own parser
(its flags exist and their values are valid), so that a documented command cannot break
without a red test."""
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

COMMAND_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "tools", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
                       if not os.path.basename(p).startswith("_"))
# Helpers of the benchmarks, not commands: run by path they say so (exit 2).
BENCH_LIBRARIES = {"bench/attacks.py", "bench/ava_like.py", "bench/figures.py", "bench/gpu_machine.py", "bench/gpu_records.py",
                   "bench/gpu_training.py", "bench/serve_clients.py", "bench/timing.py"}
DOC_FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def relative(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", [relative(p) for p in COMMAND_FILES])
def test_every_tool_is_a_command_with_a_parser(path):
    """Everything in tools/ is a command: get_args_parser() and main(), as the CLIs."""
    if path in BENCH_LIBRARIES:
        pytest.skip("a helper module of the benchmarks")
    module = importlib.import_module(path[:-3].replace("/", "."))
    assert callable(getattr(module, "get_args_parser", None)) and callable(getattr(module, "main", None)), path
    help_text = module.get_args_parser().format_help()
    assert help_text.startswith("usage:")


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("path", [relative(p) for p in COMMAND_FILES])
def test_run_by_path_works_like_run_as_module(path, tmp_path):
    """`python tools/X.py --help` from any folder: the help of `python -m tools.X`, or for a
    helper module one line naming the commands (exit 2); never a traceback."""
    by_path = subprocess.run([sys.executable, os.path.join(ROOT, path), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert "Traceback" not in by_path.stderr, by_path.stderr
    if path in BENCH_LIBRARIES:
        assert by_path.returncode == 2 and len(by_path.stderr.strip().splitlines()) == 1
        assert "python -m bench." in by_path.stderr
        return
    assert by_path.returncode == 0, by_path.stderr
    as_module = subprocess.run([sys.executable, "-m", path[:-3].replace("/", "."), "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert as_module.returncode == 0, as_module.stderr
    assert by_path.stdout == as_module.stdout and by_path.stdout.startswith("usage:")


@pytest.mark.subprocess
def test_a_tool_run_by_path_keeps_its_arguments_and_exit_code(tmp_path):
    """The arguments reach the tool unchanged and its exit code comes back."""
    req = tmp_path / "req.txt"
    req.write_text("pytest>=1\nno-such-package-at-all==1.0\n")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_requirements.py"), str(req)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "no-such-package-at-all (not installed)" in run.stdout
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_requirements.py"), str(tmp_path / "none.txt")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.txt" in missing.stderr and "Traceback" not in missing.stderr


# ---- the commands the docs show ----------------------------------------------------------

SCRIPTS = {"main.py": "main", "test.py": "test", "serve.py": "serve"}


def shell_blocks(text):
    """The bodies of the fenced code blocks marked as shell (or not marked at all)."""
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        if m.group(1) in ("", "bash", "sh", "shell", "console"):
            yield m.group(2)


def logical_lines(block):
    """Lines with their backslash continuations joined, prompts and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            yield line


def documented_commands():
    """(doc file, line, module, argv) for every python/torchrun command of the project in the docs."""
    found = []
    for doc in DOC_FILES:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        for block in shell_blocks(text):
            for line in logical_lines(block):
                for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                    try:
                        words = shlex.split(part, comments=True)
                    except ValueError:
                        continue
                    module, argv = command_of(words)
                    if module:
                        found.append((relative(doc), part, module, argv))
    return found


def command_of(words):
    """(module name, its arguments) of `python SCRIPT ...`, `python -m tools.X ...`,
    `torchrun [opts] SCRIPT ...`; (None, None) for anything else."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return None, None
    if words[0] in ("python", "python3"):
        rest = words[1:]
        if rest[:1] == ["-m"] and len(rest) > 1 and re.match(r"^(tools|bench)\.\w+$", rest[1]):
            return rest[1], rest[2:]
        if rest and rest[0] in SCRIPTS:
            return SCRIPTS[rest[0]], rest[1:]
        return None, None
    if words[0] == "torchrun" or words[:3] == ["python", "-m", "torch.distributed.run"]:
        for n, w in enumerate(words):
            if w in SCRIPTS:
                return SCRIPTS[w], words[n + 1:]
    return None, None


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10, [c[1] for c in COMMANDS]


@pytest.mark.parametrize("doc,line,module,argv", COMMANDS, ids=[f"{c[0]}:{c[1][:60]}" for c in COMMANDS])
def test_documented_command_parses(doc, line, module, argv, capsys):
    """Its flags exist and their values are what argparse accepts (types, choices, counts)."""
    parser = importlib.import_module(module).get_args_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if argv == ["--help"] or argv == ["-h"]:
            assert exc.code == 0
            return
        pytest.fail(f"{doc}: `{line}` does not parse: {capsys.readouterr().err.strip()}")


# ---- links between the docs ----------------------------------------------------------------

def anchor_of(heading):
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    return {anchor_of(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def relative_links():
    found = []
    for doc in DOC_FILES:
        with open(doc, encoding="utf-8") as f:
            text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if not re.match(r"^[a-z]+:", target):
                found.append((relative(doc), target))
    return found


@pytest.mark.parametrize("doc,target", relative_links())
def test_links_between_the_docs_resolve(doc, target):
    """Every relative link of README.md and docs/ names a file that exists, and an anchor
    that a heading of that file makes."""
    path, _, anchor = target.partition("#")
    file = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
    assert os.path.exists(file), f"{doc}: {target}: no such file"
    if anchor:
        assert anchor in anchors(file), f"{doc}: {target}: no heading makes #{anchor} in {relative(file)}"

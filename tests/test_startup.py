"""Start-up: every command answers --help, and the commands that load a model report a bad
flag (exit 2), without importing torch (seconds of start-up each). Checked with torch
and torchvision made unimportable in the command's process, so that a module-level
`import torch` creeping back into a parser's import chain fails here."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# A site hook that makes `import torch` (and torchvision) fail in every process started
# with it on PYTHONPATH.
POISON = '''import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is poisoned in this test: something imported {name}")
        return None


sys.meta_path.insert(0, NoTorch())
'''
TOOLS = sorted(os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".") for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
               if not os.path.basename(p).startswith("_"))
COMMANDS = [["main.py"], ["test.py"], ["serve.py"]] + [["-m", name] for name in TOOLS]


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("poison")
    (folder / "sitecustomize.py").write_text(POISON)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), ROOT]))


def run(argv, env):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.subprocess
def test_the_poison_works(no_torch_env):
    """The hook does block torch: without this, every test below would pass vacuously."""
    proc = run(["-c", "import torch"], no_torch_env)
    assert proc.returncode == 1 and "torch is poisoned" in proc.stderr
    proc = run(["-c", "import torchvision.transforms"], no_torch_env)
    assert proc.returncode == 1 and "torch is poisoned" in proc.stderr


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_without_torch(command, no_torch_env):
    proc = run([*command, "--help"], no_torch_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "Traceback" not in proc.stderr


# One flag error per command that loads a model: the check that runs before the model is
# read (exit 2, the flag named, no traceback).
USAGE_ERRORS = [
    (["test.py", "--model", "m.pth", "--test_images", "photos", "--tta", "0"], "--tta must be between 1 and 10"),
    (["test.py", "--model", "m.pth", "--test_images", "photos", "--threads", "0"], "--threads must be >= 1"),
    (["test.py", "--model", "m.pth", "--test_images", "photos", "--explain", "some"], "--explain must be a whole number"),
    (["test.py", "--model", "m.pth"], "give --test_images"),
    (["main.py", "--train", "--train_batch_size", "0"], "--train_batch_size must be at least 1"),
    (["main.py", "--train", "--img_path", "tests", "--label_format", "mos"], "--label_format mos needs --score_range"),
    (["main.py", "--train", "--img_path", "tests", "--lr_schedule", "cosine", "--decay"], "--decay"),
    (["serve.py", "--model", "m.pth", "--max_batch", "0"], "--max_batch must be >= 1"),
    (["-m", "tools.enhance", "--model", "m.pth", "--image", "tests/data/photos/china.jpg", "--out", "o", "--params", "blur"],
     "--params 'blur': unknown blur"),
    (["-m", "tools.export", "--model", "m.pth", "--format", "torchscript", "--out", "o.pt", "--atol", "0"],
     "--atol must be > 0"),
]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a[:3]) for a, _ in USAGE_ERRORS])
def test_usage_errors_without_torch(argv, message, no_torch_env):
    proc = run(argv, no_torch_env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_torch_free_backbone_list_is_the_registry():
    """main.py's --help lists model.constants.BACKBONE_NAMES, written out so that no torch
    is needed: it must name exactly what the registry registers."""
    from model import list_backbones
    from model.constants import BACKBONE_NAMES
    assert list(BACKBONE_NAMES) == list_backbones()

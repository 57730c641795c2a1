"""Checkpoints written before the model flags' defaults became None recorded the default
backbone's name as an instance of a marker subclass of str (`engine.flags._DefaultStr`,
and `_DefaultFloat` for a float), which a plain weights_only load refuses. Such files load
everywhere a checkpoint is taken, read as the plain str and float they stand for, without
a warning. This writes such files on purpose."""
import warnings

import pytest
import torch

import engine.flags
import hubconf
from conftest import make_photo_folder, run_main, run_test, tiny_train_args
from engine.score.scorer import Scorer
from model.checkpoint import read_checkpoint_file, recorded_args
from tools import enhance, export


class _DefaultStr(str):
    pass


class _DefaultFloat(float):
    pass


def write_legacy(path, ckpt):
    """`ckpt` saved as the old main.py did: the marker classes live in engine.flags while
    torch.save pickles them (pickle records a class by its module and name)."""
    for cls in (_DefaultStr, _DefaultFloat):
        cls.__module__, cls.__qualname__ = "engine.flags", cls.__name__
        setattr(engine.flags, cls.__name__, cls)
    try:
        torch.save(ckpt, path)
    finally:
        del engine.flags._DefaultStr, engine.flags._DefaultFloat


@pytest.fixture(scope="module")
def legacy(demo_data, tmp_path_factory):
    """A tiny run's folder whose every checkpoint holds the markers where the old code put
    them (model_args' base_model; the flags' base_model and dropout)."""
    ckpt = tmp_path_factory.mktemp("legacy") / "ck"
    assert run_main(tiny_train_args(demo_data, ckpt, "--epochs", "1")) == 0
    for path in ckpt.glob("*.pth"):
        c = torch.load(path, weights_only=True)
        c["model_args"]["base_model"] = _DefaultStr(c["model_args"]["base_model"])
        c["args"]["base_model"] = _DefaultStr("tiny_cnn")
        c["args"]["dropout"] = _DefaultFloat(0.75)
        write_legacy(path, c)
    return ckpt


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    about_loading = [str(w.message) for w in caught if any(k in str(w.message) for k in ("weights_only", "pickle", "safe_globals", "allowlist"))]
    assert not about_loading


def test_the_files_are_what_old_main_wrote(legacy):
    with pytest.raises(Exception, match="_DefaultStr"):
        torch.load(legacy / "best.pth", weights_only=True)


def test_read_as_plain_values(legacy, no_warnings):
    c = read_checkpoint_file(legacy / "best.pth")
    assert type(c["model_args"]["base_model"]) is str and c["model_args"]["base_model"] == "tiny_cnn"
    assert type(c["args"]["dropout"]) is float and c["args"]["dropout"] == 0.75
    args = recorded_args(legacy / "best.pth")
    assert type(args["base_model"]) is str and args["base_model"] == "tiny_cnn"


def test_scoring_commands_take_them(legacy, demo_data, tmp_path, no_warnings):
    out = tmp_path / "out"
    assert run_test(["--model", legacy / "best.pth", "--test_images", demo_data / "images", "--predictions", out,
                     "--num_workers", "0", "--quiet"]) == 0
    assert len((out / "predictions.csv").read_text().splitlines()) == 61  # header + 60 images
    scorer = Scorer.from_checkpoint(legacy / "best.pth", device="cpu")
    assert scorer.model_args["base_model"] == "tiny_cnn"
    model = hubconf.nima(checkpoint=str(legacy / "best.pth"))
    assert type(model.model_args["base_model"]) is str
    assert export.main(export.get_args_parser().parse_args(
        ["--model", str(legacy / "best.pth"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])) == 0
    photos = tmp_path / "photos"
    make_photo_folder(photos)
    assert enhance.main(enhance.get_args_parser().parse_args(
        ["--model", str(legacy / "best.pth"), "--image", str(photos / "a_rgb.jpg"), "--out", str(tmp_path / "enh"),
         "--steps", "2", "--quiet"])) == 0


def test_training_commands_take_them(legacy, demo_data, tmp_path, no_warnings):
    # --resume and main.py --test in the legacy folder itself (a copy: the resume writes there).
    import shutil
    folder = tmp_path / "ck"
    shutil.copytree(legacy, folder)
    assert run_main(tiny_train_args(demo_data, folder, "--epochs", "2", "--resume", folder / "last.pth",
                                    "--test", "--test_csv_file", demo_data / "test_labels.csv")) == 0
    resumed = torch.load(folder / "last.pth", weights_only=True)  # written now: plain again
    assert resumed["epoch"] == 2 and type(resumed["model_args"]["base_model"]) is str
    # --init_from and --warm_start start new runs from them.
    assert run_main(tiny_train_args(demo_data, tmp_path / "init", "--epochs", "1", "--init_from", legacy / "best.pth")) == 0
    warm = tmp_path / "warm"
    shutil.copytree(legacy, warm)
    assert run_main(tiny_train_args(demo_data, warm, "--epochs", "2", "--warm_start", "--warm_start_epoch", "1")) == 0
    for written in (tmp_path / "init" / "last.pth", warm / "last.pth"):  # written by the new runs: plain
        assert type(torch.load(written, weights_only=True)["model_args"]["base_model"]) is str

"""Pictures: training curves, the contact sheet and the scatter plot are valid PNGs of the
size their docstrings promise."""
import numpy as np
import pytest
from PIL import Image

from conftest import run_main, run_test, tiny_checkpoint, tiny_train_args
from engine.plots import contact_sheet_layout, contact_sheet_pixels, plot_contact_sheet, plot_scatter


def png_size(path):
    with Image.open(path) as img:
        img.verify()  # a complete, uncorrupted file
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_contact_sheet_layout():
    assert contact_sheet_layout(4, 100) == (4, 4, 1)
    assert contact_sheet_layout(8, 100) == (8, 6, 2)   # six tiles a row at most
    assert contact_sheet_layout(4, 5) == (3, 3, 1)     # fewer than 2k images: split the ranking
    assert contact_sheet_pixels(4, 100) == (800, 480)  # 200 x 240 px tiles, two groups
    assert contact_sheet_pixels(8, 100) == (1200, 960)


def test_contact_sheet_and_scatter_direct(tmp_path):
    rng = np.random.default_rng(0)
    paths, ids = [], []
    for n in range(7):
        # Tall and wide images alike must fit their tile.
        size = (64, 40) if n % 2 else (40, 64)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
        paths.append(str(tmp_path / f"{n}.png"))
        ids.append(f"{n}.png")
    mean = rng.uniform(3, 7, 7)
    plot_contact_sheet(paths, ids, mean, tmp_path / "sheet.png", 2, gt_mean=mean + 0.1)
    assert png_size(tmp_path / "sheet.png") == contact_sheet_pixels(2, 7) == (400, 480)
    plot_contact_sheet(paths, ids, mean, tmp_path / "sheet_nolabels.png", 10)
    assert png_size(tmp_path / "sheet_nolabels.png") == contact_sheet_pixels(10, 7) == (800, 480)
    plot_scatter(mean, mean + rng.normal(0, 0.3, 7), tmp_path / "scatter.png")
    assert png_size(tmp_path / "scatter.png") == (500, 500)
    with pytest.raises(ValueError, match="k >= 1"):
        plot_contact_sheet(paths, ids, mean, tmp_path / "none.png", 0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_test_py_contact_sheet_and_scatter(demo_data, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "pred"
    common = ["--model", ckpt, "--test_images", demo_data / "images", "--predictions", out, "--workers", "0", "--quiet"]
    assert run_test(common + ["--test_csv", demo_data / "test_labels.csv", "--contact_sheet", "3"]) == 0
    assert "contact_sheet.png" in capsys.readouterr().out
    assert png_size(out / "contact_sheet.png") == contact_sheet_pixels(3, 9) == (600, 480)
    assert png_size(out / "scatter.png") == (500, 500)
    # Without labels: a sheet of means only, and no scatter plot left from the run before.
    assert run_test(common + ["--contact_sheet", "8"]) == 0
    assert png_size(out / "contact_sheet.png") == contact_sheet_pixels(8, 60) == (1200, 960)
    assert not (out / "scatter.png").exists()
    # Without --contact_sheet an older sheet is removed too.
    assert run_test(common) == 0
    assert not (out / "contact_sheet.png").exists()
    assert run_test(common + ["--contact_sheet", "-1"]) == 2
    assert "--contact_sheet must be >= 0" in capsys.readouterr().err


def test_training_writes_curves_png(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt)) == 0  # 2 epochs, monitor val_emd
    # Three panels (EMD, validation SRCC beside it, learning rates) of 500 x 380 px each.
    assert png_size(ckpt / "snapshots" / "curves.png") == (1500, 380)


def test_curves_mark_the_best_epoch_and_show_the_monitored_metric(tmp_path, monkeypatch):
    from engine import plots
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.update(fig=fig))
    history = [{"epoch": e, "train_loss": 0.3 - 0.01 * e, "val_emd": v, "val_srcc_mean": s, "lr_dense": 0.01}
               for e, v, s in [(1, 0.25, 0.1), (2, 0.22, 0.4), (3, 0.23, 0.3)]]
    plots.plot_curves(history, tmp_path / "c.png", "val_srcc_mean", best_epoch=2)
    axes = drawn["fig"].axes
    assert [ax.get_title() for ax in axes] == ["EMD (r=2)", "val_srcc_mean (monitored)", "learning rate"]
    for ax in axes:  # a vertical line at x = 2 on every panel
        assert any(list(line.get_xdata()) == [2, 2] for line in ax.get_lines()), ax.get_title()
    assert list(axes[1].get_lines()[0].get_ydata()) == [0.1, 0.4, 0.3]


def test_contact_sheet_says_what_its_numbers_are(tmp_path, monkeypatch):
    from engine import plots
    Image.new("RGB", (40, 30), (90, 120, 200)).save(tmp_path / "a.png")
    titles = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: titles.append(fig._suptitle.get_text()))
    plots.plot_contact_sheet([str(tmp_path / "a.png")], ["a.png"], np.array([5.5]), tmp_path / "s.png", 1, gt_mean=np.array([6.0]))
    plots.plot_contact_sheet([str(tmp_path / "a.png")], ["a.png"], np.array([5.5]), tmp_path / "s.png", 1)
    assert titles == ["predicted mean score (true mean)", "predicted mean score"]

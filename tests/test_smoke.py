import pytest
from conftest import run_main, run_test, tiny_train_args


@pytest.mark.slow
def test_train_then_predict(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt)) == 0
    for name in ("best.pth", "last.pth", "metrics.jsonl"):
        assert (ckpt / name).exists()
    out = tmp_path / "pred"
    assert run_test(["--model", ckpt / "best.pth", "--test_csv", demo_data / "test_labels.csv",
                     "--test_images", demo_data / "images", "--predictions", out, "--workers", "0", "--quiet"]) == 0
    assert (out / "pred.txt").read_text().count("\n") == 9

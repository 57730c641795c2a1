"""tools.calibrate on labelled sets (the minimum of images at, below and one past, with and
without unreadable ones; a bare state_dict becoming a checkpoint of ours), and the
percentiles it stores as the Scorer, POST /score and GET /model give them."""
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Server, hand_percentile, hand_quantiles, percentile_written_ok, read_rows, run_test
from engine.score.scorer import Scorer
from model import build_model, default_model_args
from model.card import MIN_PERCENTILE_IMAGES, read_card, summary_line
from serving import ServeConfig
from serving.service import ScoringService
from tools import calibrate, make_demo_data


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """60 labelled procedural photos (all rows of one make_demo_data set) and an unreadable one."""
    data = tmp_path_factory.mktemp("calib")
    make_demo_data.main(["--out", str(data), "--num_images", "60", "--seed", "3"])
    rows = sorted(line for split in ("train", "val", "test") for line in (data / f"{split}_labels.csv").read_text().splitlines())
    (data / "images" / "broken.jpg").write_bytes(b"\xff\xd8 cut short")
    return data, rows, "broken," + ",".join(["1"] * 10)


def write_csv(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def calibrate_args(model, csv, images, out, *extra):
    return ["--model", str(model), "--csv", str(csv), "--img_path", str(images), "--out", str(out), "--num_workers", "0",
            "--quiet", *map(str, extra)]


@pytest.mark.slow
def test_calibrate_writes_the_quantiles_of_the_sets_predictions(photos, tiny_ckpt, tmp_path, capsys):
    data, rows, _ = photos
    csv = write_csv(tmp_path / "set.csv", rows[:MIN_PERCENTILE_IMAGES])
    original = tiny_ckpt.read_bytes()
    out = tmp_path / "calibrated.pth"
    assert calibrate.main(calibrate_args(tiny_ckpt, csv, data / "images", out)) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}: percentiles from {MIN_PERCENTILE_IMAGES} images" in stdout and "SRCC mean" in stdout
    assert tiny_ckpt.read_bytes() == original  # the original is never touched
    # Expected: the quantiles, by hand, of the means test.py gives the same photos with the original weights.
    assert run_test(["--model", tiny_ckpt, "--test_csv_file", csv, "--test_images", data / "images",
                     "--predictions", tmp_path / "orig", "--quiet"]) == 0
    means = [float(r["mean"]) for r in read_rows(tmp_path / "orig")]
    card = read_card(out)
    pct = card["percentiles"]
    assert pct["images"] == MIN_PERCENTILE_IMAGES and pct["csv"] == "set.csv" and pct["set"] == "calibration"
    assert pct["quantiles"] == pytest.approx(hand_quantiles(means), abs=2e-6)
    assert all(np.isfinite(pct[k]) for k in ("emd", "srcc_mean", "plcc_mean", "accuracy"))
    assert card["kind"] == "older checkpoint" and card["date"] is not None
    new, old = (torch.load(p, map_location="cpu", weights_only=True) for p in (out, tiny_ckpt))
    assert new["model_args"] == old["model_args"] and all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    # test.py with the calibrated checkpoint: the same means, now with their percentiles.
    assert run_test(["--model", out, "--test_csv_file", csv, "--test_images", data / "images",
                     "--predictions", tmp_path / "new", "--quiet"]) == 0
    for r, mean in zip(read_rows(tmp_path / "new"), means):
        assert float(r["mean"]) == mean
        assert percentile_written_ok(mean, float(r["percentile"]), pct["quantiles"]), (r, mean)
    # The Scorer: the same percentile, unrounded.
    scorer = Scorer.from_checkpoint(out, device="cpu")
    paths = [data / "images" / f"{line.split(',')[0]}.jpg" for line in rows[:5]]
    for s in scorer.score(paths):
        assert s.percentile == pytest.approx(hand_percentile(s.mean, pct["quantiles"]), abs=1e-9)
    assert scorer.explain(paths[0])[1].percentile == pytest.approx(scorer.score(paths[0]).percentile, abs=1e-6)
    assert all(s.percentile is None for s in Scorer.from_checkpoint(tiny_ckpt, device="cpu").score(paths[:2]))


@pytest.mark.slow
@pytest.mark.parametrize("good,broken,code,written", [
    (MIN_PERCENTILE_IMAGES - 1, 0, 2, None),                    # too few rows: refused before scoring
    (MIN_PERCENTILE_IMAGES - 1, 1, 1, None),                    # enough rows, one readable too few: nothing written
    (MIN_PERCENTILE_IMAGES, 1, 1, MIN_PERCENTILE_IMAGES),       # written from the readable ones, the bad one named
    (MIN_PERCENTILE_IMAGES + 1, 0, 0, MIN_PERCENTILE_IMAGES + 1)])
def test_calibrate_needs_enough_readable_images(photos, tiny_ckpt, tmp_path, capsys, good, broken, code, written):
    data, rows, broken_row = photos
    csv = write_csv(tmp_path / "set.csv", rows[:good] + [broken_row] * broken)
    out = tmp_path / "calibrated.pth"
    assert calibrate.main(calibrate_args(tiny_ckpt, csv, data / "images", out)) == code
    err = capsys.readouterr().err
    assert out.exists() is (written is not None)
    if written is not None:
        assert read_card(out)["percentiles"]["images"] == written
    if broken and code == 1:
        assert "broken.jpg" in err
    if code == 2:
        assert f"has {good} image(s); percentiles need at least {MIN_PERCENTILE_IMAGES}" in err
    elif written is None:
        assert f"only {good} of the {good + broken} images" in err and "nothing written" in err


def test_calibrate_usage_errors(photos, tiny_ckpt, tmp_path, capsys):
    data, rows, _ = photos
    csv = write_csv(tmp_path / "set.csv", rows)
    for args, words in ((calibrate_args(tiny_ckpt, csv, data / "images", tiny_ckpt), "is --model"),
                        (calibrate_args(tiny_ckpt, csv, data / "images", tmp_path / "no" / "x.pth"), "does not exist"),
                        (calibrate_args(tiny_ckpt, csv, tmp_path / "none", tmp_path / "x.pth"), "--img_path"),
                        (calibrate_args(tiny_ckpt, csv, data / "images", tmp_path / "x.pth", "--batch_size", "0"), "--batch_size"),
                        (calibrate_args(tmp_path / "missing.pth", csv, data / "images", tmp_path / "x.pth"), "missing.pth"),
                        (calibrate_args(tiny_ckpt, tmp_path / "missing.csv", data / "images", tmp_path / "x.pth"), "missing.csv"),
                        (calibrate_args(tiny_ckpt, csv, data / "images", tmp_path / "x.pth", "--score_range", "1", "5"),
                         "--score_range goes with --label_format mos"),
                        (calibrate_args(tiny_ckpt, csv, data / "images", tmp_path / "x.pth", "--label_format", "mos"),
                         "needs --score_range")):
        assert calibrate.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_calibrate_takes_mos_labels(photos, tiny_ckpt, tmp_path, capsys):
    """A MOS CSV (image_id,mos on 1..5): read with --label_format mos --score_range; the
    figures kept, the quantiles those of the predicted means (bins 1..10, as predictions.csv's `mean`)."""
    data, rows, _ = photos
    ids = [line.split(",")[0] for line in rows[:MIN_PERCENTILE_IMAGES]]
    csv = write_csv(tmp_path / "mos.csv", ["image_id,mos"] + [f"{i},{1 + 4 * n / len(ids):.3f}" for n, i in enumerate(ids)])
    out = tmp_path / "mos.pth"
    assert calibrate.main(calibrate_args(tiny_ckpt, csv, data / "images", out, "--label_format", "mos",
                                         "--score_range", "1", "5")) == 0
    pct = read_card(out)["percentiles"]
    assert pct["images"] == MIN_PERCENTILE_IMAGES and np.isfinite(pct["srcc_mean"]) and np.isfinite(pct["emd"])
    assert "SRCC mean" in capsys.readouterr().out  # the set's table
    assert run_test(["--model", tiny_ckpt, "--test_images", data / "images", "--predictions", tmp_path / "p",
                     "--quiet"]) == 1  # the folder's broken.jpg
    means = {r["image_id"]: float(r["mean"]) for r in read_rows(tmp_path / "p")}
    assert pct["quantiles"] == pytest.approx(hand_quantiles([means[f"{i}.jpg"] for i in ids]), abs=2e-6)


@pytest.mark.slow
def test_a_calibrated_bare_state_dict_becomes_a_checkpoint_of_ours(tmp_path, capsys):
    """The reference's format (random VGG16 weights): the new file records the release
    --normalize named, and loads without the flag."""
    torch.manual_seed(0)
    state = build_model(default_model_args("vgg16")).state_dict()
    torch.save(state, tmp_path / "epoch-34.pth")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for n in range(MIN_PERCENTILE_IMAGES):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{n}.png")
    csv = write_csv(tmp_path / "set.csv", [str(n) for n in range(MIN_PERCENTILE_IMAGES)])  # ids only
    out = tmp_path / "calibrated.pth"
    assert calibrate.main(calibrate_args(tmp_path / "epoch-34.pth", csv, tmp_path / "images", out,
                                         "--normalize", "imagenet", "--batch_size", "10")) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["normalize"] == "imagenet" and all(torch.equal(ckpt["model"][k], v) for k, v in state.items())
    card = read_card(out)  # no --normalize: the file now says which release it is
    assert card["kind"] == "released" and "June 2021" in card["release"] and card["normalize"] == "imagenet"
    assert card["toy"] is False and card["percentiles"]["images"] == MIN_PERCENTILE_IMAGES
    assert "emd" not in card["percentiles"]  # ids only: no figures
    line = summary_line(card)
    assert "June 2021 release, epoch-34.pth (--normalize imagenet)" in line
    assert line.endswith(f"percentiles from {MIN_PERCENTILE_IMAGES} calibration images of set.csv")
    assert capsys.readouterr().out.splitlines()[0] == summary_line(read_card(tmp_path / "epoch-34.pth", "imagenet"))


def test_get_model_carries_the_card_with_its_verdict(tiny_ckpt):
    """What GET /model answers, built without a server: the card under `card`, with
    `toy` and `warning`; the summary line the server prints at start."""
    scorer = Scorer.from_checkpoint(tiny_ckpt, device="cpu")
    info = ScoringService(scorer, ServeConfig(checkpoint="tiny.pth", workers=1), "cpu").model_info()
    assert info["card"]["toy"] is False and info["card"]["warning"] is None
    assert info["card"]["kind"] == "older checkpoint" and info["card"] == read_card(tiny_ckpt)


@pytest.mark.slow
@pytest.mark.subprocess
def test_serve_prints_the_card_and_answers_percentiles(photos, tiny_ckpt, tmp_path):
    """serve.py with a calibrated toy model: the card's line and one warning at start;
    GET /model's card with toy true; POST /score's percentile as the card's quantiles give it."""
    data, rows, _ = photos
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["args"] = {"pretrained": "none"}  # a from-scratch run (what its flags would record)
    torch.save(ckpt, tmp_path / "scratch.pth")
    assert calibrate.main(calibrate_args(tmp_path / "scratch.pth", write_csv(tmp_path / "set.csv", rows), data / "images",
                                         tmp_path / "toy.pth")) == 0
    quantiles = read_card(tmp_path / "toy.pth")["percentiles"]["quantiles"]
    server = Server(tmp_path / "toy.pth", tmp_path / "serve.log").wait_ready()
    try:
        output = server.output()
        assert output.count("warning: toy model: tiny_cnn trained from scratch") == 1
        assert "model: tiny_cnn (from scratch), written before checkpoints carried a model card" in output
        info = httpx.get(server.url + "/model", timeout=60).json()
        assert info["card"]["toy"] is True and info["card"]["warning"].startswith("toy model: tiny_cnn")
        assert info["card"]["percentiles"]["quantiles"] == quantiles and str(tmp_path) not in json.dumps(info)
        image = data / "images" / f"{rows[0].split(',')[0]}.jpg"
        answer = httpx.post(server.url + "/score", files=[("file", ("a.jpg", image.read_bytes(), "image/jpeg"))],
                            timeout=60)
        result = answer.json()["results"][0]
        assert answer.status_code == 200
        assert result["percentile"] == pytest.approx(hand_percentile(result["mean"], quantiles), abs=1e-9)
    finally:
        server.stop()

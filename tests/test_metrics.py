"""The paper's evaluation (README, "Evaluating like the paper"): values against scipy, against the plain
definitions and hand-computed cases, on the reference's published predictions, and as
main.py / test.py use them."""
import json
import math
import os
import csv
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import ROOT, run_main, run_test, tiny_checkpoint, tiny_train_args
from engine.score.predictions import write_predictions
from tools.pred_txt import read_pred_txt
from engine.metrics import PAPER_VGG16, compute_metrics, format_table, mean_and_std, plcc, score_metrics, srcc

ALL_KEYS = {"n", "emd", "emd_r1", "srcc_mean", "plcc_mean", "srcc_std", "plcc_std", "accuracy", "mae_mean", "rmse_mean"}
REFERENCE_PREDS = os.path.join(ROOT, "tests", "data", "reference_pred.txt")


def delta(score, weight=1.0, other=None):
    """A distribution over ratings 1..10 with `weight` on `score` (and the rest on `other`)."""
    p = np.zeros(10)
    p[score - 1] += weight
    if other is not None:
        p[other - 1] += 1.0 - weight
    return p


def pearson_by_definition(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_correlations_match_scipy_and_definition_with_ties():
    rng = np.random.default_rng(0)
    for n in (7, 100, 2000):
        # One decimal: many ties, as in real mean scores printed to 1-3 decimals.
        a = np.round(rng.normal(5.4, 0.7, n), 1)
        b = np.round(0.6 * a + rng.normal(0, 0.5, n), 1)
        assert len(np.unique(a)) < n  # ties present
        assert srcc(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
        assert plcc(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-9)
        # Independently of scipy: Spearman = Pearson of average ranks.
        ra, rb = stats.rankdata(a), stats.rankdata(b)
        assert srcc(a, b) == pytest.approx(pearson_by_definition(ra, rb), abs=1e-9)
        assert plcc(a, b) == pytest.approx(pearson_by_definition(a, b), abs=1e-9)


def test_compute_metrics_means_and_stds_match_scipy():
    rng = np.random.default_rng(1)
    true = rng.dirichlet(np.ones(10) * 3, 300)
    pred = rng.dirichlet(np.ones(10) * 3, 300)
    pred[150:200] = pred[100:150]  # duplicated rows: tied predicted means and stds
    m = compute_metrics(pred, true)
    assert set(m) == ALL_KEYS
    scores = np.arange(1, 11)
    pm, tm = pred @ scores, true @ scores
    ps = np.sqrt((pred * (scores - pm[:, None]) ** 2).sum(1))
    ts = np.sqrt((true * (scores - tm[:, None]) ** 2).sum(1))
    assert m["srcc_mean"] == pytest.approx(stats.spearmanr(pm, tm).statistic, abs=1e-9)
    assert m["plcc_mean"] == pytest.approx(stats.pearsonr(pm, tm).statistic, abs=1e-9)
    assert m["srcc_std"] == pytest.approx(stats.spearmanr(ps, ts).statistic, abs=1e-9)
    assert m["plcc_std"] == pytest.approx(stats.pearsonr(ps, ts).statistic, abs=1e-9)
    # EMD is the training loss's code, which runs in float32 by design: 1e-7 is its precision.
    cdf = np.abs(np.cumsum(pred, 1) - np.cumsum(true, 1))
    assert m["emd"] == pytest.approx(np.mean(np.sqrt((cdf ** 2).mean(1))), abs=1e-7)
    assert m["emd_r1"] == pytest.approx(np.mean(cdf.mean(1)), abs=1e-7)
    assert m["n"] == 300


def test_hand_computed_small_cases():
    # CDF differences: rows 1 and 2 differ by 1 at the first bin only -> EMD_1 = 1/10,
    # EMD_2 = sqrt(1/10); at bins 1..9 for the 1-vs-10 row -> 9/10 and sqrt(9/10).
    pred = np.stack([delta(1), delta(1)])
    true = np.stack([delta(2), delta(10)])
    with pytest.warns(RuntimeWarning):  # two identical predictions: correlations undefined
        m = compute_metrics(pred, true)
    assert m["emd_r1"] == pytest.approx((0.1 + 0.9) / 2, abs=1e-7)  # float32 EMD, as in training
    assert m["emd"] == pytest.approx((math.sqrt(0.1) + math.sqrt(0.9)) / 2, abs=1e-7)

    # Means 5.0 | 5.01 | 4.0 | 6.0 against 5.0 | 5.0 | 5.5 | 6.0. "High" is strictly above 5
    # on both sides: high? pred F T F T, true F F T T -> agreement on images 1 and 4 only.
    pred = np.stack([delta(5), delta(5, 0.99, 6), delta(4), delta(6)])
    true = np.stack([delta(5), delta(5), delta(5, 0.5, 6), delta(6)])
    m = compute_metrics(pred, true)
    assert set(m) == ALL_KEYS
    assert m["n"] == 4
    assert m["accuracy"] == 0.5
    assert m["mae_mean"] == pytest.approx((0 + 0.01 + 1.5 + 0) / 4, abs=1e-12)
    assert m["rmse_mean"] == pytest.approx(math.sqrt((0.01 ** 2 + 1.5 ** 2) / 4), abs=1e-12)
    pm, ps = mean_and_std(pred)
    assert np.allclose(pm, [5.0, 5.01, 4.0, 6.0]) and np.allclose(ps, [0, math.sqrt(0.99 * 0.01), 0, 0])
    assert mean_and_std(true)[1][2] == pytest.approx(0.5)

    # Ranks by hand: b swaps the middle pair -> sum d^2 = 2 -> 1 - 6*2/(4*15) = 0.8; with
    # ranks equal to the values, Pearson is 0.8 as well.
    assert srcc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert plcc([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    # A tie gets the average rank: a -> 1, 2.5, 2.5, 4; Pearson of ranks = 4.5 / sqrt(4.5 * 5).
    assert srcc([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=1e-12)
    # score_metrics alone (what a pred.txt holds) agrees with compute_metrics.
    s = score_metrics([5.0, 5.01, 4.0, 6.0], [5.0, 5.0, 5.5, 6.0])
    assert s["accuracy"] == 0.5 and s["n"] == 4 and "srcc_std" not in s


def test_constant_inputs_give_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(srcc([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]))
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(plcc([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(srcc([1.0], [2.0]))
    # A model that predicts the same distribution for every image: correlations are
    # undefined, everything else is still reported.
    true = np.random.default_rng(2).dirichlet(np.ones(10), 20)
    pred = np.tile(delta(5, 0.5, 6), (20, 1))
    with pytest.warns(RuntimeWarning):
        m = compute_metrics(pred, true)
    assert all(math.isnan(m[k]) for k in ("srcc_mean", "plcc_mean", "srcc_std", "plcc_std"))
    assert all(math.isfinite(m[k]) for k in ("emd", "emd_r1", "accuracy", "mae_mean", "rmse_mean"))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(pred, true[:10])


def test_reference_published_predictions():
    preds = read_pred_txt(REFERENCE_PREDS)
    assert len(preds.ids) == len(set(preds.ids)) == 12818
    assert preds.ids[0] == "953844" and preds.mean[0] == 5.962 and preds.std[0] == 1.420 and preds.gt_mean[0] == 5.914
    m = score_metrics(preds.mean, preds.gt_mean)
    assert m["n"] == 12818
    assert m["srcc_mean"] == pytest.approx(0.6013, abs=1e-4)
    assert m["plcc_mean"] == pytest.approx(0.6165, abs=1e-4)
    assert m["accuracy"] == pytest.approx(0.7744, abs=1e-4)


def test_pred_txt_round_trip_and_bad_lines(tmp_path):
    rng = np.random.default_rng(3)
    ids = ["953844", "sub dir/my photo.jpg", "a.png"]  # ids may hold spaces and folders
    pred, true = rng.dirichlet(np.ones(10), 3), rng.dirichlet(np.ones(10), 3)
    write_predictions(tmp_path / "with_gt", ids, pred, true)
    back = read_pred_txt(tmp_path / "with_gt" / "pred.txt")
    assert back.ids == ids
    pm, ps = mean_and_std(pred)
    assert np.allclose(back.mean, pm, atol=5e-4) and np.allclose(back.std, ps, atol=5e-4)
    # The same by hand: the mean and std of each distribution over ratings 1..10.
    scores = np.arange(1, 11)
    assert np.allclose(back.mean, pred @ scores, atol=5e-4)
    assert np.allclose(back.std, np.sqrt((pred * (scores - (pred @ scores)[:, None]) ** 2).sum(1)), atol=5e-4)
    assert np.allclose(back.gt_mean, true @ scores, atol=5e-4)
    assert np.allclose(back.gt_mean, mean_and_std(true)[0], atol=5e-4)
    write_predictions(tmp_path / "no_gt", ids, pred)
    back = read_pred_txt(tmp_path / "no_gt" / "pred.txt")
    assert back.ids == ids and back.gt_mean is None and np.allclose(back.mean, pm, atol=5e-4)

    bad = tmp_path / "bad.txt"
    bad.write_text("1 mean: 5.0 | std: 1.0 | GT: 5.1\n\n2 mean: five | std: 1.0 | GT: 5.1\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: expected"):
        read_pred_txt(bad)
    bad.write_text("1 mean: 5.0 | std: 1.0 | GT: 5.1\n2 mean: 5.0 | std: 1.0\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: no '\| GT' part"):
        read_pred_txt(bad)


def test_format_table_has_this_run_and_the_paper_row():
    m = compute_metrics(np.stack([delta(4, 0.9, 5), delta(6, 0.6, 7), delta(7)]),
                        np.stack([delta(5), delta(6, 0.7, 5), delta(8, 0.5, 9)]))
    table = format_table(m)
    lines = table.splitlines()
    assert lines[1].startswith("this run") and lines[2].startswith("paper VGG16")
    assert f"{m['srcc_mean']:.4f}" in lines[1] and f"{PAPER_VGG16['srcc_mean']:.4f}" in lines[2]
    assert "n = 3 images" in table


def test_monitor_val_srcc_mean_chooses_best_pth(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_main(tiny_train_args(demo_data, ckpt, "--monitor", "val_srcc_mean", "--epochs", "3",
                                    "--early_stopping_patience", "10")) == 0
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert {f"val_{k}" for k in ALL_KEYS} <= set(r)
    # epoch-N.pth exactly where val_srcc_mean beat every earlier epoch; best.pth the last of those.
    best, improved = -math.inf, []
    for r in records:
        if math.isfinite(r["val_srcc_mean"]) and r["val_srcc_mean"] > best:
            best, improved = r["val_srcc_mean"], improved + [r["epoch"]]
    assert improved, "no finite val_srcc_mean in a 3-epoch run"
    assert sorted(int(p.stem.split("-")[1]) for p in ckpt.glob("epoch-*.pth")) == improved
    saved = torch.load(ckpt / "best.pth", weights_only=True)
    assert saved["epoch"] == improved[-1] and saved["monitor"] == "val_srcc_mean"
    assert saved["best_value"] == pytest.approx(best)  # the metric's own value, not sign-adjusted
    # The curves show the monitored metric in a third panel: 3 x 500 by 380 pixels.
    from PIL import Image
    with Image.open(ckpt / "snapshots" / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1500, 380)


def test_test_py_with_labels_writes_metrics_json_and_prints_table(demo_data, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "pred"
    assert run_test(["--model", ckpt, "--test_csv", demo_data / "test_labels.csv", "--test_images",
                     demo_data / "images", "--predictions", out, "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == ALL_KEYS | {"model_args", "card"}  # the preprocessing the scores were made with, the model card
    assert metrics.pop("model_args")["base_model"] == "tiny_cnn"
    assert metrics.pop("card")["kind"] == "older checkpoint"  # tiny_checkpoint writes no card
    assert metrics["n"] == 9  # every test image once
    assert "paper VGG16" in printed and "this run" in printed and "SRCC mean" in printed
    assert format_table(metrics) in printed
    # metrics.json agrees with the predictions written beside it (6 decimals there).
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = score_metrics([float(r["mean"]) for r in rows], [float(r["gt_mean"]) for r in rows])
    assert all(np.isfinite(metrics[key]) for key in ALL_KEYS)
    for key in ("srcc_mean", "accuracy", "mae_mean"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-5)


def test_test_py_metrics_recomputed_from_the_label_csv_and_predictions_csv(demo_data, tmp_path):
    """Every figure of metrics.json recomputed here from the files alone, without the
    project's metrics code: the true distributions from the CSV's vote counts, the
    predicted ones from predictions.csv, correlations by scipy. The head's weights are
    spread so the predictions differ by more than predictions.csv's 6 decimals can blur."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", seed=1)
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["classifier.1.weight"] = saved["model"]["classifier.1.weight"] * 100
    torch.save(saved, ckpt)
    out = tmp_path / "pred"
    assert run_test(["--model", ckpt, "--test_csv", demo_data / "test_labels.csv", "--test_images",
                     demo_data / "images", "--predictions", out, "--workers", "0", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(demo_data / "test_labels.csv", newline="") as f:
        votes = {row[0]: np.array([float(v) for v in row[1:11]]) for row in csv.reader(f)}
    assert sorted(r["image_id"] for r in rows) == sorted(votes)
    scores = np.arange(1, 11)
    true = np.stack([votes[r["image_id"]] / votes[r["image_id"]].sum() for r in rows])
    pred = np.array([[float(r[f"p{k}"]) for k in scores] for r in rows])
    pm, tm = pred @ scores, true @ scores
    assert pm.max() - pm.min() > 0.5  # spread predictions: the comparison below is meaningful
    ps = np.sqrt((pred * (scores - pm[:, None]) ** 2).sum(1))
    ts = np.sqrt((true * (scores - tm[:, None]) ** 2).sum(1))
    assert np.allclose([float(r["mean"]) for r in rows], pm, atol=1e-5)
    assert np.allclose([float(r["std"]) for r in rows], ps, atol=1e-5)
    assert np.allclose([float(r["gt_mean"]) for r in rows], tm, atol=1e-5)
    assert np.allclose([float(r["gt_std"]) for r in rows], ts, atol=1e-5)
    cdf = np.abs(np.cumsum(pred, 1) - np.cumsum(true, 1))
    by_hand = {"n": len(rows), "emd": np.sqrt((cdf ** 2).mean(1)).mean(), "emd_r1": cdf.mean(1).mean(),
               "srcc_mean": stats.spearmanr(pm, tm).statistic, "plcc_mean": stats.pearsonr(pm, tm).statistic,
               "srcc_std": stats.spearmanr(ps, ts).statistic, "plcc_std": stats.pearsonr(ps, ts).statistic,
               "accuracy": np.mean((pm > 5) == (tm > 5)), "mae_mean": np.abs(pm - tm).mean(),
               "rmse_mean": np.sqrt(((pm - tm) ** 2).mean())}
    assert set(by_hand) == ALL_KEYS
    for key, value in by_hand.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-5), key

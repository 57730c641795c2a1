"""MOS labels: the maximum-entropy targets (dataset/maxent.py) against independent
computations, the MOS CSV reader (dataset/mos.py), and a tiny end-to-end training on a
generated MOS data set scored by test.py on the data set's own scale."""
import csv
import json
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from scipy.stats import pearsonr, spearmanr

from conftest import run_main, run_test, tiny_train_args
from dataset.label_text import LabelFileError
from dataset.maxent import TOLERANCE, maxent_distributions, moments, std_bounds
from dataset.mos import from_bins, read_mos_csv, to_bins

BINS = np.arange(1, 11, dtype=np.float64)


def entropy(p):
    return float(-np.sum(p * np.log(np.maximum(p, 1e-300))))


def scipy_maxent(mean, std=None):
    """The distribution of maximum entropy found by a generic constrained optimiser."""
    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1}, {"type": "eq", "fun": lambda p: p @ BINS - mean}]
    if std is not None:
        cons.append({"type": "eq", "fun": lambda p: p @ (BINS - mean) ** 2 - std ** 2})
    result = minimize(lambda p: -entropy(p), np.full(10, 0.1), jac=lambda p: np.log(np.maximum(p, 1e-300)) + 1,
                      method="SLSQP", bounds=[(0, 1)] * 10, constraints=cons, options={"ftol": 1e-14, "maxiter": 1000})
    return result.x


def extreme_variance(mean, largest):
    """With the mean fixed the variance is linear in p: a linear programme gives the
    distribution of smallest (or largest) variance, which is unique."""
    result = linprog(-(BINS ** 2) if largest else BINS ** 2, A_eq=np.stack([np.ones(10), BINS]), b_eq=[1, mean],
                     bounds=[(0, 1)] * 10, method="highs")
    assert result.success
    return result.x


MEANS = [1.3, 2.0, 2.5, 4.75, 5.5, 7.0, 9.9]


@pytest.mark.parametrize("mean", MEANS)
def test_reachable_targets_match_a_generic_optimiser_and_are_exact(mean):
    low, high = std_bounds(mean, 10)
    stds = [float(low + f * (high - low)) for f in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98)]
    result = maxent_distributions([mean] * len(stds), stds)
    assert not result.clipped.any()
    for row, std in zip(result.dists, stds):
        m, s = moments(row[None])
        assert abs(m[0] - mean) < TOLERANCE and abs(s[0] - std) < TOLERANCE
        reference = scipy_maxent(mean, std)
        assert np.abs(row - reference).max() < 1e-4, (mean, std)
        assert entropy(row) >= entropy(reference) - 1e-9  # nothing with these moments has more entropy


def test_mean_only_targets_match_a_generic_optimiser():
    means = [1.0, 1.01, 2.2, 5.5, 7.77, 9.99, 10.0]
    result = maxent_distributions(means)
    for row, mean in zip(result.dists, means):
        assert abs(row @ BINS - mean) < TOLERANCE
        assert np.abs(row - scipy_maxent(mean)).max() < 1e-4, mean
    assert result.dists[0, 0] == 1 and result.dists[-1, -1] == 1  # the end bins: a point mass
    assert not result.clipped.any()


@pytest.mark.parametrize("mean", [1.0, 1.3, 2.0, 4.75, 5.5, 9.9, 10.0])
def test_unreachable_stds_get_the_closest_reachable_distribution_and_are_counted(mean):
    low, high = std_bounds(mean, 10)
    too_small, too_large = [0.0, low * 0.5, max(low - 0.01, 0.0)], [high + 0.01, high * 1.5 + 0.1, 9.0]
    stds = too_small + [low, high] + too_large
    result = maxent_distributions([mean] * len(stds), stds)
    smallest, largest = extreme_variance(mean, largest=False), extreme_variance(mean, largest=True)
    for row, std, got in zip(result.dists, stds, result.std):
        closest = smallest if std <= low else largest
        assert np.abs(row - closest).max() < 1e-9, (mean, std)
        assert abs(row @ BINS - mean) < TOLERANCE
    # Only the stds out of reach by more than the tolerance are counted (the bounds themselves are reached).
    expected = [abs(s - low) > TOLERANCE if s <= low else abs(s - high) > TOLERANCE for s in stds]
    assert result.clipped.tolist() == expected


def test_near_the_bounds_the_targets_are_still_exact():
    rng = np.random.default_rng(1)
    mean = rng.uniform(1, 10, 4000)
    low, high = std_bounds(mean, 10)
    for gap in (1e-3, 1e-5, 2e-7):
        for std in (low + gap, high - gap):
            keep = std > low
            result = maxent_distributions(mean[keep], std[keep])
            assert np.abs(result.mean - mean[keep]).max() < TOLERANCE
            assert np.abs(result.std - std[keep]).max() < TOLERANCE and not result.clipped.any()


def test_speed_on_255000_rows():
    rng = np.random.default_rng(0)
    mean = rng.uniform(1, 10, 255_000)
    low, high = std_bounds(mean, 10)
    std = low + rng.uniform(0, 1, len(mean)) * (high - low)
    start, cpu = time.perf_counter(), time.process_time()
    result = maxent_distributions(mean, std)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"maximum-entropy targets of 255,000 (mean, std) rows: {seconds:.2f} s ({cpu:.2f} s of CPU); largest error: mean "
          f"{np.abs(result.mean - mean).max():.1e}, std {np.abs(result.std - std).max():.1e}")
    assert np.abs(result.mean - mean).max() < TOLERANCE and np.abs(result.std - std).max() < TOLERANCE
    assert seconds < 30


def test_score_range_maps_linearly_onto_the_bins():
    assert to_bins([1, 3, 5], (1, 5)).tolist() == [1, 5.5, 10]
    assert from_bins(to_bins([0.5, 42, 100], (0, 100)), (0, 100)) == pytest.approx([0.5, 42, 100])


def write(path, text):
    path.write_text(text)
    return path


def test_mos_csv_with_and_without_std_and_header(demo_data, tmp_path):
    images = demo_data / "images"
    with_std = read_mos_csv(write(tmp_path / "a.csv", "image_id,mos,std\ndemo00000,4.5,0.5\ndemo00001,1,0\n"), images, (1, 5))
    assert with_std.ids == ["demo00000", "demo00001"] and with_std.lines == [2, 3] and with_std.clipped == 0
    mean, std = moments(with_std.dists.astype(np.float64))
    assert mean == pytest.approx([1 + 9 * 3.5 / 4, 1], abs=1e-5) and std == pytest.approx([0.5 * 9 / 4, 0], abs=1e-5)
    mean_only = read_mos_csv(write(tmp_path / "b.csv", "demo00000,60\ndemo00001,12.5\n"), images, (0, 100))
    assert mean_only.std is None and mean_only.mos.tolist() == [60, 12.5]
    assert moments(mean_only.dists.astype(np.float64))[0] == pytest.approx(to_bins([60, 12.5], (0, 100)), abs=1e-5)
    ids_only = read_mos_csv(write(tmp_path / "c.csv", "demo00000\nnot_there\n"), images, (1, 5),
                            require_labels=False, require_images=False)
    assert ids_only.dists is None and ids_only.paths[1].endswith("not_there.jpg")


def test_mos_csv_reports_every_problem_with_line_and_column(demo_data, tmp_path):
    bad = write(tmp_path / "bad.csv", "image_id,mos,std\ndemo00000,5.5,0.3\ndemo00001,abc,1\ndemo00002,3,-1\n"
                                      "demo00003,3\ndemo00000,2,1\nmissing,2,1\n" + "demo00004" + ",1" * 10 + "\n")
    with pytest.raises(LabelFileError) as err:
        read_mos_csv(bad, demo_data / "images", (1, 5))
    text = str(err.value)
    for expected in ["bad.csv:2, column 2: MOS 5.5 is outside --score_range 1 5", "bad.csv:3, column 2: 'abc' is not a finite number",
                     "bad.csv:4, column 3: negative std -1", "bad.csv:6, column 1: duplicate image id 'demo00000' (first on line 2)",
                     "bad.csv:7, column 1: image 'missing' not found", "bad.csv:8: has 11 columns, expected 2 (image id, MOS) or 3",
                     "a distribution file"]:
        assert expected in text, expected
    mixed = write(tmp_path / "mixed.csv", "demo00000,3,1\ndemo00001,3\n")
    with pytest.raises(LabelFileError, match="1 with a MOS without std .first on line 2.*1 with a MOS and a std .first on line 1"):
        read_mos_csv(mixed, demo_data / "images", (1, 5))
    with pytest.raises(ValueError, match="--score_range 5 1: LO must be below HI"):
        read_mos_csv(mixed, demo_data / "images", (5, 1))


def test_unreachable_stds_are_counted_in_the_table(demo_data, tmp_path):
    # On 1..5 a MOS of 3 maps to bin 5.5: its std (in bins) is at least 0.5, so at least 0.5 * 4/9 on 1..5.
    table = read_mos_csv(write(tmp_path / "m.csv", "demo00000,3,0.01\ndemo00001,3,1\ndemo00002,1.5,3\n"), demo_data / "images", (1, 5))
    assert table.clipped == 2 and "line 1: MOS 3, std 0.01 -> 0.2222" in table.clipped_example


def mos_csvs(demo_data, folder, with_std=True, header=True):
    """The demo set's labels as MOS on a 1..5 scale: each vote histogram's mean and std
    mapped from 1..10 (what a quality data set would publish). Returns {split: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val", "test"):
        rows = list(csv.reader(open(demo_data / f"{split}_labels.csv")))
        votes = np.array([[float(v) for v in r[1:]] for r in rows])
        mean, std = moments(votes / votes.sum(axis=1, keepdims=True))
        lines = ["image_id,mos,std" if with_std else "image_id,mos"] if header else []
        for r, m, s in zip(rows, from_bins(mean, (1, 5)), std * 4 / 9):
            lines.append(f"{r[0]},{m:.6f}" + (f",{s:.6f}" if with_std else ""))
        paths[split] = folder / f"{split}.csv"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def test_training_on_mos_labels_and_scoring_on_the_data_sets_scale(demo_data, tmp_path, capsys):
    csvs, ckpt = mos_csvs(demo_data, tmp_path / "mos"), tmp_path / "ckpt"
    args = tiny_train_args(demo_data, ckpt, "--label_format", "mos", "--score_range", "1", "5", "--epochs", "2",
                           "--test", "--test_csv_file", csvs["test"])
    args[args.index("--train_csv_file") + 1], args[args.index("--val_csv_file") + 1] = csvs["train"], csvs["val"]
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert "on the data set's scale 1..5" in out
    saved = json.loads((ckpt / "test" / "metrics.json").read_text())
    assert saved["scaled"]["score_range"] == [1, 5] and saved["n"] == 9

    # test.py takes the label format and the range from the checkpoint.
    pred = tmp_path / "pred"
    assert run_test(["--model", ckpt / "best.pth", "--test_csv", csvs["test"], "--test_images", demo_data / "images",
                     "--predictions", pred, "--workers", "0", "--quiet"]) == 0
    rows = list(csv.DictReader(open(pred / "predictions.csv")))
    assert list(rows[0])[:4] == ["image_id", "mean", "mean_scaled", "std"] and "gt_mean_scaled" in rows[0]
    mos = {r[0]: float(r[1]) for r in list(csv.reader(open(csvs["test"])))[1:]}
    scaled = np.array([float(r["mean_scaled"]) for r in rows])
    assert scaled == pytest.approx([1 + (float(r["mean"]) - 1) * 4 / 9 for r in rows], abs=2e-6)
    # The metrics on 1..5 against the MOS as written in the CSV, computed here by hand.
    truth = np.array([mos[r["image_id"]] for r in rows])
    metrics = json.loads((pred / "metrics.json").read_text())
    assert metrics["scaled"]["srcc_mean"] == pytest.approx(spearmanr(scaled, truth)[0], abs=1e-5)
    assert metrics["scaled"]["plcc_mean"] == pytest.approx(pearsonr(scaled, truth)[0], abs=1e-5)
    assert metrics["scaled"]["mae_mean"] == pytest.approx(np.abs(scaled - truth).mean(), abs=1e-5)
    assert metrics["scaled"]["rmse_mean"] == pytest.approx(np.sqrt(((scaled - truth) ** 2).mean()), abs=1e-5)
    with capsys.disabled():
        print(f"\ntiny_cnn, 2 epochs on the demo set's labels as MOS 1..5 with std: test SRCC {metrics['srcc_mean']:.3f}, "
              f"on 1..5: MAE {metrics['scaled']['mae_mean']:.3f}, RMSE {metrics['scaled']['rmse_mean']:.3f}")

    # A flag overrides the checkpoint's range; a 10-bin CSV under --label_format mos is refused with a hint.
    assert run_test(["--model", ckpt / "best.pth", "--test_csv", csvs["test"], "--test_images", demo_data / "images",
                     "--predictions", pred, "--workers", "0", "--quiet", "--score_range", "0", "10"]) == 0
    assert json.loads((pred / "metrics.json").read_text())["scaled"]["score_range"] == [0, 10]
    capsys.readouterr()
    assert run_test(["--model", ckpt / "best.pth", "--test_csv", demo_data / "test_labels.csv", "--test_images",
                     demo_data / "images", "--predictions", pred, "--workers", "0", "--quiet"]) == 2
    assert "has 11 columns" in capsys.readouterr().err


def test_training_on_mos_without_std_and_counting_unreachable_stds(demo_data, tmp_path, capsys):
    csvs, ckpt = mos_csvs(demo_data, tmp_path / "mos", with_std=False, header=False), tmp_path / "ckpt"
    args = tiny_train_args(demo_data, ckpt, "--label_format", "mos", "--score_range", "1", "5", "--epochs", "1")
    args[args.index("--train_csv_file") + 1], args[args.index("--val_csv_file") + 1] = csvs["train"], csvs["val"]
    assert run_main(args) == 0
    assert torch.load(ckpt / "last.pth", weights_only=True)["args"]["score_range"] == [1.0, 5.0]
    # A std no distribution on 10 bins has at its MOS: trained on the closest, and said so.
    lines = (demo_data / "train_labels.csv").read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("".join(f"{line.split(',')[0]},3,{0.01 if k == 0 else 1}\n" for k, line in enumerate(lines)))
    args[args.index("--train_csv_file") + 1] = bad
    args[args.index("--val_csv_file") + 1] = mos_csvs(demo_data, tmp_path / "mos2")["val"]
    assert run_main(args + ["--ckpt_path", tmp_path / "ckpt2"]) == 0
    assert f"bad.csv: 1 of {len(lines)} rows have a std that 10 bins cannot reach" in capsys.readouterr().out

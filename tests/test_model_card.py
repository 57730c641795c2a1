"""The model card (model/card.py, engine/train/card.py): its fields after a real training
run, checked against metrics.jsonl and the label files; a resume keeps and updates it;
checkpoints without one still load and say what is unknown; the percentiles against
quantiles computed by hand from the validation predictions; the toy warning, said once,
for a model trained from scratch and not for one marked as pretrained on enough images."""
import contextlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, hand_percentile, hand_quantiles, percentile_written_ok, read_rows, run_main, run_test, tiny_train_args
from model import save_checkpoint
from model.card import (MIN_PERCENTILE_IMAGES, TOY_MIN_IMAGES, empty_card, finish, full_text, percentiles, quantiles_of,
                        read_card, released_card, summary_line)
from engine.train.card import saved
from tools import enhance, make_demo_data, model_card

FIGURES = ("val_emd", "val_srcc_mean", "val_plcc_mean", "val_accuracy")


# ---- helpers ------------------------------------------------------------------------------

def strictly_lower_share(x, values):
    return 100.0 * sum(v < x for v in values) / len(values)


def captured(fn, *args):
    """(return value, stdout, stderr) of fn(*args)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = fn(*args)
    return value, out.getvalue(), err.getvalue()


def card_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["card"]


def head_commit():
    run = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


# ---- percentiles and the toy verdict, by hand -----------------------------------------------

def test_quantiles_and_percentiles_against_hand_computed_values():
    rng = np.random.default_rng(0)
    values = list(np.round(rng.normal(5.0, 0.6, 137), 2)) + [5.0] * 30  # ties: 30 images scored exactly 5.0
    q = quantiles_of(values)
    assert len(q) == 101 and q == pytest.approx(hand_quantiles(values), abs=1e-12)
    plateau = [k for k in range(101) if q[k] == 5.0]
    assert len(plateau) >= 10  # the tied block spans many levels
    xs = [min(values) - 1, q[0], q[0] + 1e-9, q[37], (q[37] + q[38]) / 2, 5.0, 5.0 + 1e-9, q[-2], q[-1], q[-1] + 1, 99.0]
    got = percentiles(xs, q)
    for x, p in zip(xs, got):
        assert p == pytest.approx(hand_percentile(x, q), abs=1e-9), x
        assert abs(p - strictly_lower_share(x, values)) <= 1 + 100 / len(values), x
    assert got[0] == 0 and got[1] == 0 and got[-1] == 100 and got[-3] == 100  # below / at the lowest; above the highest
    assert got[5] == pytest.approx(plateau[0])  # strictly lower: a photo scored like the tied block is placed below it
    assert got[6] > plateau[-1] - 1e-6         # just above the block: above all of it


@pytest.mark.parametrize("images,from_scratch,toy", [
    (TOY_MIN_IMAGES - 1, False, True), (TOY_MIN_IMAGES, False, False), (TOY_MIN_IMAGES + 1, False, False),
    (229_981, True, True), (None, False, False), (None, None, False), (None, True, True), (0, False, True)])
def test_toy_verdict_at_its_edges(images, from_scratch, toy):
    card = finish(dict(empty_card({"base_model": "vgg16", "image_size": 224, "resize_size": 256, "normalize": "imagenet"}),
                       images_total=images, from_scratch=from_scratch))
    assert card["toy"] is toy and (card["warning"] is not None) is toy
    if toy:
        assert card["warning"].startswith("toy model: vgg16 trained ")
        assert ("from scratch" in card["warning"]) is bool(from_scratch)
        assert ("on only" in card["warning"]) is (images is not None and images < TOY_MIN_IMAGES)
        if images is not None and images < TOY_MIN_IMAGES:
            assert f"on only {images:,} images" in card["warning"]


@pytest.mark.parametrize("normalize,release", [(None, "2018-2020"), ("none", "2018-2020"), ("imagenet", "June 2021")])
def test_a_bare_state_dict_is_the_release_that_normalize_names(tmp_path, normalize, release):
    path = tmp_path / "bare.pth"
    torch.save({"features.0.weight": torch.zeros(1), "classifier.1.weight": torch.zeros(1)}, path)
    card = read_card(path, normalize)
    assert card["kind"] == "released" and card["normalize"] == (normalize or "none") and release in card["release"]
    assert card["toy"] is False and card["warning"] is None and card["train_csv"] is None and card["best"] is None
    assert ("assumed" in card["note"]) is (normalize is None) and "the rest is unknown" in card["note"]
    line = summary_line(card)
    assert release in line and f"--normalize {normalize or 'none'}" in line and "no percentiles" in line
    assert released_card(normalize) == card


def test_mid_epoch_checkpoints_carry_no_percentiles():
    card = dict(empty_card({"base_model": "tiny_cnn", "image_size": 32, "resize_size": 40, "normalize": "imagenet"}),
                percentiles={"quantiles": list(range(101)), "images": 60, "csv": "val.csv", "set": "validation"})
    assert saved(card)["percentiles"] == card["percentiles"]
    assert saved(card, mid_epoch=True)["percentiles"] is None and card["percentiles"] is not None


# ---- a real training run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny_cnn trained from scratch (--train --test) for 2 epochs on 130 procedural
    images, 58 of them for validation, with one unreadable training and one unreadable
    validation image; then resumed to epoch 3. The cards after epoch 2 are kept."""
    root = tmp_path_factory.mktemp("card")
    data = root / "data"
    make_demo_data.main(["--out", str(data), "--num_images", "130", "--seed", "2", "--val_fraction", "0.45"])
    for split in ("train", "val"):
        first = (data / f"{split}_labels.csv").read_text().split(",")[0]
        (data / "images" / f"{first}.jpg").write_bytes(b"not a jpeg at all")
    ckpt = root / "ckpt"
    first = captured(run_main, tiny_train_args(data, ckpt, "--test", "--test_csv_file", data / "test_labels.csv"))
    after_two = {name: card_of(ckpt / name) for name in ("best.pth", "last.pth")}
    second = captured(run_main, tiny_train_args(data, ckpt, "--epochs", "3", "--resume", "auto"))
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    photo = data / "images" / ((data / "test_labels.csv").read_text().split(",")[0] + ".jpg")
    return {"root": root, "data": data, "ckpt": ckpt, "first": first, "second": second, "after_two": after_two,
            "records": records, "photo": photo}


def best_record(records):
    return min(records, key=lambda r: r["val_emd"])


@pytest.mark.slow
def test_card_fields_after_training_match_metrics_jsonl_and_the_label_files(run):
    assert run["first"][0] == 0 and run["second"][0] == 0
    card, records = run["after_two"]["last.pth"], run["records"][:2]
    data = run["data"]
    assert card["kind"] == "training" and card["backbone"] == "tiny_cnn" and card["pretrained"] == "none"
    assert card["from_scratch"] is True and card["started_from"] is None
    assert (card["image_size"], card["resize_size"], card["normalize"], card["head"]) == (32, 40, "imagenet", "reference")
    assert card["label_format"] == "distribution" and card["score_range"] == [1.0, 10.0]
    for split in ("train", "val"):
        rows = len((data / f"{split}_labels.csv").read_text().splitlines())  # no header: one row per line
        assert card[f"{split}_csv"] == {"file": f"{split}_labels.csv", "rows": rows}
    assert card["images_total"] == card["train_csv"]["rows"] == 130 - 19 - 58
    assert card["unreadable_images"] == {"train": 1, "val": 1}
    assert records[-1]["skipped_images"] == 1 and records[-1]["val_unreadable_images"] == 1
    assert card["epochs"] == 2 and card["monitor"] == "val_emd"
    best = best_record(records)
    assert card["best"] == {"epoch": best["epoch"], **{k: best[k] for k in FIGURES}}
    assert card["git_commit"] == head_commit()
    assert card["created"] <= card["date"] and card["date"].endswith("+00:00")
    assert card["toy"] is True and "from scratch" in card["warning"] and "on only 53 images" in card["warning"]
    assert str(run["root"]) not in json.dumps(card)  # file names only: GET /model shows the card to strangers


@pytest.mark.slow
def test_resume_keeps_the_card_and_updates_it(run):
    before, card, records = run["after_two"]["last.pth"], card_of(run["ckpt"] / "last.pth"), run["records"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert card["created"] == before["created"] and card["date"] >= before["date"]
    assert card["epochs"] == 3 and card["percentiles"]["epoch"] == 3
    best = best_record(records)
    assert card["best"] == {"epoch": best["epoch"], **{k: best[k] for k in FIGURES}}
    assert card_of(run["ckpt"] / "best.pth")["percentiles"]["epoch"] == best["epoch"]
    assert {k: card[k] for k in ("train_csv", "val_csv", "images_total", "from_scratch")} == \
           {k: before[k] for k in ("train_csv", "val_csv", "images_total", "from_scratch")}


@pytest.mark.slow
def test_percentiles_against_quantiles_of_the_validation_predictions_by_hand(run, tmp_path):
    best = run["ckpt"] / "best.pth"
    card = card_of(best)
    # The validation predictions of the weights in best.pth, as test.py writes them.
    assert run_test(["--model", best, "--test_csv_file", run["data"] / "val_labels.csv", "--test_images",
                     run["data"] / "images", "--predictions", tmp_path / "val", "--quiet"]) == 1  # the unreadable one
    val_means = [float(r["mean"]) for r in read_rows(tmp_path / "val")]
    assert len(val_means) == 57 == card["percentiles"]["images"] >= MIN_PERCENTILE_IMAGES
    assert card["percentiles"]["quantiles"] == pytest.approx(hand_quantiles(val_means), abs=2e-6)
    assert run_test(["--model", best, "--test_csv_file", run["data"] / "test_labels.csv", "--test_images",
                     run["data"] / "images", "--predictions", tmp_path / "test", "--quiet"]) == 0
    rows = read_rows(tmp_path / "test")
    assert list(rows[0]) == ["image_id", "mean", "std", *(f"p{k}" for k in range(1, 11)), "gt_mean", "gt_std", "percentile"]
    q = card["percentiles"]["quantiles"]
    for r in rows:
        mean, pct = float(r["mean"]), float(r["percentile"])
        assert percentile_written_ok(mean, pct, q), r
        assert abs(pct - strictly_lower_share(mean, val_means)) <= 1 + 100 / len(val_means) + 0.01, r["image_id"]
    assert len({r["percentile"] for r in rows}) > 1
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["card"] == read_card(best) and metrics["card"]["toy"] is True


@pytest.mark.slow
def test_the_toy_warning_is_said_once_by_every_command(run, tmp_path):
    warning = "warning: toy model: tiny_cnn trained from scratch"
    rc, out, err = run["first"]  # main.py --train --test: the --test start says it, not the end of training
    assert (out + err).count(warning) == 1 and "model: tiny_cnn (from scratch), trained on 53 images" in out
    rc, out, err = run["second"]  # training alone (the demo's first step): at its end
    assert rc == 0 and (out + err).count(warning) == 1
    best = run["ckpt"] / "best.pth"
    rc, out, err = captured(run_test, ["--model", best, "--test_images", run["photo"],
                                       "--predictions", tmp_path / "one", "--quiet"])
    assert rc == 0 and err.count(warning) == 1 and out.count("model: tiny_cnn (from scratch)") == 1
    rc, out, err = captured(enhance.main, enhance.get_args_parser().parse_args(
        ["--model", str(best), "--image", str(run["photo"]), "--out", str(tmp_path / "e"),
         "--steps", "0", "--quiet"]))
    assert rc == 0 and err.count(warning) == 1 and out.count("model: tiny_cnn (from scratch)") == 1


@pytest.mark.slow
@pytest.mark.parametrize("images,toy", [(TOY_MIN_IMAGES - 1, True), (TOY_MIN_IMAGES, False)])
def test_no_toy_warning_for_a_model_marked_as_pretrained_on_enough_images(run, tmp_path, images, toy):
    ckpt = torch.load(run["ckpt"] / "best.pth", map_location="cpu", weights_only=True)
    ckpt["card"].update(pretrained="imagenet", from_scratch=False, images_total=images,
                        train_csv={"file": "train_labels.csv", "rows": images})
    save_checkpoint(tmp_path / "marked.pth", ckpt)
    rc, out, err = captured(run_test, ["--model", tmp_path / "marked.pth", "--test_csv_file", run["data"] / "test_labels.csv",
                                       "--test_images", run["data"] / "images", "--predictions", tmp_path / "p", "--quiet"])
    assert rc == 0 and f"model: tiny_cnn (ImageNet init), trained on {images:,} images of train_labels.csv" in out
    assert ("warning: toy model" in err) is toy
    card = json.loads((tmp_path / "p" / "metrics.json").read_text())["card"]
    assert card["toy"] is toy and (card["warning"] is None) is not toy


@pytest.mark.slow
def test_a_checkpoint_without_a_card_loads_and_says_unknown(run, tiny_ckpt, tmp_path, capsys):
    rc, out, err = captured(run_test, ["--model", tiny_ckpt, "--test_images", run["photo"],
                                       "--predictions", tmp_path / "p", "--quiet"])
    assert rc == 0 and "written before checkpoints carried a model card" in out and "warning: toy" not in err
    assert [r["percentile"] for r in read_rows(tmp_path / "p")] == [""]  # the column is there, empty
    assert model_card.main([str(tiny_ckpt), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["kind"] == "older checkpoint" and card["toy"] is False and card["percentiles"] is None
    assert all(card[k] is None for k in ("pretrained", "train_csv", "val_csv", "best", "epochs", "git_commit", "date"))
    assert model_card.main([str(tiny_ckpt)]) == 0
    text = capsys.readouterr().out
    assert "  train_csv: unknown" in text and "  best: unknown" in text and text == full_text(card) + "\n"
    # One of ours from before cards, with its flags: what they say is known (from scratch, epochs).
    old = torch.load(run["ckpt"] / "last.pth", map_location="cpu", weights_only=True)
    del old["card"]
    save_checkpoint(tmp_path / "old.pth", old)
    card = read_card(tmp_path / "old.pth")
    assert card["kind"] == "older checkpoint" and card["from_scratch"] is True and card["toy"] is True
    assert card["epochs"] == 3 and card["train_csv"] is None and card["best"] is None
    # Resumed, it begins a card; what happened before the resume stays unknown.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "old.pth", resumed / "last.pth")
    assert run_main(tiny_train_args(run["data"], resumed, "--epochs", "4", "--resume", "auto")) == 0
    card = card_of(resumed / "last.pth")
    assert card["epochs"] == 4 and card["created"] is None and "before model cards" in card["note"]
    assert card["train_csv"]["file"] == "train_labels.csv" and card["percentiles"]["epoch"] == 4


def test_model_card_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,1\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    for path in (tmp_path / "x.csv", tmp_path / "other.pth", tmp_path / "missing.pth"):
        assert model_card.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and "Traceback" not in err


def test_git_commit_only_from_the_projects_own_checkout(tmp_path, monkeypatch):
    """The commit of the checkout whose top folder the project is; None outside git, and
    None for a copy inside another repository's tree (that commit is not the project's)."""
    from engine.train import card as run_card
    assert run_card.git_commit() == head_commit()
    monkeypatch.setattr(run_card, "ROOT", str(tmp_path))
    assert run_card.git_commit() is None  # not a repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert run_card.git_commit() == commit and len(commit) == 40
    (tmp_path / "vendored copy").mkdir()
    monkeypatch.setattr(run_card, "ROOT", str(tmp_path / "vendored copy"))
    assert run_card.git_commit() is None


@pytest.mark.slow
def test_a_run_started_from_a_checkpoint_inherits_its_origin(run, tmp_path):
    """--init_from our toy model: still from scratch, and its images count with the new run's."""
    assert run_main(tiny_train_args(run["data"], tmp_path / "ck", "--epochs", "1", "--init_from",
                                    run["ckpt"] / "best.pth")) == 0
    card, parent = card_of(tmp_path / "ck" / "best.pth"), card_of(run["ckpt"] / "best.pth")
    assert card["started_from"] == {"checkpoint": "best.pth", "flag": "--init_from", "kind": "training",
                                    "images_total": parent["images_total"]}
    assert card["from_scratch"] is True and card["images_total"] == 53 + 53 and card["toy"] is True
    assert card["created"] > parent["created"] and card["epochs"] == 1
    assert summary_line(card).startswith("model: tiny_cnn (from best.pth (--init_from)), trained on 53 images")


def test_a_fine_tune_of_a_released_model_is_not_a_toy():
    """Started from the reference's release (AVA-trained, its count unknown): a few hundred
    photos of one's own make no toy; from our toy model they do."""
    from engine.train.card import new_card, set_data
    args = {"base_model": "vgg16", "num_classes": 10, "dropout": 0.75, "image_size": 224, "resize_size": 256,
            "normalize": "none", "head": "reference"}
    flags = {"pretrained": "imagenet", "train_csv_file": "/data/mine.csv", "val_csv_file": "/data/mine_val.csv"}
    card = new_card(flags, args, released_card(None), "/models/epoch-82.pth", "--init_from")
    set_data(card, flags, 400, 100)
    assert card["started_from"] == {"checkpoint": "epoch-82.pth", "flag": "--init_from", "kind": "released",
                                    "images_total": None}
    assert card["images_total"] is None and finish(card)["toy"] is False
    toy_parent = finish(dict(card, from_scratch=True, images_total=400, started_from=None))
    card = new_card(flags, args, toy_parent, "/models/best.pth", "--warm_start")
    set_data(card, flags, 400, 100)
    assert card["images_total"] == 800 and finish(card)["toy"] is True and "from scratch" in card["warning"]

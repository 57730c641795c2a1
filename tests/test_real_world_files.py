"""A folder as real-world archives have them: valid files of every format Pillow here reads
(PSD, multi-frame TIFF/GIF/APNG/WebP/MPO, ICO/ICNS, 16-bit and float TIFF, CMYK JPEG,
palette and alpha images, JPEG 2000, ...) mixed with broken ones (decoders raising
EOFError, struct.error, IndexError, KeyError, ZeroDivisionError, MemoryError,
RuntimeError, TypeError; a zero-byte file; a decompression bomb; truncated files), and
every tool that reads images run over it: each valid image is used, each broken one is
reported with its reason, nothing is lost, no traceback."""
import contextlib
import csv
import io
import json
import os

import pytest
import torch

from conftest import run_main, run_test
from dataset import ImageReadError
from engine.score.scorer import Scorer
from image_corpus import broken_files, expected_size, register_fault_decoder, tiff_with_oversized_tag, valid_files
from tools import ava_to_csv, check_images, resize_images

MAX_PIXELS = 1_000_000  # --max_image_pixels of these runs: bomb.png (1010 x 1010) is over it
WARNED = {"warned_tag.tif": "UserWarning: Tag data larger than file", "rgb_im.im": "DeprecationWarning: IM image format"}


def warned_rel(rel: str) -> str:
    """The WARNED key of a relative path (some files sit in sub/)."""
    return os.path.basename(rel)


def unique_name(name: str) -> str:
    """rgb.jpg -> rgb_jpg.jpg: every file its own stem, so ids without extensions resolve."""
    stem, ext = os.path.splitext(name)
    return f"{stem}_{ext[1:]}{ext}"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(folder, {valid relative path: (w, h)}, {broken relative path: reason prefix})."""
    register_fault_decoder()  # before any loader worker forks
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "sub").mkdir()
    valid, broken = {}, {}
    for k, (name, data) in enumerate(sorted(valid_files().items())):
        rel = ("sub/" if k % 5 == 0 else "") + unique_name(name)
        (folder / rel).write_bytes(data)
        valid[rel] = expected_size(name)
    (folder / "warned_tag.tif").write_bytes(tiff_with_oversized_tag())
    valid["warned_tag.tif"] = (40, 30)
    for name, (data, reason) in broken_files(MAX_PIXELS).items():
        (folder / name).write_bytes(data)
        broken[name] = reason
    return folder, valid, broken


def labels_csv(path, rels):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rel] + [str(1 + (k + r) % 7) for r in range(10)] for k, rel in enumerate(rels))
    return path


def assert_no_traceback(text: str):
    assert "Traceback" not in text and '  File "' not in text, text[-3000:]
    assert "UserWarning" not in text and "DeprecationWarning" not in text, text[-3000:]


def run_captured(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(mixed, tmp_path_factory):
    """One epoch of tiny_cnn on every file of the folder (loader in a worker process)."""
    folder, valid, broken = mixed
    work = tmp_path_factory.mktemp("train")
    train = labels_csv(work / "train.csv", sorted(valid) + sorted(broken))
    val = labels_csv(work / "val.csv", sorted(valid)[:6] + ["zero_bytes.jpg"])
    ckpt = work / "ckpt"
    argv = ["--train", "--img_path", folder, "--train_csv_file", train, "--val_csv_file", val, "--ckpt_path", ckpt,
            "--snapshot_dir", ckpt / "snapshots", "--base_model", "tiny_cnn", "--pretrained", "none",
            "--image_size", "32", "--resize_size", "40", "--train_batch_size", "16", "--val_batch_size", "16",
            "--num_workers", "1", "--epochs", "1", "--quiet", "--max_image_pixels", MAX_PIXELS]
    torch.set_num_threads(1)
    return ckpt, run_captured(run_main, argv)


def test_training_skips_exactly_the_broken_images(trained, mixed):
    ckpt, (code, out, err) = trained
    _, _, broken = mixed
    assert code == 0, err[-3000:]
    with open(ckpt / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped_images"] for r in records] == [len(broken)]
    assert records[0]["val_unreadable_images"] == 1
    assert records[0]["warned_images"] == len(WARNED)  # used for training, their warnings counted, not printed
    for name, reason in broken.items():
        assert f"{name}: {reason}" in out, name
    assert_no_traceback(err)


def test_test_py_scores_every_valid_file_and_lists_every_broken_one(trained, mixed, tmp_path):
    ckpt, _ = trained
    folder, valid, broken = mixed
    code, out, err = run_captured(run_test, ["--model", ckpt / "best.pth", "--test_images", folder, "--predictions",
                                             tmp_path, "--workers", "1", "--quiet", "--contact_sheet", "3",
                                             "--max_image_pixels", MAX_PIXELS])
    assert code == 1, err[-3000:]
    with open(tmp_path / "predictions.csv") as f:
        assert sorted(r["image_id"] for r in csv.DictReader(f)) == sorted(valid)
    with open(tmp_path / "errors.csv") as f:
        errors = {os.path.relpath(r["path"], folder): r["reason"] for r in csv.DictReader(f)}
    assert set(errors) == set(broken)
    for name, reason in broken.items():
        assert errors[name].startswith(reason), (name, errors[name])
    assert "--max_image_pixels" in errors["bomb.png"] and "--max_image_pixels" in errors["huge_header.png"]
    with open(tmp_path / "warnings.csv") as f:
        warned = {warned_rel(os.path.relpath(r["path"], folder)): r["warning"] for r in csv.DictReader(f)}
    assert set(warned) == set(WARNED) and all(warned[k].startswith(v) for k, v in WARNED.items()), warned
    assert f"{len(WARNED)} images produced decoder warnings; see {tmp_path / 'warnings.csv'}" in err
    assert (tmp_path / "contact_sheet.png").is_file()
    assert_no_traceback(err)


def test_rerun_without_warnings_removes_the_old_warnings_csv(trained, mixed, tmp_path):
    ckpt, _ = trained
    folder, valid, _ = mixed
    args = ["--model", ckpt / "best.pth", "--predictions", tmp_path, "--workers", "0", "--quiet"]
    assert run_test(args + ["--test_images", folder / "warned_tag.tif"]) == 0
    assert (tmp_path / "warnings.csv").is_file()
    quiet_file = next(rel for rel in sorted(valid) if warned_rel(rel) not in WARNED)
    assert run_test(args + ["--test_images", folder / quiet_file]) == 0
    assert not (tmp_path / "warnings.csv").exists()


def test_check_images_reports_every_broken_file(mixed, tmp_path):
    folder, valid, broken = mixed
    code, out, err = run_captured(lambda a: check_images.main(check_images.get_args_parser().parse_args(a)),
                                  ["--img_path", str(folder), "--workers", "2", "--out", str(tmp_path), "--quiet",
                                   "--max_image_pixels", str(MAX_PIXELS)])
    assert code == 1
    with open(tmp_path / "bad_images.csv") as f:
        report = {os.path.relpath(r["path"], folder): r["reason"] for r in csv.DictReader(f)}
    assert set(report) == set(broken) and all(report[k].startswith(v) for k, v in broken.items()), report
    assert f"checked {len(valid) + len(broken)} images" in out
    assert_no_traceback(err)


def test_scorer_scores_valid_files_and_names_broken_ones(trained, mixed):
    ckpt, _ = trained
    folder, valid, broken = mixed
    scorer = Scorer.from_checkpoint(ckpt / "best.pth", device="cpu", max_image_pixels=MAX_PIXELS)
    scores = scorer.score([str(folder / rel) for rel in sorted(valid)])
    assert len(scores) == len(valid) and all(1 <= s.mean <= 10 for s in scores)
    for name, reason in broken.items():
        with pytest.raises(ImageReadError, match="^" + str(folder / name) + ": "):
            scorer.score(str(folder / name))


def test_resize_images_caches_every_valid_file(mixed, tmp_path):
    folder, valid, broken = mixed
    argv = ["--src", str(folder), "--dst", str(tmp_path / "cache"), "--size", "20", "--workers", "2", "--quiet",
            "--max_image_pixels", str(MAX_PIXELS)]
    code, out, err = run_captured(lambda a: resize_images.main(resize_images.get_args_parser().parse_args(a)), argv)
    assert code == 1
    assert f"{len(valid)} written, 0 up to date, {len(broken)} failed" in out
    for name, reason in broken.items():
        assert f"{folder / name}: {reason}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("full_decode", [False, True])
def test_ava_to_csv_rejects_the_broken_files(mixed, tmp_path, full_decode):
    folder, valid, broken = mixed
    ids = [os.path.splitext(os.path.basename(rel))[0] for rel in sorted(valid) + sorted(broken) if "/" not in rel]
    lines = [f"{k} {i} " + " ".join(str(1 + (k + r) % 5) for r in range(10)) + " 0 0 1" for k, i in enumerate(ids, 1)]
    (tmp_path / "AVA.txt").write_text("\n".join(lines) + "\n")
    argv = ["--ava_txt", str(tmp_path / "AVA.txt"), "--img_path", str(folder), "--out_dir", str(tmp_path / "out"),
            "--val_size", "2", "--test_size", "2", "--workers", "2", "--quiet", "--max_image_pixels", str(MAX_PIXELS)]
    code, out, err = run_captured(lambda a: ava_to_csv.main(ava_to_csv.get_args_parser().parse_args(a)),
                                  argv + (["--full_decode"] if full_decode else []))
    assert code == 0, err
    with open(tmp_path / "out" / "rejected.csv") as f:
        rejected = {r["image_id"] for r in csv.DictReader(f)}
    broken_ids = {os.path.splitext(b)[0] for b in broken}
    # The header check finds what a header shows; only the full decode finds the rest.
    assert rejected <= broken_ids and {"zero_bytes", "bomb", "huge_header", "not_an_image"} <= rejected
    if full_decode:
        assert rejected == broken_ids
    assert_no_traceback(err)

"""Messages that name the fix: an unknown flag gets the closest flags, an unknown
--base_model the few closest names, a label file in another format the flags or the
separator that read it, a missing file its name without a line number."""
import glob
import hashlib
import importlib
import os

import numpy as np
import pytest
import torchvision
from PIL import Image

import main as main_cli
import serve as serve_cli
import test as test_cli
from conftest import ROOT, run_main, run_test, tiny_train_args
from dataset.label_text import LabelFileError, sniff_delimiter
from dataset.labels import read_label_csv
from dataset.mos import read_mos_csv
from engine.explain.pixels import safe_name
from engine.flags import ArgumentParser, closest_flags
from model.registry import BACKBONES, get_backbone

VOTES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
MOS_FLAGS = "--label_format mos --score_range LO HI"


# ---- unknown flags ----------------------------------------------------------------------

def command_modules():
    paths = glob.glob(os.path.join(ROOT, "tools", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    names = sorted(os.path.relpath(p, ROOT)[:-3].replace("/", ".") for p in paths if not os.path.basename(p).startswith("_"))
    modules = [main_cli, test_cli, serve_cli] + [importlib.import_module(n) for n in names]
    return [m for m in modules if hasattr(m, "get_args_parser")]


def test_every_command_uses_the_parser_that_suggests_flags():
    modules = command_modules()
    assert len(modules) >= 20  # main, test, serve, the tools and the benchmarks
    for module in modules:
        assert isinstance(module.get_args_parser(), ArgumentParser), module.__name__


def parse_error(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("module, argv, expected", [
    # main.py does not accept abbreviations: --epoch is unknown, and --epochs the closest.
    (main_cli, ["--epoch", "3"], "unrecognized arguments: --epoch 3; --epoch: did you mean --epochs"),
    # Hyphens for underscores (or another case): that one flag, alone.
    (main_cli, ["--train-csv-file", "a.csv"], "--train-csv-file: did you mean --train_csv_file?"),
    (main_cli, ["--Seed", "1"], "--Seed: did you mean --seed?"),
    (test_cli, ["--model", "m.pth", "--test-images", "x"], "--test-images: did you mean --test_images?"),
    # A value glued with '=' is not part of the name.
    (serve_cli, ["--model", "m.pth", "--max-body-mb=5"], "--max-body-mb: did you mean --max_body_mb?"),
])
def test_unknown_flag_names_the_closest(module, argv, expected, capsys):
    assert expected in parse_error(module.get_args_parser(), argv, capsys)


def test_a_short_name_suggests_the_flags_that_hold_it(capsys):
    line = parse_error(main_cli.get_args_parser(), ["--lr=0.1"], capsys)
    suggested = line.split("did you mean ", 1)[1].rstrip("?").replace(" or ", ", ").split(", ")
    assert len(suggested) == 3 and {"--dense_lr", "--conv_base_lr"} <= set(suggested)


def test_no_suggestion_without_a_close_flag_and_none_for_values(capsys):
    parser = main_cli.get_args_parser()
    assert parse_error(parser, ["--qqqqqqqq"], capsys).endswith("unrecognized arguments: --qqqqqqqq")
    assert parse_error(parser, ["stray", "-1"], capsys).endswith("unrecognized arguments: stray -1")


def test_a_subcommand_flag_is_suggested(capsys):
    from bench import gpu_steps
    assert "--matrx: did you mean --matrix?" in parse_error(gpu_steps.get_args_parser(), ["peak", "--matrx", "4"], capsys)


@pytest.mark.parametrize("flag, expected", [
    ("--epochs", ["--epochs"]),                # a known flag written exactly
    ("--EPOCHS", ["--epochs"]),
    ("--val-csv-file", ["--val_csv_file"]),
    ("--epoc", ["--epochs"]),                  # epoch_size reads too far from it (ratio 0.57)
    ("--size", ["--epoch_size"]),              # a word of the flag
    ("--val_csv", ["--val_csv_file"]),         # train_csv_file: ratio 0.48, and "val" is not one of its words
    ("--csv_file", ["--val_csv_file", "--train_csv_file"]),  # both hold its words; closest first (0.8, 0.73)
    ("--nothing_like_it", []),
    ("--", []),
])
def test_closest_flags(flag, expected):
    known = ["--help", "--epochs", "--epoch_size", "--val_csv_file", "--train_csv_file"]
    assert closest_flags(flag, known) == expected


def test_closest_flags_gives_at_most_n():
    known = [f"--lr_{k}" for k in "abcdef"]
    assert len(closest_flags("--lr", known)) == 3 and len(closest_flags("--lr", known, n=5)) == 5


# ---- unknown --base_model ----------------------------------------------------------------

def test_unknown_backbone_lists_the_few_closest_names_not_all():
    with pytest.raises(ValueError) as err:
        get_backbone("resnt50")
    message = str(err.value)
    assert "did you mean resnet50" in message
    others = [n for n in torchvision.models.list_models(module=torchvision.models) if n not in BACKBONES]
    named = [n for n in others if f" {n}," in message or f" {n}?" in message or f" {n} " in message]
    assert 1 <= len(named) <= 2, named  # resnet152, resnet101: the two others of the three closest
    assert all(n in message for n in BACKBONES)  # the curated eight, all of them
    assert f"any other of torchvision's {len(others)} classification models works by its name" in message


def test_unknown_backbone_case_and_far_names():
    with pytest.raises(ValueError, match=r"did you mean resnet50,"):
        get_backbone("ResNet50")
    with pytest.raises(ValueError) as err:
        get_backbone("zzzz")
    assert "did you mean" not in str(err.value) and "the curated backbones are" in str(err.value)


# ---- label files --------------------------------------------------------------------------

@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(40):
        Image.new("RGB", (8, 8), (k, k, k)).save(folder / f"im{k}.jpg")
    return folder


def write(path, text):
    path.write_text(text)
    return path


def read_error(reader, path, *args, **kwargs) -> LabelFileError:
    with pytest.raises(LabelFileError) as err:
        reader(path, *args, **kwargs)
    return err.value


@pytest.mark.parametrize("header, row", [
    ("image,mos\n", "{},3.5"),
    ("", "{},3.5"),
    ("image_id,mos,std\n", "{},3.5,0.4"),
    ("", "{},3.5,0.4"),
])
def test_a_mos_file_read_as_distributions_names_the_flags_once(images, tmp_path, header, row):
    path = write(tmp_path / "mos.csv", header + "".join(row.format(f"im{k}") + "\n" for k in range(35)))
    err = read_error(read_label_csv, path, images)
    width = row.count(",") + 1
    first = 2 if header else 1
    # One problem for the 35 rows (not 30 shown and "5 more"), and the flags named once.
    assert err.problems == [f"{first}: has {width} columns, expected 11 (image id, then votes for ratings 1..10); so do "
                            f"34 more rows (lines {first + 1}, {first + 2}, {first + 3}, {first + 4}, {first + 5}, ...)"]
    assert str(err).count(MOS_FLAGS) == 1 and MOS_FLAGS in err.hint
    # And so it reads with those flags.
    assert len(read_mos_csv(path, images, (1, 5))) == 35


def test_the_mos_hint_needs_most_rows_to_look_like_mos(images, tmp_path):
    good = "".join(f"im{k}," + ",".join(map(str, VOTES)) + "\n" for k in range(3))
    # Half of the rows with 3 columns: not most of them, no hint.
    half = write(tmp_path / "half.csv", good + "im10,3.5,1\nim11,3.5,1\nim12,3.5,1\n")
    assert read_error(read_label_csv, half, images).hint == ""
    # One more: most of them.
    most = write(tmp_path / "most.csv", good + "im10,3.5,1\nim11,3.5,1\nim12,3.5,1\nim13,3.5,1\n")
    assert MOS_FLAGS in read_error(read_label_csv, most, images).hint


def test_a_header_naming_a_mos_column_points_to_the_converter(images, tmp_path):
    text = "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\nim1,1,2,3,4,5,15,3.1,0.5,0.2\nim2,1,2,3,4,5,15,3.1,0.5,0.2\n"
    err = read_error(read_label_csv, write(tmp_path / "koniq.csv", text), images)
    assert err.problems == ["2: has 10 columns, expected 11 (image id, then votes for ratings 1..10); so do 1 more row (line 3)"]
    assert "('MOS')" in err.hint and MOS_FLAGS in err.hint and "python -m tools.iqa_to_csv" in err.hint


def test_a_distribution_file_read_as_mos_says_so_once(images, tmp_path):
    path = write(tmp_path / "dist.csv", "".join(f"im{k}," + ",".join(map(str, VOTES)) + "\n" for k in range(31)))
    err = read_error(read_mos_csv, path, images, (1, 5))
    assert len(err.problems) == 1 and str(err).count("read without --label_format mos") == 1
    assert err.problems[0].startswith("1: has 11 columns, expected 2 (image id, MOS) or 3 (image id, MOS, std); so do 30 more rows")


@pytest.mark.parametrize("separator", [";", "\t"])
def test_semicolon_and_tab_separated_files_are_read(images, tmp_path, separator):
    rows = [[f"im{k}"] + [str(v * (k + 1)) for v in VOTES] for k in range(3)]
    path = write(tmp_path / "labels.csv", "".join(separator.join(r) + "\n" for r in rows))
    table = read_label_csv(path, images)
    expected = np.array([[v * (k + 1) for v in VOTES] for k in range(3)], dtype=np.float64)
    assert table.ids == ["im0", "im1", "im2"]
    np.testing.assert_allclose(table.dists, expected / expected.sum(axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("separator", [";", "\t"])
def test_decimal_commas_of_a_semicolon_or_tab_file(images, tmp_path, separator):
    path = write(tmp_path / "mos.csv", f"image{separator}mos{separator}std\nim1{separator}3,5{separator}0,25\n"
                                       f"im2{separator}4{separator}1,5e-1\n")
    table = read_mos_csv(path, images, (1, 5))
    assert table.mos.tolist() == [3.5, 4.0] and table.std.tolist() == [0.25, 0.15]


@pytest.mark.parametrize("line, expected", [
    ("a,1,2,3", ","),
    ("a;1;2;3", ";"),
    ("a\t1\t2\t3", "\t"),
    ("a;3,5;0,5", ";"),        # as many semicolons as commas: decimal commas
    ("a;3,5,0,5", ","),        # one fewer: commas separate
    ("a;b,1,2,3", ","),        # a semicolon inside a comma file's id
    ("a\t3,5\t0,5", "\t"),
    ("image_id", ","),         # one column: nothing to tell
])
def test_sniff_delimiter(line, expected):
    assert sniff_delimiter("\n\n" + line + "\nx,y\n") == expected


def test_a_missing_file_is_named_without_a_line_number(tmp_path, images):
    path = tmp_path / "nope.csv"
    err = read_error(read_label_csv, path, images)
    assert str(err) == f"{path}: no such file"
    err = read_error(read_mos_csv, path, images, (1, 5))
    assert str(err) == f"{path}: no such file"


def test_file_level_problems_among_others_have_no_line_number(tmp_path, images):
    err = LabelFileError("x.csv", ["3: bad", "0: rows differ"])
    assert str(err) == "x.csv: 2 problems:\n  x.csv:3: bad\n  x.csv: rows differ"
    assert str(LabelFileError("x.csv", ["3: bad"])) == "x.csv: 1 problem:\n  x.csv:3: bad"


def test_main_names_the_mos_flags_once_before_training(demo_data, tmp_path, capsys):
    ids = [line.split(",")[0] for line in (demo_data / "train_labels.csv").read_text().splitlines()]
    mos = write(tmp_path / "mos.csv", "image_id,mos\n" + "".join(f"{i},3.5\n" for i in ids))
    assert len(ids) > 30
    assert run_main(tiny_train_args(demo_data, tmp_path / "ckpt", "--train_csv_file", mos)) == 2
    captured = capsys.readouterr()
    assert captured.err.count(MOS_FLAGS) == 1 and f"{mos}:0" not in captured.err
    assert f"so do {len(ids) - 1} more rows" in captured.err
    assert "training" not in captured.out and not (tmp_path / "ckpt").exists()


def test_main_names_a_missing_csv_without_line_number(demo_data, tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert run_main(tiny_train_args(demo_data, tmp_path / "ckpt", "--val_csv_file", missing)) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err and f"{missing}:0" not in err


# ---- output names and counts --------------------------------------------------------------

def test_output_names_keep_one_extension():
    taken = set()
    assert safe_name("photo.png", taken) == "photo"          # written as photo.png, not photo.png.png
    digest = hashlib.sha1(b"photo.jpg").hexdigest()[:8]
    assert safe_name("photo.jpg", taken) == f"photo-{digest}"  # another photo of the same stem
    assert safe_name("sub/IMG_1.JPEG") == "sub_IMG_1"
    assert safe_name("archive.tar") == "archive.tar"         # not an image extension: kept
    assert safe_name("953844") == "953844"


def test_one_unreadable_image_is_counted_in_the_singular(tiny_ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (48, 40), (90, 120, 30)).save(folder / "good.jpg")
    (folder / "bad.jpg").write_bytes(b"not an image")
    assert run_test(["--model", tiny_ckpt, "--test_images", folder, "--predictions", tmp_path / "out",
                     "--workers", "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 image could not be read; see" in err and "image(s)" not in err


@pytest.mark.parametrize("workers,name,shown", [(1, "decoding process", "1 decoding process,"),
                                                (2, "decoding process", "2 decoding processes,"),
                                                (1, "loader worker", "1 loader worker,"),
                                                (3, "loader worker", "3 loader workers,")])
def test_the_runtime_line_counts_its_workers_in_words(workers, name, shown):
    import torch
    from engine.runtime import Runtime, describe_runtime
    line = describe_runtime(Runtime(torch.device("cpu")), {"base_model": "tiny_cnn"}, workers, name)
    assert shown in line and "processs" not in line

"""Label CSVs in every form the README's "Formats" section allows; no row lost."""
import numpy as np
import pytest
from PIL import Image

from dataset import LabelFileError, read_label_csv


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("953619.jpg", "953958.jpg", "954184.png", "photo a.JPEG"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
    return folder


def write(path, text):
    path.write_text(text)
    return path


COUNTS = "953619,0,1,5,17,38,36,15,6,5,1\n953958,10,7,15,26,26,21,10,8,1,2\n"


def test_header_less_first_row_is_kept(images, tmp_path):
    table = read_label_csv(write(tmp_path / "a.csv", COUNTS), images)
    assert table.ids == ["953619", "953958"]
    assert table.lines == [1, 2]
    assert table.paths[0].endswith("953619.jpg")


def test_header_row_is_skipped_and_counts_are_normalised(images, tmp_path):
    table = read_label_csv(write(tmp_path / "a.csv", "image_id,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10\n" + COUNTS), images)
    assert table.ids == ["953619", "953958"]
    assert table.lines == [2, 3]
    np.testing.assert_allclose(table.dists.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(table.dists[0], np.array([0, 1, 5, 17, 38, 36, 15, 6, 5, 1]) / 124, atol=1e-7)


def test_probabilities_extensions_and_other_formats(images, tmp_path):
    text = ("953619.jpg,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1\n"
            "954184,0,0,0,0,0.5,0.5,0,0,0,0\n"
            "photo a,1,0,0,0,0,0,0,0,0,0\n")
    table = read_label_csv(write(tmp_path / "a.csv", text), images)
    assert [p.rsplit("/", 1)[1] for p in table.paths] == ["953619.jpg", "954184.png", "photo a.JPEG"]
    np.testing.assert_allclose(table.dists[1, 4:6], [0.5, 0.5])


def test_ids_only_csv_for_inference(images, tmp_path):
    table = read_label_csv(write(tmp_path / "a.csv", "953619\n953958\n"), images, require_labels=False)
    assert table.ids == ["953619", "953958"] and table.dists is None
    with pytest.raises(LabelFileError, match="expected 11"):
        read_label_csv(tmp_path / "a.csv", images)


def test_every_problem_is_reported_with_line_and_column(images, tmp_path):
    text = ("953619,0,1,5,17,38,36,15,6,5,1\n"
            "953958,0,x,5,17,38,36,15,6,5,1\n"   # line 2: not a number in column 3
            "954184,0,0,0,0,0,0,0,0,0,0\n"        # line 3: all zero
            "953619,0,1,5,17,38,36,15,6,5,1\n"    # line 4: duplicate
            "999999,0,1,5,17,38,36,15,6,5,-1\n"   # line 5: negative, and missing image
            "953958,1,2\n")                        # line 6: column count
    with pytest.raises(LabelFileError) as err:
        read_label_csv(write(tmp_path / "bad.csv", text), images)
    message = str(err.value)
    for expected in ("bad.csv:2, column 3: 'x' is not a finite number", "bad.csv:3, columns 2-11: all-zero",
                     "bad.csv:4, column 1: duplicate image id '953619' (first on line 1)",
                     "bad.csv:5, column 11: negative value -1", "bad.csv:5, column 1: image '999999' not found",
                     "bad.csv:6: has 3 columns, expected 11"):
        assert expected in message, (expected, message)
    assert len(err.value.problems) == 6


def test_missing_images_are_kept_for_inference(images, tmp_path):
    table = read_label_csv(write(tmp_path / "a.csv", "953619\nnope\n"), images, require_labels=False, require_images=False)
    assert table.ids == ["953619", "nope"] and table.paths[1].endswith("nope.jpg")


def test_the_same_file_named_three_ways_is_an_error_naming_both_lines(demo_data, tmp_path):
    votes = ",1,2,3,4,5,6,7,8,9,10"
    csv_path = tmp_path / "dup.csv"
    csv_path.write_text(f"demo00000{votes}\ndemo00001{votes}\ndemo00000.jpg{votes}\n./demo00000{votes}\n")
    with pytest.raises(LabelFileError) as info:
        read_label_csv(csv_path, demo_data / "images")
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("3, column 1: image 'demo00000.jpg' is the same file as 'demo00000' on line 1")
    assert problems[1].startswith("4, column 1: image './demo00000' is the same file as 'demo00000' on line 1")


def test_images_in_both_training_and_validation_are_reported_before_training(demo_data, tmp_path, capsys):
    from conftest import run_main, tiny_train_args
    args = tiny_train_args(demo_data, tmp_path / "ckpt", "--epochs", "1")
    i = args.index("--val_csv_file")
    args[i + 1] = str(demo_data / "train_labels.csv")  # a debugging run validating on its training CSV: allowed
    assert run_main(args) == 0
    out = capsys.readouterr().out
    n = len(read_label_csv(demo_data / "train_labels.csv", demo_data / "images"))
    first = read_label_csv(demo_data / "train_labels.csv", demo_data / "images").ids[0]
    assert f"warning: {n} of the {n} validation images are also in the training CSV (first: {first}," in out
    assert out.index("warning:") < out.index("epoch 1:")


SECOND_ROW = COUNTS.splitlines()[1] + "\n"


@pytest.mark.parametrize("first", [
    "953619,,,,,,,,,,",                        # every rating missing
    "953619,NA,NA,NA,NA,NA,NA,NA,NA,NA,NA",    # every rating text
    "953619.jpg,-,-,-,-,-,-,-,-,-,-",          # the id with its extension
])
def test_a_malformed_first_row_is_reported_not_taken_for_a_header(images, tmp_path, first):
    """A header-less CSV whose first data row has no number among its ratings: its id names
    an image on disk, so it is data, and each of its ten rating cells is reported on line 1."""
    with pytest.raises(LabelFileError) as err:
        read_label_csv(write(tmp_path / "a.csv", first + "\n" + SECOND_ROW), images)
    problems = err.value.problems
    assert len(problems) == 10, problems
    assert [p.split(":")[0] for p in problems] == [f"1, column {c}" for c in range(2, 12)]


@pytest.mark.parametrize("header", [
    "image_id,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10",
    "image_id,,,,,,,,,,",                      # unnamed rating columns (a spreadsheet export)
    ",a,b,c,d,e,f,g,h,i,j",                    # an unnamed id column
])
def test_a_header_is_still_skipped(images, tmp_path, header):
    table = read_label_csv(write(tmp_path / "a.csv", header + "\n" + COUNTS), images)
    assert table.ids == ["953619", "953958"] and table.lines == [2, 3]


def test_only_the_first_row_can_be_a_header(images, tmp_path):
    """The same header-like row as the second line is data: reported, not skipped."""
    text = COUNTS.splitlines()[0] + "\nimage_id,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10\n"
    with pytest.raises(LabelFileError) as err:
        read_label_csv(write(tmp_path / "a.csv", text), images)
    assert sorted(p.split(":")[0] for p in err.value.problems) == sorted(f"2, column {c}" for c in range(1, 12))


def test_mos_csv_first_row(images, tmp_path):
    from dataset.mos import read_mos_csv
    for header in ("image_id,mos", "image,mos,std", "name,score"):
        table = read_mos_csv(write(tmp_path / "h.csv", f"{header}\n953619,3.5\n953958,4\n"), images, (1, 5))
        assert table.ids == ["953619", "953958"] and table.lines == [2, 3], header
    with pytest.raises(LabelFileError) as err:
        read_mos_csv(write(tmp_path / "m.csv", "953619,N/A\n953958,4\n"), images, (1, 5))
    assert [p.split(":")[0] for p in err.value.problems] == ["1, column 2"]

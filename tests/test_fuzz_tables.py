"""Fuzzing the label CSV reader (dataset.labels), the cleaned-copy reader of
tools/check_images.py and the AVA.txt reader (tools/ava_to_csv.py): whatever bytes the
file holds (random bytes, UTF-16, NUL bytes, a BOM, CRLF or CR line ends, very long
lines, broken quotes), the result is a valid table or LabelFileError naming the file and
a line, never another exception. NIMA_FUZZ_MINUTES runs a longer campaign, as in
test_fuzz.py."""
import os
import random
import time

import numpy as np
import pytest
from PIL import Image

from dataset import LabelFileError, read_label_csv
from tools import ava_to_csv, check_images

CASES = 300
MINUTES = float(os.environ.get("NIMA_FUZZ_MINUTES", "0"))
IDS = ["1", "2", "3", "a b", "x.png", "sub/4", "missing", "", " 1 ", "ü", "1\x00", "../1", "/etc/1", "1.jpg"]
NUMBERS = ["0", "1", "2.5", "-1", "1e309", "nan", "inf", "1e308", "0x10", "1_0", "", "abc", "9" * 5000, "1e-320", " 3 "]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    for name in ("1.jpg", "2.jpg", "3.png", "a b.jpg", "x.png", "sub/4.jpg", "ü.jpg"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / name)
    return folder


GOOD_IDS = ["1", "2", "3", "a b", "x.png", "sub/4", "ü", "1.jpg"]


def random_table_bytes(rng: random.Random, columns: int = 11, sep: str = ",") -> bytes:
    """A label-CSV-like file: rows of ids and numbers. Half the files are well formed
    (only the BOM, line ends, header, blank lines and quoting vary); the others carry
    every kind of damage."""
    kind = rng.random()
    if kind < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    clean = kind < 0.55
    lines = []
    if rng.random() < 0.3:
        lines.append(sep.join(["image_id"] + [f"r{k}" for k in range(1, columns)]))
    ids = rng.sample(GOOD_IDS, rng.randrange(1, len(GOOD_IDS))) if clean else \
        [rng.choice(IDS) for _ in range(rng.randrange(0, 12))]
    for image_id in ids:
        n = columns if clean or rng.random() < 0.7 else rng.choice((1, 2, columns - 1, columns + 1, 200))
        bad_cells = 0.0 if clean else 0.1
        cells = [image_id] + [rng.choice(NUMBERS) if rng.random() < bad_cells else str(rng.randrange(1, 50))
                              for _ in range(n - 1)]
        if rng.random() < 0.1:
            k = rng.randrange(len(cells))
            cells[k] = '"' + cells[k] + '"' if clean else \
                '"' + rng.choice(('a\nb', 'q"q', 'open', '')) + rng.choice(('"', ''))
        lines.append(sep.join(cells))
        if rng.random() < 0.1:
            lines.append(rng.choice(("", "   ")) if clean else rng.choice(("", sep * 3, "x" * 200_000)))
    ending = rng.choice(("\n", "\r\n", "\r"))
    text = ending.join(lines) + (ending if rng.random() < 0.5 else "") + ("\n" if rng.random() < 0.2 else "")
    data = text.encode("utf-16" if not clean and rng.random() < 0.05 else "utf-8", errors="surrogatepass")
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data
    if not clean and rng.random() < 0.15 and data:  # a stray byte: NUL, Latin-1, a lone UTF-8 lead byte
        at = rng.randrange(len(data))
        data = data[:at] + bytes([rng.choice((0, 0xE9, 0xC3, 0xFF, 0x0D))]) + data[at:]
    return data


def line_count(data: bytes) -> int:
    return data.count(b"\n") + data.count(b"\r") + 1


def assert_documented_error(exc: LabelFileError, path, data: bytes):
    assert str(exc).startswith(f"{path}: "), str(exc)[:200]
    assert exc.problems
    for problem in exc.problems:
        line = int(problem.split(":", 1)[0].split(",", 1)[0])  # "LINE: ..." or "LINE, column C: ..."
        assert 0 <= line <= line_count(data), (problem[:200], line_count(data))


def check_label_csv(data: bytes, path, image_dir, rng):
    path.write_bytes(data)
    require_labels, require_images = rng.random() < 0.5, rng.random() < 0.5
    try:
        table = read_label_csv(path, image_dir, require_labels=require_labels, require_images=require_images)
    except LabelFileError as exc:
        assert_documented_error(exc, path, data)
    else:
        assert len(table.ids) == len(table.paths) == len(table.lines) > 0
        assert len(set(table.ids)) == len(table.ids) and all(table.ids)
        assert table.lines == sorted(table.lines) and 1 <= table.lines[0] and table.lines[-1] <= line_count(data)
        if table.dists is not None:
            assert table.dists.shape == (len(table.ids), 10) and np.isfinite(table.dists).all()
            np.testing.assert_allclose(table.dists.sum(axis=1), 1.0, atol=1e-5)
        elif require_labels:
            raise AssertionError("labels required, none returned")
    # check_images' cleaned copy: the same rows; every byte of the input is on some line.
    try:
        lines = check_images.read_csv_lines(path, image_dir)
    except LabelFileError as exc:
        assert_documented_error(exc, path, data)
    else:
        assert b"".join(raw for raw, _ in lines) == data and len(lines) <= line_count(data)


def random_ava_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return random_table_bytes(rng, columns=15, sep=rng.choice((" ", "\t", ",")))
    clean, lines = rng.random() < 0.5, []
    for k, image_id in enumerate(rng.sample(GOOD_IDS, rng.randrange(0, len(GOOD_IDS)))):
        votes = [rng.choice(NUMBERS) if not clean and rng.random() < 0.1 else str(rng.randrange(0, 30)) for _ in range(10)]
        cells = [str(k + 1), image_id.replace(" ", "_") if clean else rng.choice(IDS) or "1", *votes, "0", "0",
                 "1" if clean else rng.choice(("1", "x", "-5"))]
        if not clean and rng.random() < 0.1:
            del cells[rng.randrange(len(cells))]
        lines.append(rng.choice((" ", "\t", "  ")).join(cells))
    ending = rng.choice(("\n", "\r\n", "\r"))
    data = (ending.join(lines) + rng.choice(("", ending, ending * 2))).encode("utf-8", errors="surrogatepass")
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data
    if not clean and rng.random() < 0.1:
        data = data.decode("utf-8", errors="replace").encode("utf-16")
    return data


def check_ava(data: bytes, path):
    path.write_bytes(data)
    try:
        entries = ava_to_csv.parse_ava(path)
    except LabelFileError as exc:
        assert_documented_error(exc, path, data)
    else:
        assert entries and all(len(votes) == 10 and min(votes) >= 0 for _, _, votes in entries)
        assert len({i for _, i, _ in entries}) == len(entries)


def run(seed, count, tmp_path, image_dir, deadline=None) -> int:
    rng, done = random.Random(seed), 0
    for _ in range(count):
        if deadline is not None and time.monotonic() > deadline:
            break
        check_label_csv(random_table_bytes(rng), tmp_path / "labels.csv", image_dir, rng)
        check_ava(random_ava_bytes(rng), tmp_path / "AVA.txt")
        done += 1
    return done


def test_random_label_csvs_and_ava_files(tmp_path, image_dir):
    assert run(7, CASES, tmp_path, image_dir) == CASES


def test_bom_crlf_and_cr_read_like_plain_utf8(tmp_path, image_dir):
    plain = "image_id,a,b,c,d,e,f,g,h,i,j\n1,0,1,2,3,4,5,6,7,8,9\nsub/4,1,1,1,1,1,1,1,1,1,1\n"
    (tmp_path / "plain.csv").write_text(plain)
    reference = read_label_csv(tmp_path / "plain.csv", image_dir)
    for name, data in (("bom.csv", b"\xef\xbb\xbf" + plain.encode()), ("crlf.csv", plain.replace("\n", "\r\n").encode()),
                       ("cr.csv", plain.replace("\n", "\r").encode()), ("no_final_newline.csv", plain.rstrip().encode()),
                       ("trailing_blank_lines.csv", (plain + "\n\n").encode())):
        (tmp_path / name).write_bytes(data)
        table = read_label_csv(tmp_path / name, image_dir)
        assert table.ids == reference.ids and table.lines == reference.lines, name
        np.testing.assert_array_equal(table.dists, reference.dists)


@pytest.mark.parametrize("data, expected", [
    ("1,0,1,2,3,4,5,6,7,8,9\n".encode("utf-16"), ":1: the file is UTF-16 text; save it as UTF-8"),
    (b"1,0,1,2,3,4,5,6,7,8,9\n2,\xe9,1,2,3,4,5,6,7,8,9\n", ":2: byte 0xe9 is not UTF-8 text"),
    (b"1,0,1,2,3,4,5,6,7,8,9\n" + b"2" * 200_000 + b",1\n", ":2: cannot be parsed as CSV: field larger than field limit"),
    (b"1,1e308,1e308,0,0,0,0,0,0,0,0\n", ":1, columns 2-11: the ratings add up to more than a float holds"),
    (b"1\x00,0,1,2,3,4,5,6,7,8,9\n", ":1, column 1: image '1\\x00' not found"),
])
def test_bad_bytes_give_the_documented_error(tmp_path, image_dir, data, expected):
    (tmp_path / "bad.csv").write_bytes(data)
    with pytest.raises(LabelFileError) as err:
        read_label_csv(tmp_path / "bad.csv", image_dir)
    assert expected in str(err.value)


def test_ava_tool_exits_2_on_any_malformed_file(tmp_path, image_dir, capsys):
    for k, data in enumerate([b"\xff\xfe" + "1 1".encode("utf-16-le"), b"\x00" * 50, b"1 2 3\r\n" * 3, b"",
                              b"1 1 " + b"9" * 5000 + b" 0 0 0 0 0 0 0 0 0 0 0 0\n"]):
        (tmp_path / f"AVA{k}.txt").write_bytes(data)
        argv = ["--ava_txt", tmp_path / f"AVA{k}.txt", "--img_path", image_dir, "--out_dir", tmp_path / "out", "--quiet"]
        assert ava_to_csv.main(ava_to_csv.get_args_parser().parse_args([str(a) for a in argv])) == 2
        assert f"AVA{k}.txt:" in capsys.readouterr().err


@pytest.mark.skipif(MINUTES <= 0, reason="set NIMA_FUZZ_MINUTES to run the long campaign")
def test_long_campaign(tmp_path, image_dir):
    start = time.monotonic()
    deadline, seed, cases = start + 60 * MINUTES, int(os.environ.get("NIMA_FUZZ_SEED", "1")), 0
    while time.monotonic() < deadline:
        cases += run(seed, 1000, tmp_path, image_dir, deadline)
        seed += 1
    print(f"\nlabel CSV + AVA.txt fuzz campaign: {cases} cases (each one CSV and one AVA.txt) "
          f"in {(time.monotonic() - start) / 60:.1f} min, no failure")

"""Every image mode load_rgb turns into RGB, against pixels computed by hand with numpy:
real partial transparency (LA, P with a tRNS alpha table, RGBA, a PNG's transparent
colour) composited onto white, 16-bit data scaled by 65535 whether Pillow opens it as
I;16 or as I (Pillow before 11 opens 16-bit PNGs as I), 32-bit I and F data, CMYK; and
files whose extensions are upper or mixed case, through folder scoring, file lists,
globs, tar shards and label CSVs."""
import csv

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg, read_rows, run_test, write_tar
from dataset import find_images, load_rgb, read_label_csv
from dataset.images import upright_rgb

WHITE = 255.0


def on_white(colour, alpha):
    """Straight alpha over an opaque white background, by hand: c * a + 255 * (1 - a)."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.asarray(colour, dtype=np.float64) * a + WHITE * (1.0 - a)


def loaded(path):
    return np.asarray(load_rgb(path)).astype(np.int64)


def saved(img, path, **kwargs):
    img.save(path, **kwargs)
    with Image.open(path) as back:  # the mode the test means is the one Pillow reads back
        return back.mode


# Every 8-bit level and a spread of alpha values: 0 (fully transparent), 255 (opaque) and between.
LEVELS = np.arange(256, dtype=np.uint8).reshape(16, 16)
ALPHAS = np.array([0, 1, 64, 127, 128, 200, 254, 255] * 32, dtype=np.uint8).reshape(16, 16)


def test_l_is_grey_on_every_channel(tmp_path):
    assert saved(Image.fromarray(LEVELS, "L"), tmp_path / "l.png") == "L"
    got = loaded(tmp_path / "l.png")
    assert (got == LEVELS[..., None].astype(np.int64)).all()


def test_la_partial_alpha_is_composited_onto_white(tmp_path):
    assert saved(Image.fromarray(np.stack([LEVELS, ALPHAS], -1), "LA"), tmp_path / "la.png") == "LA"
    got = loaded(tmp_path / "la.png")
    want = on_white(np.repeat(LEVELS[..., None], 3, -1), ALPHAS)
    assert np.abs(got - want).max() <= 1  # Pillow's compositing rounds in fixed point
    assert (got[ALPHAS == 0] == 255).all() and (got[ALPHAS == 255] == LEVELS[ALPHAS == 255][:, None]).all()
    # The grey level shows through in proportion to alpha: a black half-transparent pixel is mid-grey.
    assert (np.abs(got[(LEVELS == 0) & (ALPHAS == 128)] - 127) <= 1).all()


def test_rgba_partial_alpha_is_composited_onto_white(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert saved(Image.fromarray(np.dstack([rgb, ALPHAS]), "RGBA"), tmp_path / "rgba.png") == "RGBA"
    got = loaded(tmp_path / "rgba.png")
    assert np.abs(got - on_white(rgb, ALPHAS)).max() <= 1
    assert (got[ALPHAS == 0] == 255).all() and (got[ALPHAS == 255] == rgb[ALPHAS == 255]).all()


def test_palette_with_an_alpha_table_is_composited_onto_white(tmp_path):
    """P with a tRNS chunk of several alpha values (not only fully transparent entries)."""
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [40, 200, 90]], dtype=np.uint8)
    alpha = np.array([0, 128, 255, 30], dtype=np.uint8)
    index = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    assert saved(img, tmp_path / "p.png", transparency=bytes(alpha)) == "P"
    got = loaded(tmp_path / "p.png")
    assert np.abs(got - on_white(palette[index], alpha[index])).max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_colour_key_is_white(tmp_path, mode):
    """A PNG's tRNS colour (mode L or RGB, no alpha channel): pixels of exactly that colour
    are transparent, so white like every other transparent pixel; the rest unchanged."""
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    key = 100
    img = Image.fromarray(grey, "L") if mode == "L" else Image.fromarray(np.dstack([grey] * 3), "RGB")
    assert saved(img, tmp_path / "key.png", transparency=key if mode == "L" else (key, key, key)) == mode
    got = loaded(tmp_path / "key.png")[..., 0]
    assert got.tolist() == [[0, 255], [200, 255]]


def sixteen_bit_levels():
    """Values on the 8-bit levels (65535 k / 255 = 257 k), and just below and above half-way
    between two levels (rounding, not truncation)."""
    k = np.arange(256, dtype=np.int64)
    values = np.concatenate([257 * k, np.clip(257 * k + 128, 0, 65535), np.clip(257 * k + 129, 0, 65535),
                             np.clip(257 * k - 129, 0, 65535)])
    return values.reshape(32, 32)


def level_of(values):
    """A 16-bit value as 8 bits, by hand: the nearest of 0..255 to v * 255 / 65535."""
    return np.floor(values / 257.0 + 0.5).astype(np.int64)


def test_i16_is_scaled_by_65535(tmp_path):
    values = sixteen_bit_levels()
    assert saved(Image.fromarray(values.astype(np.uint16)), tmp_path / "g16.png") in ("I;16", "I")
    got = loaded(tmp_path / "g16.png")
    assert (got == level_of(values)[..., None]).all()


def test_sixteen_bit_data_in_mode_i_stays_as_dark_as_in_i16(tmp_path):
    """What Pillow 10 does with a 16-bit PNG (mode I, int32): the same pixels as the I;16
    file, not stretched to the image's own brightest pixel. A dark photo (brightest value
    4000 of 65535, about level 16) must stay dark."""
    rng = np.random.default_rng(1)
    dark = rng.integers(0, 4001, (20, 30)).astype(np.int64)
    dark[0, 0] = 4000
    as_i = Image.fromarray(dark.astype(np.int32))
    assert as_i.mode == "I"
    assert saved(as_i, tmp_path / "dark_i.tif") == "I"
    want = level_of(dark)
    assert want.max() == 16
    assert (loaded(tmp_path / "dark_i.tif") == want[..., None]).all()
    assert (np.asarray(upright_rgb(as_i)).astype(np.int64) == want[..., None]).all()  # a PIL image (the Scorer's input)
    saved(Image.fromarray(dark.astype(np.uint16)), tmp_path / "dark16.png")
    assert (loaded(tmp_path / "dark16.png") == want[..., None]).all()


def test_i_beyond_sixteen_bits_is_scaled_by_its_maximum(tmp_path):
    values = np.array([[0, 100_000], [200_000, 400_000]], dtype=np.int64)
    assert saved(Image.fromarray(values.astype(np.int32)), tmp_path / "i32.tif") == "I"
    got = loaded(tmp_path / "i32.tif")[..., 0]
    assert got.tolist() == [[0, 64], [128, 255]]  # 255 * v / 400000, rounded
    negative = np.array([[-500, 0], [30_000, 65535]], dtype=np.int64)
    saved(Image.fromarray(negative.astype(np.int32)), tmp_path / "neg.tif")
    assert loaded(tmp_path / "neg.tif")[..., 0].tolist() == [[0, 0], [117, 255]]  # below 0 is black


def test_float_images(tmp_path):
    """F in [0, 1] is scaled by 255; F beyond 1 by its own maximum; NaN and infinities are black."""
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    assert saved(Image.fromarray(unit, "F"), tmp_path / "unit.tif") == "F"
    assert loaded(tmp_path / "unit.tif")[..., 0].tolist() == [[0, 64], [128, 255]]
    wide = np.array([[0.0, 10.0], [np.nan, 40.0]], dtype=np.float32)
    saved(Image.fromarray(wide, "F"), tmp_path / "wide.tif")
    assert loaded(tmp_path / "wide.tif")[..., 0].tolist() == [[0, 64], [0, 255]]


def test_cmyk(tmp_path):
    rng = np.random.default_rng(2)
    cmyk = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    assert saved(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tif") == "CMYK"
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    want = (255.0 - c) * (255.0 - k) / 255.0  # ink subtracts from white, black scales what is left
    assert np.abs(loaded(tmp_path / "c.tif") - want).max() <= 1


# ---- upper- and mixed-case extensions -----------------------------------------------

CASED = ["A.JPG", "b.Png", "c.JPEG", "d.TIF", "e.WebP", "f.BMP", "g.jpg"]


@pytest.fixture(scope="module")
def cased(tmp_path_factory):
    """The same seven images twice: under names with upper/mixed-case extensions, and
    under lower-case names, which the tests' expectations come from."""
    root = tmp_path_factory.mktemp("cased")
    rng = np.random.default_rng(5)
    upper, lower = root / "upper", root / "lower"
    upper.mkdir()
    lower.mkdir()
    fmt = {"jpg": "JPEG", "png": "PNG", "jpeg": "JPEG", "tif": "TIFF", "webp": "WEBP", "bmp": "BMP"}
    for name in CASED:
        stem, ext = name.rsplit(".", 1)
        data = jpeg(rng, 64, 48, fmt=fmt[ext.lower()])
        (upper / name).write_bytes(data)
        (lower / f"{stem}.{ext.lower()}").write_bytes(data)
    return root


def scores(out, key="image_id"):
    return {r[key]: float(r["mean"]) for r in read_rows(out)}


def lower_ext(name):
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{ext.lower()}"


@pytest.mark.slow
def test_upper_and_mixed_case_extensions_are_scored(cased, tiny_ckpt, tmp_path):
    upper, lower = cased / "upper", cased / "lower"
    assert [p.rsplit("/", 1)[1] for p in find_images(str(upper))[1]] == sorted(CASED)
    common = ["--model", tiny_ckpt, "--workers", "0", "--quiet"]
    assert run_test([*common, "--test_images", lower, "--predictions", tmp_path / "lower"]) == 0
    want = scores(tmp_path / "lower")
    # A folder, a file list, and shards whose members have such extensions: every image, its id as named.
    assert run_test([*common, "--test_images", upper, "--predictions", tmp_path / "folder"]) == 0
    got = scores(tmp_path / "folder")
    assert sorted(got) == sorted(CASED)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{upper / n}\n" for n in CASED))
    assert run_test([*common, "--file_list", listing, "--predictions", tmp_path / "list"]) == 0
    assert len(scores(tmp_path / "list")) == len(CASED)
    write_tar(tmp_path / "000000.tar", [(n, (upper / n).read_bytes()) for n in CASED])
    assert run_test([*common, "--test_images", tmp_path / "000000.tar", "--predictions", tmp_path / "tar"]) == 0
    from_tar = scores(tmp_path / "tar")
    assert sorted(from_tar) == sorted(n.split(".")[0] for n in CASED)
    for name in CASED:
        assert got[name] == pytest.approx(want[lower_ext(name)], abs=1e-6), name
        assert from_tar[name.split(".")[0]] == pytest.approx(want[lower_ext(name)], abs=1e-6), name


def test_label_csv_ids_find_files_with_cased_extensions(cased, tmp_path):
    """Ids without an extension find A.JPG and b.Png; ids written with the file's own
    extension find it too; the table keeps every row in order."""
    upper = cased / "upper"
    rows = [[n.split(".")[0]] + ["1"] * 10 for n in CASED[:4]] + [[n] + ["2"] * 10 for n in CASED[4:]]
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    table = read_label_csv(path, upper)
    assert table.ids == [r[0] for r in rows]
    assert [p.rsplit("/", 1)[1] for p in table.paths] == CASED

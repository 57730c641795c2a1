"""Scoring collections with test.py, in this process: tar shards (brace ranges, globs,
repeated keys, corrupt and truncated members), --file_list, parquet output, resume
records, tools/make_shards.py. The multi-process, kill and memory tests are in
test_collection_dist.py; the mixed data set of both is built here."""
import os
import tarfile

import numpy as np
import pytest

from conftest import jpeg, make_mixed, read_rows, row_numbers, run_test, tiny_checkpoint, write_tar
from dataset.sources import expand_braces, member_key
from tools import make_shards


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    folder, shards = make_mixed(root)
    return {"root": root, "folder": folder, "shards": shards, "ckpt": tiny_checkpoint(root / "tiny.pth")}


def score(ckpt, out, *specs_and_flags):
    return run_test(["--model", ckpt, "--predictions", out, "--workers", "0", "--quiet", "--batch_size", "16",
                     *specs_and_flags])


def test_brace_ranges_and_member_keys():
    assert expand_braces("s/{000008..000011}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar", "s/000011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    with pytest.raises(ValueError, match=r"bad brace range \{5\.\.2\}"):
        expand_braces("s/{5..2}.tar")
    assert member_key("a/b.c.jpg") == "a/b" and member_key("x.jpg") == "x"


def test_shards_by_brace_range_glob_and_names_agree(mixed, tmp_path, capsys):
    ckpt, shards = mixed["ckpt"], mixed["shards"]
    assert score(ckpt, tmp_path / "brace", "--test_images", str(shards / "{000000..000002}.tar")) == 1
    assert score(ckpt, tmp_path / "glob", "--test_images", str(shards / "*.tar")) == 1
    assert score(ckpt, tmp_path / "each", "--test_images", *(str(shards / f"{k:06d}.tar") for k in range(3))) == 1
    brace = read_rows(tmp_path / "brace")
    ids = [r["image_id"] for r in brace]
    assert ids == sorted(ids) and len(ids) == 3 * 20 + 2
    assert "000000/dup" in ids and "000001/dup" in ids and "s1_007" in ids  # a repeated key gets its shard's name
    for other in ("glob", "each"):
        assert (tmp_path / other / "predictions.csv").read_bytes() == (tmp_path / "brace" / "predictions.csv").read_bytes()
    errors = read_rows(tmp_path / "brace", "errors.csv")
    assert [e["path"] for e in errors] == [f"{shards / f'{k:06d}.tar'}:broken{k}.jpg" for k in range(3)]
    assert all("identify" in e["reason"] for e in errors)
    # A range none of whose names exists, and a reversed range, are usage errors.
    capsys.readouterr()
    assert score(ckpt, tmp_path / "none", "--test_images", str(shards / "{000005..000007}.tar")) == 2
    assert "none of its 3 names exists" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert score(ckpt, tmp_path / "none", "--test_images", str(shards / "{000002..000001}.tar")) == 2
    assert "bad brace range" in capsys.readouterr().err


def test_shard_scores_equal_the_same_files_scored_from_a_folder(mixed, tmp_path):
    ckpt = mixed["ckpt"]
    rng = np.random.default_rng(9)
    folder = tmp_path / "files"
    folder.mkdir()
    members = []
    for n in range(6):
        data = jpeg(rng, 40 + 8 * n, 56)
        (folder / f"k{n}.jpg").write_bytes(data)
        members.append((f"k{n}.jpg", data))
    write_tar(tmp_path / "one.tar", members)
    assert score(ckpt, tmp_path / "a", "--test_images", folder) == 0
    assert score(ckpt, tmp_path / "b", "--test_images", tmp_path / "one.tar") == 0
    a, b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert [r["image_id"] for r in b] == [r["image_id"][:-4] for r in a]
    assert np.array_equal(row_numbers(a), row_numbers(b))  # same bytes, same decode, same batch: same numbers


def test_truncated_shards_score_every_complete_member(mixed, tmp_path):
    rng = np.random.default_rng(4)
    members = [(f"m{n}.jpg", jpeg(rng)) for n in range(6)]
    write_tar(tmp_path / "whole.tar", members)
    raw = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        offsets = {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}
    (tmp_path / "in_member.tar").write_bytes(raw[: offsets["m3.jpg"][1] + 100])  # cut inside m3's bytes
    (tmp_path / "on_boundary.tar").write_bytes(raw[: offsets["m4.jpg"][0]])     # cut before m4's header, no end marker
    out = tmp_path / "out"
    assert score(mixed["ckpt"], out, "--test_images", tmp_path / "in_member.tar", tmp_path / "on_boundary.tar") == 1
    ids = [r["image_id"] for r in read_rows(out)]
    # Keys both shards hold carry the shard's name; m3 is whole only in on_boundary.tar.
    assert ids == [f"in_member/m{n}" for n in range(3)] + ["m3"] + [f"on_boundary/m{n}" for n in range(3)]
    errors = {e["path"]: e["reason"] for e in read_rows(out, "errors.csv")}
    assert set(errors) == {str(tmp_path / "in_member.tar"), str(tmp_path / "on_boundary.tar")}
    assert "in or after member m3.jpg (3 image members before it read whole" in errors[str(tmp_path / "in_member.tar")]
    assert "after member m3.jpg (4 image members read whole): no end-of-archive marker" in errors[str(tmp_path / "on_boundary.tar")]


def test_file_list_relative_absolute_and_missing(mixed, tmp_path):
    folder = mixed["folder"]
    lists = tmp_path / "lists"
    lists.mkdir()
    os.symlink(folder, lists / "photos")
    entries = ["photos/p001.jpg", str(folder / "sub" / "p000.png"), "", "# a comment", "photos/missing.jpg",
               "  photos/p002.jpg  "]
    (lists / "list.txt").write_text("\n".join(entries) + "\n")
    out = tmp_path / "out"
    assert score(mixed["ckpt"], out, "--file_list", lists / "list.txt") == 1
    got = read_rows(out)
    assert [r["image_id"] for r in got] == sorted(["photos/p001.jpg", str(folder / "sub" / "p000.png"), "photos/p002.jpg"])
    assert [(e["path"], e["reason"]) for e in read_rows(out, "errors.csv")] == [(str(lists / "photos" / "missing.jpg"), "file not found")]
    # The same images scored from the folder score the same.
    assert score(mixed["ckpt"], tmp_path / "folder", "--test_images", folder) == 1
    by_id = {r["image_id"]: r for r in read_rows(tmp_path / "folder")}
    same = {"photos/p001.jpg": "p001.jpg", "photos/p002.jpg": "p002.jpg", str(folder / "sub" / "p000.png"): "sub/p000.png"}
    assert np.allclose(row_numbers(got), row_numbers([by_id[same[r["image_id"]]] for r in got]), rtol=0, atol=1e-6)
    (lists / "empty.txt").write_text("\n# nothing\n")
    assert score(mixed["ckpt"], tmp_path / "e", "--file_list", lists / "empty.txt") == 2
    assert score(mixed["ckpt"], tmp_path / "e", "--file_list", lists / "nope.txt") == 2


def test_parquet_reads_back_equal_to_the_csv(mixed, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    assert score(mixed["ckpt"], out, "--test_images", mixed["folder"], "--output_format", "parquet") == 1
    table = pq.read_table(out / "predictions.parquet").to_pydict()
    csv_rows = read_rows(out)
    assert list(table) == list(csv_rows[0])
    assert table["image_id"] == [r["image_id"] for r in csv_rows]
    for column in list(table)[1:]:  # an empty cell (percentile, without quantiles) is a null
        assert table[column] == [float(r[column]) if r[column] else None for r in csv_rows], column
    assert score(mixed["ckpt"], out, "--test_images", mixed["folder"]) == 1  # a CSV run leaves no stale parquet
    assert not (out / "predictions.parquet").exists()


def test_resume_skips_what_the_parts_hold_and_refuses_another_run(mixed, tmp_path, capsys):
    ckpt, out = mixed["ckpt"], tmp_path / "out"
    spec = ["--test_images", mixed["folder"], str(mixed["shards"] / "000000.tar")]
    assert score(ckpt, out, *spec, "--part_size", "7") == 1
    assert not (out / "parts").exists()  # merged: the parts are gone
    assert score(ckpt, out, *spec, "--part_size", "7", "--keep_parts") == 1
    first = (out / "predictions.csv").read_bytes()
    parts = sorted(p.name for p in (out / "parts").glob("part-*.csv"))
    assert len(parts) > 3
    capsys.readouterr()
    assert score(ckpt, out, *spec, "--resume", "--keep_parts") == 1  # nothing left to score: the same merge
    assert "resuming:" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "parts").glob("part-*.csv")) == parts
    assert (out / "predictions.csv").read_bytes() == first
    other = tiny_checkpoint(tmp_path / "other.pth", seed=1)
    assert score(other, out, *spec, "--resume") == 2
    assert "come from another run (different model" in capsys.readouterr().err
    assert (out / "predictions.csv").read_bytes() == first  # refused before anything was touched
    assert score(other, out, *spec) == 1  # without --resume: starts over
    assert (out / "predictions.csv").read_bytes() != first
    # Another precision or decoder would mix two sets of numbers in one file: refused, named.
    assert score(ckpt, out, *spec, "--keep_parts") == 1
    for flags, named in [(("--amp", "on"), "different precision"), (("--exact_decode",), "different decode")]:
        assert score(ckpt, out, *spec, "--resume", "--keep_parts", *flags) == 2, flags
        assert named in capsys.readouterr().err, flags
    assert score(ckpt, out, *spec, "--resume", "--keep_parts", "--amp", "off") == 1  # float32, as the run was


def test_make_shards_from_a_folder_and_a_csv(mixed, tmp_path, capsys):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "v1.2.jpg", "d/b.webp"):
        (src / name).write_bytes(jpeg(rng, fmt={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]))
    out = tmp_path / "shards"
    assert make_shards.main(["--src", str(src), "--out", str(out), "--shard_size", "3", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar"]  # no temporary file left
    names = []
    for shard in sorted(out.iterdir()):
        with tarfile.open(shard) as tar:
            names += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [n for n, _ in names] == ["a.jpg", "a_png.png", "d/b.webp", "v1_2.jpg"]
    assert names[0][1] == (src / "a.jpg").read_bytes() and names[2][1] == (src / "d" / "b.webp").read_bytes()
    assert make_shards.main(["--src", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "l.csv").write_text("a\nv1.2\nmissing\n")
    assert make_shards.main(["--csv", str(tmp_path / "l.csv"), "--img_path", str(src), "--out", str(out),
                             "--overwrite", "--quiet"]) == 1
    assert sorted(os.listdir(out)) == ["000000.tar"]  # the extra shard of the earlier run is gone
    with tarfile.open(out / "000000.tar") as tar:
        assert tar.getnames() == ["a.jpg", "v1_2.jpg"]
    assert "missing" in capsys.readouterr().err
    assert score(mixed["ckpt"], tmp_path / "pred", "--test_images", str(out / "{000000..000000}.tar")) == 0
    assert [r["image_id"] for r in read_rows(tmp_path / "pred")] == ["a", "v1_2"]


def test_pictures_and_explanations_of_tar_members(mixed, tmp_path):
    from dataset.images import ImageReadError, load_rgb
    from engine.score.merge import member_bytes
    shard = mixed["shards"] / "000000.tar"
    data = member_bytes(str(shard), "s0_003.jpg", f"{shard}:s0_003.jpg")
    assert load_rgb(data).size == (64, 48) and str(data) == f"{shard}:s0_003.jpg"
    with pytest.raises(ImageReadError, match="zero-byte"):  # gone since it was scored: the picture says unreadable
        load_rgb(member_bytes(str(shard), "absent.jpg", "x"))
    out = tmp_path / "out"
    assert score(mixed["ckpt"], out, "--test_images", shard, "--contact_sheet", "2", "--explain", "1") == 1
    assert (out / "contact_sheet.png").exists()
    assert len(list((out / "explain").glob("*.png"))) == 2  # the best and the worst member, read from the shard again

"""Fuzzing the image loader: small valid files in every format Pillow here reads, mutated
(truncated, bits flipped, header fields set to boundary values, spliced with another
format), must each load as an RGB image of the decoded size or raise ImageReadError:
never another exception, never a warning on the terminal, never a hang.

The suite runs a few hundred cases from a fixed seed. A longer campaign:

    NIMA_FUZZ_MINUTES=10 nice python -m pytest -q -s tests/test_fuzz.py

draws new seeds until the time is up, prints the number of cases, and saves every
failing input under NIMA_FUZZ_DIR (default: the test's tmp folder) for replay.
"""
import io
import os
import random
import signal
import time
import warnings

import pytest
import torch

from dataset.images import ImageReadError, check_resizable, read_image_size, read_rgb
from dataset.transforms import eval_transform
from image_corpus import expected_size, mutate, valid_files

CASES = 400                  # in the normal suite: about 10 s on one core
FUZZ_MAX_PIXELS = 2_000_000  # mutated headers claim huge sizes: keep each case cheap
CASE_SECONDS = 30            # longer means a decoder hangs on the input
MINUTES = float(os.environ.get("NIMA_FUZZ_MINUTES", "0"))
TRANSFORM = eval_transform({"image_size": 32, "resize_size": 40, "normalize": "imagenet"})


class CaseTimeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise CaseTimeout()


def check_one(data: bytes, as_path=None) -> str:
    """'ok', 'unreadable' or 'warned'; raises AssertionError (or whatever escaped) otherwise."""
    source = io.BytesIO(data)
    if as_path is not None:
        with open(as_path, "wb") as f:
            f.write(data)
        source = as_path
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        try:
            read_image_size(source if as_path else io.BytesIO(data), FUZZ_MAX_PIXELS)
        except ImageReadError:
            pass
        try:
            img, warning = read_rgb(source, FUZZ_MAX_PIXELS)
        except ImageReadError as exc:
            assert str(exc), "an ImageReadError must say why"
            return "unreadable"
        assert not leaked, f"warnings escaped the loader: {[str(w.message) for w in leaked]}"
    assert img.mode == "RGB", img.mode
    width, height = img.size
    assert width >= 1 and height >= 1 and width * height <= FUZZ_MAX_PIXELS, img.size
    assert len(img.tobytes()) == width * height * 3
    try:  # what ImageDataset does before its transforms
        check_resizable(img.size, 40, FUZZ_MAX_PIXELS)
    except ImageReadError:
        return "unreadable"
    tensor = TRANSFORM(img)  # the transforms take every image the loader returns
    assert tuple(tensor.shape) == (3, 32, 32) and torch.isfinite(tensor).all()
    return "warned" if warning else "ok"


def run_cases(seed: int, count: int, tmp_path, deadline=None) -> dict:
    """Mutate the valid files `count` times (or until `deadline`) from `seed`; returns
    {'cases', 'ok', 'unreadable', 'warned', 'failures': [(case, name, error)]}."""
    files = valid_files()
    names, blobs = sorted(files), [files[n] for n in sorted(files)]
    rng = random.Random(seed)
    stats = {"cases": 0, "ok": 0, "unreadable": 0, "warned": 0, "failures": []}
    save_dir = os.environ.get("NIMA_FUZZ_DIR") or str(tmp_path / "failures")
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(count):
            if deadline is not None and time.monotonic() > deadline:
                break
            name = rng.choice(names)
            data = mutate(files[name], blobs, rng)
            as_path = str(tmp_path / f"case{os.path.splitext(name)[1]}") if rng.random() < 0.2 else None
            signal.alarm(CASE_SECONDS)
            try:
                stats[check_one(data, as_path)] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, then reported together
                stats["failures"].append((case, name, f"{type(exc).__name__}: {exc}"[:300]))
                os.makedirs(save_dir, exist_ok=True)
                with open(os.path.join(save_dir, f"seed{seed}_case{case}_{name}"), "wb") as f:
                    f.write(data)
            finally:
                signal.alarm(0)
            stats["cases"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    return stats


def test_every_valid_file_loads_at_its_size():
    for name, data in valid_files().items():
        img, warning = read_rgb(io.BytesIO(data))
        assert img.mode == "RGB" and img.size == expected_size(name), name
        # Pillow warns that it will drop the IM format: the one valid file that warns.
        if name == "rgb.im":
            assert warning.startswith("DeprecationWarning: IM image format is deprecated"), warning
        else:
            assert warning == "", (name, warning)


def test_mutated_files_load_or_are_unreadable(tmp_path):
    stats = run_cases(seed=20240611, count=CASES, tmp_path=tmp_path)
    assert not stats["failures"], stats["failures"][:10]
    assert stats["cases"] == CASES
    # The mutations reach both outcomes: many inputs break, and some still decode.
    assert stats["unreadable"] > CASES // 10 and stats["ok"] + stats["warned"] > CASES // 10, stats


@pytest.mark.skipif(MINUTES <= 0, reason="set NIMA_FUZZ_MINUTES to run the long campaign")
def test_long_campaign(tmp_path):
    deadline, start = time.monotonic() + 60 * MINUTES, time.monotonic()
    total = {"cases": 0, "ok": 0, "unreadable": 0, "warned": 0, "failures": []}
    seed = int(os.environ.get("NIMA_FUZZ_SEED", "1"))
    while time.monotonic() < deadline:
        stats = run_cases(seed, 10**9, tmp_path, deadline=min(deadline, time.monotonic() + 60))
        for key in ("cases", "ok", "unreadable", "warned"):
            total[key] += stats[key]
        total["failures"] += [(seed, *f) for f in stats["failures"]]
        seed += 1
    print(f"\nimage fuzz campaign: {total['cases']} cases in {(time.monotonic() - start) / 60:.1f} min "
          f"(seeds from {os.environ.get('NIMA_FUZZ_SEED', '1')} to {seed - 1}): {total['ok']} ok, {total['warned']} "
          f"with warnings, {total['unreadable']} unreadable, {len(total['failures'])} failures")
    for failure in total["failures"][:50]:
        print("  failure:", failure)
    assert not total["failures"]

"""Raise a photo's predicted aesthetic score: the paper's enhancement application.

    python -m tools.enhance --model CKPT --image PHOTO --out DIR [--params brightness,contrast] [--steps N]
    python -m tools.enhance --model CKPT --image PHOTO --out DIR --sweep contrast --steps 7
    python -m tools.enhance --model CKPT --image FOLDER --out DIR      (a subfolder per photo: a.jpg -> DIR/a)

Finds, by gradient ascent through the model, the global enhancement (brightness,
contrast, saturation, gamma, sharpness, each within natural bounds: engine/explain/enhance.py)
that maximises the predicted mean, and writes into DIR: enhanced.jpg (the photo at its
full resolution with the settings applied), before_after.png (both with their predicted
means) and enhance.json (settings, bounds, scores before and after, the ascent's
history). A photo whose score cannot be raised is written unchanged and says so.
--sweep PARAM instead writes sweep_<PARAM>.png, one row of the photo at --steps settings
of PARAM from its lower bound through neutral to its upper one, each with its predicted
mean, and sweep_<PARAM>.json.

Exit codes: 0 all photos done; 1 some could not be read or written (the rest written);
2 bad usage or an unreadable checkpoint.
"""
if not __package__:  # run by path (python tools/enhance.py): run as python -m tools.enhance
    import _by_path
    _by_path.run_as_module(__file__)

import os
import sys

from tqdm import tqdm

# Only torch-free modules at the top: --help and a usage error answer without importing
# torch; main() and the functions that need it import the rest.
from dataset.images import DEFAULT_MAX_PIXELS, ImageReadError, check_max_pixels, find_images, load_rgb
from engine.explain.params import PARAMS, check_params
from engine.flags import ArgumentParser, HelpFormatter
from fileio import OutputWriteError, atomic_path, atomic_write_json
from model.constants import NORMALIZE_CHOICES

DEFAULT_STEPS = {"enhance": 30, "sweep": 7}


def get_args_parser():
    p = ArgumentParser(description="Find the global enhancement that raises a photo's predicted NIMA score, "
                       "or sweep one enhancement parameter.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours (best.pth, ...) or the reference's released state_dict")
    p.add_argument("--image", required=True, help="a photo, or a folder of photos (recursive; one output subfolder each)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params", default=",".join(PARAMS), help=f"comma-separated parameters to optimise, of: {', '.join(PARAMS)}")
    p.add_argument("--steps", type=int, default=None,
                   help=f"gradient steps ({DEFAULT_STEPS['enhance']} when not given); with --sweep, the number of "
                        f"settings drawn ({DEFAULT_STEPS['sweep']} when not given)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate on the parameters' unbounded form")
    p.add_argument("--sweep", default=None, metavar="PARAM", choices=list(PARAMS),
                   help=f"instead of optimising, draw the photo at --steps settings of PARAM (one of {', '.join(PARAMS)})")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of enhanced.jpg (1-95)")
    p.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                   help="for a bare state_dict only: its input normalisation (as test.py's --normalize)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="a photo of more than N pixels (width x height) is refused, not decoded")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no line per photo")
    return p


def check_args(args) -> tuple:
    """(parameter names, steps, [(photo path, output folder)]); ValueError for bad usage."""
    names = check_params(args.params.split(","))
    mode = "sweep" if args.sweep else "enhance"
    steps = DEFAULT_STEPS[mode] if args.steps is None else args.steps
    if steps < (2 if args.sweep else 0):
        raise ValueError(f"--steps must be >= {2 if args.sweep else 0} {'(settings in a sweep)' if args.sweep else ''}, got {steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 1 <= args.quality <= 95:
        raise ValueError(f"--quality must be between 1 and 95 (Pillow's useful JPEG range), got {args.quality}")
    check_max_pixels(args.max_image_pixels)
    if os.path.isdir(args.image):
        root, paths = find_images(args.image)
        if not paths:
            raise ValueError(f"--image {args.image}: a folder without image files")
        from engine.explain.pixels import safe_name  # imports torch: only once the flags are known good
        taken = set()
        jobs = [(p, os.path.join(args.out, safe_name(os.path.relpath(p, root), taken))) for p in paths]
    elif os.path.isfile(args.image):
        jobs = [(args.image, args.out)]
    else:
        raise ValueError(f"--image {args.image}: no such file or folder (give a photo or a folder of photos)")
    return names, steps, jobs


def enhance_one(model, model_args, rgb, photo, out, names, steps, args, device) -> str:
    """enhanced.jpg, before_after.png and enhance.json for one photo; returns a summary line."""
    from engine.explain.enhance import enhance_photo
    from engine.explain.pictures import plot_before_after
    done = enhance_photo(model, model_args, rgb, names, steps, args.lr, device, args.quality)
    found, before, after, raised, values = done["found"], done["before"], done["after"], done["raised"], done["values"]
    target = os.path.join(out, "enhanced.jpg")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(done["jpeg"])
    atomic_write_json(os.path.join(out, "enhance.json"), {
        "image": os.path.abspath(photo), "model": os.path.abspath(args.model), "size": list(rgb.size),
        "raised": raised, "note": done["note"], "params": values, "found": found["values"],
        "bounds": {n: {"lower": PARAMS[n][0], "neutral": PARAMS[n][1], "upper": PARAMS[n][2]} for n in names},
        "score_before": before, "score_after": after, "steps": steps, "lr": args.lr, "best_step": found["best_step"],
        "history": found["history"]})
    plot_before_after(rgb, load_rgb(target), before, after, values, os.path.join(out, "before_after.png"), done["note"])
    settings = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
    return f"{photo}: {before:.3f} -> {after:.3f} " + (f"({settings})" if raised else f"({done['note']})")


def sweep_one(model, model_args, rgb, photo, out, steps, args, device) -> str:
    from engine.explain.enhance import sweep
    from engine.explain.pictures import plot_sweep
    name = args.sweep
    values, images, scores = sweep(model, model_args, rgb, name, steps, device)
    plot_sweep(images, values, scores, name, os.path.join(out, f"sweep_{name}.png"), PARAMS[name][1])
    atomic_write_json(os.path.join(out, f"sweep_{name}.json"), {
        "image": os.path.abspath(photo), "model": os.path.abspath(args.model), "param": name,
        "bounds": {"lower": PARAMS[name][0], "neutral": PARAMS[name][1], "upper": PARAMS[name][2]},
        "values": values, "scores": scores})
    return f"{photo}: {name} " + ", ".join(f"{v:.2f}: {s:.3f}" for v, s in zip(values, scores))


def main(args) -> int:
    try:
        names, steps, jobs = check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from engine.distributed import pick_device  # the first import of torch (seconds), after the usage checks
    from model import CheckpointError, load_for_inference
    from model.card import print_card, read_card
    try:
        device = pick_device(args.device)
        model, model_args = load_for_inference(args.model, device, normalize=args.normalize)
        card = read_card(args.model, args.normalize)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_card(card)  # what the scores come from, and a toy model's warning
    failed = 0
    bar = tqdm(jobs, desc="enhance", disable=args.quiet or len(jobs) == 1, dynamic_ncols=True)
    for photo, out in bar:
        try:
            rgb = load_rgb(photo, args.max_image_pixels)
            os.makedirs(out, exist_ok=True)
            if args.sweep:
                line = sweep_one(model, model_args, rgb, photo, out, steps, args, device)
            else:
                line = enhance_one(model, model_args, rgb, photo, out, names, steps, args, device)
        except (ImageReadError, OutputWriteError, OSError) as exc:
            failed += 1
            tqdm.write(f"error: {photo}: {exc}", file=sys.stderr)
            continue
        if not args.quiet:
            tqdm.write(line)
    if failed and len(jobs) > 1:  # one photo: its error line says it all
        done = len(jobs) - failed
        written = "none is written" if done == 0 else "the other is written" if done == 1 else f"the other {done} are written"
        print(f"{failed} of {len(jobs)} photos failed; {written} under {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

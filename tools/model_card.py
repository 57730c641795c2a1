"""Print a checkpoint's model card: what the model is, what it was trained on, its best
validation figures, its percentiles, and whether it is a toy (docs/model-card.md).

    python -m tools.model_card runs/demo/best.pth
    python -m tools.model_card runs/demo/best.pth --json
    python -m tools.model_card epoch-34.pth --normalize imagenet

Exit codes: 0 printed; 2 a file that is not a checkpoint (or bad usage).
"""
if not __package__:  # run by path (python tools/model_card.py): run as python -m tools.model_card
    import _by_path
    _by_path.run_as_module(__file__)

import json
import sys

from engine.flags import ArgumentParser, HelpFormatter, add_normalize_flag


def get_args_parser():
    p = ArgumentParser(description="Print the model card of a NIMA checkpoint.", formatter_class=HelpFormatter,
                       allow_abbrev=False)
    p.add_argument("checkpoint", help="ours (best.pth, epoch-N.pth, last.pth) or the reference's released state_dict")
    p.add_argument("--json", action="store_true", help="print the card as JSON (every field, the quantiles in full)")
    add_normalize_flag(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from model import CheckpointError  # torch: after the flags are parsed (--help needs none)
    from model.card import full_text, read_card
    try:
        card = read_card(args.checkpoint, args.normalize)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2) if args.json else full_text(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())

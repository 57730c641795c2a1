"""Read a pred.txt (ours, or the reference implementation's published one) and print
the paper's metrics on its means when it carries the ground truth (`| GT: G`).

    python -m tools.pred_txt predictions/pred.txt

Exit codes: 0 done; 2 unreadable file (the message names the first bad line).
"""
if not __package__:  # run by path (python tools/pred_txt.py): run as python -m tools.pred_txt
    import _by_path
    _by_path.run_as_module(__file__)

import re
import sys
from dataclasses import dataclass

import numpy as np

from engine.flags import ArgumentParser
from engine.metrics import score_metrics

# `<id> mean: 5.962 | std: 1.420 | GT: 5.914`; the id may hold spaces, `| GT` is optional.
_PRED_LINE = re.compile(r"(?P<id>.+?) mean: (?P<mean>\S+) \| std: (?P<std>\S+)(?: \| GT: (?P<gt>\S+))?")


@dataclass
class PredTxt:
    ids: list
    mean: np.ndarray             # (N,) predicted mean scores
    std: np.ndarray              # (N,) predicted standard deviations
    gt_mean: np.ndarray = None   # (N,) true mean scores, or None when the file has no `| GT` part


def read_pred_txt(path) -> PredTxt:
    """Read a pred.txt (ours or the reference's published one). Raises ValueError naming
    the first bad line; blank lines are ignored."""
    ids, values, has_gt = [], [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            m = _PRED_LINE.fullmatch(line)
            try:
                row = [float(m["mean"]), float(m["std"])] + ([float(m["gt"])] if m and m["gt"] else [])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line_no}: expected '<id> mean: M | std: S' with an optional "
                                 f"' | GT: G' and numbers for M, S, G; got {line[:120]!r}") from None
            if has_gt is None:
                has_gt = len(row) == 3
            elif has_gt != (len(row) == 3):
                raise ValueError(f"{path}:{line_no}: {'no' if has_gt else 'a'} '| GT' part, unlike the lines before it")
            ids.append(m["id"])
            values.append(row)
    table = np.asarray(values, dtype=np.float64).reshape(len(values), 3 if has_gt else 2)
    return PredTxt(ids, table[:, 0], table[:, 1], table[:, 2] if has_gt else None)




def get_args_parser():
    p = ArgumentParser(description="Metrics of a pred.txt file that carries the ground truth.", allow_abbrev=False)
    p.add_argument("path", help="a pred.txt: '<id> mean: M | std: S | GT: G' per line")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        preds = read_pred_txt(args.path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if preds.gt_mean is None:
        print(f"{args.path}: {len(preds.ids)} predictions, no ground truth ('| GT' part): nothing to compare")
        return 0
    metrics = score_metrics(preds.mean, preds.gt_mean)
    print(f"{args.path}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

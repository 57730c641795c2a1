"""Flag values and the argument parser shared by the CLIs (main.py, test.py, serve.py,
tools/, bench/). Torch-free: tools/check_requirements.py runs it before torch is installed."""
import argparse
import difflib

TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")


def str2bool(text):
    """--multi_gpu / --warm_start: the reference parsed them with type=bool, so any string
    (even 'False') meant True. Accept a bare flag, or an explicit true/false."""
    if isinstance(text, bool):
        return text
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default. A flag whose default is None because it is
    resolved later (from the backbone or a checkpoint) says what it resolves to in its
    own help text ("default: ..."), which is shown instead of "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose "unrecognized arguments" error names the closest flags:
    `--epoch 3` -> "did you mean --epochs?", `--train-csv-file` -> "--train_csv_file"
    (this project's flags are written with underscores)."""

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(
                f"; {flag}: did you mean {either(close)}?" for flag, close in self.suggestions(extras)))
        return namespace

    def suggestions(self, extras) -> list:
        """[(unknown flag, [closest known flags])] for the extras that look like flags."""
        known = all_option_strings(self)
        out = []
        for token in extras:
            if not token.startswith("-") or len(token) < 2 or token[1:2].isdigit():  # a value (-1), not a flag
                continue
            flag = token.split("=", 1)[0]
            close = closest_flags(flag, known)
            if close:
                out.append((flag, close))
        return out


def either(names) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def all_option_strings(parser) -> list:
    """Every flag of `parser` and of its subcommands' parsers."""
    flags = []
    for action in parser._actions:
        flags.extend(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.extend(f for f in all_option_strings(sub) if f not in flags)
    return flags


def closest_flags(flag: str, known: list, n: int = 3) -> list:
    """Up to `n` known flags closest to `flag`: one written with '-' for '_' (or in
    another case) alone; else those that read alike, or hold the name as a word
    (`--lr` -> `--dense_lr`), closest first."""
    def key(f):
        return f.lstrip("-").replace("-", "_").lower()
    by_key = {key(k): k for k in known if k != "--help"}
    name = key(flag)
    if name in by_key:
        return [by_key[name]]
    if not name:
        return []
    ratio = {k: difflib.SequenceMatcher(None, name, k).ratio() for k in by_key}
    near = [k for k in by_key if ratio[k] >= 0.6 or set(name.split("_")) <= set(k.split("_"))]
    return [by_key[k] for k in sorted(near, key=lambda k: (-ratio[k], k))[:n]]


def add_normalize_flag(parser) -> None:
    """--normalize of every command that scores a checkpoint (test.py, serve.py,
    tools.export): which release a bare state_dict is, since the file does not say."""
    from model.checkpoint import NORMALIZE_CHOICES
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                        help="for a bare state_dict only (the reference's release format, which does not record it): "
                             "none for its 2018-2020 release (epoch-82.pth, assumed by default), imagenet for its June "
                             "2021 release (epoch-34.pth); our checkpoints record their own")


def add_decode_flags(parser) -> None:
    """--decode_timeout and --max_decode_mb of every command that decodes images
    (main.py, test.py, serve.py, tools.check_images): dataset.decode_limits."""
    from dataset.decode_limits import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_DECODE_MB
    parser.add_argument("--decode_timeout", type=float, default=DEFAULT_DECODE_TIMEOUT_S, metavar="SECONDS",
                        help="an image whose decode takes longer is unreadable, with that reason (default: %(default)g; 0: no deadline)")
    parser.add_argument("--max_decode_mb", type=float, default=DEFAULT_MAX_DECODE_MB, metavar="MiB",
                        help="an image whose decode would need more memory (estimated from its header: pixels x bytes a "
                             "pixel for its mode) is unreadable, not decoded (default: %(default)g, which fits an RGB image "
                             "at Pillow's pixel limit)")


def apply_decode_flags(args):
    """Make --decode_timeout and --max_decode_mb this process's decode limits (and its
    workers'); raises ValueError naming the flag. Returns the DecodeLimits."""
    from dataset.decode_limits import set_decode_limits
    return set_decode_limits(args.decode_timeout, args.max_decode_mb)

"""Flag values and the argument parser shared by the CLIs (main.py, test.py, serve.py,
tools/, bench/). Torch-free: tools/check_requirements.py runs it before torch is installed,
and the CLIs answer --help and report a bad flag (exit 2) from this module and the other
torch-free ones (model.constants, dataset.constants, dataset.images, dataset.mos,
engine.train.options) before anything heavy is imported."""
import argparse
import difflib

from model.constants import NORMALIZE_CHOICES

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
    own help text ("default: ..." or "(default ...)"), which is shown instead of "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None and ("default:" in text or "(default " in text):
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
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                        help="for a bare state_dict only (the reference's release format, which does not record it): "
                             "none for its 2018-2020 release (epoch-82.pth, assumed by default), imagenet for its June "
                             "2021 release (epoch-34.pth); our checkpoints record their own")


SPEED_CHOICES = ("auto", "on", "off")
UINT8_TRANSFER_CHOICES = ("auto", "on", "off")
PARQUET_HINT = "pip install pyarrow (or -r requirements-parquet.txt)"  # what --output_format parquet needs


def parse_explain(text):
    """--explain: 0 (off), a count K >= 1, or 'all'. Returns 0, K or 'all'."""
    if str(text).strip().lower() == "all":
        return "all"
    try:
        k = int(text)
    except (TypeError, ValueError):
        k = -1
    if k < 0:
        raise ValueError(f"--explain must be a whole number K >= 0 (the K highest and K lowest scored images; 0: off) "
                         f"or 'all', got {text!r}")
    return k


def add_speed_flags(parser, threads: bool = True) -> None:
    """--amp, --channels_last (and --threads) of the commands that score: test.py, serve.py.
    What 'auto' picks is engine/runtime.py's resolve_speed_flags and resolve_threads."""
    parser.add_argument("--amp", choices=SPEED_CHOICES, default="auto",
                        help="bf16 autocast (auto: on CUDA with bf16, and on a CPU with native bf16 (AVX512-BF16 or AMX) "
                             "for the backbones whose scores it keeps; off: exact float32)")
    parser.add_argument("--channels_last", choices=SPEED_CHOICES, default="auto",
                        help="channels_last memory format (auto: on CUDA, and on a CPU for the backbones it makes faster)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, metavar="N",
                            help="torch's threads for the network on a CPU; default: one per core this process may "
                                 "use (its CPU affinity)")


def add_decode_flag(parser) -> None:
    """--exact_decode of the commands that decode photos for the model (test.py, main.py,
    serve.py): the full-size decode instead of the JPEG draft (dataset/images.py)."""
    parser.add_argument("--exact_decode", action="store_true",
                        help="decode JPEGs at full size; by default a large JPEG is decoded already reduced by "
                             "libjpeg (1/2, 1/4 or 1/8, its shorter side kept at least twice the resize size and "
                             "512 px), several times faster on camera photos, with the score changes of "
                             "docs/performance.md")


def check_batch_flags(args) -> None:
    """--batch_size and --num_workers of the commands that score collections (None: the
    command's default)."""
    if (args.batch_size is not None and args.batch_size < 1) or (args.num_workers is not None and args.num_workers < 0):
        raise ValueError(f"--batch_size must be >= 1 and --num_workers >= 0, got {args.batch_size} and {args.num_workers}")


def check_threads(threads) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1 (leave it out for one per core), got {threads}")


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

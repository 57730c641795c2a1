"""Flag values shared by the CLIs."""
import argparse

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


class _DefaultStr(str):
    pass


class _DefaultFloat(float):
    pass


def default(value):
    """A flag's default that stays recognisable as one after parsing (argparse keeps the
    default object as it is), so that a checkpoint's recorded value can win over a
    default while a value the user typed that contradicts it is an error."""
    return _DefaultStr(value) if isinstance(value, str) else _DefaultFloat(value)


def given(value) -> bool:
    """Whether a flag's value was typed by the user (not a default() or None)."""
    return value is not None and not isinstance(value, (_DefaultStr, _DefaultFloat))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default."""


def plain_args(args) -> dict:
    """The flags as plain Python values (default() markers dropped), for a checkpoint,
    which holds only plain types so that it loads with weights_only=True."""
    return {k: str(v) if isinstance(v, _DefaultStr) else float(v) if isinstance(v, _DefaultFloat) else v
            for k, v in vars(args).items()}


def add_normalize_flag(parser) -> None:
    """--normalize of every command that scores a checkpoint (test.py, serve.py,
    tools.export): which release a bare state_dict is, since the file does not say."""
    from model.checkpoint import NORMALIZE_CHOICES
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                        help="for a bare state_dict only (the reference's release format, which does not record it): "
                             "none for its 2018-2020 release (epoch-82.pth, assumed by default), imagenet for its June "
                             "2021 release (epoch-34.pth); our checkpoints record their own")

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default. A flag whose default is None because it is
    resolved later (from the backbone or a checkpoint) says what it resolves to in its
    own help text ("default: ..."), which is shown instead of "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_normalize_flag(parser) -> None:
    """--normalize of every command that scores a checkpoint (test.py, serve.py,
    tools.export): which release a bare state_dict is, since the file does not say."""
    from model.checkpoint import NORMALIZE_CHOICES
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, default=None,
                        help="for a bare state_dict only (the reference's release format, which does not record it): "
                             "none for its 2018-2020 release (epoch-82.pth, assumed by default), imagenet for its June "
                             "2021 release (epoch-34.pth); our checkpoints record their own")

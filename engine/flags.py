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

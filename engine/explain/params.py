"""The enhancement's parameters and their bounds (the table in engine/explain/enhance.py),
importable without torch: tools.enhance checks --params and --sweep before torch is
imported."""

PARAMS = {  # name: (lower bound, neutral, upper bound)
    "brightness": (0.6, 1.0, 1.5),
    "contrast": (0.6, 1.0, 1.5),
    "saturation": (0.5, 1.0, 1.6),
    "gamma": (0.6, 1.0, 1.6),
    "sharpness": (-0.5, 0.0, 1.5),
}


def check_params(names) -> list:
    """Parameter names in PARAMS order; ValueError naming the bad one and the valid ones."""
    names = [n.strip() for n in names if n.strip()]
    bad = [n for n in names if n not in PARAMS]
    if bad or not names:
        raise ValueError(f"--params {','.join(names)!r}: unknown {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(PARAMS)}")
    return [n for n in PARAMS if n in names]

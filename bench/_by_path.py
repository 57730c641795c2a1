"""Run by path (`python bench/bench.py ...`), a benchmark works as `python -m bench.bench
...`: see tools/_by_path.py, which this puts within reach (the repository root on
sys.path) and re-exports."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools._by_path import refuse_library, run_as_module  # noqa: E402,F401

"""Ctrl-C and SIGTERM during training: finish the current step, save last.pth, stop."""
import signal


class StopRequested(Exception):
    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopOnSignals:
    """While active, SIGINT/SIGTERM only record that a stop was asked for; the training
    loop calls `check()` at safe points (after a step, after the epoch's checkpoint).
    A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(self.signum)

"""Test doubles shared by the training tests."""

import signal


class SignalAfter:
    """Stands in for ``perturb_repro.training.StopFlag``: reports SIGTERM once the training loop has
    polled it ``n`` times, so a test can preempt a run at a chosen step without real signals."""

    def __init__(self, n):
        self.n = n

    @property
    def raised(self):
        self.n -= 1
        return signal.SIGTERM if self.n < 0 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

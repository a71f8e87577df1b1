"""Ctrl-C and SIGTERM: stop a command promptly, through every ``finally`` (MLflow runs ended KILLED,
Ray shut down, temp folders removed), and exit 128 + the signal number (130, 143).

:func:`install` (the CLI, once) makes both signals raise :class:`Interrupted`, a
``KeyboardInterrupt`` that knows its signal, in the main thread. A second signal while the first
is unwinding is ignored, so that the cleanup it interrupted is not left half done (SIGKILL still
ends the process at once).

Two libraries take SIGINT over in the driver: Ray Tune (it would stop the experiment and return
normally, so the command exited 0 with a summary of stopped trials; ``TUNE_DISABLE_SIGINT_HANDLER``
in :mod:`ensemble_kd.core.raycluster` turns that off) and Ray Train V2, which installs its own handler
in ``TorchTrainer.fit`` (first Ctrl-C: abort the run, then ``sys.exit(0)``) and never restores
ours: :func:`ray_train_fit` goes around ``fit`` and turns what happened into :class:`Interrupted`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal (``signum``)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def reason(self) -> str:
        return f"interrupted ({signal.Signals(self.signum).name})"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_stopping = False


def _stop(signum: int) -> Interrupted:
    global _stopping
    _stopping = True
    return Interrupted(signum)


def _handler(signum: int, frame) -> None:  # noqa: ANN001 - the signal module's handler protocol
    if _stopping:  # the first one is unwinding: let its cleanup finish
        print(f"ensemble-kd: {signal.Signals(signum).name} again: still stopping (cleaning up); "
              f"kill -9 {os.getpid()} to end at once", file=sys.stderr, flush=True)
        return
    raise _stop(signum)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (from then on)."""
    global _stopping
    _stopping = False
    for s in SIGNALS:
        signal.signal(s, _handler)


def is_ours(handler: object) -> bool:
    return handler is _handler


def reason_of(exc: BaseException | None) -> str | None:
    """"interrupted (SIGINT)" for an interrupt (ours, or a bare KeyboardInterrupt), else None."""
    if isinstance(exc, Interrupted):
        return exc.reason
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return None


@contextlib.contextmanager
def ray_train_fit() -> Iterator[None]:
    """Around ``TorchTrainer.fit`` in the driver: Ray Train replaces the SIGINT handler for the
    fit (see the module doc). A wakeup fd (Python writes every caught signal's number to it,
    whichever handler runs) tells whether SIGINT came; if it did, :class:`Interrupted` is raised
    instead of Ray Train's ``SystemExit(0)`` or its aborted result. Our handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray Train installs nothing outside the main thread (Tune trials)
        return
    before = signal.getsignal(signal.SIGINT)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w)

    def sigint_came() -> bool:
        try:
            return bytes([signal.SIGINT]) in os.read(r, 1024)
        except BlockingIOError:
            return False

    try:
        yield
    except SystemExit:
        if sigint_came():
            raise _stop(signal.SIGINT) from None
        raise
    except Interrupted:
        raise
    except BaseException:
        if sigint_came():
            raise _stop(signal.SIGINT) from None
        raise
    else:
        if sigint_came():  # Ray Train aborted the run and fit returned
            raise _stop(signal.SIGINT)
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(r)
        os.close(w)
        signal.signal(signal.SIGINT, before)

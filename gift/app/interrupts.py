"""Ctrl-C and SIGTERM in the training loop: SIGTERM (what schedulers, ``docker stop`` and Kubernetes
send) is handled as Ctrl-C (`Terminated` is a ``KeyboardInterrupt``), and `interrupts_held` keeps
both out of a block that must be all or nothing."""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's ``KeyboardInterrupt`` would be (exit status 143 instead of 130)."""


def _raise_terminated(signum, frame):
    raise Terminated


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM raises `Terminated` (unless SIGTERM was ignored, as under ``nohup``-like
    setups that ignore it on purpose); the previous handler comes back after."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) and SIGTERM inside the block are held until the block ends, so its work is all or
    nothing; then the first of them is raised (`KeyboardInterrupt` or `Terminated`). A signal that was
    ignored when the block began (a background job's SIGINT) stays ignored."""
    if not _in_main_thread():
        yield
        return
    caught: list[type[KeyboardInterrupt]] = []
    kinds = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
    previous = {}
    for sig, kind in kinds.items():
        handler = signal.getsignal(sig)
        if handler is signal.SIG_IGN or (sig == signal.SIGTERM and handler is not _raise_terminated):
            continue  # ignored, or SIGTERM outside `sigterm_as_interrupt`: left as it is
        previous[sig] = signal.signal(sig, lambda *_, kind=kind: caught.append(kind))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.default_int_handler)
    if caught:
        raise caught[0]

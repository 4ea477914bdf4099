"""User-facing errors and the stage entry point that turns them into one line and exit code 2."""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import sys
import threading
import warnings
from typing import Callable, NoReturn

import rcnn


PR_SET_PDEATHSIG = 1  # the prctl(2) option asking for a signal when the parent process dies
# Errors of the user's machine or files: a full disk, a quota, a file size limit, a read-only or forbidden place.
USER_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
               errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE, errno.EIO}


class RcnnError(Exception):
    """An error caused by the user's input (params, data, files): shown as one line, no traceback."""


class ParamError(RcnnError):
    """An invalid value in params.yaml."""


def one_line(message: object) -> str:
    """``message`` as one line: line breaks and other control characters (in a file name, say) escaped."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(message))


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"warning: {one_line(message)}\n"


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """Stop (as on Ctrl-C: temporary outputs removed, nothing half-written kept) when the process that started
    this one dies, e.g. a ``kill -9`` of ``dvc repro``: an orphaned train stage would otherwise go on writing
    outputs no ``dvc.lock`` will ever describe. Linux's ``PR_SET_PDEATHSIG``; elsewhere nothing changes."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            return
    except (OSError, AttributeError):
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)
    if os.getppid() != rcnn.PARENT_AT_START:  # it died while this one imported torch, before the request above
        raise KeyboardInterrupt



def run_cli(main: Callable[[], object]) -> None:
    """Run a stage or CLI main function, turning user errors into one line on stderr and exit code 2, and
    warnings into one ``warning:`` line each (no source file and line: they are about the user's data)."""
    warnings.formatwarning = _one_line_warning
    try:
        _die_with_parent()
        main()
    except RcnnError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no partial output was kept", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `rcnn-detect ... | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain again
        sys.exit(0)
    except OSError as err:  # disk full, file too large, read-only, no permission: the machine's, not a bug
        if err.errno not in USER_ERRNOS:
            raise
        print(f"error: {one_line(os_error_line(err))}", file=sys.stderr)
        sys.exit(2)



def os_error_line(err: OSError) -> str:
    """``<file>: <the errno's text>`` on one line, with what to do for a full disk."""
    name = err.filename if err.filename is not None else "a file"
    text = err.strerror or os.strerror(err.errno or 0)
    hint = {errno.ENOSPC: "; free space and rerun", errno.EDQUOT: "; free space and rerun",
            errno.EFBIG: "; raise the file size limit (ulimit -f) or write to another file system"}.get(err.errno, "")
    return f"{name!s}: {text}{hint}"


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error:`` line (through :func:`run_cli`), not argparse's
    usage block: parse inside the function ``run_cli`` runs."""

    def error(self, message: str) -> NoReturn:
        raise RcnnError(f"{message} (see {self.prog} --help)")

"""User-facing errors and the stage entry point that turns them into one line and exit code 2."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable


class RcnnError(Exception):
    """An error caused by the user's input (params, data, files): shown as one line, no traceback."""


class ParamError(RcnnError):
    """An invalid value in params.yaml."""


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"warning: {message}\n"


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage or CLI main function, turning user errors into one line on stderr and exit code 2, and
    warnings into one ``warning:`` line each (no source file and line: they are about the user's data)."""
    warnings.formatwarning = _one_line_warning
    try:
        main()
    except RcnnError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no partial output was kept", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `rcnn-detect ... | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain again
        sys.exit(0)

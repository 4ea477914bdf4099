"""Atomic writes, safe loading and contained paths: an interrupted stage never leaves a file that looks
complete, nothing loaded from disk can run code, and no name taken from a data set (a file name, a folder,
a class name) reads or writes outside where it belongs."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rcnn.utils.errors import RcnnError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def contained(root: str | Path, named: str, what: str, base: str | Path | None = None) -> Path:
    """``base / named`` (``base`` defaults to ``root``) if it stays inside ``root`` once ``..`` and links are
    resolved, else one error naming ``what`` (e.g. "annotations.json: image 3 file_name"), whether or not the
    file exists (no probing for files elsewhere): the one rule for every path a data set names (COCO
    ``file_name``, YOLO ``path`` and split folders, archive members). Absolute names are refused too."""
    where = Path(root).resolve()
    path = Path(base if base is not None else root) / named
    resolved = path.resolve()
    if Path(named).is_absolute() or (resolved != where and where not in resolved.parents):
        raise RcnnError(f"{what} {named!r} lies outside the data set; name files inside its folder")
    return path


def safe_name(text: str) -> str:
    """``text`` as one file name that stays in its folder: path separators and control characters become
    ``_``, and ``.``/``..`` (or an empty name) become ``_`` too; for file names built from class names and
    image ids."""
    cleaned = "".join("_" if ch in "/\\" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in text)
    return "_" if cleaned in ("", ".", "..") else cleaned


def _named_after(err: OSError, tmp: Path, path: Path) -> OSError:
    """``err`` (disk full, file too large, ...) naming the output ``path`` rather than the temporary file or
    folder standing in for it, which is gone by the time the user reads the message."""
    name = str(err.filename) if err.filename is not None else str(tmp)
    if err.errno is None or not name.startswith(str(tmp)):
        return err
    return type(err)(err.errno, err.strerror, str(path) + name[len(str(tmp)):])


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        raise _named_after(err, tmp_path, path) from None
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        raise _named_after(err, tmp, path) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, keys in a stable order."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, stage: str) -> Any:
    """Read a JSON file another stage wrote; a missing or broken one says which stage to (re)run."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RcnnError(f"{path} not found: run the {stage} stage first") from None
    except json.JSONDecodeError as err:
        raise RcnnError(f"{path} is not valid JSON ({err}); rerun the {stage} stage") from None


def load_npz(path: str | Path, what: str, stage: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` another stage wrote (``allow_pickle=False``). A missing, truncated or
    otherwise unreadable file is one :class:`RcnnError` saying which stage to (re)run; whatever the
    damage (a cut zip, a corrupt member, a huge or bogus header), nothing is half-loaded."""
    path = Path(path)
    if not path.is_file():
        raise RcnnError(f"{path} not found: run the {stage} stage first")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is the same user error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(f"{path} is not a valid {what} file ({reason}); rerun the {stage} stage") from None


def write_pickle(path: str | Path, obj: Any) -> None:
    """Pickle ``obj`` atomically; only numpy arrays and plain containers will load back (see load_pickle)."""
    write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array machinery and plain builtin containers, never functions."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_pickle(path: str | Path) -> Any:
    """Load a pickle that may only hold numpy arrays and plain containers; anything else is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh).load()
    except FileNotFoundError:
        raise RcnnError(f"{path} not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RcnnError(f"{path} is not a valid region pickle ({reason}); rerun the stage that writes it") from None

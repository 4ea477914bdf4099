"""Archives checked before anything is extracted: every member's name stays inside the target, no links
out, no device files, sizes and counts within limits (a compression bomb is refused), then extracted."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm import tqdm

from rcnn.pipeline.params import DataParams
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import contained

def _check_member_name(archive: Path, name: str, target: Path) -> None:
    """Refuse member paths that could land outside the extraction folder ``target``: absolute ones, and
    any that :func:`rcnn.utils.fileio.contained` (the one rule for paths a data set names) finds outside it."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise RcnnError(f"{archive}: refusing to extract member {name!r}: absolute path")
    try:
        contained(target, str(path), f"{archive}: member")
    except RcnnError:
        raise RcnnError(f"{archive}: refusing to extract member {name!r}: '..' in path climbs out of the archive's "
                        f"folder") from None


def _escapes(path: PurePosixPath) -> bool:
    """Whether a relative path climbs above its starting folder."""
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def _check_tar_member(archive: Path, member: tarfile.TarInfo, target: Path) -> None:
    _check_member_name(archive, member.name, target)
    if member.issym() or member.islnk():
        # symlink targets are relative to the member's folder, hardlink targets to the archive root
        target = PurePosixPath(member.linkname.replace("\\", "/"))
        base = PurePosixPath(member.name).parent if member.issym() else PurePosixPath()
        if target.is_absolute() or _escapes(base / target):
            raise RcnnError(f"{archive}: refusing to extract link {member.name!r} -> {member.linkname!r}: "
                            f"it points outside the archive")
    elif not (member.isfile() or member.isdir()):
        raise RcnnError(f"{archive}: refusing to extract {member.name!r}: device, FIFO or other special file")


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def verify_archive(archive: Path) -> None:
    """Check an archive's integrity end to end before anything from it is kept: every zip member's
    CRC, or a compressed tar's whole stream with the checksum at its end (tar extraction alone stops
    at the end-of-archive marker and never reads it)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise RcnnError(f"{archive}: member {bad!r} is corrupt (CRC mismatch); download or copy the "
                                f"archive again")
            return
        with open(archive, "rb") as fh:
            magic = fh.read(6)
        opener = next((open_ for prefix, open_ in _COMPRESSED if magic.startswith(prefix)), None)
        if opener is None:
            return  # a plain tar has no data checksums; downloads are verified by MD5
        with opener(archive, "rb") as stream:
            with tqdm(desc=f"verify {archive.name}", unit="B", unit_scale=True) as bar:
                while chunk := stream.read(1 << 20):
                    bar.update(len(chunk))
    except (OSError, EOFError, lzma.LZMAError, zlib.error, zipfile.BadZipFile) as err:
        raise RcnnError(f"{archive}: corrupt or truncated archive ({err}); download or copy it again") from None


def _check_zip_member(archive: Path, info: zipfile.ZipInfo, seen: set[str], target: Path) -> None:
    _check_member_name(archive, info.filename, target)
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise RcnnError(f"{archive}: refusing to extract link {info.filename!r}")
    if info.filename in seen:  # the later copy would silently replace the earlier one
        raise RcnnError(f"{archive}: member {info.filename!r} appears twice")
    seen.add(info.filename)


# Datasets hardly compress (JPEG ~1:1, the XML beside it ~10:1): an archive that expands beyond this ratio, and to
# more than BOMB_MIN_BYTES, is padding made to fill the disk, whatever the byte limit (round 3, M2).
BOMB_RATIO = 100


BOMB_MIN_BYTES = 64 * 2**20


def _check_size(archive: Path, sizes: Sequence[int], max_bytes: int, max_files: int, target: Path) -> None:
    """Refuse, before extracting, an archive whose members would fill the disk (a zip bomb) or the folder."""
    if len(sizes) > max_files:
        raise RcnnError(f"{archive}: {len(sizes):,} members, above the data.max_extract_files limit of "
                        f"{max_files:,}; refusing (raise the limit if the archive is trusted)")
    total = sum(sizes)
    if total > max_bytes:
        raise RcnnError(f"{archive}: expands to {total / 2**30:.1f} GiB, above the data.max_extract_bytes limit of "
                        f"{max_bytes / 2**30:.1f} GiB; refusing (raise the limit if the archive is trusted)")
    packed = max(archive.stat().st_size, 1)
    if total > BOMB_MIN_BYTES and total / packed > BOMB_RATIO:
        raise RcnnError(f"{archive}: {packed / 2**20:.1f} MiB that expand to {total / 2**30:.1f} GiB (ratio "
                        f"{total / packed:,.0f}:1; photos and annotations stay under {BOMB_RATIO}:1): a zip bomb? "
                        f"refusing")
    free = shutil.disk_usage(target).free
    if total > free:
        raise RcnnError(f"{archive}: expands to {total / 2**30:.1f} GiB but {target} has {free / 2**30:.1f} GiB "
                        f"free; free space and rerun")


def safe_extract(archive: Path, target: Path, max_bytes: int = DataParams.max_extract_bytes,
                 max_files: int = DataParams.max_extract_files) -> None:
    """Extract a .tar(.gz)/.tgz/.zip into ``target`` after verifying it (:func:`verify_archive`) and
    checking every member is harmless and that together they stay within ``max_bytes`` and ``max_files``."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                seen: set[str] = set()
                infos = zf.infolist()
                for info in infos:
                    _check_zip_member(archive, info, seen, target)
                _check_size(archive, [info.file_size for info in infos], max_bytes, max_files, target)
            verify_archive(archive)  # after the listing's checks: a bomb is refused without inflating it
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target)
            return
        verify_archive(archive)
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            _check_size(archive, [m.size for m in members if m.isfile()], max_bytes, max_files, target)
            links = {PurePosixPath(m.name) for m in members if m.issym()}
            for member in members:
                _check_tar_member(archive, member, target)
                if any(parent in links for parent in PurePosixPath(member.name).parents):
                    # a path through a symlink defeats the name checks above (link chains)
                    raise RcnnError(f"{archive}: refusing to extract {member.name!r}: it lies under a symlink")
            # Python >= 3.11.4 also applies the standard "data" filter as a second line of defence.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file"):
                tf.extract(member, target, **extra)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise RcnnError(f"{archive}: not a readable archive ({err})") from None

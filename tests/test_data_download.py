"""Downloads: cache directory resolution, checksum-verified atomic writes, offline errors."""

import hashlib
import http.client
import io
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fsdm_eqx.data import DataError, default_cache_dir
from fsdm_eqx.data.download import CACHE_ENV, fetch

PAYLOAD = b"few-shot diffusion " * 1000
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Response(io.BytesIO):
    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


class _Opener:
    """Stands in for `urllib.request.urlopen`: serves fixed bytes per URL or raises."""

    def __init__(self, served: dict[str, bytes | BaseException]) -> None:
        self.served = served
        self.calls: list[tuple[str, float]] = []

    def __call__(self, url: str, timeout: float) -> _Response:
        self.calls.append((url, timeout))
        item = self.served[url]
        if isinstance(item, BaseException):
            raise item
        return _Response(item)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "fsdm_eqx"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_fetch_writes_verified_file_and_reuses_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    opener = _Opener({"https://a/f.bin": PAYLOAD})
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    path = fetch(["https://a/f.bin"], "f.bin", ("md5", MD5), cache_dir=tmp_path, timeout=7.0)
    assert path == tmp_path / "f.bin" and path.read_bytes() == PAYLOAD
    assert opener.calls == [("https://a/f.bin", 7.0)]
    fetch(["https://a/f.bin"], "f.bin", ("md5", MD5), cache_dir=tmp_path)
    assert len(opener.calls) == 1, "a verified cached file must not be downloaded again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_fetch_falls_back_to_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    opener = _Opener({"https://a/f": urllib.error.URLError("refused"), "https://b/f": PAYLOAD})
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    path = fetch(["https://a/f", "https://b/f"], "f", ("md5", MD5), cache_dir=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert [u for u, _ in opener.calls] == ["https://a/f", "https://b/f"]


def test_offline_gives_one_sentence_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = "https://example.invalid/data.tar.gz"
    opener = _Opener({url: urllib.error.URLError("Name or service not known")})
    monkeypatch.setattr(urllib.request, "urlopen", opener)
    with pytest.raises(DataError) as info:
        fetch([url], "data.tar.gz", ("md5", MD5), cache_dir=tmp_path)
    message = str(info.value)
    assert url in message and "--data-dir" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("served", [PAYLOAD[:-100], PAYLOAD[:-1] + b"X"], ids=["short", "flip"])
def test_wrong_checksum_download_never_stays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, served: bytes
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _Opener({"https://a/f": served}))
    with pytest.raises(DataError, match="wrong md5"):
        fetch(["https://a/f"], "f", ("md5", MD5), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_never_stays(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class _Broken(_Response):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 1000:
                raise TimeoutError("timed out")
            return super().read(512)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Broken(PAYLOAD))
    with pytest.raises(DataError, match="timed out"):
        fetch(["https://a/f"], "f", ("md5", MD5), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_connection_dropped_mid_body(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class _Dropped(_Response):
        def read(self, size: int | None = -1) -> bytes:
            raise http.client.IncompleteRead(b"partial", 1000)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Dropped(PAYLOAD))
    expected = r"https://a/f \(IncompleteRead\(7 bytes read, 1000 more expected\)\)"
    with pytest.raises(DataError, match=expected):
        fetch(["https://a/f"], "f", ("md5", MD5), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_file_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(PAYLOAD[:10])
    monkeypatch.setattr(urllib.request, "urlopen", _Opener({"https://a/f": PAYLOAD}))
    assert fetch(["https://a/f"], "f", ("md5", MD5), cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_unwritable_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="--cache-dir"):
        fetch(["https://a/f"], "f", ("md5", MD5), cache_dir=blocker / "sub")

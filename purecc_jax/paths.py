"""The one path layer: local paths and bucket URLs (gs://...) through etils `epath`.

Every place the package reads or writes a run's files takes a `str` or a path and goes through
`path()`. Local paths keep working as before (`~` expanded, made absolute); `gs://BUCKET/...`
goes through gcsfs (files) and tensorstore (orbax checkpoints). Two things a bucket does not do:

- append to an object: `AppendText` rewrites the object with the new lines instead;
- serve a folder to libraries that read local files only (transformers' tokenizers, PIL, the
  safetensors reader's memory map): `local_copy` copies a bucket folder once to a per-host cache
  (`PURECC_CACHE`, default ~/.cache/purecc_jax), under a lock so that the processes of one host copy
  it once, and checks every file against the bucket's CRC32C before the copy counts as complete.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

from etils import epath

PathLike = str | os.PathLike
REMOTE_PREFIXES = ("gs://",)
_CHUNK = 16 * 2**20


def is_remote(p: PathLike) -> bool:
    """True for a bucket URL (gs://...)."""
    return str(p).startswith(REMOTE_PREFIXES)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: a bucket URL as is, a local path with `~` expanded and made absolute."""
    if is_remote(p):
        return epath.Path(str(p))
    return epath.Path(os.path.abspath(os.path.expanduser(str(p))))


class AppendText:
    """A text file opened for appending, locally or in a bucket (whose objects are rewritten whole:
    fine for logs of a few hundred lines, written every `log_every` steps)."""

    def __init__(self, file: PathLike):
        self.path = path(file)
        self._remote = is_remote(self.path)
        if self._remote:
            self._text = self.path.read_text() if self.path.exists() else ""
        else:
            self._file: IO[str] = open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if self._remote:
            self._text += text
        else:
            self._file.write(text)

    def flush(self) -> None:
        if self._remote:
            self.path.write_text(self._text)
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()


def write_bytes(file: PathLike, data: bytes) -> None:
    """Writes `data` to `file` (local or in a bucket), creating its folder; a reader sees the old
    file or the new one, never a part.

    A local file is written beside itself and renamed over (another process of the run may be
    reading it: config.json, on a resume); a bucket object appears whole by itself.
    """
    p = path(file)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        p.write_bytes(data)
        return
    # a name of its own (not mkstemp's: its files are private, where the others are made under the umask)
    temporary = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(temporary, "xb") as f:
            f.write(data)
        os.replace(temporary, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def upload(local: PathLike, remote: PathLike) -> None:
    """Copies the files of a local folder (recursively) to a folder (local or in a bucket)."""
    local, remote = pathlib.Path(local), path(remote)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            target = remote / f.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _listing(url: str) -> dict[str, dict]:
    """Every object under a bucket folder, by relative name: {"size", "crc32c"} (one listing request)."""
    import gcsfs

    root = url.removeprefix("gs://").rstrip("/")
    found = gcsfs.GCSFileSystem().find(url, detail=True)
    return {name[len(root) + 1:]: {"size": int(info["size"]), "crc32c": info.get("crc32c")}
            for name, info in found.items() if info.get("type") == "file" and name.startswith(root + "/")}


def _crc32c(file: pathlib.Path) -> str:
    import google_crc32c

    h = google_crc32c.Checksum()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode()


@contextlib.contextmanager
def _locked(lock: pathlib.Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the other processes of this host wait for the copy
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PURECC_CACHE", "~/.cache/purecc_jax")).expanduser()


def local_copy(folder: PathLike, only: tuple[str, ...] | None = None) -> pathlib.Path:
    """A local folder with the content of `folder`: itself when local, else a checked copy in the cache.

    The copy is made once per host: `<cache>/<hash of the URL>/<name>/` (the folder keeps its name), with
    `.purecc_manifest.json` (name, size and CRC32C of every file) written last; a later call finds the
    manifest and copies nothing unless the bucket's listing changed. `only`: the top-level names to copy
    (e.g. a diffusers folder's components without the single-file checkpoints beside them).
    """
    if not is_remote(folder):
        return pathlib.Path(os.path.expanduser(str(folder)))
    src = path(folder)
    listing = {rel: info for rel, info in _listing(str(src)).items() if only is None or rel.split("/")[0] in only}
    if not listing:
        raise FileNotFoundError(f"{folder} holds no files in the bucket (or is not readable with these credentials)")
    key = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    dest = cache_root() / key / src.name
    manifest = dest / ".purecc_manifest.json"
    with _locked(cache_root() / key / ".lock"):
        if manifest.is_file() and json.loads(manifest.read_text()) == listing:
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        for rel, info in sorted(listing.items()):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with (src / rel).open("rb") as r, open(target, "wb") as w:
                shutil.copyfileobj(r, w, _CHUNK)
            size, crc = target.stat().st_size, _crc32c(target)
            if size != info["size"] or (info["crc32c"] is not None and crc != info["crc32c"]):
                raise OSError(f"the copy of {src / rel} in {target} is corrupt (size {size} of {info['size']}, "
                              f"crc32c {crc}, the bucket says {info['crc32c']}); run again to copy it again")
        manifest.write_text(json.dumps(listing, indent=1))
    return dest


@contextlib.contextmanager
def local_folder(folder: PathLike) -> Iterator[pathlib.Path]:
    """A local folder to write `folder`'s files into with libraries that need one: `folder` itself
    when local, else a temporary folder copied to the bucket when the block ends without error."""
    if not is_remote(folder):
        yield pathlib.Path(os.path.expanduser(str(folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield pathlib.Path(tmp)
        upload(tmp, folder)


@contextlib.contextmanager
def local_file(file: PathLike) -> Iterator[pathlib.Path | None]:
    """A local copy of `file` for libraries that read local files only (None when it does not exist)."""
    p = path(file)
    if not p.exists():
        yield None
    elif not is_remote(p):
        yield pathlib.Path(p)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = pathlib.Path(tmp) / p.name
            local.write_bytes(p.read_bytes())
            yield local

"""Content-addressed blob store: ``blobs/ab/abcdef…`` (the file's plain sha256).

Blobs are immutable and read-only on disk. A blob is written to a temp file
(named after the writing process, so `gc` can tell a live writer's temp file from
a dead one's), fsynced, then renamed into place: a crash leaves at most a temp
file or an orphan blob, never a half-written blob under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistryError
from ..fsutil import fsync_dir, open_input

# 1 MiB reads: hashlib (OpenSSL, SHA-NI where present) runs at memory speed on them,
# and one reused buffer keeps the allocator out of the loop.
READ = 1024 * 1024
WRITE = 256 * 1024
# Files up to this size are read once into memory: hash and write from one buffer.
IN_MEMORY = 64 * 1024 * 1024


class BlobCorrupt(RegistryError):
    """A blob's bytes no longer hash to its name."""

    def __init__(self, path, expected: str, found: str | None):
        self.path = str(path)
        self.expected = expected
        self.found = found
        what = "is missing" if found is None else "is corrupt"
        super().__init__(f"blob {self.path} {what}: expected sha256 {expected}"
                         + ("" if found is None else f", found {found}"),
                         "`adapters verify` lists every affected version")


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 1 MiB pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(READ)
    view = memoryview(buf)
    size = 0
    with open_input(path, buffering=0) as fh:  # never a symlink, FIFO or device
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class BlobStore:
    root: Path

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def _tmp(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)  # OSError here is reported by the callers
        return self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}.tmp"

    def _install(self, tmp: Path, sha: str) -> Path:
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)  # same bytes if a concurrent writer won: harmless
        fsync_dir(dest.parent)
        return dest

    def put_file(self, src: str | os.PathLike, expected: str | None = None) -> tuple[str, int]:
        """Store ``src``; returns (sha256, size). Writes nothing if the blob exists.

        With ``expected``, the bytes copied must hash to it (the file changed
        under us otherwise): the copy is verified, not trusted.
        """
        src = Path(src)
        with open_input(src, buffering=0) as fh:  # never a symlink, FIFO or device
            size = os.fstat(fh.fileno()).st_size
            data = fh.readall() if size <= IN_MEMORY else None
        if data is not None:
            sha = hashlib.sha256(data).hexdigest()
            if expected is not None and sha != expected:
                raise RegistryError(f"{src}: file changed while it was being registered")
            if not self.exists(sha):
                self._write(sha, [data])
            return sha, len(data)
        sha, size = sha256_file(src) if expected is None else (expected, size)
        if not self.exists(sha):
            self._copy_verified(src, sha)
        return sha, size

    def _write(self, sha: str, pieces) -> None:
        try:
            self._write_tmp(self._tmp(), sha, pieces)
        except OSError as e:
            raise RegistryError(f"{self.root}: cannot store blob {sha[:12]}… ({e.strerror or e})") from None

    def _write_tmp(self, tmp: Path, sha: str, pieces) -> None:
        try:
            with open(tmp, "wb") as fh:
                for data in pieces:
                    view = memoryview(data).cast("B")
                    fh.writelines(view[start : start + WRITE] for start in range(0, len(view), WRITE))
                fh.flush()
                os.fsync(fh.fileno())
            self._install(tmp, sha)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _copy_verified(self, src: Path, sha: str) -> None:
        try:
            self._copy_tmp(src, sha)
        except OSError as e:
            raise RegistryError(f"{self.root}: cannot store blob {sha[:12]}… ({e.strerror or e})") from None

    def _copy_tmp(self, src: Path, sha: str) -> None:
        tmp = self._tmp()
        try:
            h = hashlib.sha256()
            buf = bytearray(READ)
            view = memoryview(buf)
            with open_input(src, buffering=0) as fin, open(tmp, "wb") as fout:
                while n := fin.readinto(buf):
                    h.update(view[:n])
                    fout.write(view[:n])
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != sha:
                raise RegistryError(f"{src}: file changed while it was being registered")
            self._install(tmp, sha)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def check(self, sha: str, size: int | None = None) -> Path:
        """The blob's path after re-hashing it; BlobCorrupt when missing or altered."""
        p = self.path(sha)
        if not p.is_file():
            raise BlobCorrupt(p, sha, None)
        found, n = sha256_file(p)
        if found != sha or (size is not None and n != size):
            raise BlobCorrupt(p, sha, found)
        return p

    def copy_to(self, sha: str, dest: Path) -> None:
        """Copy a blob to ``dest`` (not linked: the copy is the user's to edit), hashing on the way."""
        src = self.path(sha)
        if not src.is_file():
            raise BlobCorrupt(src, sha, None)
        h = hashlib.sha256()
        buf = bytearray(READ)
        view = memoryview(buf)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb", buffering=0) as fin, open(dest, "wb") as fout:
            while n := fin.readinto(buf):
                h.update(view[:n])
                fout.write(view[:n])
        if h.hexdigest() != sha:
            raise BlobCorrupt(src, sha, h.hexdigest())

    def all_blobs(self) -> dict[str, Path]:
        """Every file under blobs/ab/ that is named like a blob."""
        out = {}
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sub.iterdir():
                if len(f.name) == 64 and f.name.startswith(sub.name):
                    out[f.name] = f
        return out

    def stale_temps(self) -> list[Path]:
        """Temp files whose writer process is gone (killed mid-write)."""
        out = []
        if not self.tmp_dir.is_dir():
            return out
        for f in self.tmp_dir.iterdir():
            pid = f.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                out.append(f)
        return out



"""The filesystem, kept ours.

Output: crash-safe writes (temp path, fsync, rename; ``atomic_dir`` for folders), and
``check_output``: an --out is never an input, inside or above one, or a registry home.
Writes go out in 256 KiB pieces: one multi-MB write() is ~5x slower on the disks we run
on than the same bytes in pieces.

Input: ``regular_files`` / ``check_folder`` list a folder by lstat and refuse a symlink,
FIFO, socket or device inside it by name; ``open_input`` opens with O_NOFOLLOW and
O_NONBLOCK and checks fstat, so a file is never followed out of its folder and a FIFO
never blocks. Every command that walks an input folder goes through them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 256 * 1024


def write_chunked(fh, data) -> None:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        fh.write(view[start : start + CHUNK])


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data, fsync: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_chunked(fh, data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", fsync=fsync)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it becomes ``out`` in one rename.

    On any error (Ctrl-C included) the temp dir is removed and ``out`` is untouched,
    so nothing that looks finished is ever left behind.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        from .errors import AdapterHubError

        raise AdapterHubError(f"{out}: already exists", "choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with contextlib.suppress(OSError):
                    fd = os.open(child, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- inputs we did not write: nothing inside them is followed out of them ---------------------

def _special(mode: int) -> str | None:
    """What a non-regular, non-directory entry is, in words; None for files and folders."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _refuse(path: Path, kind: str, what: str):
    from .errors import UnsafeInput

    hint = ("if you trust its target, replace the link with a copy of that file"
            if "link" in kind else "remove it from the folder")
    return UnsafeInput(path, f"{kind} inside the {what}; refused: nothing in an input folder is "
                             "followed out of it", hint)


def regular_files(folder: str | os.PathLike, recursive: bool = False, what: str = "input folder") -> list[Path]:
    """Every regular file of ``folder`` (sorted; with ``recursive``, also of its subfolders
    but hidden ones and __pycache__), decided by lstat: a symlink, FIFO, socket or device
    anywhere in what is listed is refused by name, before any file is opened."""
    folder = Path(folder)
    out: list[Path] = []
    todo = [folder]
    while todo:
        current = todo.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            from .errors import UnsafeInput

            raise UnsafeInput(current, f"cannot list ({e.strerror or e})") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue  # vanished while listed
            kind = _special(mode)
            if kind:
                raise _refuse(path, kind, what)
            if stat.S_ISREG(mode):
                out.append(path)
            elif recursive and not entry.name.startswith(".") and entry.name != "__pycache__":
                todo.append(path)
    return sorted(out)


def check_folder(folder: str | os.PathLike, what: str = "input folder") -> None:
    """Refuse ``folder`` when one of its entries is a symlink or a special file."""
    regular_files(folder, what=what)


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` that is certainly a regular file: a symlink is not
    followed (O_NOFOLLOW) and a FIFO cannot block the open (O_NONBLOCK, then fstat)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(path, "a symbolic link", "input folder") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, _special(mode) or "a folder", "input folder")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_input(path: str | os.PathLike, buffering: int = -1):
    """``open(path, "rb")`` for a file inside an input folder (see :func:`open_regular`)."""
    return os.fdopen(open_regular(path), "rb", buffering=buffering)


# -- outputs: never an input, inside or above one, or a registry -------------------------------

def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(out: str | os.PathLike, inputs=(), registry_homes=()) -> Path:
    """Refuse an ``--out`` that is an input, lies inside one, or holds one (or the registry
    home) below it: `--overwrite` would delete it, and writing into an input changes what
    was read. Compared on resolved real paths, so a symlink or ``..`` cannot hide it.
    The default registry home (``$ADAPTERS_HOME`` / XDG) is always protected."""
    from .errors import AdapterHubError
    from .paths import registry_home

    o = _real(out)
    checks = [(p, "input") for p in inputs if p is not None]
    checks += [(h, "registry home") for h in (*registry_homes, registry_home(None)) if h is not None]
    for given, what in checks:
        r = _real(given)
        if o == r:
            problem = f"is the {what} {given}"
        elif r in o.parents:
            problem = f"is inside the {what} {given}"
        elif o in r.parents:
            problem = f"contains the {what} {given}"
        else:
            continue
        raise AdapterHubError(f"output folder {out} {problem}: refused, writing there would change or "
                              "delete what it holds", "choose an output folder outside every input and "
                              "the registry home")
    return o

"""Writing outputs so that a full disk is a one-line error and never leaves a half-written output.

Every writer of mptkit (training checkpoints, data shards, HF and GGUF exports, adapters) raises
`DiskFullError` when the filesystem runs out of space: the path, that the disk is full, and about
how much the write needed. `staged(target)` writes an output into a temporary sibling that takes
the target's name only once it is complete, so no reader trusts a half-written file or directory,
and an earlier complete output stays as it was unless the new one replaces it. Standard library
only: every area may import it.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# torch.save and DCP report a full disk as a RuntimeError ("unexpected pos 704 vs 598") or wrap it
# (DCP's CheckpointException, a BaseException): a failure that leaves less than this free is
# taken for one.
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """The filesystem ran out of space while writing `path`."""

    def __init__(self, path: str | Path, needed: int):
        free = _free_bytes(Path(path))
        super().__init__(errno.ENOSPC, f"{path}: the disk is full (writing it needs about {_size(needed)}; "
                                       f"{_size(free)} free there)")
        self.path, self.needed = Path(path), needed

    def __str__(self) -> str:
        return self.strerror


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _is_enospc(exc: BaseException | None) -> bool:
    """ENOSPC in `exc` or its causes; libraries that wrap it (safetensors) keep at least its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_space(exc: BaseException, path: str | Path) -> bool:
    """Whether `exc`, raised while writing under `path`, is the filesystem there running out of space."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return False
    return _is_enospc(exc) or _free_bytes(Path(path)) < _NEARLY_FULL_BYTES


@contextmanager
def full_disk_reported(path: str | Path, needed: int, cleanup: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Run `cleanup` when the body fails (before re-raising), and turn a full disk into DiskFullError."""
    try:
        yield
    except BaseException as exc:
        full = out_of_space(exc, path)  # judged before the cleanup frees what was written
        cleanup()
        if full:
            raise DiskFullError(path, needed) from None
        raise


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: str | Path, needed: int) -> Iterator[Path]:
    """A temporary path beside `target` to write (a file, or a directory to fill): once the body
    finishes it becomes `target` (a directory's entries replace those of the same name in `target`,
    by renames, which need no space); on failure it is removed. `needed`: the bytes it will take."""
    target = Path(target).absolute()  # "." has no name to put the temporary one beside
    temp = target.with_name(f".tmp-{target.name}")
    remove(temp)
    target.parent.mkdir(parents=True, exist_ok=True)
    with full_disk_reported(target, needed, cleanup=lambda: remove(temp)):
        yield temp
    if temp.is_dir():
        target.mkdir(exist_ok=True)
        for entry in temp.iterdir():
            if (target / entry.name).is_dir():  # os.replace puts no directory over a non-empty one
                remove(target / entry.name)
            os.replace(entry, target / entry.name)
        temp.rmdir()
    else:
        os.replace(temp, target)

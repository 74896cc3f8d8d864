"""Atomic, checksummed checkpoint files: the one module through which distlion_ds writes and reads them.

Why: ``torch.save`` straight to the final name leaves a torn file when the process is killed mid-write, a marker
rewritten in place can name a checkpoint that was never completed, and ``torch.load`` does not verify the zip CRCs
(flipped bytes load silently and training goes on differently). So every file is written

    1. to a temporary name in the same folder (``.<name>.tmp.<pid>.<random>``: same filesystem, so the rename is
       atomic; the leading dot keeps it out of the globs that look for checkpoint files), hashed (SHA-256) as it is
       written, then ``fsync``-ed;
    2. its checksum goes into the sidecar ``<name>.sha256`` (itself written by temporary + fsync + rename);
    3. ``os.replace`` onto the final name, then ``fsync`` of the folder (so the rename survives a power loss).

The sidecar holds lines in ``sha256sum`` format (``<64 hex>  <name>``; ``sha256sum -c <name>.sha256`` checks a file
by hand), and the data file stays a plain ``torch.save`` file. Every read hashes the whole file and accepts it only if
the digest is one the sidecar lists: a flipped byte, a truncated file, or a missing or malformed sidecar raises
:class:`CheckpointCorruptError` naming the file and the fix (load the previous checkpoint). Nothing is loaded
unverified.

Overwriting a name (a marker such as DeepSpeed's ``latest`` or the Megatron tracker, or a re-saved tag) is the one
case where two files must change together. The sidecar is first rewritten to accept both the digest it held and the
new one, then the data is renamed over, then the sidecar is narrowed to the new digest. Every crash point therefore
leaves either the complete old or the complete new file, accepted by its sidecar: a marker never becomes unreadable
and never names a torn file. A new name killed before its rename has a sidecar but no file (FileNotFoundError), and a
killed save leaves at most a stray temporary. Markers are written last, after every rank's files are complete, so a
reader that follows the marker always finds a whole checkpoint.

This module imports only the standard library and torch (lean import).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

__all__ = [
    "CHECKSUM_SUFFIX",
    "CheckpointCorruptError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_stream",
    "atomic_write_text",
    "checksum_path",
    "file_sha256",
    "fsync_dir",
    "load_verified",
    "makedirs_durable",
    "read_verified_bytes",
    "read_verified_text",
    "verify_file",
]

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
_CHUNK = 1 << 20  # 1 MiB reads: large enough that hashing runs at memory speed, small enough to stay cache-resident
_SIDECAR_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")


class CheckpointCorruptError(ValueError):
    """A checkpoint file failed verification (checksum mismatch, truncated, or its checksum file is missing).

    A ``ValueError`` so callers that already treat bad checkpoint contents as bad input keep working.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(
            f"checkpoint file {self.path} is refused: {reason}. The file is corrupt or was not completely written "
            "(for example the process was killed during the save); load the previous checkpoint instead, or save "
            "again from a run that holds this state."
        )


def checksum_path(path: str | os.PathLike) -> str:
    """The sidecar file that holds ``path``'s SHA-256."""
    return os.fspath(path) + CHECKSUM_SUFFIX


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder so that renames and creations inside it are durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str | os.PathLike) -> None:
    """``os.makedirs(path, exist_ok=True)``, then ``fsync`` the parent of every folder it created.

    A marker written later must never survive a power loss that the folder it names did not.
    """
    path = os.path.abspath(os.fspath(path))
    missing = []
    probe = path
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    os.makedirs(path, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(os.path.dirname(created))


class _HashingWriter(io.RawIOBase):
    """Forwards writes to a file while hashing them, so a save is hashed without reading the file back."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def _write_temporary(path: str, write: Any) -> tuple[str, Any]:
    """Run ``write(file)`` on a new temporary file beside ``path`` and fsync it; returns (its name, the result).

    On any error the temporary file is removed.
    """
    tmp = _temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # KeyboardInterrupt included: a stray temporary must not outlive a failed save in this process.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp, result


def _rename_durably(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _write_sidecar(path: str, digests: list[str]) -> None:
    name = os.path.basename(path)
    lines = "".join(f"{d}  {name}\n" for d in digests).encode()
    sidecar = checksum_path(path)
    tmp, _ = _write_temporary(sidecar, lambda f: f.write(lines))
    _rename_durably(tmp, sidecar)


def _recorded_digests(path: str) -> list[str]:
    """The digests ``path``'s sidecar accepts; raises CheckpointCorruptError when it is missing or malformed."""
    sidecar = checksum_path(path)
    try:
        with open(sidecar, "rb") as f:
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            path,
            f"its checksum file {os.path.basename(sidecar)} is missing (the save did not complete, or the file was "
            "not written by distlion_ds)",
        ) from None
    text = raw.decode("utf-8", errors="replace")
    digests = []
    for line in text.splitlines():
        match = _SIDECAR_LINE.match(line)
        if match is None or match.group(2) != os.path.basename(path):
            raise CheckpointCorruptError(
                path, f"its checksum file {os.path.basename(sidecar)} is malformed ({raw[:100]!r})"
            )
        digests.append(match.group(1))
    if not digests or not text.endswith("\n"):
        raise CheckpointCorruptError(
            path, f"its checksum file {os.path.basename(sidecar)} is malformed ({raw[:100]!r})"
        )
    return digests


def _commit(tmp: str, path: str, digest: str) -> None:
    """Rename the fsynced temporary ``tmp`` onto ``path`` so that every crash point leaves a verifiable state.

    A new name: the sidecar ``[new]`` is written first, then the rename (killed in between, the file is missing).
    Overwriting a name: the sidecar first accepts both the digest it held and the new one, then the rename, then
    the sidecar is narrowed to the new digest. Whichever rename a crash lands before or after, the file on disk is a
    complete old or new version that its sidecar accepts: an in-place update (a marker, a re-saved tag) never leaves
    a refused file behind, and a corrupted file still matches neither digest.
    """
    previous: list[str] = []
    if os.path.exists(path):
        try:
            previous = [d for d in _recorded_digests(path) if d != digest]
        except CheckpointCorruptError:
            previous = []  # the old file was not verifiable anyway: nothing of it to keep accepting
    _write_sidecar(path, [digest, *previous])
    _rename_durably(tmp, path)
    if previous:
        _write_sidecar(path, [digest])


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably, with its checksum sidecar.

    Args:
        path: the final file name; its folder must exist.
        data: the bytes to write.

    Returns:
        The SHA-256 (hex) recorded in ``<path>.sha256``.
    """
    path = os.fspath(path)
    digest = hashlib.sha256(data).hexdigest()
    tmp, _ = _write_temporary(path, lambda f: f.write(data))
    _commit(tmp, path, digest)
    return digest


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (markers, tracker files)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)`` atomically and durably, with its checksum sidecar.

    The bytes are hashed as ``torch.save`` streams them, so the file is not read back.

    Args:
        obj: what ``torch.save`` accepts.
        path: the final file name; its folder must exist.

    Returns:
        The SHA-256 (hex) recorded in ``<path>.sha256``.
    """
    path = os.fspath(path)

    def write(f: BinaryIO) -> str:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        return writer.sha256.hexdigest()

    tmp, digest = _write_temporary(path, write)
    _commit(tmp, path, digest)
    return digest


def atomic_write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> str:
    """Write a file of any size atomically and durably, with its checksum sidecar, by streaming.

    ``write(f)`` is called with a binary file object (only ``write`` and ``flush``) and writes the whole content
    in as many calls as it likes (a memory-mapped buffer chunk by chunk, for example): the bytes are hashed as they
    pass, so nothing is held in memory twice and nothing is read back. Read such a file with
    :func:`read_verified_bytes`, or :func:`verify_file` and then open it (``numpy.memmap``...).

    Args:
        path: the final file name; its folder must exist.
        write: the writer callback.

    Returns:
        The SHA-256 (hex) recorded in ``<path>.sha256``.
    """
    path = os.fspath(path)

    def stream(f: BinaryIO) -> str:
        writer = _HashingWriter(f)
        write(writer)
        return writer.sha256.hexdigest()

    tmp, digest = _write_temporary(path, stream)
    _commit(tmp, path, digest)
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check(path: str, accepted: list[str], actual: str, size: int) -> None:
    if actual not in accepted:
        raise CheckpointCorruptError(
            path,
            f"SHA-256 mismatch: the file ({size} bytes) hashes to {actual[:16]}..., its checksum file records "
            f"{', '.join(d[:16] + '...' for d in accepted)} (truncated or corrupted)",
        )


def verify_file(path: str | os.PathLike) -> str:
    """Check ``path`` against its sidecar.

    Returns:
        The verified SHA-256 (hex).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointCorruptError: the checksum differs, or the sidecar is missing or malformed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    accepted = _recorded_digests(path)
    actual = file_sha256(path)
    _check(path, accepted, actual, os.path.getsize(path))
    return actual


def read_verified_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, verified against its sidecar (errors as :func:`verify_file`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    accepted = _recorded_digests(path)
    with open(path, "rb") as f:
        data = f.read()
    _check(path, accepted, hashlib.sha256(data).hexdigest(), len(data))
    return data


def read_verified_text(path: str | os.PathLike) -> str:
    """:func:`read_verified_bytes` decoded as UTF-8."""
    return read_verified_bytes(path).decode("utf-8")


def load_verified(path: str | os.PathLike, map_location: Any = None, weights_only: bool = True) -> Any:
    """``torch.load`` of a file written by :func:`atomic_save`, after verifying its checksum.

    The file is hashed in 1 MiB chunks and then loaded from its path, so the peak memory is that of a plain
    ``torch.load`` (not twice the file). Checkpoint files are never rewritten in place (a save renames a new file
    over the name), so what was verified is what is loaded.

    Args:
        path: the checkpoint file.
        map_location: as ``torch.load``.
        weights_only: as ``torch.load`` (default True: tensors, containers and primitive types only).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointCorruptError: the checksum differs, or the sidecar is missing or malformed.
    """
    verify_file(path)
    return torch.load(os.fspath(path), map_location=map_location, weights_only=weights_only)

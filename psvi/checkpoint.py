"""The checkpoint file format both backends write: no pickle, no code, no torn files.

A checkpoint is a NumPy ``.npz`` archive (read with ``allow_pickle=False``) of plain
arrays plus two byte members: a JSON header and the SHA-256 of the header and every
array (name, dtype, shape, bytes). The header says what wrote the file (format
version, package version, backend, engine, guide, latent sites, params, optimizer) so
that loading can refuse a checkpoint that does not fit the engine, and it holds the
state's non-array values (counters, optimizer settings) as a JSON tree whose array
leaves point at the archive's members (:func:`flatten`, :func:`unflatten`).

Writes are atomic (:func:`write`): a temp file in the target's directory, flushed and
fsynced, then ``os.replace``; a failed write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from psvi import __version__
from psvi.checks import caller_stacklevel
from psvi.objective import inner_objective_scale

FORMAT = "psvi-checkpoint"
FORMAT_VERSION = 1
_HEADER, _CHECKSUM = "__psvi_header__", "__psvi_checksum__"


class CheckpointError(ValueError):
    """A file that is not a valid psvi checkpoint (truncated, corrupted, foreign)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"not a valid psvi checkpoint: {os.fspath(path)}: {reason}")


class CheckpointMismatch(ValueError):
    """A valid checkpoint written by another engine, guide, model or optimizer."""


class LegacyCheckpointError(CheckpointError):
    """A checkpoint in the pickle format of psvi before format version 1."""


def flatten(
    tree: Any, to_array: Callable[[Any], tuple[np.ndarray, str] | None]
) -> tuple[Any, dict[str, np.ndarray]]:
    """A JSON-able description of ``tree`` and the arrays it points at.

    ``tree`` nests dicts (keys ``str`` or ``int``), lists, tuples, ``None``, ``bool``,
    ``int``, ``float``, ``str`` and array leaves (NumPy scalars become 0-dim arrays);
    ``to_array(leaf)`` returns the leaf
    as a NumPy array and a tag for :func:`unflatten` (``None``: not an array), and
    anything else is a ``TypeError`` naming where it sits.
    """
    arrays: dict[str, np.ndarray] = {}

    def visit(node: Any, where: str) -> Any:
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, Mapping):
            items = []
            for key, value in node.items():
                if not isinstance(key, str | int):
                    raise TypeError(f"Cannot store the key {key!r} at {where} in a checkpoint.")
                items.append([key, visit(value, f"{where}[{key!r}]")])
            return {"dict": items}
        if isinstance(node, tuple | list):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {kind: [visit(value, f"{where}[{i}]") for i, value in enumerate(node)]}
        converted = to_array(np.asarray(node) if isinstance(node, np.generic) else node)
        if converted is None:
            raise TypeError(f"Cannot store a {type(node).__name__} (at {where}) in a checkpoint.")
        array, tag = converted
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(array, order="C")
        return {"array": name, "tag": tag}

    return visit(tree, "state"), arrays


def unflatten(
    description: Any, arrays: Mapping[str, np.ndarray], from_array: Callable[[np.ndarray, str], Any]
) -> Any:
    """The tree :func:`flatten` described, array leaves rebuilt by ``from_array(array, tag)``."""
    if not isinstance(description, dict):
        return description
    if "dict" in description:
        return {key: unflatten(value, arrays, from_array) for key, value in description["dict"]}
    if "tuple" in description:
        return tuple(unflatten(value, arrays, from_array) for value in description["tuple"])
    if "list" in description:
        return [unflatten(value, arrays, from_array) for value in description["list"]]
    return from_array(arrays[description["array"]], description["tag"])


def header(backend: str, engine: str, **fields: Any) -> dict:
    """The header of a checkpoint of ``engine`` (a class name) in ``backend``."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "backend": backend, "engine": engine, **fields}  # fmt: skip


def _digest(header_bytes: bytes, arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(header_bytes)
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.asarray(array, order="C").tobytes())
    return digest.hexdigest()


def write(path: str | os.PathLike, header: dict, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a checkpoint atomically: the file at ``path`` is the old one or the new one,
    never a torn mix, whatever interrupts the write."""
    path = os.fspath(path)
    header_bytes = json.dumps(header, sort_keys=True).encode()
    members = {name: np.asarray(array, order="C") for name, array in arrays.items()}
    checksum = _digest(header_bytes, members).encode()
    members[_HEADER] = np.frombuffer(header_bytes, np.uint8)
    members[_CHECKSUM] = np.frombuffer(checksum, np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of the checkpoint at ``path``, checksum verified.

    Raises
    ------
    LegacyCheckpointError
        The file is an old pickle checkpoint (not read: pickle can run code).
    CheckpointError
        The file is truncated, corrupted or not a psvi checkpoint.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:1] == b"\x80":
        raise LegacyCheckpointError(path, "a pickle file (psvi's checkpoints before format 1)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise CheckpointError(path, f"not an npz archive, or truncated ({error})") from None
    if any(name.endswith("data.pkl") for name in names):
        raise LegacyCheckpointError(path, "a torch.save pickle archive (psvi's checkpoints before format 1)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(path, f"an unreadable member ({type(error).__name__}: {error})") from None
    if _HEADER not in arrays or _CHECKSUM not in arrays:
        raise CheckpointError(path, "no psvi header")
    header_bytes = arrays.pop(_HEADER).tobytes()
    checksum = arrays.pop(_CHECKSUM).tobytes().decode(errors="replace")
    if _digest(header_bytes, arrays) != checksum:
        raise CheckpointError(path, "its checksum does not match its contents (the file is corrupted)")
    content = json.loads(header_bytes)
    if content.get("format") != FORMAT:
        raise CheckpointError(path, "no psvi header")
    if content.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path, f"format version {content.get('format_version')}; this psvi reads version "
            f"{FORMAT_VERSION} (written by psvi {content.get('package_version')})",
        )  # fmt: skip
    return content, arrays


def check_match(path: str | os.PathLike, what: str, saved: Any, current: Any, fix: str) -> None:
    """Raise :class:`CheckpointMismatch` naming both sides when ``saved != current``."""
    if saved == current:
        return
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = [
            f"{name!r}: {saved.get(name, 'absent')} saved, {current.get(name, 'absent')} here"
            for name in sorted(set(saved) | set(current))
            if saved.get(name) != current.get(name)
        ]
        detail = "; ".join(diffs)
    else:
        detail = f"{saved} saved, {current} here"
    raise CheckpointMismatch(
        f"The checkpoint {os.fspath(path)} does not fit this engine: its {what} differ ({detail}). {fix}"
    )


def legacy_message(error: LegacyCheckpointError, backend_recipe: str) -> str:
    """The refusal of an old pickle checkpoint, with how to convert a trusted one."""
    return (
        f"{error} Loading it would run pickle, which can execute arbitrary code, so psvi "
        f"refuses. If you wrote this file yourself and trust it, convert it once: "
        f"{backend_recipe}"
    )


def warn_if_inner_scale_changed(saved_scale: float | None, prox_weight: float) -> None:
    """Warn (``RuntimeWarning``) when a resumed run's optimizer state was accumulated at
    another scale of the inner steps' objective than :func:`psvi.objective.inner_objective_scale`
    gives at ``prox_weight`` (``saved_scale`` ``None``: written before psvi scaled it,
    i.e. at 1), naming both scales and what the saved moments do."""
    scale = inner_objective_scale(prox_weight)
    saved_scale = 1.0 if saved_scale is None else saved_scale
    if abs(saved_scale - scale) <= 1e-9 * scale:
        return
    ratio = saved_scale / scale
    message = (
        f"The checkpoint's optimizer state was accumulated with the inner steps' objective "
        f"scaled by {saved_scale:.4g}; this engine scales it by {scale:.4g} (psvi.objective."
        f"inner_objective_scale), so the saved moments are {ratio:.3g}x those of the gradients "
        "to come. The run continues from the saved params; an adaptive optimizer (Adam) takes "
        f"steps up to {ratio:.3g}x {'smaller' if ratio > 1 else 'larger'} until its second "
        "moment forgets the old scale (about 1 / (1 - beta2) inner steps). docs/defaults.md, "
        "'The user's optimizer'."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())

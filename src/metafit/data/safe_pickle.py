"""Reading the pickle files some benchmarks are published as (miniImageNet's
``mini-imagenet-cache-*.pkl``, tieredImageNet's ``*_images_png.pkl``/``*_labels.pkl``, CIFAR-100's
python batches) without running code from them.

A pickle can name any importable callable and have it called while loading (``os.system`` through
``__reduce__``), so :func:`load_pickle` uses an unpickler whose ``find_class`` resolves only what
numpy arrays, numpy scalars and dtypes and plain containers need; any other global is refused
before it is imported or called, with a one-line :class:`~metafit.errors.DataError` naming the
file and the global. Python-2 era pickles (CIFAR-100, Ren et al.'s tieredImageNet) load with
``encoding="latin1"`` (their byte strings become ``str``; numpy arrays keep their bytes), and
pickles written by numpy 1 and numpy 2 (``numpy.core`` / ``numpy._core``) both load.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import IO, Any

from ..errors import DataError

__all__ = ["ALLOWED_GLOBALS", "as_text", "load_pickle", "pickle_field"]

#: (module, name) of every global a data pickle may reference: numpy array reconstruction (the
#: protocol 2-4 form and the protocol-5 buffer form), numpy scalars and dtypes, and the
#: builtins and collections that plain containers are rebuilt with
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (served for text codecs only)
})

#: Python 2 module names (pickle protocol 0-2) -> their Python 3 names
_PY2_MODULES = {"__builtin__": "builtins"}


def _module_candidates(module: str) -> list[str]:
    """Where to import ``module`` from: numpy's core package was renamed ``numpy._core`` in
    numpy 2 (``numpy.core`` remains as a deprecated alias), so either name is tried, the
    numpy-2 name first."""
    for prefix in ("numpy.core", "numpy._core"):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):]
            return ["numpy._core" + rest, "numpy.core" + rest]
    return [module]


_TEXT_CODECS = {"latin1": "latin-1", "latin_1": "latin-1", "iso8859_1": "latin-1", "iso_8859_1": "latin-1",
                "l1": "latin-1", "utf8": "utf-8", "utf_8": "utf-8", "ascii": "ascii"}


def _text_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2 (``encode(text, "latin1")``);
    only text with latin-1, utf-8 or ascii is served (no codec is looked up by name)."""
    name = _TEXT_CODECS.get(encoding.lower().replace("-", "_")) if isinstance(encoding, str) else None
    if name is None or not isinstance(obj, str) or errors != "strict":
        raise pickle.UnpicklingError(
            f"_codecs.encode is served only for text with latin-1, utf-8 or ascii; got {str(encoding)[:40]!r}")
    return obj.encode(name)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (``where`` names the file in errors)."""

    def __init__(self, file: IO[bytes], where: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding, errors="strict")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(
                f"Pickle: {self.where} must hold only arrays and plain containers; got a reference to "
                f"{f'{module}.{name}'!r}. Use the dataset's published files."
            )
        if module == "builtins":
            import builtins  # noqa: PLC0415

            return getattr(builtins, name)
        if module == "_codecs":
            return _text_encode
        err: Exception | None = None
        for candidate in _module_candidates(module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError) as e:
                err = e
        raise DataError(
            f"Pickle: {self.where} must reference globals this numpy can load; got {f'{module}.{name}'!r} "
            f"({err}). Install a numpy that has it, or use the dataset's published files."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(
            f"Pickle: {self.where} must hold only arrays and plain containers; got a persistent reference "
            f"{str(pid)[:60]!r}. Use the dataset's published files."
        )


def load_pickle(path_or_file: str | os.PathLike | IO[bytes], where: str | None = None,
                encoding: str = "latin1") -> Any:
    """The object in a data pickle ``path_or_file`` (a path, or a binary file object such as a tar
    member), loaded with only numpy arrays, numpy scalars/dtypes and plain containers allowed.

    ``where`` names the file in errors (default: the path, or the file object's ``name``).
    ``encoding`` decodes Python-2 byte strings (``"latin1"``: they become ``str``, and numpy
    arrays written by Python 2 load; ``"bytes"``: they stay ``bytes``). A reference to any
    other global, a truncated or damaged file, is a one-line :class:`DataError`.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        label = where or repr(str(path_or_file))
        try:
            f = open(path_or_file, "rb")
        except OSError as err:
            raise DataError(
                f"Pickle: {label} must be a readable file; got {type(err).__name__} ({err.strerror}). "
                "Check the path and its permissions."
            ) from err
        with f:
            return _load(f, label, encoding)
    label = where or repr(str(getattr(path_or_file, "name", "<pickle>")))
    return _load(path_or_file, label, encoding)


def _load(f: IO[bytes], label: str, encoding: str) -> Any:
    try:
        return _RestrictedUnpickler(f, label, encoding).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(
            f"Pickle: {label} must be a complete, readable pickle; got an unreadable file ({msg}). "
            "Re-download it or replace it with the dataset's published file."
        ) from err


def pickle_field(mapping: Any, name: str, default: Any = KeyError) -> Any:
    """``mapping[name]``, also when the pickle was loaded with ``encoding="bytes"`` (Python-2 keys
    as ``bytes``); ``default`` if absent (raises ``KeyError`` when no default is given)."""
    if isinstance(mapping, dict):
        for key in (name, name.encode()):
            if key in mapping:
                return mapping[key]
    if default is KeyError:
        raise KeyError(name)
    return default


def as_text(value: Any) -> str:
    """A label read from a pickle as ``str`` (Python-2 byte strings and numpy strings decoded)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if hasattr(value, "item") and not isinstance(value, str):
        return as_text(value.item())
    return str(value)

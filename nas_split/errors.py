"""The one base of every error a user can cause and fix: bad input, configuration, data, files or state.

:class:`NasSplitError` subclasses keep their historical built-in base too (``ConfigError`` is a ``ValueError``,
``DataNotFoundError`` a ``FileNotFoundError``, ...), so ``except ValueError`` in user code still works.  The CLI
prints a ``NasSplitError`` as one line and exits with code 2; any other exception is a bug in nas-split (or in a
plugin) and keeps its traceback (exit code 1).
"""
from __future__ import annotations

from typing import Any

__all__ = ["NasSplitError", "ConfigError", "RunFileError", "UntrustedFileError", "RunLockedError", "DivergedError",
           "first_problem"]


class NasSplitError(Exception):
    """Base of the errors a user causes and can fix; the message is one line naming the problem."""

    def __str__(self) -> str:  # KeyError subclasses would quote their message
        return str(self.args[0]) if self.args else ""


class ConfigError(NasSplitError, ValueError):
    """A configuration or option value that cannot be used; the message names the key and the problem."""


class RunFileError(NasSplitError, ValueError):
    """A file a run wrote (``results.json``, a checkpoint, a stage state) is damaged or of another shape; the
    message names the file and the first wrong key."""


class UntrustedFileError(NasSplitError, ValueError):
    """A file asks for code to be imported or called that the caller did not allow."""


class RunLockedError(NasSplitError, RuntimeError):
    """Another live process writes the same output directory."""


class DivergedError(NasSplitError, FloatingPointError):
    """Training produced a non-finite loss (the recipe, usually the learning rate, needs changing)."""


def first_problem(err: Any) -> tuple[str, str, dict]:
    """``(dotted key, message, the error itself)`` of a pydantic ``ValidationError``'s first error (``(root)`` for
    the document itself, ``unknown key`` for a key the schema forbids): one line for a user."""
    first = err.errors()[0]
    key = ".".join(str(k) for k in first["loc"]) or "(root)"
    return key, ("unknown key" if first["type"] == "extra_forbidden" else first["msg"]), first

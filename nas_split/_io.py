"""Atomic file writes (a temporary file in the same directory, fsync, then rename over the target) and the
output lock that keeps two runs from writing one output."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .distributed import is_main

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_torch_save", "output_lock", "remove_path",
           "interrupt_on_termination", "MAX_CONFIG_BYTES", "load_yaml", "read_mapping", "load_plain"]


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    if not is_main():  # files are written by process 0 of a multi-process run only
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old or the new file, never a partial one."""
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically ``torch.save`` ``obj``."""
    return _atomic(path, lambda f: torch.save(obj, f))


_HELD: set[Path] = set()  # output locks this process holds (taking one again is a no-op)


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _create_lock(lock: Path, me: tuple[int, str]) -> bool:
    """Create ``lock`` holding ``pid host`` in one step, or return False if it exists.  The owner is written to a
    private file first and hard-linked into place, so no other process ever reads the lock empty (an empty lock
    reads as stale and would be taken over from its live owner); where the file system has no hard links, an
    exclusive create and a write."""
    owner = f"{me[0]} {me[1]}\n"
    tmp = lock.with_name(f"{lock.name}.new-{me[0]}")
    tmp.write_text(owner)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the output path ``out`` for a run: ``.NAME.lock`` beside it, holding ``pid host``.

    A second process asking for the same output gets :class:`~nas_split.errors.RunLockedError` naming the owner.
    A lock whose owner on this host no longer runs is stale: it is taken over, and the hidden leftovers of that
    owner (``.NAME.partial-PID`` / ``.NAME.old-PID`` beside ``out``) are removed.  A lock held by another host is
    never taken over.  Re-entrant within one process.

    Raises:
        RunLockedError: another live process holds the lock.
        ConfigError: the directory that would hold ``out`` cannot be created or written.
    """
    from .errors import ConfigError, RunLockedError

    out = Path(out).absolute()
    if out in _HELD or not is_main():  # process 0 of a multi-process run holds the lock for all
        yield out.with_name(f".{out.name}.lock")
        return
    lock = out.with_name(f".{out.name}.lock")
    me = (os.getpid(), socket.gethostname())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if not _create_lock(lock, me):
                owner = _lock_owner(lock)
                if owner is not None and (owner[1] != me[1] or _alive(owner[0])):
                    raise RunLockedError(f"output {str(out)!r} is in use by process {owner[0]} on {owner[1]} "
                                         f"(lock file {str(lock)!r}); wait for it or choose another --out") from None
                stale = lock.with_name(f"{lock.name}.stale-{me[0]}")
                try:
                    os.replace(lock, stale)  # one taker wins; the others retry and find the new owner
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            break
        else:
            raise RunLockedError(f"output {str(out)!r}: could not take its lock {str(lock)!r}")
    except OSError as e:
        raise ConfigError(f"cannot write output {str(out)!r}: {e.strerror or e}") from None
    _HELD.add(out)
    try:
        for left in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(left, ignore_errors=True)
        for left in out.parent.glob(f".{out.name}.old-*"):
            remove_path(left)
        yield lock
    finally:
        _HELD.discard(out)
        lock.unlink(missing_ok=True)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, link or directory tree if it exists."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, as Ctrl-C does, so a
    terminated command releases its locks, removes its partial directories and stops its workers; the previous
    handlers are restored on exit (a no-op outside the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, _interrupt) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


#: Largest configuration or profile file read (a run's configuration is a few kB; a measured profile some 100 kB).
MAX_CONFIG_BYTES = 16 << 20


def load_yaml(text: str) -> Any:
    """YAML's safe loader without aliases: ``*name`` is refused (``yaml.YAMLError``), so a few hundred bytes of
    nested aliases (a "billion laughs" file) cannot expand into gigabytes."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=Loader)


def read_mapping(path: str | os.PathLike, what: str) -> dict:
    """The mapping a YAML or JSON file holds (``.json`` files are read by the JSON parser, which is fast; YAML by
    :func:`load_yaml`); every problem (missing, a directory, over :data:`MAX_CONFIG_BYTES`, not UTF-8, not valid,
    not a mapping) is one :class:`~nas_split.errors.ConfigError` naming ``what`` and the file."""
    import yaml

    from .errors import ConfigError

    p = Path(path)
    where = f"{what} {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{where} is a directory, not a file")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {size} bytes; at most {MAX_CONFIG_BYTES} are read")
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else load_yaml(text)
    except FileNotFoundError:
        raise ConfigError(f"{where} not found") from None
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping, not {type(data).__name__}")
    return data


def load_plain(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """What the torch file ``path`` holds, read with ``torch.load(weights_only=True)``: tensors and plain data only,
    so a pickle naming code is refused, never run.  Every failure (missing, truncated, not a torch file, an object
    ``weights_only`` refuses) is one :class:`~nas_split.errors.RunFileError` naming ``what`` and the file; torch's
    warnings about legacy files are not shown."""
    import pickle
    import warnings

    from .errors import RunFileError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunFileError(f"{what} {str(path)!r} not found") from None
    except pickle.UnpicklingError as e:
        refused = any(w in str(e).lower() for w in ("unsupported global", "unsupported class"))  # names code
        why = "it holds objects other than tensors and plain data (not unpickled)" if refused \
            else "not a file torch.save wrote"
        raise RunFileError(f"{what} {str(path)!r} cannot be read: {why}") from None
    except Exception as e:  # truncated zip, wrong magic number, ...
        raise RunFileError(f"{what} {str(path)!r} cannot be read: not a file torch.save wrote "
                           f"({type(e).__name__})") from None

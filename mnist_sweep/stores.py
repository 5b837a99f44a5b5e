"""The stores a sweep shares between processes (the MLflow store, the Optuna study's database), and
the lock that serialises what must not race on them.

An embedded sqlite store is one file that every process on this machine opens: its first use
creates the schema (two processes doing that at once crash in the migration), and a few
read-then-write steps (the study's MLflow parent, the champion alias) must not interleave. A file
lock beside the database serialises them. A server store needs no such lock for its schema.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


@contextlib.contextmanager
def lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the store ``uri`` for the block: a file lock beside a sqlite
    database (all its users are processes of this machine); nothing for a server store."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def redact(uri: str) -> str:
    """``uri`` with any password replaced by ``***``, for logs and error messages."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", uri)

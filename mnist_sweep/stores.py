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
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

CONNECT_TIMEOUT_S = 10  # a database server that does not answer: an error after this, not a hang
ADVISORY_LOCK_KEY = 0x6D6E6973  # "mnis": the one PostgreSQL advisory lock every worker takes


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def is_postgres(uri: str) -> bool:
    return uri.startswith("postgresql")


def engine_kwargs(uri: str) -> dict:
    """SQLAlchemy engine options for the database ``uri``: a PostgreSQL server that does not
    answer is an error after ``CONNECT_TIMEOUT_S``, not a hang (libpq waits forever by default)."""
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if is_postgres(uri) else {}


@contextlib.contextmanager
def lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the store ``uri`` for the block: a file lock beside a sqlite
    database (all its users are processes of this machine), an advisory lock on a PostgreSQL
    server (its users are anywhere); nothing for an MLflow tracking server, which serialises itself."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield
    elif is_postgres(uri):
        with _advisory_lock(uri):
            yield
    else:
        yield


@contextlib.contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    engine = sqlalchemy.create_engine(uri, poolclass=NullPool, **engine_kwargs(uri))
    try:
        connection = engine.connect()
    except sqlalchemy.exc.OperationalError as err:
        raise StoreError(f"cannot reach the database {redact(uri)}: {one_line(err.orig)}") from None
    try:
        with connection:  # the lock is the session's: it ends with the connection, or the process
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            yield
    finally:
        engine.dispose()


class StoreError(ConnectionError):
    """A store cannot be reached or used; the message says which (redacted) and why, in one line."""


def redact(text: str) -> str:
    """``text`` with the password of every URI in it (``//user:password@``, ``password=…``)
    replaced by ``***``: for params, tags, logged config files, log lines and error messages."""
    text = re.sub(r"(//[^/@:\s]*:)[^/@\s]*@", r"\1***@", text)
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", text)


class Redact(logging.Filter):
    """A logging filter that redacts every record its handler writes: Hydra's launcher logs each
    job's overrides, and a store URI typed there may carry a password (conf/config.yaml)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def one_line(error: BaseException) -> str:
    """An error's message, redacted, on one line (database drivers and HTTP clients write several)."""
    return redact(" ".join(str(error).split()))

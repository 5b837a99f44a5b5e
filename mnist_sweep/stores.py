"""The stores a sweep shares between processes (the MLflow store, the Optuna study's database), and
the lock that serialises what must not race on them.

An embedded sqlite store is one file that every process on this machine opens: its first use
creates the schema (two processes doing that at once crash in the migration), and a few
read-then-write steps (the study's MLflow parent, the champion alias) must not interleave. A file
lock beside the database serialises them. A server store needs no such lock for its schema. And
an embedded store keeps a write-ahead log, which makes each commit cheaper (:func:`write_ahead`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import requests
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

CONNECT_TIMEOUT_S = 10  # a database server that does not answer: an error after this, not a hang
ADVISORY_LOCK_KEY = 0x6D6E6973  # "mnis": the one PostgreSQL advisory lock every worker takes
# What the OS and the databases say when a store's file cannot be used, as (whose code, the code):
# SQLite's primary result codes, errno values (EEXIST: a folder on the path is a file), SQLSTATEs
NOT_A_DATABASE = {("sqlite", sqlite3.SQLITE_NOTADB), ("sqlite", sqlite3.SQLITE_CORRUPT)}
READ_ONLY = {*(("sqlite", code) for code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM)),
             *(("errno", code) for code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST))}
DISK_FULL = {("sqlite", sqlite3.SQLITE_FULL), ("errno", errno.ENOSPC), ("sqlstate", "53100")}
# MLflow's error codes for a tracking server that failed inside (its database away), not the request
TRACKING_DOWN = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"}
# Riding out an outage: the first try again after this, each wait twice the last, up to the most;
# a store back after a restart is found within MAX_PAUSE_S, without hammering one that is down
FIRST_PAUSE_S, MAX_PAUSE_S = 0.5, 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")
_WRITING_AHEAD: set[Path] = set()  # the sqlite databases this process put in WAL mode (write_ahead)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def is_postgres(uri: str) -> bool:
    return uri.startswith("postgresql")


def is_server(uri: str) -> bool:
    """Whether the MLflow store ``uri`` is a tracking server, which keeps and serves artifacts itself."""
    return uri.startswith(("http://", "https://"))


def engine_kwargs(uri: str) -> dict:
    """SQLAlchemy engine options for the database ``uri``: a PostgreSQL server that does not
    answer is an error after ``CONNECT_TIMEOUT_S``, not a hang (libpq waits forever by default),
    and a pooled connection is checked before use, so a server restarted between two calls
    costs nothing (its old connections are dead; without the check the next call fails)."""
    if not is_postgres(uri):
        return {}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}


def write_ahead(uri: str) -> None:
    """Put the sqlite database of ``uri`` in write-ahead-log mode (its file keeps it; the first
    process that opens it sets it, each later one checks it, once): a commit then syncs the disk
    once, where SQLite's default rollback journal syncs it about four times (the journal, the
    database, the journal's folder). A sweep trial commits ~64 times to its two stores: ~25 ms of
    its overhead (docs/benchmark.md). And a reader (the MLflow UI) no longer blocks a writer. WAL
    wants every user of the file on one machine, as a local store does already. Nothing for a
    server's URI.

    What a process committed waits in the log beside the file (``<file>-wal``) until a checkpoint
    moves it in; the process's own at its exit, so that the file alone, copied, is the whole store."""
    path = sqlite_path(uri)
    if path is None or path in _WRITING_AHEAD:  # a sweep's trials reopen it: checked once a process
        return
    wait_s = float(make_url(uri).query.get("timeout", 5))  # the first switch waits for the writers, as they do
    with contextlib.closing(sqlite3.connect(path, timeout=wait_s)) as database:
        database.execute("PRAGMA journal_mode=WAL")
    _WRITING_AHEAD.add(path)
    atexit.register(_checkpoint, path)


def _checkpoint(path: Path) -> None:
    """Move the log's commits into the database file, without waiting: what another process's
    reader still needs stays in the log, for that process's exit to move. A file gone or unusable
    since keeps its log for the next process that opens it: nothing is lost."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True)) as database:
            database.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as err:
        log.debug("no checkpoint of %s at exit: %s", path, err)


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
        # from its cause: a worker riding out an outage (ride_out) knows it for the database gone
        raise StoreError(f"cannot reach the database {redact(uri)}: {one_line(err.orig)}") from err
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


def gone(error: BaseException) -> bool:
    """Whether ``error`` says a store stopped answering (the database's connection lost or refused,
    the tracking server unreachable or failing inside), not that what was asked of it was wrong: the
    trial it cut short deserves another run once the store is back."""
    return database_gone(error) or any(
        isinstance(each, requests.RequestException) or getattr(each, "error_code", None) in TRACKING_DOWN
        for each in causes(error))


def database_gone(error: BaseException) -> bool:
    """Whether ``error`` says the database stopped answering (a lost or refused connection)."""
    return any(isinstance(each, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
               for each in causes(error))


def can_go_away(uri: str) -> bool:
    """Whether the store ``uri`` is a server (PostgreSQL, an MLflow tracking server), which can stop
    answering for a while and come back: a worker rides out its outages (:func:`ride_out`). A local
    sqlite file does not come back by waiting: its errors (a full disk, a lock) are errors at once."""
    return bool(uri) and not uri.startswith("sqlite:")


def ride_out(call: Callable[[], T], what: str, uri: str, bound_s: float) -> T:
    """``call()``, riding out an outage of the store ``uri`` (``what`` it is) shorter than ``bound_s``
    seconds: while it raises an error that says the store is gone (:func:`gone`), wait and call again,
    saying so once, and once more when the store answers. Past the bound (counted from the first
    failure), or for any other error, or a full disk, or a store that cannot go away
    (:func:`can_go_away`), the error goes on. ``call`` must be safe to repeat: a try that failed is
    tried again whole."""
    bound_s = bound_s if can_go_away(uri) else 0
    began, pause = None, FIRST_PAUSE_S
    while True:
        try:
            result = call()
        except Exception as err:
            now = time.monotonic()
            left = bound_s - (now - began if began is not None else 0)
            if not gone(err) or disk_full(err) or left <= 0:
                raise
            if began is None:
                began = now
                log.warning("%s %s stopped answering (%s): waiting up to %s s for it", what, redact(uri),
                            one_line(err), bound_s)
            time.sleep(min(pause, left))
            pause = min(2 * pause, MAX_PAUSE_S)
            continue
        if began is not None:
            log.warning("%s answers again, after %.0f s", what, time.monotonic() - began)
        return result


@contextlib.contextmanager
def answering(what: str, uri: str) -> Iterator[None]:
    """In the block, the database ``uri`` (``what`` it is) that stops answering is a
    :class:`StoreError` naming it, in one line, where its driver's error would be a traceback
    (Optuna words it as bad data: "An exception is raised during the commit")."""
    try:
        yield
    except Exception as err:
        if isinstance(err, StoreError) or not database_gone(err):
            raise
        said = [one_line(each) for each in causes(err) if one_line(each)]  # the driver's words come last
        raise StoreError(f"{what} {redact(uri)} stopped answering ({said[-1]}): this worker stops; "
                         "the study keeps every finished trial, and the same command goes on from there "
                         "once it is back") from None


def one_line(error: BaseException) -> str:
    """An error's message, redacted, on one line (database drivers and HTTP clients write several),
    less what SQLAlchemy appends to its driver's message: the statement, its parameters, a link."""
    text = str(error).split("\n[SQL: ")[0].split("\n(Background on this error at:")[0]
    return redact(" ".join(text.split()))


@contextlib.contextmanager
def opening(what: str, uri: str, setting: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Open the store ``uri`` (``what`` it is; ``setting``, the config key that names it) in the
    block: an error of SQLAlchemy's, SQLite's, the file system's or ``kinds`` becomes a
    :class:`StoreError` that names the store and what to do, in one line."""
    try:
        yield
    except StoreError:
        raise
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, OSError, *kinds) as err:
        raise StoreError(cannot_open(what, uri, setting, err)) from None


def cannot_open(what: str, uri: str, setting: str, error: BaseException) -> str:
    """Why the store ``uri`` cannot be opened, and what to do, for :func:`opening`."""
    path, codes, reason = sqlite_path(uri), _codes(error), one_line(error)
    if codes & DISK_FULL:
        return disk_full_message([path]) if path else f"{what} {redact(uri)}: its server's disk is full ({reason})"
    if path and codes & NOT_A_DATABASE:
        return (f"{what} {path} is not an SQLite database ({reason}): move it away (a new one is made there), "
                f"or point {setting} at another file")
    if path and codes & READ_ONLY:
        return (f"cannot write {what} {path} ({why_unwritable(path, error)}): make it writable, or set "
                f"paths.outputs (or {setting}) elsewhere")
    return f"cannot use {what} {redact(uri)}: {reason}"


def why_unwritable(path: Path, error: BaseException) -> str:
    """Why ``path`` could not be written, as ``error`` says, or as a file on the way to it does
    (the OS says "File exists" or "Not a directory")."""
    above = _existing(path.parent)
    return one_line(error) if above.is_dir() else f"{above} is a file, not a folder"


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then the errors it was raised from or while handling, down to what the OS or
    the database driver said (an error raised ``from None`` ends the chain)."""
    while error is not None:
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _codes(error: BaseException) -> set[tuple[str, int | str]]:
    """The errno, SQLite result and SQLSTATE codes anywhere in ``error``'s chain, as (whose, code)."""
    codes = set()
    for each in causes(error):
        codes |= {("errno", getattr(each, "errno", None)), ("sqlstate", getattr(each, "sqlstate", None))}
        if getattr(each, "sqlite_errorcode", None) is not None:  # an extended code's low byte is its primary
            codes.add(("sqlite", each.sqlite_errorcode & 0xFF))
    return {(whose, code) for whose, code in codes if code is not None}


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` comes from a write that found its disk full (a file, SQLite, PostgreSQL)."""
    return bool(_codes(error) & DISK_FULL)


def disk_full_message(places: Iterable[str | Path]) -> str:
    """A full disk, in one line: names the fullest disk among ``places`` (the files and folders
    a process writes, and the temporary folder) and what to do."""
    free = {str(place): shutil.disk_usage(_existing(Path(place))).free for place in [*places, tempfile.gettempdir()]}
    fullest = min(free, key=free.get)  # the first of equals: the caller's first place
    return (f"the disk holding {fullest} ran out of space ({free[fullest] // 1024} KiB left now): free space "
            "there, or set paths.outputs to another disk, then run the same command again; what finished is kept")


def written(*where: str | None) -> list[Path]:
    """The local files and folders among ``where``: paths, and store URIs (only sqlite ones are
    local; a server, an unset store, a scheme's URI are not)."""
    places = []
    for place in where:
        if place and place.startswith("sqlite:"):
            places.append(sqlite_path(place))
        elif place and not re.match(r"^[a-z][a-z0-9+.-]*:", place):
            places.append(Path(place))
    return [place for place in places if place is not None]


def _existing(path: Path) -> Path:
    """``path``, or the nearest folder above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

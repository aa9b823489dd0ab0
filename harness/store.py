"""The results store: SQLAlchemy 2.0 ORM over SQLite (default, WAL) or any SQLAlchemy URL.

Only the driver process writes; Ray workers send results back (see ``harness.orchestration.scheduler``).
All queries go through the ORM: no SQL is built from strings.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import struct
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import NullPool

from harness.errors import HarnessError
from harness.versions import package_versions

log = logging.getLogger(__name__)

DEFAULT_DB = "sqlite:///runs/harness.db"
STATUSES = ("pending", "running", "finished", "failed")


class RunBusy(HarnessError):
    """The run is being run by another live process on this machine."""

    def __init__(self, run_key: str, owner: str | None) -> None:
        super().__init__(f"run {run_key} is running in another process ({owner}); not started "
                         f"twice")
        self.run_key, self.owner = run_key, owner


def owner_tag() -> str:
    """What a run row's ``host`` holds while it runs: the machine and the driver's pid."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def owner_alive(host: str | None) -> bool:
    """Whether the process named by :func:`owner_tag` still runs a harness command here.

    Only this machine's processes can be checked; a row of another machine (or written before
    pids were recorded) counts as not alive, so a rerun takes it over as before. A recycled
    pid is told apart by its command line (Linux), which must name the harness.
    """
    name, _, pid = (host or "").rpartition(" pid ")
    if name != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"harness" in cmdline.read_bytes()
        except OSError:
            return True
    return True


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str | None] = mapped_column(Text)  # YAML text or CLI line
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_key: Mapped[str] = mapped_column(String(12), unique=True, index=True)
    spec_hash: Mapped[str] = mapped_column(String(64), unique=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id"))
    method: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(300), index=True)
    fmt: Mapped[str | None] = mapped_column(String(16))
    bits: Mapped[int | None] = mapped_column(Integer)
    group_size: Mapped[int | None] = mapped_column(Integer)
    profile: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    wall_s: Mapped[float | None] = mapped_column(Float)
    versions: Mapped[dict | None] = mapped_column(JSON)
    host: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    metrics: Mapped[list[Metric]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "name", "task"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # "" rather than NULL so the unique constraint holds on every backend.
    task: Mapped[str] = mapped_column(String(100), default="")
    value: Mapped[float | None] = mapped_column(Float)
    extra: Mapped[dict | None] = mapped_column(JSON)
    run: Mapped[Run] = relationship(back_populates="metrics")


class TrainStep(Base):
    __tablename__ = "train_steps"
    __table_args__ = (UniqueConstraint("run_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)


class LayerStat(Base):
    __tablename__ = "layer_stats"
    __table_args__ = (UniqueConstraint("run_id", "layer", "module", "stat"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[str] = mapped_column(String(100))
    module: Mapped[str] = mapped_column(String(100))
    stat: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(50))
    path: Mapped[str] = mapped_column(Text)


class Series(Base):
    """Per-item values of one evaluation (``nll`` per perplexity window, task = the data set;
    ``correct`` per example, task = the lm-eval task), float64 little-endian in one blob: a
    full-profile evaluation is 75 windows, an accuracy task up to a few thousand examples."""

    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("run_id", "name", "task"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(300), default="")
    n: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def pack_series(values) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def unpack_series(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 8}d", data))


_NO_WAL_REPORTED: set[str] = set()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """Writable SQLite connections only (read-only ones never switch the journal mode)."""
    cur = dbapi_conn.cursor()
    try:
        row = cur.execute("PRAGMA journal_mode=WAL").fetchone()
        mode = str(row[0]).lower() if row else "unknown"
        problem = None if mode in ("wal", "memory") else f"the journal mode stayed {mode!r}"
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem:
        _report_no_wal(cur, problem)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _report_no_wal(cur, problem: str) -> None:
    """Without WAL a reader (the dashboard) blocks the writer: the run goes on, but the user
    should know why it stalls. Once per file; temporary and in-memory databases need no WAL."""
    files = [row[2] for row in cur.execute("PRAGMA database_list").fetchall() if row[1] == "main"]
    path = files[0] if files else ""
    if not path or path in _NO_WAL_REPORTED:
        return
    _NO_WAL_REPORTED.add(path)
    log.warning("database %s: SQLite could not switch to WAL journaling (%s); a reader such as "
                "the dashboard will block writes while it reads. Keep the file on a local disk, "
                "or use --db postgresql+psycopg://...", path, problem)


def _bad_db(url: str, why: str, readonly: bool = False) -> HarnessError:
    kind = "an existing" if readonly else "a writable"
    return HarnessError(f"database {url!r} is unusable ({why}); pass {kind} "
                        f"--db such as {DEFAULT_DB} or postgresql+psycopg://user@host/db")


def make_engine(url: str = DEFAULT_DB, readonly: bool = False) -> Engine:
    """Creates an engine for ``url``; SQLite files get their folder, WAL and a busy timeout.

    Raises:
        HarnessError: malformed URL, missing driver, unreachable or unwritable database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise _bad_db(url, "not a SQLAlchemy URL", readonly) from None
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db).expanduser()
            if readonly:
                if not path.exists():
                    raise HarnessError(f"database file {path} does not exist; run `harness run` "
                                       f"first or pass --db with an existing database")
                return _readonly_sqlite(path)
            else:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise _bad_db(url, f"cannot create {path.parent}: {exc.strerror}") from None
        connect_args["timeout"] = 30
    try:
        engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise _bad_db(url, f"{type(exc).__name__}: {exc}", readonly) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


READONLY_BUSY_S = 5  # WAL readers wait only for a checkpoint; a writer's lock is not theirs


def _readonly_sqlite(path: Path) -> Engine:
    """A read-only engine on a SQLite file (the dashboard, ``list``, ``show``, ``eval``).

    The URI comes from pathlib, so '#', '?', '%' and spaces in a file name stay part of the
    name (a hand-built URI cut the name at '#' and created a new, empty database there). Each
    session gets a fresh connection (NullPool): a file replaced under a running dashboard, as
    rsync, mv or a new ``harness run`` into a deleted path do, is read anew rather than
    through connections to the old inode. A WAL database in a folder this user cannot write
    (read-only media, another user's results) has no shared-memory file to create: SQLite
    opens it only as immutable, which is tried next (no live updates, nothing to update).
    """
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=READONLY_BUSY_S)) as con:
            con.execute("SELECT count(*) FROM sqlite_master")
    except sqlite3.OperationalError as exc:
        if "unable to open" not in str(exc):  # "locked": immutable would read past a writer
            raise HarnessError(f"database file {path} cannot be read ({exc}); retry once no "
                               f"other process holds it locked") from None
        uri += "&immutable=1"  # if this fails too, Store reports the error in one line

    def connect():
        return sqlite3.connect(uri, uri=True, timeout=READONLY_BUSY_S, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


class Store:
    """Read/write access to the results database.

    Args:
        url: SQLAlchemy URL.
        readonly: open without creating tables (dashboard, ``harness list``).
    """

    def __init__(self, url: str = DEFAULT_DB, readonly: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, readonly=readonly)
        try:
            if not readonly:
                Base.metadata.create_all(self.engine)
            with self.engine.connect():
                pass
        except (OperationalError, SQLAlchemyError) as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            raise _bad_db(url, reason, readonly) from None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # --- runs --------------------------------------------------------------------------
    def find_run(self, spec_hash: str) -> Run | None:
        with self.session() as s:
            return s.scalar(select(Run).where(Run.spec_hash == spec_hash))

    def begin_run(self, spec, experiment_id: int | None = None, device: str | None = None) -> Run:
        """Creates the run row, or resets a failed/interrupted one for a rerun (same identity).

        Metrics of the earlier attempt are deleted (they are recomputed); train steps are kept so
        a resumed training continues its curve.

        Raises:
            RunBusy: another live process on this machine is running it (two terminals sharing
                the FP reference, say); taking it over would delete that process's metrics.
        """
        try:
            return self._begin_run(spec, experiment_id, device)
        except IntegrityError:  # another process created the row between our select and insert
            return self._begin_run(spec, experiment_id, device)

    def _begin_run(self, spec, experiment_id: int | None, device: str | None) -> Run:
        h = spec.spec_hash()
        with self.session() as s, s.begin():
            run = s.scalar(select(Run).where(Run.spec_hash == h))
            if run is not None and run.status == "running" and owner_alive(run.host):
                raise RunBusy(run.run_key, run.host)
            if run is None:
                run = Run(run_key=h[:12], spec_hash=h, method=spec.method, model=spec.model,
                          fmt=spec.fmt, bits=spec.bits, group_size=spec.group_size,
                          profile=spec.profile, seed=spec.seed,
                          spec=json.loads(spec.canonical_json()))
                s.add(run)
            else:
                s.execute(delete(Metric).where(Metric.run_id == run.id))
                s.execute(delete(Artifact).where(Artifact.run_id == run.id))
                s.execute(delete(Series).where(Series.run_id == run.id))
            run.experiment_id = experiment_id if experiment_id is not None else run.experiment_id
            run.status = "running"
            run.error = None
            run.started_at = utcnow()
            run.finished_at = None
            run.host = owner_tag()
            run.device = device
            run.versions = package_versions()
            run.attempts = (run.attempts or 0) + 1
            s.flush()
        return run

    def end_run(self, run_id: int, status: str, error: str | None = None,
                wall_s: float | None = None) -> None:
        assert status in STATUSES
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            run.status = status
            run.error = error
            run.finished_at = utcnow()
            run.wall_s = wall_s

    def add_metric(self, run_id: int, name: str, value: float | None, task: str | None = None,
                   extra: dict | None = None) -> None:
        """Inserts or replaces one metric (unique per run, name, task)."""
        task = task or ""
        with self.session() as s, s.begin():
            row = s.scalar(select(Metric).where(Metric.run_id == run_id, Metric.name == name,
                                                Metric.task == task))
            if row is None:
                s.add(Metric(run_id=run_id, name=name, task=task, value=value, extra=extra))
            else:
                row.value, row.extra = value, extra

    def add_train_step(self, run_id: int, step: int, loss: float, lr: float,
                       tokens_per_s: float) -> None:
        with self.session() as s, s.begin():
            row = s.scalar(select(TrainStep).where(TrainStep.run_id == run_id,
                                                   TrainStep.step == step))
            if row is None:
                s.add(TrainStep(run_id=run_id, step=step, loss=loss, lr=lr,
                                tokens_per_s=tokens_per_s))
            else:
                row.loss, row.lr, row.tokens_per_s = loss, lr, tokens_per_s

    def add_layer_stat(self, run_id: int, layer: str, module: str, stat: str,
                       value: float) -> None:
        with self.session() as s, s.begin():
            row = s.scalar(select(LayerStat).where(
                LayerStat.run_id == run_id, LayerStat.layer == layer,
                LayerStat.module == module, LayerStat.stat == stat))
            if row is None:
                s.add(LayerStat(run_id=run_id, layer=layer, module=module, stat=stat, value=value))
            else:
                row.value = value

    def add_artifact(self, run_id: int, kind: str, path: str) -> None:
        with self.session() as s, s.begin():
            row = s.scalar(select(Artifact).where(Artifact.run_id == run_id,
                                                  Artifact.kind == kind))
            if row is None:
                s.add(Artifact(run_id=run_id, kind=kind, path=path))
            else:
                row.path = path

    def add_series(self, run_id: int, name: str, values, task: str | None = None) -> None:
        """Inserts or replaces one series (unique per run, name, task)."""
        task, data = task or "", pack_series(values)
        with self.session() as s, s.begin():
            row = s.scalar(select(Series).where(Series.run_id == run_id, Series.name == name,
                                                Series.task == task))
            if row is None:
                s.add(Series(run_id=run_id, name=name, task=task, n=len(values), data=data))
            else:
                row.n, row.data = len(values), data

    def series(self, run_id: int, name: str | None = None) -> dict[tuple[str, str], list[float]]:
        """``{(name, task): values}`` of a run; empty for databases written before series
        existed (a read-only store does not create the table)."""
        if not inspect(self.engine).has_table(Series.__tablename__):
            return {}
        with self.session() as s:
            q = select(Series).where(Series.run_id == run_id)
            if name is not None:
                q = q.where(Series.name == name)
            return {(r.name, r.task): unpack_series(r.data) for r in s.scalars(q)}

    def truncate_train_steps(self, run_id: int, after_step: int) -> None:
        """Drops logged steps beyond a checkpoint, so a resumed run does not duplicate them."""
        with self.session() as s, s.begin():
            s.execute(delete(TrainStep).where(TrainStep.run_id == run_id,
                                              TrainStep.step > after_step))

    def experiment_id(self, name: str, source: str | None = None) -> int:
        with self.session() as s, s.begin():
            exp = s.scalar(select(Experiment).where(Experiment.name == name))
            if exp is None:
                exp = Experiment(name=name, source=source)
                s.add(exp)
                s.flush()
            elif source is not None:
                exp.source = source
            return exp.id

    # --- reading -----------------------------------------------------------------------
    def runs(self, status: str | None = None) -> list[Run]:
        with self.session() as s:
            q = select(Run).order_by(Run.id)
            if status:
                q = q.where(Run.status == status)
            return list(s.scalars(q))

    def get_run(self, ref: str | int) -> Run:
        """A run by numeric id or (a unique prefix of) its run key.

        Raises:
            HarnessError: no such run, or an ambiguous prefix.
        """
        with self.session() as s:
            ref = str(ref)
            if ref.isdigit():
                run = s.get(Run, int(ref))
                if run is not None:
                    return run
            matches = list(s.scalars(select(Run).where(Run.run_key.startswith(ref, autoescape=True))))
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise HarnessError(f"run {ref!r} is ambiguous ({len(matches)} runs match); "
                                   f"give more characters of the run key")
        raise HarnessError(f"no run {ref!r} in {self.url}; `harness list` shows the runs")

    def metrics(self, run_id: int) -> list[Metric]:
        with self.session() as s:
            return list(s.scalars(select(Metric).where(Metric.run_id == run_id)
                                  .order_by(Metric.task, Metric.name)))

    def metric_dict(self, run_id: int) -> dict[str, float | None]:
        """``{name: value}``, task metrics keyed ``task/name``."""
        return {(f"{m.task}/{m.name}" if m.task else m.name): m.value
                for m in self.metrics(run_id)}

    def train_steps(self, run_id: int) -> list[TrainStep]:
        with self.session() as s:
            return list(s.scalars(select(TrainStep).where(TrainStep.run_id == run_id)
                                  .order_by(TrainStep.step)))

    def layer_stats(self, run_id: int) -> list[LayerStat]:
        with self.session() as s:
            return list(s.scalars(select(LayerStat).where(LayerStat.run_id == run_id)))

    def artifacts(self, run_id: int) -> dict[str, str]:
        with self.session() as s:
            return {a.kind: a.path for a in s.scalars(select(Artifact)
                                                      .where(Artifact.run_id == run_id))}

    def run_as_dict(self, run: Run) -> dict[str, Any]:
        """Machine-readable form used by ``harness list --json`` / ``harness show --json``."""
        return {
            "id": run.id, "run_key": run.run_key, "method": run.method, "model": run.model,
            "fmt": run.fmt, "bits": run.bits, "group_size": run.group_size,
            "profile": run.profile, "seed": run.seed, "status": run.status, "error": run.error,
            "wall_s": run.wall_s, "attempts": run.attempts, "host": run.host,
            "device": run.device,
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "spec": run.spec, "versions": run.versions,
            "metrics": self.metric_dict(run.id), "artifacts": self.artifacts(run.id),
        }

import sqlite3

import pytest

from harness.config import EvalSpec, RunSpec
from harness.errors import HarnessError
from harness.store import Store


def _spec(bits=3):
    return RunSpec(model="tiny-llama", method="rtn",
                   config={"bits": bits, "group_size": 64, "fmt": "int"}, eval=EvalSpec())


def test_run_lifecycle_and_metrics(store):
    spec = _spec()
    run = store.begin_run(spec, device="cpu")
    store.add_metric(run.id, "ppl", 12.5, extra={"tokens": 100})
    store.add_metric(run.id, "ppl", 12.0)  # replaces, no duplicate row
    store.add_metric(run.id, "acc", 0.4, task="cloze")
    store.end_run(run.id, "finished", wall_s=3.0)
    got = store.get_run(run.run_key[:6])
    assert got.status == "finished" and got.bits == 3 and got.group_size == 64
    assert store.metric_dict(run.id) == {"ppl": 12.0, "cloze/acc": 0.4}
    d = store.run_as_dict(got)
    assert d["spec"]["method"] == "rtn" and d["versions"]["torch"]


def test_rerun_of_failed_run_reuses_row_and_clears_metrics(store):
    spec = _spec()
    run = store.begin_run(spec)
    store.add_metric(run.id, "ppl", 1.0)
    store.add_train_step(run.id, 1, 2.0, 1e-5, 100.0)
    store.add_train_step(run.id, 2, 1.5, 1e-5, 100.0)
    store.end_run(run.id, "failed", "boom")
    again = store.begin_run(spec)
    assert again.id == run.id and again.attempts == 2 and again.error is None
    assert store.metric_dict(run.id) == {}
    store.truncate_train_steps(run.id, 1)
    assert [s.step for s in store.train_steps(run.id)] == [1]


def test_sqlite_uses_wal(db_url, store):
    path = db_url.removeprefix("sqlite:///")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_readonly_store_cannot_write(db_url, store):
    store.begin_run(_spec())
    ro = Store(db_url, readonly=True)
    assert len(ro.runs()) == 1
    from sqlalchemy.exc import OperationalError

    with pytest.raises(OperationalError, match="readonly"):
        ro.begin_run(_spec(bits=2))


def test_bad_urls_are_one_line_errors(tmp_path):
    with pytest.raises(HarnessError, match="not a SQLAlchemy URL"):
        Store("not a url")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HarnessError, match="unusable"):
        Store(f"sqlite:///{blocker}/sub/harness.db")
    with pytest.raises(HarnessError, match="does not exist"):
        Store(f"sqlite:///{tmp_path}/missing.db", readonly=True)


def test_unknown_run(store):
    with pytest.raises(HarnessError, match="harness list"):
        store.get_run("deadbeef")


def test_readonly_store_takes_any_file_name(tmp_path):
    """'#', '%' and spaces are part of the file name: a hand-built URI cut the name at '#',
    found no such file and created an empty database at the cut. ('?' starts the URL's query
    in SQLAlchemy's own syntax, for writing too.)"""
    folder = tmp_path / "results dir"
    folder.mkdir()
    path = folder / "run#1 at 100%.db"
    Store(f"sqlite:///{path}").begin_run(_spec())
    ro = Store(f"sqlite:///{path}", readonly=True)
    assert len(ro.runs()) == 1
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm"))) \
        == [path.name]


def test_readonly_store_reads_a_replaced_file_anew(tmp_path):
    """rsync, mv or a fresh `harness run` give the path a new file: a pooled connection kept
    reading the old one (the dashboard showed it until restarted)."""
    path = tmp_path / "h.db"
    Store(f"sqlite:///{path}").begin_run(_spec())
    ro = Store(f"sqlite:///{path}", readonly=True)
    assert len(ro.runs()) == 1
    other = tmp_path / "other.db"
    writer = Store(f"sqlite:///{other}")
    writer.begin_run(_spec(2))
    writer.begin_run(_spec(4))
    writer.engine.dispose()
    other.replace(path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"h.db{suffix}").unlink(missing_ok=True)
    assert len(ro.runs()) == 2


def test_locked_database_is_a_one_line_error_not_an_empty_one(tmp_path):
    """A database another process holds exclusively (rollback-journal mode) used to wait 30 s
    per query and then read as empty; now it is refused in one line after a short wait."""
    import harness.store as store_mod

    path = tmp_path / "h.db"
    writer = Store(f"sqlite:///{path}")
    writer.begin_run(_spec())
    writer.engine.dispose()  # leaving WAL mode takes the only connection
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("BEGIN EXCLUSIVE")
    try:
        old, store_mod.READONLY_BUSY_S = store_mod.READONLY_BUSY_S, 0.2
        with pytest.raises(HarnessError, match="cannot be read .*locked"):
            Store(f"sqlite:///{path}", readonly=True)
    finally:
        store_mod.READONLY_BUSY_S = old
        con.execute("ROLLBACK")


class _NoWalCursor:
    """A DB-API cursor whose WAL switch fails as on a file system without shared memory."""

    def __init__(self, real, fail_with):
        self.real, self.fail_with = real, fail_with

    def execute(self, sql, *args):
        if sql.startswith("PRAGMA journal_mode") and self.fail_with is not None:
            if isinstance(self.fail_with, Exception):
                raise self.fail_with
            return _Rows([(self.fail_with,)])
        return self.real.execute(sql, *args)

    def close(self):
        self.real.close()


class _Rows(list):
    def fetchone(self):
        return self[0]


@pytest.mark.parametrize("fail_with", [sqlite3.OperationalError("disk I/O error"), "delete"])
def test_a_writable_database_without_wal_is_reported_once(tmp_path, caplog, fail_with):
    from harness import store as store_mod

    path = tmp_path / f"nowal-{type(fail_with).__name__}.db"
    con = sqlite3.connect(path)

    class Conn:
        def cursor(self):
            return _NoWalCursor(con.cursor(), fail_with)

    with caplog.at_level("WARNING", logger="harness.store"):
        store_mod._sqlite_pragmas(Conn(), None)
        store_mod._sqlite_pragmas(Conn(), None)  # a second connection to the same file
    warnings = [r.getMessage() for r in caplog.records if "WAL" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert ("disk I/O error" if isinstance(fail_with, Exception) else "stayed 'delete'") \
        in warnings[0]
    assert con.execute("PRAGMA foreign_keys").fetchone() == (1,)  # the other pragmas still ran


def test_a_normal_database_switches_to_wal_silently(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="harness.store"):
        Store(f"sqlite:///{tmp_path / 'ok.db'}").begin_run(_spec())
    assert not [r for r in caplog.records if "WAL" in r.getMessage()]
    with sqlite3.connect(tmp_path / "ok.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)

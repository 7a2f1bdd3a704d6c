"""The throwaway PostgreSQL launcher: it really starts, serves SQL, restarts, dies and recovers."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from masstasker.testing_postgres import PostgresCluster, fresh_schema_name, quote_ident

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this module's own: these tests stop and kill it, which the session one must not see."""
    with PostgresCluster({"autovacuum_naptime": "7"}) as own:
        yield own


def test_serves_on_a_private_socket_with_durable_commits(cluster: PostgresCluster) -> None:
    out = cluster.psql(
        "SHOW fsync; SHOW synchronous_commit; SHOW listen_addresses; SHOW unix_socket_directories;"
        " SHOW autovacuum_naptime; SELECT current_user"
    ).split()
    assert out == ["on", "on", str(cluster.dir), "7s", "postgres"]


def test_socket_directory_is_private(cluster: PostgresCluster) -> None:
    mode = stat.S_IMODE(os.stat(cluster.dir).st_mode)
    assert mode & 0o077 == 0, oct(mode)
    assert (cluster.dir / ".s.PGSQL.5432").is_socket()
    if os.geteuid() == 0:
        # PostgreSQL refuses root, so the cluster belongs to an unprivileged account.
        assert os.stat(cluster.data).st_uid != 0


def test_dsn_and_uri_name_the_same_server(cluster: PostgresCluster) -> None:
    assert cluster.dsn == f"host={cluster.dir} port=5432 dbname=postgres user=postgres"
    assert cluster.uri.startswith("postgresql://postgres@%2F")
    assert cluster.uri.endswith(":5432/postgres")


def test_restart_keeps_committed_data(cluster: PostgresCluster) -> None:
    cluster.psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (41), (1)")
    before = cluster.postmaster_pid()
    cluster.restart()
    assert cluster.postmaster_pid() not in (None, before)
    assert cluster.psql("SELECT sum(n) FROM kept").strip() == "42"


def test_kill_is_a_crash_and_start_recovers_commits(cluster: PostgresCluster) -> None:
    cluster.psql("CREATE TABLE crashed (n int); INSERT INTO crashed SELECT generate_series(1, 1000)")
    pids = cluster.pids()
    assert len(pids) >= 3  # postmaster, checkpointer, background writer at least
    cluster.kill()
    assert not cluster.running
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    cluster.start()
    assert cluster.psql("SELECT count(*) FROM crashed").strip() == "1000"
    assert "database system was interrupted" in cluster.log.read_text()


def test_stop_then_start(cluster: PostgresCluster) -> None:
    cluster.stop()
    assert not cluster.running
    with pytest.raises(RuntimeError, match="psql failed"):
        cluster.psql("SELECT 1")
    cluster.start()
    assert cluster.psql("SELECT 1").strip() == "1"


def test_psql_errors_are_raised(cluster: PostgresCluster) -> None:
    with pytest.raises(RuntimeError, match="does_not_exist"):
        cluster.psql("SELECT * FROM does_not_exist")


def test_create_database_and_drop_schema(cluster: PostgresCluster) -> None:
    name = 'odd "name" it\'s'
    assert cluster.create_database(name) == cluster.dsn_for(name)
    assert cluster.psql("SELECT current_database()", dbname=name).strip() == name
    schema = fresh_schema_name()
    cluster.psql(f"CREATE SCHEMA {quote_ident(schema)}; CREATE TABLE {quote_ident(schema)}.t (x int)")
    cluster.drop_schema(schema)
    assert cluster.psql(f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'").strip() == "0"


def test_fresh_schema_names_differ() -> None:
    assert len({fresh_schema_name() for _ in range(100)}) == 100


def test_destroy_removes_everything() -> None:
    own = PostgresCluster().start()
    pids = own.pids()
    own.destroy()
    assert not own.dir.exists()
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_session_fixtures(postgresql_dsn: str, postgresql_schema: str, postgresql_cluster: PostgresCluster) -> None:
    assert postgresql_dsn == postgresql_cluster.dsn
    postgresql_cluster.psql(f"CREATE SCHEMA {quote_ident(postgresql_schema)}")
    assert postgresql_schema in postgresql_cluster.psql("SELECT nspname FROM pg_namespace")

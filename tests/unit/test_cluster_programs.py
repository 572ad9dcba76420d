"""Whether a test of throwaway clusters can run here, and what it lacks if not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import clusters
from tests.clusters import CLUSTER_PROGRAMS, missing_programs, skip_unless_runnable

REPLICA_PROGRAMS = (*CLUSTER_PROGRAMS, "pg_basebackup", "psql")


def programs_in(folder: Path, *names: str) -> Path:
    """A folder holding a runnable stand-in for each of ``names``."""
    folder.mkdir(exist_ok=True)
    for name in names:
        program = folder / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return folder


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that alone is the PATH, empty until a test fills it."""
    folder = programs_in(tmp_path / "path")
    monkeypatch.setenv("PATH", str(folder))
    return folder


@pytest.fixture
def server_user(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether a postgres user exists depends on the machine; root always does.
    monkeypatch.setattr(clusters, "SERVER_USER", "root")


def test_nothing_is_missing_when_every_program_is_there(tmp_path: Path) -> None:
    folder = programs_in(tmp_path / "bin", *REPLICA_PROGRAMS)

    assert missing_programs(REPLICA_PROGRAMS, folder=folder, as_root=False) == []


def test_every_missing_program_is_named_not_only_the_first(tmp_path: Path) -> None:
    folder = programs_in(tmp_path / "bin", "initdb", "postgres")

    missing = missing_programs(REPLICA_PROGRAMS, folder=folder, as_root=False)

    assert missing == [str(folder / n) for n in ("pg_ctl", "pg_basebackup", "psql")]


def test_only_the_programs_a_test_runs_are_needed(tmp_path: Path) -> None:
    folder = programs_in(tmp_path / "bin", *CLUSTER_PROGRAMS)

    assert missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=False) == []
    assert missing_programs(REPLICA_PROGRAMS, folder=folder, as_root=False) == [
        str(folder / "pg_basebackup"),
        str(folder / "psql"),
    ]


def test_a_program_that_cannot_be_run_counts_as_missing(tmp_path: Path) -> None:
    folder = programs_in(tmp_path / "bin", "initdb")
    (folder / "pg_ctl").write_text("#!/bin/sh\nexit 0\n")
    (folder / "pg_ctl").chmod(0o644)
    (folder / "postgres").mkdir()
    (folder / "postgres").chmod(0o755)

    missing = missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=False)

    assert missing == [str(folder / "pg_ctl"), str(folder / "postgres")]


@pytest.mark.usefixtures("server_user")
def test_runuser_is_needed_only_when_running_as_root(
    tmp_path: Path, on_path: Path
) -> None:
    folder = programs_in(tmp_path / "bin", *CLUSTER_PROGRAMS)

    as_user = missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=False)
    as_root = missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=True)
    programs_in(on_path, "runuser")
    with_runuser = missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=True)

    assert as_user == []
    assert as_root == ["runuser on PATH"]
    assert with_runuser == []


def test_a_root_process_needs_the_user_the_servers_run_as(
    tmp_path: Path, on_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = programs_in(tmp_path / "bin", *CLUSTER_PROGRAMS)
    programs_in(on_path, "runuser")
    monkeypatch.setattr(clusters, "SERVER_USER", "ordertrail-no-such-user")

    assert missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=False) == []
    assert missing_programs(CLUSTER_PROGRAMS, folder=folder, as_root=True) == [
        "the ordertrail-no-such-user user"
    ]


@pytest.mark.usefixtures("server_user")
@pytest.mark.parametrize("root", [False, True])
def test_the_skip_names_what_the_marked_test_lacks(
    tmp_path: Path, on_path: Path, monkeypatch: pytest.MonkeyPatch, root: bool
) -> None:
    folder = programs_in(tmp_path / "bin", *CLUSTER_PROGRAMS)
    monkeypatch.setattr(clusters, "BINARIES", folder)
    monkeypatch.setattr(clusters, "_is_root", lambda: root)

    plain = skip_unless_runnable()
    replica = skip_unless_runnable("pg_basebackup", "psql")

    assert plain.args == (root,)
    assert replica.args == (True,)
    expected = [str(folder / "pg_basebackup"), str(folder / "psql")]
    if root:
        expected.append("runuser on PATH")
    assert replica.kwargs["reason"] == (
        f"cannot run throwaway clusters without {', '.join(expected)}"
    )
    if root:
        assert plain.kwargs["reason"] == (
            "cannot run throwaway clusters without runuser on PATH"
        )

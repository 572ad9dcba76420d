"""``ordertrail audit``: signed checkpoints, and checks of the log and exports."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import click
import msgspec
import structlog
from rich.console import Console
from rich.table import Table

from ordertrail.audit.chains import Finding
from ordertrail.audit.checkpoints import Checkpoint, list_checkpoints, record_checkpoint
from ordertrail.audit.digest import AuditKey, AuditKeyError
from ordertrail.audit.settle import LogNotSettled
from ordertrail.audit.verify import VerifyReport, verify_log
from ordertrail.audit.verify_export import ExportCheck, verify_export
from ordertrail.cli.common import DURATION, TEXT, load_settings, with_connection
from ordertrail.db.connection import connect, database_url
from ordertrail.lib.logging import configure_logging
from ordertrail.lib.settings import Settings

__all__ = ["audit"]

log = structlog.get_logger("ordertrail.audit")


@click.group()
def audit() -> None:
    """Evidence that the event log was not altered.

    Checkpoints sign the head of every stream with ORDERTRAIL_AUDIT_KEY;
    `verify` recomputes every hash chain and checks every checkpoint;
    `verify-export` checks an export file without the database.
    """


def _key(settings: Settings, *, required: bool) -> AuditKey | None:
    try:
        key = AuditKey.configured(settings.audit_key)
    except AuditKeyError as error:
        raise click.UsageError(str(error)) from None
    if key is None and required:
        raise click.UsageError(
            "ORDERTRAIL_AUDIT_KEY is not set: refusing to record an unsigned checkpoint"
        )
    return key


@audit.command("checkpoint")
@click.option(
    "--every",
    type=DURATION,
    default=None,
    help="Keep running and record one every DURATION (such as 1h).",
)
def checkpoint(every: timedelta | None) -> None:
    """Record a signed digest of every stream's head at the settled position.

    Nothing is recorded when no event arrived since the last checkpoint. With
    --every, runs until stopped, logging each checkpoint as JSON lines.
    """
    settings = load_settings()
    key = _key(settings, required=True)
    assert key is not None
    if every is None:
        try:
            recorded = with_connection(settings, lambda c: record_checkpoint(c, key))
        except LogNotSettled as error:
            raise click.ClickException(str(error)) from None
        if recorded is None:
            click.echo("no event since the last checkpoint; nothing recorded")
        else:
            click.echo(_describe(recorded))
        return
    if every <= timedelta(0):
        raise click.UsageError("--every must be a positive duration")
    configure_logging(settings.log_level, settings.log_format)
    with database_url(settings) as dsn, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_until_terminated(_record_every(dsn, key, every.total_seconds())))


def start_checkpointer(settings: Settings, dsn: str, every: timedelta) -> None:
    """Record checkpoints every ``every`` on a thread beside the server.

    Used by ``ordertrail serve --checkpoint-every``; the thread dies with the
    process. Several serving processes each record only when events arrived
    since the last checkpoint, so at most a few land per period.
    """
    if every <= timedelta(0):
        raise click.UsageError("--checkpoint-every must be a positive duration")
    key = _key(settings, required=True)
    assert key is not None
    seconds = every.total_seconds()
    threading.Thread(
        target=lambda: asyncio.run(_record_every(dsn, key, seconds)),
        name="ordertrail-checkpointer",
        daemon=True,
    ).start()


async def _until_terminated(work: Coroutine[Any, Any, None]) -> None:
    # A service manager stops the command with SIGTERM. Ended as Ctrl-C ends
    # it, the process exits normally: a checkpoint being recorded rolls back,
    # and the log lines of the last turn (a recorded checkpoint's among them)
    # are written at exit instead of lost with the process.
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _record_every(dsn: str, key: AuditKey, seconds: float) -> None:
    log.info("audit.checkpointer_started", every_seconds=seconds, key_id=key.key_id)
    while True:
        # A connection per round: a database restart between rounds costs
        # nothing, and an idle connection is not held for an hour.
        try:
            connection = await connect(dsn)
            try:
                await record_checkpoint(connection, key)
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError, LogNotSettled) as error:
            log.warning("audit.checkpoint_failed", error=str(error))
        await asyncio.sleep(seconds)


def _describe(checkpoint: Checkpoint) -> str:
    return (
        f"checkpoint {checkpoint.id} at position {checkpoint.position}: "
        f"{checkpoint.stream_count} streams, digest {checkpoint.digest.hex()}, "
        f"key {checkpoint.key_id}"
    )


@audit.command("checkpoints")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def checkpoints(as_json: bool) -> None:
    """List checkpoints, oldest first, with their digests."""
    found = with_connection(load_settings(), list_checkpoints)
    if as_json:
        for item in found:
            document = msgspec.to_builtins(item)
            document["digest"] = item.digest.hex()
            document["signature"] = item.signature.hex()
            click.echo(msgspec.json.encode(document).decode())
        return
    table = Table("id", "position", "streams", "digest", "key", "created (UTC)")
    for item in found:
        table.add_row(
            str(item.id),
            str(item.position),
            str(item.stream_count),
            item.digest.hex(),
            item.key_id,
            item.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)


@audit.command("verify")
@click.option(
    "--order", "order_id", type=TEXT, default=None, help="Only this order's streams."
)
@click.option("--mode", type=click.Choice(["live", "test"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def verify(order_id: str | None, mode: str | None, as_json: bool) -> None:
    """Recompute every hash chain and check every checkpoint; exit 1 on findings.

    Reports each finding with its stream, version and kind: a changed event,
    a deleted or renumbered one, a tail or stream missing from a checkpoint,
    a forged checkpoint. Without ORDERTRAIL_AUDIT_KEY, signatures are not
    checked (and that is said).
    """
    settings = load_settings()
    key = _key(settings, required=False)
    report = with_connection(
        settings,
        lambda c: verify_log(c, key=key, order_id=order_id, mode=mode),
    )
    _print_findings(report.findings, report.omitted, as_json)
    if as_json:
        click.echo(msgspec.json.encode(_summary(report)).decode())
    else:
        click.echo(_verify_summary(report))
    if not report.signatures_checked and report.checkpoints:
        click.echo(
            "warning: ORDERTRAIL_AUDIT_KEY is not set; checkpoint signatures "
            "were not checked",
            err=True,
        )
    if not report.clean:
        raise SystemExit(1)


def _summary(report: VerifyReport) -> dict[str, object]:
    return {
        "summary": {
            "scope": report.scope,
            "events": report.events,
            "streams": report.streams,
            "checkpoints": report.checkpoints,
            "signatures_checked": report.signatures_checked,
            "findings": len(report.findings) + report.omitted,
            "clean": report.clean,
        }
    }


def _verify_summary(report: VerifyReport) -> str:
    signed = "signatures checked" if report.signatures_checked else "NOT signed-checked"
    head = (
        f"verified {report.scope}: {report.events} events in {report.streams} "
        f"streams, {report.checkpoints} checkpoints ({signed}) in "
        f"{report.seconds:.2f} s"
    )
    if report.clean:
        return f"{head}: clean"
    return f"{head}: {len(report.findings) + report.omitted} findings"


def _print_findings(findings: list[Finding], omitted: int, as_json: bool) -> None:
    for finding in findings:
        if as_json:
            click.echo(msgspec.json.encode(finding).decode())
        else:
            click.echo(finding.describe())
    if omitted:
        click.echo(f"... and {omitted} more findings not shown", err=True)


@audit.command("verify-export")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--expect-digest",
    default=None,
    help="A checkpoint's digest, for an export of both modes from position 1 "
    "to that checkpoint's position.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def verify_export_file(file: Path, expect_digest: str | None, as_json: bool) -> None:
    """Check an export file without the database; exit 1 on findings.

    Recomputes every hash chain from the lines, checks that versions follow
    each other within the range, and that the summary's count and stream
    heads match the lines.
    """
    # No database and no settings here; only warnings would distract.
    configure_logging("warning", "console")
    result = verify_export(file, expect_digest=expect_digest)
    _print_findings(result.findings, result.omitted, as_json)
    if as_json:
        click.echo(msgspec.json.encode({"summary": _export_summary(result)}).decode())
    else:
        verdict = (
            "clean"
            if result.clean
            else f"{len(result.findings) + result.omitted} findings"
        )
        click.echo(
            f"checked {file}: {result.events} events in {result.streams} streams, "
            f"heads digest {result.heads_digest}: {verdict}"
        )
    if not result.clean:
        raise SystemExit(1)


def _export_summary(result: ExportCheck) -> dict[str, object]:
    return {
        "path": result.path,
        "events": result.events,
        "streams": result.streams,
        "heads_digest": result.heads_digest,
        "summary_line": result.summary,
        "findings": len(result.findings) + result.omitted,
        "clean": result.clean,
    }

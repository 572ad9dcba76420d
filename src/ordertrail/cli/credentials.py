"""``ordertrail tokens`` and ``ordertrail keys``: create, list, revoke."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import click
import msgspec
from rich.console import Console
from rich.table import Table

from ordertrail.auth.credentials import (
    Credential,
    CredentialKind,
    Issued,
    Role,
    create_credential,
    list_credentials,
    revoke_credential,
)
from ordertrail.cli.common import DURATION, TEXT, load_settings, with_connection

__all__ = ["keys", "tokens"]


@click.group()
def tokens() -> None:
    """Webhook tokens, which Locally sends in the locally-webhook-token header.

    A rotation: create a token, paste it into Locally Station, then revoke the
    old one (or let it expire). Both work in between; no restart is needed.
    """


@tokens.command("create")
@click.option(
    "--mode",
    type=click.Choice(["live", "test"]),
    required=True,
    help="Locally's live or test connectivity.",
)
@click.option(
    "--label", type=TEXT, default="", help="A note for whoever lists the tokens."
)
@click.option(
    "--expires-in",
    type=DURATION,
    default=None,
    help="Lifetime, such as 30d; unset never expires.",
)
@click.option(
    "--from-stdin",
    is_flag=True,
    help="Adopt a token generated in Locally Station, read from stdin.",
)
def create_token(
    mode: str, label: str, expires_in: timedelta | None, from_stdin: bool
) -> None:
    """Create a webhook token and print it once."""
    secret = _read_secret() if from_stdin else None
    issued = with_connection(
        load_settings(),
        lambda c: create_credential(
            c,
            CredentialKind.WEBHOOK_TOKEN,
            mode=mode,
            label=label,
            expires_in=expires_in,
            secret=secret,
        ),
    )
    _show_issued(issued, "locally-webhook-token", shown=not from_stdin)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def list_tokens(as_json: bool) -> None:
    """List webhook tokens (never their secrets)."""
    found = with_connection(
        load_settings(), lambda c: list_credentials(c, CredentialKind.WEBHOOK_TOKEN)
    )
    _print_credentials(found, as_json, scope="mode")


@tokens.command("revoke")
@click.argument("token_id", type=TEXT)
def revoke_token(token_id: str) -> None:
    """Revoke a webhook token; running services stop accepting it at once."""
    _revoke(CredentialKind.WEBHOOK_TOKEN, token_id)


@click.group()
def keys() -> None:
    """API keys for the read API, each with a role.

    reader: orders and items. auditor: also event histories. admin: all.
    """


@keys.command("create")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option("--label", type=TEXT, default="", help="Who or what uses the key.")
@click.option(
    "--expires-in",
    type=DURATION,
    default=None,
    help="Lifetime, such as 90d; unset never expires.",
)
def create_key(role: str, label: str, expires_in: timedelta | None) -> None:
    """Create an API key and print it once."""
    issued = with_connection(
        load_settings(),
        lambda c: create_credential(
            c,
            CredentialKind.API_KEY,
            role=Role(role),
            label=label,
            expires_in=expires_in,
        ),
    )
    _show_issued(issued, "Authorization: Bearer", shown=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def list_keys(as_json: bool) -> None:
    """List API keys with when each was last used (never their secrets)."""
    found = with_connection(
        load_settings(), lambda c: list_credentials(c, CredentialKind.API_KEY)
    )
    _print_credentials(found, as_json, scope="role")


@keys.command("revoke")
@click.argument("key_id", type=TEXT)
def revoke_key(key_id: str) -> None:
    """Revoke an API key; running services refuse it at once."""
    _revoke(CredentialKind.API_KEY, key_id)


def _read_secret() -> str:
    secret = sys.stdin.readline().strip()
    if len(secret) < 16:
        raise click.UsageError("a webhook token must be at least 16 characters")
    return secret


def _show_issued(issued: Issued, usage: str, *, shown: bool) -> None:
    credential = issued.credential
    click.echo(f"id:      {credential.id}", err=True)
    if credential.expires_at is not None:
        click.echo(f"expires: {credential.expires_at.isoformat()}", err=True)
    if shown:
        click.echo(f"Send it as {usage}; it is not shown again.", err=True)
        # The secret alone on stdout, so `$(ordertrail tokens create ...)` works.
        click.echo(issued.secret)


def _revoke(kind: CredentialKind, credential_id: str) -> None:
    revoked = with_connection(
        load_settings(), lambda c: revoke_credential(c, kind, credential_id)
    )
    if revoked is None:
        raise click.ClickException(
            f"no {kind.value.replace('_', ' ')} {credential_id!r}"
        )
    click.echo(f"revoked {revoked.id}")


def _print_credentials(found: list[Credential], as_json: bool, *, scope: str) -> None:
    if as_json:
        for credential in found:
            click.echo(msgspec.json.encode(credential).decode())
        return
    now = datetime.now(UTC)
    table = Table()
    table.add_column("id", no_wrap=True)
    for heading in (scope, "label", "created", "expires", "last used", "status"):
        table.add_column(heading)
    for credential in found:
        table.add_row(
            credential.id,
            str(credential.mode if scope == "mode" else credential.role),
            credential.label,
            _when(credential.created_at),
            _when(credential.expires_at),
            _when(credential.last_used_at),
            _status(credential, now),
        )
    Console().print(table)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "-"


def _status(credential: Credential, now: datetime) -> str:
    if credential.revoked_at is not None:
        return "revoked"
    if credential.expires_at is not None and credential.expires_at <= now:
        return "expired"
    return "active"

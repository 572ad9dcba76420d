"""Settings read from ``ORDERTRAIL_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from ordertrail.lib.settings import PREFIX, Settings, SettingsError


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env({})

    assert settings.database_url is None
    assert settings.port == 8000
    assert settings.body_limit == 64 * 1024
    assert settings.redelivery_window == 120.0
    assert settings.log_format == "json"


def test_variables_are_read_with_the_prefix_and_converted() -> None:
    settings = Settings.from_env(
        {
            "ORDERTRAIL_DATABASE_URL": "postgresql://db.example/ordertrail",
            "ORDERTRAIL_PORT": "9001",
            "ORDERTRAIL_REDELIVERY_WINDOW": "2.5",
            "ORDERTRAIL_LOG_FORMAT": "console",
            "ORDERTRAIL_WEBHOOK_TOKEN_LIVE": "otw_bootstrap",
        }
    )

    assert PREFIX == "ORDERTRAIL_"
    assert settings.database_url == "postgresql://db.example/ordertrail"
    assert settings.port == 9001
    assert settings.redelivery_window == 2.5
    assert settings.log_format == "console"
    assert settings.webhook_token_live == "otw_bootstrap"


def test_variables_without_the_prefix_are_ignored() -> None:
    settings = Settings.from_env({"PORT": "1", "DATABASE_URL": "postgresql://x/y"})

    assert settings.port == 8000
    assert settings.database_url is None


def test_process_environment_is_the_default_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORDERTRAIL_BODY_LIMIT", "1024")

    assert Settings.from_env().body_limit == 1024


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORDERTRAIL_PORT", "eighty"),
        ("ORDERTRAIL_BODY_LIMIT", "64k"),
        ("ORDERTRAIL_REDELIVERY_WINDOW", "two minutes"),
        ("ORDERTRAIL_LOG_FORMAT", "xml"),
        ("ORDERTRAIL_COMMIT_BATCH", "1.5"),
    ],
)
def test_type_error_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})

    message = str(raised.value)
    assert message.startswith(f"{variable}: ")
    # The message is about the variable, not about msgspec's JSON path.
    assert "$." not in message


def test_embedded_data_lives_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"ORDERTRAIL_DATA_DIR": str(tmp_path)})

    assert settings.pgdata == tmp_path / "pgdata"

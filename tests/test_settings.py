"""Settings: the TOML file, variables over it, durations, deprecated names, masked secrets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from f2pipe.errors import ConfigError
from f2pipe.operations.config import problems, show_lines, sources, unknown_variables
from f2pipe.settings import Settings, load_settings, mask_url

SECRET = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def _no_f2pipe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("F2PIPE_"):
            monkeypatch.delenv(name)


def _config_file(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "f2pipe.toml"
    path.write_text(text)
    monkeypatch.setenv("F2PIPE_CONFIG_FILE", str(path))
    return path


def test_the_file_sets_values_and_variables_override_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config_file(
        tmp_path,
        'kafka_bootstrap = "k1:9093"\nmqtt_port = 18883\nsink_batch_age_ms = "2s"\n',
        monkeypatch,
    )
    monkeypatch.setenv("F2PIPE_MQTT_PORT", "28883")
    settings = load_settings()
    assert settings.kafka_bootstrap == "k1:9093"
    assert settings.mqtt_port == 28883
    assert settings.sink_batch_age_ms == 2000
    where = sources(settings)
    assert where["kafka_bootstrap"] == f"file {path}"
    assert where["mqtt_port"] == "environment"
    assert where["redis_url"] == "default"


def test_an_unknown_key_in_the_file_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config_file(tmp_path, 'kafka_bootstrapp = "k1:9093"\n', monkeypatch)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == f"F2PIPE_CONFIG_FILE: {path}: unknown key 'kafka_bootstrapp'"


def test_a_bad_value_in_the_file_names_the_key_and_hides_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config_file(tmp_path, f'metadata_dsn = "mysql://app:{SECRET}@db/f2pipe"\n', monkeypatch)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"metadata_dsn = 'mysql://app:****@db/f2pipe' in {path} is invalid")
    assert SECRET not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, "cannot read"), ("kafka_bootstrap = \n", "is not TOML")],
)
def test_an_unreadable_or_broken_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, expected: str
) -> None:
    path = tmp_path / "f2pipe.toml"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("F2PIPE_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"F2PIPE_CONFIG_FILE: {path}" if text else "F2PIPE_CONFIG")
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("1.5 min", 90.0), (45, 45.0)],
)
def test_durations_take_seconds_or_a_unit(
    monkeypatch: pytest.MonkeyPatch, value: object, seconds: float
) -> None:
    monkeypatch.setenv("F2PIPE_CONNECTOR_SHUTDOWN_TIMEOUT_S", str(value))
    assert load_settings().connector_shutdown_timeout_s == seconds


def test_durations_in_other_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_SINK_BATCH_AGE_MS", "1.5s")
    monkeypatch.setenv("F2PIPE_CRL_DAYS", "2w")
    monkeypatch.setenv("F2PIPE_COMPRESS_AFTER_DAYS", "7 days")
    settings = load_settings()
    assert settings.sink_batch_age_ms == 1500
    assert settings.crl_days == 14
    assert settings.compress_after_days == 7


def test_a_bad_duration_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_PROCESSOR_POLL_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "F2PIPE_PROCESSOR_POLL_TIMEOUT_S='soon' is invalid: "
        "expected a number or a duration such as 500ms, 90s, 5m, 2h, 7d"
    )


def test_old_names_still_work_with_one_deprecation_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("F2PIPE_CONNECTOR_SHUTDOWN_TIMEOUT", "12")
    monkeypatch.setenv("F2PIPE_COMPRESS_AFTER", "14 days")
    monkeypatch.setenv("F2PIPE_RETENTION", "5 years")
    with caplog.at_level(logging.WARNING, logger="f2pipe.settings"):
        settings = load_settings()
        load_settings()  # a second read says nothing more
    assert settings.connector_shutdown_timeout_s == 12
    assert settings.compress_after_days == 14
    assert settings.retention_days == 5 * 365
    lines = [r.getMessage() for r in caplog.records]
    assert (
        "F2PIPE_CONNECTOR_SHUTDOWN_TIMEOUT is deprecated: use F2PIPE_CONNECTOR_SHUTDOWN_TIMEOUT_S"
        in lines
    )
    assert len(lines) == 3
    assert sources(settings)["retention_days"] == "environment (F2PIPE_RETENTION, deprecated)"


def test_the_new_name_wins_over_the_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_MQTT_KEEPALIVE", "10")
    monkeypatch.setenv("F2PIPE_MQTT_KEEPALIVE_S", "1m")
    assert load_settings().mqtt_keepalive_s == 60


def test_old_names_work_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_file(tmp_path, 'simulator_interval = 2.5\nretention = "1 year"\n', monkeypatch)
    settings = load_settings()
    assert settings.simulator_interval_s == 2.5
    assert settings.retention_days == 365


def test_a_bad_log_level_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match=r"^F2PIPE_LOG_LEVEL='LOUD' is invalid: Input should be"):
        load_settings()
    monkeypatch.setenv("F2PIPE_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_urls_are_shown_without_their_passwords() -> None:
    assert mask_url(f"postgresql://app:{SECRET}@db:5432/f2pipe?sslmode=verify-full") == (
        "postgresql://app:****@db:5432/f2pipe?sslmode=verify-full"
    )
    assert mask_url(f"rediss://svc:{SECRET}@cache:6380/0") == "rediss://svc:****@cache:6380/0"
    assert mask_url(f"postgresql://db/f2pipe?user=app&password={SECRET}") == (
        "postgresql://db/f2pipe?user=app&password=****"
    )
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_show_masks_every_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_file(tmp_path, f'admin_token = "{SECRET}-token"\n', monkeypatch)
    monkeypatch.setenv(
        "F2PIPE_METADATA_DSN", f"postgresql://app:{SECRET}@db/f2pipe?sslmode=require"
    )
    monkeypatch.setenv("F2PIPE_REDIS_URL", f"rediss://svc:{SECRET}@cache:6380/0")
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("F2PIPE_CA_PASSPHRASE", SECRET)
    text = "\n".join(show_lines(load_settings()))
    assert SECRET not in text
    assert "F2PIPE_KAFKA_SASL_PASSWORD=****  # environment" in text
    assert "F2PIPE_METADATA_DSN=postgresql://app:****@db/f2pipe?sslmode=require" in text
    assert "F2PIPE_TIMESERIES_DSN=postgresql://app:****@db/f2pipe?sslmode=require" in text
    assert "F2PIPE_REDIS_URL=rediss://svc:****@cache:6380/0" in text
    assert "F2PIPE_ADMIN_TOKEN=****  # file" in text


def test_check_reports_every_unreadable_file(tmp_path: Path) -> None:
    settings = load_settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=tmp_path / "ca.pem",
        kafka_properties_file=tmp_path / "client.properties",
        admin_token_file=tmp_path / "token",
    )
    found = problems(settings)
    assert sorted(found) == [
        f"F2PIPE_ADMIN_TOKEN_FILE: cannot read {tmp_path / 'token'}: No such file or directory",
        f"F2PIPE_KAFKA_PROPERTIES_FILE: cannot read {tmp_path / 'client.properties'}: "
        "No such file or directory",
        f"F2PIPE_KAFKA_SSL_CA_LOCATION: cannot read {tmp_path / 'ca.pem'}: "
        "No such file or directory",
    ]


def test_every_setting_has_a_description() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"give these a Field(description=...): {missing}"


def test_a_redis_url_with_user_password_and_tls_reaches_the_client_unchanged() -> None:
    import redis

    from f2pipe.metadata.resolver import Resolver

    resolver = Resolver(
        load_settings(redis_url=f"rediss://svc-processor:{SECRET}@cache.example:6380/2"),
        listen=False,
    )
    pool = resolver._redis.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["username"] == "svc-processor"
    assert pool.connection_kwargs["password"] == SECRET
    assert (pool.connection_kwargs["host"], pool.connection_kwargs["port"]) == (
        "cache.example",
        6380,
    )
    assert pool.connection_kwargs["db"] == 2
    resolver.close()


def test_a_url_with_a_password_may_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "metadata_dsn"
    secret_file.write_text(f"postgresql://app:{SECRET}@db:5432/f2pipe?sslmode=verify-full\n")
    monkeypatch.setenv("F2PIPE_METADATA_DSN_FILE", str(secret_file))
    settings = load_settings()
    assert settings.metadata_dsn == f"postgresql://app:{SECRET}@db:5432/f2pipe?sslmode=verify-full"
    assert sources(settings)["metadata_dsn"] == "environment (F2PIPE_METADATA_DSN_FILE)"
    assert SECRET not in "\n".join(show_lines(settings))


def test_an_unreadable_url_file_or_both_forms_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "redis_url"
    monkeypatch.setenv("F2PIPE_REDIS_URL_FILE", str(missing))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"F2PIPE_REDIS_URL_FILE: cannot read {missing}: No such file or directory"
    )
    monkeypatch.setenv("F2PIPE_REDIS_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match=r"^F2PIPE_REDIS_URL and F2PIPE_REDIS_URL_FILE are both"):
        load_settings()


def test_check_notes_variables_no_setting_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("F2PIPE_KAFKA_SASL_PASWORD", SECRET)
    monkeypatch.setenv("F2PIPE_MQTT_KEEPALIVE", "30")  # an old name is still read
    monkeypatch.setenv("F2PIPE_IMAGE", "f2pipe:latest")  # read by docker-compose
    assert unknown_variables() == ["F2PIPE_KAFKA_SASL_PASWORD"]

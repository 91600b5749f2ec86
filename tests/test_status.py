"""The pure parts of the supervisor and of ``f2pipe status``: settings hand-over, lag verdict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from f2pipe.operations import services, status
from f2pipe.settings import Settings, load_settings


def test_settings_env_reproduces_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        mqtt_port=12345,
        mqtt_tls=False,
        admin_token="s3cret",
        topic_raw="raw-x",
        sink_batch_age_ms=123,
    )
    env = services.settings_env(settings)
    assert env["F2PIPE_MQTT_TLS"] == "false"
    assert env["F2PIPE_ADMIN_TOKEN"] == "s3cret"
    assert "F2PIPE_ADMIN_TOKEN_FILE" not in env  # None is left unset, not "None"
    for key in [k for k in os.environ if k.startswith("F2PIPE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def snapshot(taken: float, **counters: float) -> status.Snapshot:
    return status.Snapshot(taken, [], dict(counters), {}, {})


def test_rates_are_per_second_and_a_restart_reads_zero() -> None:
    before = snapshot(10.0, frames_consumed=100.0, readings_landed=500.0)
    after = snapshot(12.0, frames_consumed=300.0, readings_landed=20.0)  # the sink restarted
    assert status.rates(before, after) == {"frames_consumed": 100.0, "readings_landed": 0.0}


@pytest.mark.parametrize(
    ("samples", "rates", "verdict"),
    [
        ([0, 1, 2], {"frames_consumed": 4.0}, False),  # a few records, consumed: noise
        ([2000, 3000, 4000], {"frames_consumed": 900.0}, True),  # falling behind
        ([1, 2, 3], {"frames_consumed": 0.0}, True),  # stalled
        ([5000, 4000, 6000], {"frames_consumed": 0.0}, False),  # not at every sample
        ([1, None, 3], {"frames_consumed": 0.0}, False),  # unknown is not growing
    ],
)
def test_lag_grows_only_when_large_or_not_consumed(
    samples: list[int | None], rates: dict[str, float], verdict: bool
) -> None:
    history = [{"processor": s, "sink": 0} for s in samples]
    assert status.growing(history, rates) == {"processor": verdict, "sink": False}


def test_problems_name_what_is_down_and_what_grows() -> None:
    health = [
        status.Health("sink", "service", False, False, None, None, "/healthz: refused"),
        status.Health("kafka", "server", True),
    ]
    found = status.problems(health, {"processor": True, "sink": False}, {"dropped_messages": 0})
    assert found == ["sink is down (/healthz: refused)", "processor lag keeps growing"]
    (reset,) = status.problems([], {}, {}, {"processor": 0, "sink": 2})
    assert reset.startswith("sink reset 2 partition offsets past Kafka's retention")
    dropped = status.problems([], {}, {"dropped_messages": 1200, "queued_messages": 5})
    assert len(dropped) == 1
    assert "broker dropped 1,200 messages" in dropped[0]
    assert "F2PIPE_BROKER_MAX_QUEUED_BYTES" in dropped[0]


def test_scrape_parses_prometheus_text(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    body = (
        b"# TYPE f2pipe_dead_letters counter\n"
        b'f2pipe_dead_letters_total{stage="processor",reason="crc_mismatch"} 3.0\n'
        b'f2pipe_dead_letters_total{stage="processor",reason="invalid_json"} 2.0\n'
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        samples = status.scrape(f"http://127.0.0.1:{server.server_address[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert status.total(samples, "f2pipe_dead_letters") == 5.0
    assert status.total(samples, "f2pipe_dead_letters", reason="crc_mismatch") == 3.0
    assert status.by_label(samples, "f2pipe_dead_letters", "reason") == {
        "crc_mismatch": 3.0,
        "invalid_json": 2.0,
    }
    assert status.scrape("http://127.0.0.1:1/metrics") is None


def test_a_crl_near_its_end_is_an_alarm_in_the_snapshot(tmp_path: Path) -> None:
    from f2pipe.pki.ca import CertificateAuthority, pki_paths
    from f2pipe.pki.state import ensure_pki, write_crl
    from f2pipe.settings import load_settings

    # Nothing answers on these ports: the snapshot still carries the PKI's state.
    settings = load_settings(
        state_dir=tmp_path,
        **dict.fromkeys(("connector_port", "processor_port", "sink_port", "certgen_port"), 1),
        mqtt_port=1,
    )
    ensure_pki(settings)
    paths = pki_paths(settings)
    write_crl(CertificateAuthority.load(paths, None), paths, [], days=3)
    alarms = status.Observer(settings).snapshot(with_health=False).alarms
    assert any("crl.pem expires in 3 days" in alarm for alarm in alarms), alarms


def test_certgen_over_https_is_probed_against_f2pipes_ca(tmp_path: Path) -> None:
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from f2pipe.operations.stack import Paths, security

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    settings = load_settings(
        state_dir=tmp_path, certgen_tls=True, certgen_port=server.server_address[1]
    )
    certgen = services.Certgen(settings, Paths(tmp_path))
    cert, key = security.server_tls(settings, tmp_path, "certgen", None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert certgen.cafile() == security.ca_file(settings)
        assert certgen.healthy(), certgen.last_error
        assert certgen.ready()
        assert status.scrape(certgen.url("/metrics"), cafile=certgen.cafile()) == {}
    finally:
        server.shutdown()
        server.server_close()


def two_brokers(second_up: bool) -> dict[str, dict[str, object]]:
    return {
        "mqtt-1": {
            "url": "mqtts://127.0.0.1:8883",
            "up": True,
            "connected_clients": 3,
            "queued_messages": 0,
            "dropped_messages": 0,
            "connectors": ["connector"],
        },
        "mqtt-2": {
            "url": "mqtts://127.0.0.1:8885",
            "up": second_up,
            "connected_clients": 2 if second_up else None,
            "queued_messages": 7 if second_up else None,
            "dropped_messages": 5 if second_up else None,
            "connectors": ["connector-mqtt-2", "connector-mqtt-2-2"],
        },
    }


def test_every_broker_is_shown_and_an_unreachable_one_is_a_problem() -> None:
    from rich.console import Console

    from f2pipe.operations.statusview import tables

    down = two_brokers(second_up=False)
    found = status.problems([], {}, {}, brokers=down)
    assert found == [
        "broker mqtt-2 at mqtts://127.0.0.1:8885 is unreachable: start it (`f2pipe up`) or"
        " check F2PIPE_MQTT_HOST, F2PIPE_MQTT_PORT and F2PIPE_MQTT_BROKERS"
    ]
    assert status.problems([], {}, {}, brokers=two_brokers(second_up=True)) == [
        "broker mqtt-2 dropped 5 messages since it started: its queue reached"
        " F2PIPE_BROKER_MAX_QUEUED_BYTES while its connectors were down"
    ]
    before = status.Snapshot(0.0, [], {}, {}, {}, brokers=down)
    after = status.Snapshot(2.0, [], {}, {}, {}, brokers=down)
    rep = status.fold(before, after, [{}], 2.0)
    assert not rep.ok
    assert rep.as_dict()["brokers"]["mqtt-2"]["up"] is False
    console = Console(record=True, width=200)
    console.print(tables(rep))
    text = console.export_text()
    lines = {row.split()[1]: row for row in text.splitlines() if row.startswith("│ mqtt-")}
    assert "up" in lines["mqtt-1"]
    assert "connector" in lines["mqtt-1"]
    assert "unreachable" in lines["mqtt-2"]
    assert "connector-mqtt-2, connector-mqtt-2-2" in lines["mqtt-2"]

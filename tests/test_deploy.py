"""The deployment files are f2pipe's own render, and hold what SPEC sections 8 and 10 ask.

The committed docker-compose.yml, .env.example and deploy/ files are byte for
byte what ``f2pipe deploy render --target compose`` writes for the default
settings, so nothing in them is copied by hand. No container engine runs on
the development machine, so the rest is proven without one: the compose file
is valid against the Compose specification's JSON schema (the copy the
check-jsonschema package ships), every f2pipe command in it parses with the
real CLI, every F2PIPE_ variable is a setting with a valid value, and the
least-privilege layout holds (the CA key only in certgen's volume, a user per
service, /readyz probes, the local stack's server versions). The broker's
rendered configuration and start script run on a real Mosquitto.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from f2pipe.cli import COMMANDS, build_parser
from f2pipe.operations.deploy.containers import PARTIES, USERS
from f2pipe.operations.deploy.render import render_files
from f2pipe.operations.stack import retainguard
from f2pipe.operations.stack.install import kafka_version
from f2pipe.operations.stack.pgcluster import MIN_MAJOR
from f2pipe.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
F2PIPE_IMAGE = "f2pipe:latest"
CA_VOLUME = "certgen"
CERTGEN_UID = USERS["certgen"].split(":")[0]

# f2pipe service -> (subcommand words, Settings field of its health and metrics port)
LONG_RUNNING = {
    "certgen": (["certgen", "serve"], "certgen_port"),
    "connector": (["connector"], "connector_port"),
    "processor": (["processor"], "processor_port"),
    "sink": (["sink"], "sink_port"),
}
ONE_SHOT = {
    "certgen-init": ["deploy", "shares"],
    "db-migrate": ["db", "migrate"],
    "db-seed": ["db", "seed-demo"],
    "simulator-certs": ["certgen", "issue-device"],
}
# One-shots that act as certgen: its user and its volume.
AS_CERTGEN = {"certgen", "certgen-init", "simulator-certs"}
# A load source: no ops port, and nothing waits for it.
NO_HEALTHCHECK = {"simulator": "load generator without an ops port; nothing depends on it"}


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def f2pipe_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if svc.get("image") == F2PIPE_IMAGE}


def f2pipe_argv(svc: dict[str, Any]) -> list[str]:
    """The f2pipe words a service runs: its command, or the `f2pipe ...` line of its script."""
    command = [str(word) for word in svc["command"]]
    if svc.get("entrypoint") != ["sh", "-c"]:
        return command
    lines = [line for line in command[0].splitlines() if "f2pipe " in line]
    assert len(lines) == 1, command
    words = shlex.split(lines[0][lines[0].index("f2pipe ") :].replace('"$', '"x'))
    return [w for w in words[1:] if not w.startswith("$")]


def volume_sources(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Volume name or host path -> the long form of its mount."""
    found = {}
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            volume = {"source": source, "target": target, "read_only": mode == ["ro"]}
        found.setdefault(volume["source"], volume)
    return found


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema as check-jsonschema vendors it (not copied here)."""
    path = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert "services" in schema["properties"]
    return schema  # type: ignore[no-any-return]


def schema_errors(document: object) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, err.absolute_path)) or '(top)'}: {err.message}"
        for err in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip() or "x" * 40
    return values


_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?+][^}]*)?\}")


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?msg}, ${VAR:-default} from ``values`` (all must be there)."""
    return _INTERPOLATION.sub(lambda m: values[m.group(1)], text)


# --- one source: the committed files are a fresh render -------------------------------------


def test_the_committed_files_are_a_fresh_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`f2pipe deploy render --target compose .` changes nothing in the checkout."""
    from f2pipe.cli import main
    from f2pipe.operations.deploy import cli

    # The declared defaults, whatever this process's environment or earlier tests set.
    monkeypatch.setattr(cli, "get_settings", Settings.model_construct)
    assert main(["deploy", "render", "--target", "compose", str(tmp_path)]) == 0
    expected = render_files(Settings.model_construct())
    rendered = {
        str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    }
    assert set(rendered) == set(expected)
    stale = [name for name, data in rendered.items() if (ROOT / name).read_bytes() != data]
    assert not stale, f"re-render with `f2pipe deploy render --target compose .`: {stale}"
    # Nothing rendered holds a secret, and no key or certificate is committed.
    committed = subprocess.run(
        ["git", "ls-files", "deploy", "docker-compose.yml", ".env.example"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert not [n for n in committed if n.endswith((".key", ".pem", ".crt"))]
    for name, data in rendered.items():
        assert b"PRIVATE KEY" not in data, name
        assert b"CERTIFICATE" not in data, name


def test_the_render_is_deterministic_and_follows_the_settings() -> None:
    defaults = Settings.model_construct()
    assert render_files(defaults) == render_files(defaults)
    moved = defaults.model_copy(update={"topic_raw": "plant-a-raw", "mqtt_port": 18883})
    files = render_files(moved, connectors=3)
    assert "topic plant-a-raw 6 604800000" in files["deploy/kafka/setup.sh"]
    assert "listener 18883\n" in files["deploy/mosquitto/mosquitto.conf"]
    assert "user svc-connector-3\ntopic read stat/#" in files["deploy/mosquitto/acl"]
    assert "'18883:18883'" in files["docker-compose.yml"]


def test_with_certificates_the_broker_gets_the_names_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only on request, into OUT/secrets, which keeps itself out of git."""
    import stat

    from cryptography import x509

    from f2pipe.cli import main
    from f2pipe.pki.state import ensure_pki
    from f2pipe.settings import get_settings, load_settings

    state = tmp_path / "state"
    ensure_pki(load_settings(state_dir=state))
    monkeypatch.setenv("F2PIPE_STATE_DIR", str(state))
    get_settings.cache_clear()
    try:
        out = tmp_path / "out"
        argv = ["deploy", "render", str(out), "--broker-name", "mqtt.example.com"]
        assert main([*argv, "--broker-name", "192.0.2.7", "--with-certificates"]) == 0
    finally:
        get_settings.cache_clear()
    secrets = out / "secrets"
    assert sorted(p.name for p in secrets.iterdir()) == [
        ".gitignore", "broker.key", "broker.pem", "ca.pem", "crl.pem",
    ]  # fmt: skip
    assert stat.S_IMODE((secrets / "broker.key").stat().st_mode) == 0o600
    assert (secrets / ".gitignore").read_text().splitlines()[-1] == "*"
    cert = x509.load_pem_x509_certificate((secrets / "broker.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"mqtt.example.com", "mosquitto", "localhost"} <= set(
        names.get_values_for_type(x509.DNSName)
    )
    assert "192.0.2.7" in {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    # The compose file names them too, so certgen's own broker certificate carries them.
    compose_text = (out / "docker-compose.yml").read_text(encoding="utf-8")
    assert "F2PIPE_BROKER_NAMES: mosquitto,certgen,mqtt.example.com,192.0.2.7" in compose_text
    assert not (tmp_path / "out" / "deploy" / "secrets").exists()


def test_the_broker_files_are_the_local_stacks_renderers_output() -> None:
    """The drift of issue #14: queue bound, in-flight window, autosave, identities."""
    from f2pipe.operations.stack.mosquitto import SERVICE_ACL, render_acl

    defaults = Settings.model_construct()
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text(encoding="utf-8")
    assert f"max_inflight_messages {defaults.mqtt_max_inflight_messages}\n" in conf
    assert f"autosave_interval {defaults.mqtt_autosave_interval_s}\n" in conf
    queued = int(re.search(r"^max_queued_bytes (\d+)$", conf, re.MULTILINE)[1])  # type: ignore[index]
    assert queued == services()["mosquitto"]["mem_limit"] // 32
    assert "pid_file" not in conf
    assert "\nuser " not in conf
    # The plugin refusing retained messages, where the broker image puts it, before the ACL.
    dockerfile = (ROOT / "deploy/mosquitto/Dockerfile").read_text(encoding="utf-8")
    plugin = re.search(r"^plugin (\S+)$", conf, re.MULTILINE)[1]  # type: ignore[index]
    assert dockerfile.rstrip().endswith(f" {plugin}")
    assert conf.index("\nplugin ") < conf.index("\nacl_file ")
    acl = (ROOT / "deploy/mosquitto/acl").read_text(encoding="utf-8")
    assert acl == render_acl(["svc-connector"])
    for identity in SERVICE_ACL:
        assert f"user {identity}\n" in acl


def test_kafka_users_and_acls_are_the_principals() -> None:
    """Each service's SCRAM user holds exactly its ACLs; the services authenticate as it."""
    from f2pipe.operations.principals import PRINCIPALS, kafka_acl_arguments

    setup = (ROOT / "deploy/kafka/setup.sh").read_text(encoding="utf-8")
    acls = [line for line in setup.splitlines() if line.startswith("acl ")]
    wanted = [
        "acl " + " ".join(shlex.quote(a) for a in arguments)
        for who in PRINCIPALS
        for arguments in kafka_acl_arguments(who)
    ]
    assert acls == wanted
    kafka = services()["kafka"]["environment"]
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert "StandardAuthorizer" in kafka["KAFKA_AUTHORIZER_CLASS_NAME"]
    assert "PLAINTEXT:" not in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].replace("SASL_", "")
    for who in PRINCIPALS:
        if who.kafka_user is None:
            continue
        env = services()[who.service]["environment"]
        assert env["F2PIPE_KAFKA_SASL_USERNAME"] == who.kafka_user, who.service
        assert env["F2PIPE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert f"user {who.kafka_user} " in setup


# --- the Compose specification ------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    assert schema_errors(compose()) == []


def test_the_schema_check_is_not_vacuous() -> None:
    broken = compose()
    broken["services"]["sink"]["depends_on"]["db-roles"]["condition"] = "service_ready"
    broken["services"]["sink"]["healthcheck"]["retries"] = "many"
    broken["services"]["kafka"]["restarts"] = "always"  # a typo the schema must catch
    errors = schema_errors(broken)
    assert any(e.startswith("services/sink/depends_on") for e in errors), errors
    assert any("services/kafka" in e and "restarts" in e for e in errors), errors


def test_every_variable_compose_interpolates_is_in_env_example() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    used = set(_INTERPOLATION.findall(text))
    # The admin token secret is read from the environment by name.
    used |= {s["environment"] for s in compose()["secrets"].values() if "environment" in s}
    assert used
    assert used <= set(env_example()), used - set(env_example())
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "/.env" in ignored or ".env" in ignored
    # Every secret is read from .env or a script's environment, never written out.
    assert not re.search(r"(PASSWORD|TOKEN): (?!\$\{)", text)


# --- f2pipe services against the CLI and the settings ---------------------------------------


def test_the_f2pipe_services_are_the_expected_ones() -> None:
    assert set(f2pipe_services()) == set(LONG_RUNNING) | set(ONE_SHOT) | {"simulator"}


@pytest.mark.parametrize("name", sorted([*LONG_RUNNING, *ONE_SHOT, "simulator"]))
def test_every_f2pipe_command_parses_with_the_real_cli(name: str) -> None:
    argv = f2pipe_argv(f2pipe_services()[name])
    expected = {**{k: v[0] for k, v in LONG_RUNNING.items()}, **ONE_SHOT, "simulator": ["simulate"]}
    assert argv[: len(expected[name])] == expected[name]
    if argv[0] not in COMMANDS:
        pytest.fail(
            f"service {name!r} runs `f2pipe {' '.join(argv)}`, but f2pipe has no {argv[0]!r}"
        )
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`f2pipe {' '.join(argv)}` (service {name!r}) is refused by the CLI: {exc}")
    assert callable(getattr(args, "func", None)), f"`f2pipe {' '.join(argv)}` selects no action"


def test_every_f2pipe_variable_is_a_setting_with_a_valid_value() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    names = set(re.findall(r"\bF2PIPE_[A-Z0-9_]+", text)) - {"F2PIPE_ADMIN_TOKEN"}
    unknown = {n for n in names if n.removeprefix("F2PIPE_").lower() not in Settings.model_fields}
    assert not unknown, f"not settings: {sorted(unknown)}"
    values = env_example()
    for name, svc in f2pipe_services().items():
        env = {k: interpolate(str(v), values) for k, v in svc["environment"].items()}
        fields = {k.removeprefix("F2PIPE_").lower(): v for k, v in env.items()}
        fields.pop("admin_token_file", None)  # secrets mounted at run time
        fields.pop("kafka_sasl_password_file", None)
        settings = Settings.model_validate(fields)  # raises, naming the field, when invalid
        if "kafka_bootstrap" in fields:
            assert settings.kafka_bootstrap == "kafka:19092", name


def test_published_ports_are_the_settings_defaults() -> None:
    defaults = Settings.model_construct()  # the declared defaults, whatever the environment says
    published: dict[str, set[tuple[int, int]]] = {}
    for name, svc in services().items():
        for port in svc.get("ports", []):
            *_, host, container = str(port).split(":")
            published.setdefault(name, set()).add((int(host), int(container)))
    for name, (_, field) in LONG_RUNNING.items():
        port = getattr(defaults, field)
        assert published[name] == {(port, port)}, name
        assert f"127.0.0.1:{port}/readyz" in " ".join(services()[name]["healthcheck"]["test"])
    assert published["mosquitto"] == {(defaults.mqtt_port, defaults.mqtt_port)}
    assert published["postgres"] == {(defaults.pg_port(), 5432)}
    assert published["redis"] == {(defaults.redis_port(), 6379)}
    assert published["kafka"] == {(defaults.kafka_port(), defaults.kafka_port())}
    assert published["timescaledb"] == {(5433, 5432)}  # the time series port of the brief
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in scrape["scrape_configs"]
    }
    assert targets == {n: [f"{n}:{getattr(defaults, f)}"] for n, (_, f) in LONG_RUNNING.items()}
    assert scrape["rule_files"] == ["alerts.yml"]


# --- least privilege (SPEC section 10) -----------------------------------------------------


def test_the_ca_key_lives_only_in_certgens_volume() -> None:
    """Only certgen (and the one-shots acting as it) mount its volume or all the shares."""
    for name, svc in services().items():
        mounts = volume_sources(svc)
        if CA_VOLUME in mounts or ("shares" in mounts and "volume" not in mounts["shares"]):
            assert name in AS_CERTGEN, f"{name} can read the CA key or every share"
            assert str(svc["user"]).split(":")[0] == CERTGEN_UID, name
        elif "shares" in mounts:
            share = mounts["shares"]
            assert share["read_only"] is True, name
            assert PARTIES[share["volume"]["subpath"]] == name, name
    # Every mount of the state folder is certgen's volume, or a one-shot's own.
    state_mounts = {
        name: source
        for name, svc in services().items()
        for source, mount in volume_sources(svc).items()
        if mount["target"] == "/var/lib/f2pipe"
    }
    assert state_mounts == {
        "certgen": CA_VOLUME,
        "certgen-init": CA_VOLUME,
        "simulator-certs": CA_VOLUME,
        "db-seed": "claiming-codes",
    }
    # The broker and the services get the CA certificate, the CRL and their own key.
    assert {PARTIES[p] for p in PARTIES} == {"mosquitto", "connector", "simulator", "prometheus"}


def test_only_certgen_holds_the_admin_token_and_each_secret_one_service() -> None:
    holders: dict[str, list[str]] = {}
    for name, svc in services().items():
        for secret in svc.get("secrets", []):
            holders.setdefault(secret, []).append(name)
    assert holders["admin_token"] == ["certgen"]
    for service in ("connector", "processor", "sink"):
        assert holders[f"{service}_kafka_password"] == [service]
        env = services()[service]["environment"]
        assert env["F2PIPE_KAFKA_SASL_PASSWORD_FILE"] == f"/run/secrets/{service}_kafka_password"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert text.count("F2PIPE_ADMIN_TOKEN_FILE") == 1


def test_each_service_runs_as_its_own_non_root_user() -> None:
    users: dict[str, str] = {}
    for name, svc in services().items():
        user = str(svc.get("user", ""))
        assert user, f"{name} does not name its user"
        assert user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
        if svc.get("image") == F2PIPE_IMAGE or name == "mosquitto":
            uid = user.split(":")[0]
            owner = "certgen" if name in AS_CERTGEN else name
            assert users.setdefault(uid, owner) == owner, (
                f"{name} shares uid {uid} with {users[uid]}"
            )
    assert len(set(users.values())) == len(users)
    # The servers run as their image's own user.
    for name, user in {"postgres": "postgres", "redis": "redis", "kafka": "appuser"}.items():
        assert services()[name]["user"] == user


def test_certgen_serves_https_and_everyone_checks_it_against_the_ca() -> None:
    certgen = services()["certgen"]
    env = certgen["environment"]
    assert env["F2PIPE_CERTGEN_TLS"] == "true"
    assert env["F2PIPE_CERTGEN_URL"].startswith("https://certgen:")
    probe = " ".join(certgen["healthcheck"]["test"])
    assert "https://127.0.0.1:8080/readyz" in probe
    assert "cafile=" in probe
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "certgen")
    assert job["scheme"] == "https"
    ca_file = job["tls_config"]["ca_file"]
    share = volume_sources(services()["prometheus"])["shares"]
    assert ca_file == f"{share['target']}/ca.pem"
    for name, svc in f2pipe_services().items():
        url = svc["environment"].get("F2PIPE_CERTGEN_URL")
        assert url is None or url.startswith("https://"), name


def test_the_broker_certificate_names_the_host_the_services_connect_to() -> None:
    for name in ("certgen-init", "certgen"):
        names = services()[name]["environment"]["F2PIPE_BROKER_NAMES"].split(",")
        assert {"mosquitto", "certgen"} <= set(names), name
    for name, svc in f2pipe_services().items():
        host = svc["environment"].get("F2PIPE_MQTT_HOST")
        assert host in (None, "mosquitto"), name


# --- health, ordering, images ----------------------------------------------------------------


def test_every_long_running_service_has_a_health_check_and_waits_properly() -> None:
    all_services = services()
    for name, svc in all_services.items():
        one_shot = svc.get("restart") == "no"
        if not one_shot and name not in NO_HEALTHCHECK:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, how in svc.get("depends_on", {}).items():
            condition = how["condition"]
            target = all_services[dep]
            if target.get("restart") == "no":
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                assert target.get("healthcheck", {}).get("test"), (name, dep)
            assert set(target.get("profiles", [])) <= set(svc.get("profiles", [])), (name, dep)
    for name in ("prometheus", "grafana"):
        assert all_services[name]["profiles"] == ["observability"]
    for name in LONG_RUNNING:
        assert "/readyz" in " ".join(all_services[name]["healthcheck"]["test"]), name
    assert "/healthz" not in COMPOSE_FILE.read_text(encoding="utf-8")


def test_server_images_are_the_local_stacks_versions_pinned() -> None:
    images = {name: svc["image"] for name, svc in services().items()}
    expected_repos = {
        "postgres": "postgres",
        "timescaledb": "timescale/timescaledb",
        "redis": "redis",
        "kafka": "apache/kafka",
        "mosquitto": "f2pipe-mosquitto",
    }
    for name, repo in expected_repos.items():
        assert images[name].split(":")[0] == repo
    # The broker image is the pinned official one with the retain guard compiled in.
    dockerfile = (ROOT / services()["mosquitto"]["build"]["dockerfile"]).read_text("utf-8")
    bases = set(re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE))
    assert bases == {f"eclipse-mosquitto:{images['mosquitto'].partition(':')[2]}"}
    for name, image in images.items():
        if image == F2PIPE_IMAGE:
            continue
        tag = image.partition(":")[2]
        assert re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"
        assert "latest" not in tag, f"{name}: {image} is not pinned"
    # The same servers as the local stack: Kafka exactly the pom's, the others' majors.
    assert images["kafka"] == f"apache/kafka:{kafka_version()}"
    assert images["kafka-setup"] == images["kafka"]
    assert images["postgres"].split(":")[1].split("-")[0] == str(MIN_MAJOR)
    assert images["timescaledb"].endswith(f"-pg{MIN_MAJOR}")
    assert images["redis"].split(":")[1].split(".")[0] == "7"
    assert images["mosquitto"].split(":")[1].split(".")[0] == "2"


def test_kafka_runs_kraft_and_redis_keeps_its_data() -> None:
    kafka = services()["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@")
    assert not any("ZOOKEEPER" in key for key in kafka)
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    redis = (ROOT / "deploy/redis/redis.sh").read_text(encoding="utf-8")
    assert "--appendonly yes" in redis
    assert any(v.endswith(":/data") for v in services()["redis"]["volumes"])


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        for base in re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    ]
    assert len(bases) >= 2, "expected a build stage and a runtime stage"
    for base in bases:
        image, _, tag = base.partition(":")
        assert image == "python", base
        assert re.match(r"3\.11\.\d+-", tag), f"{base}: base image not pinned to a version"
    runtime = text[text.rindex("\nFROM ") :]
    users = re.findall(r"^USER (\S+)", runtime, re.MULTILINE)
    assert users, "the runtime stage names no USER"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert "uv sync --locked" in text
    assert re.search(r'^ENTRYPOINT \["f2pipe"\]', runtime, re.MULTILINE)
    assert users[-1] == services()["certgen"]["user"]
    # The folders certgen's volumes are mounted on exist in the image, owned by certgen.
    assert "install -d -o 10001 -g 10001 -m 0750 /var/lib/f2pipe/shares" in text


# --- observability files ---------------------------------------------------------------------


def test_grafana_dashboard_and_provisioning_agree() -> None:
    provisioning = ROOT / "deploy/grafana/provisioning"
    sources = yaml.safe_load((provisioning / "datasources/f2pipe.yml").read_text("utf-8"))
    uids = {d["uid"] for d in sources["datasources"]}
    providers = yaml.safe_load((provisioning / "dashboards/f2pipe.yml").read_text("utf-8"))
    mounted = {v.split(":")[1] for v in services()["grafana"]["volumes"]}
    assert providers["providers"][0]["options"]["path"] in mounted

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/f2pipe.json").read_text("utf-8"))
    queries = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
            queries.append(target.get("expr") or target.get("rawSql", ""))
    text = "\n".join(queries)
    for needle in (
        "f2pipe_sink_rows_written_total",
        "f2pipe_processor_consumer_lag",
        "f2pipe_sink_consumer_lag",
        "f2pipe_dead_letters_total",
        "(stage, reason)",
        'up{job=~"certgen|connector|processor|sink"}',
        "FROM readings",
    ):
        assert needle in text, needle


# --- the broker configuration, on a real Mosquitto ---------------------------------------------


def test_the_broker_configuration_enforces_mtls_the_acl_and_the_crl(tmp_path: Path) -> None:
    """The committed mosquitto.conf, acl and broker.sh, with the broker's share of the PKI.

    As in the compose file, certgen's PKI is made by `deploy shares`; the broker
    reads only its share; a revocation reaches it through the share and the start
    script's reload, with no pid known to anyone.
    """
    import datetime as dt
    import getpass
    import os
    import signal
    import socket
    import ssl
    import threading

    import paho.mqtt.client as mqtt

    from conftest import wait_until
    from f2pipe.operations.deploy.cli import make_shares
    from f2pipe.pki.ca import key_pem, pki_paths, write_private, write_public
    from f2pipe.pki.local import load_ca
    from f2pipe.pki.state import write_crl
    from f2pipe.settings import load_settings

    state = tmp_path / "state"
    init = services()["certgen-init"]
    settings = load_settings(
        state_dir=state, broker_names=init["environment"]["F2PIPE_BROKER_NAMES"]
    )
    argv = f2pipe_argv(init)
    assert argv[:2] == ["deploy", "shares"]
    assert make_shares(settings, argv[2:])
    share = state / "shares" / "broker"
    assert sorted(p.name for p in share.iterdir()) == [
        "broker.key", "broker.pem", "ca.pem", "crl.pem",
    ]  # fmt: skip
    ca, paths = load_ca(settings), pki_paths(settings)
    device, other, connector = "f2-aabbccddee01", "f2-aabbccddee02", "svc-connector"
    issued = ca.issue_device("aabbccddee01", None, 1)
    assert issued.private_key is not None
    clients_dir = tmp_path / "clients"
    write_private(clients_dir / f"{device}.key", key_pem(issued.private_key))
    write_public(clients_dir / f"{device}.pem", issued.certificate_pem().encode())

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "data").mkdir()
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text(encoding="utf-8")
    assert "listener 8883\n" in conf
    conf = (
        conf.replace("/mosquitto/pki/", f"{share}/")
        .replace("/mosquitto/config/acl", str(ROOT / "deploy/mosquitto/acl"))
        .replace("/mosquitto/data/", f"{tmp_path / 'data'}/")
        .replace("listener 8883\n", f"listener {port} 127.0.0.1\n")
        .replace(str(retainguard.IMAGE_PLUGIN), str(retainguard.build(tmp_path)))
    )
    # In the container the broker runs as its own user; here, as whoever runs the test.
    conf += f"user {getpass.getuser()}\n"
    (tmp_path / "mosquitto.conf").write_text(conf, encoding="utf-8")
    mosquitto = services()["mosquitto"]
    shell, script, _ = mosquitto["command"]
    assert script == "/mosquitto/config/broker.sh"
    broker = subprocess.Popen(
        [shell, str(ROOT / "deploy/mosquitto/broker.sh"), str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOSQUITTO": "/usr/sbin/mosquitto"},
        start_new_session=True,
    )
    clients: list[mqtt.Client] = []

    def context_of(identity: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(share / "ca.pem"))
        if identity == connector:
            context.load_cert_chain(paths.service_cert(identity), paths.service_key(identity))
        elif identity:
            context.load_cert_chain(
                clients_dir / f"{identity}.pem", clients_dir / f"{identity}.key"
            )
        return context

    def client(identity: str | None) -> tuple[mqtt.Client, threading.Event]:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=identity or "anonymous",
            protocol=mqtt.MQTTv311,
            # Once the broker stops, a reconnecting loop would leave its sockets open.
            reconnect_on_failure=False,
        )
        c.tls_set_context(context_of(identity))
        connected = threading.Event()

        def on_connect(*args: Any) -> None:
            if not args[3].is_failure:
                connected.set()

        c.on_connect = on_connect
        clients.append(c)
        return c, connected

    def refused(identity: str | None) -> bool:
        """True when the broker drops a connection with this identity before CONNACK."""
        c, connected = client(identity)
        try:
            c.connect("127.0.0.1", port)
            wait_until(
                lambda: connected.is_set() or c.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS,
                timeout=10,
                what="the broker to answer",
            )
        except (ssl.SSLError, OSError):
            return True  # refused during the handshake
        finally:
            sock = c.socket()
            if sock is not None:  # a refused connection is left open by paho
                sock.close()
        return not connected.is_set()

    try:

        def listening() -> bool:
            assert broker.poll() is None, "the broker exited: its configuration is refused"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=15, what="mosquitto to listen")
        # The services check the broker's name: the compose host name is in its certificate.
        checked = context_of(None)
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            checked.wrap_socket(raw, server_hostname="mosquitto") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert refused(None), "a client without a certificate was let in"

        received: list[str] = []
        sub, sub_up = client(connector)
        sub.on_message = lambda _c, _u, msg: received.append(msg.topic)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        wait_until(sub_up.is_set, timeout=10, what="the connector identity to connect")
        subscribed = threading.Event()
        sub.on_subscribe = lambda *args: subscribed.set()
        sub.subscribe([("tele/#", 1), ("stat/#", 1)])
        wait_until(subscribed.is_set, timeout=10, what="the subscription")

        pub, pub_up = client(device)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        wait_until(pub_up.is_set, timeout=10, what="the device to connect")
        # Another device's topic is refused by the ACL; the device's own goes through.
        pub.publish(f"tele/{other}/sensor-mode/J1/sensor-1", b"{}", qos=1).wait_for_publish(10)
        pub.publish(f"tele/{device}/sensor-mode/J1/sensor-1", b"{}", qos=1).wait_for_publish(10)
        wait_until(lambda: received, timeout=10, what="the device's telemetry")
        assert received == [f"tele/{device}/sensor-mode/J1/sensor-1"]

        # Revoked in certgen's CRL: the share follows, the script reloads the broker.
        write_crl(ca, paths, [(issued.certificate.serial_number, dt.datetime.now(dt.UTC))], 90)
        assert (share / "crl.pem").read_bytes() == paths.crl.read_bytes()
        wait_until(lambda: refused(device), timeout=30, what="the broker to apply the new CRL")
        assert not refused(connector)

        # A stop reaches the broker through the script, which exits with it.
        for c in clients:
            c.loop_stop()
            c.disconnect()
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=20) == 0
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        if broker.poll() is None:
            os.killpg(broker.pid, signal.SIGKILL)
            broker.wait(timeout=10)


@pytest.mark.servers
def test_the_dashboard_sql_runs_on_the_real_schema(fresh_db: str, tmp_path: Path) -> None:
    import psycopg

    from f2pipe.metadata.database import seed_demo

    seed_demo(fresh_db, tmp_path)
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/f2pipe.json").read_text("utf-8"))
    queries = {
        target["datasource"]["uid"]: target["rawSql"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if "rawSql" in target
    }
    with psycopg.connect(fresh_db) as conn:
        wiring = conn.execute(queries["f2pipe-metadata"].encode()).fetchall()
        assert len(wiring) == 3 * 3 + 2  # three environmental sensors, one power monitor
        assert ("Living Room Env Sensor", "Temperature", "°C", "aabbccddee01 J1 sensor-1") in {
            (r[1], r[3], r[4], r[5]) for r in wiring
        }
        # Grafana expands the time filter macro; the readings view comes with the sink.
        sql = queries["f2pipe-timescaledb"].replace(
            "$__timeFilter(timestamp)", "timestamp > now() - interval '1 hour'"
        )
        device_id, datapoint_id = wiring[0][0], wiring[0][2]
        conn.execute(
            "INSERT INTO decoded_data VALUES (now(), %s, %s, 21.5)", (device_id, datapoint_id)
        )
        rows = conn.execute(sql.encode()).fetchall()
    assert [(r[1], r[2], r[3]) for r in rows] == [(wiring[0][1], wiring[0][3], 21.5)]

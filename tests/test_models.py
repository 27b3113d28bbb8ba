"""Domain models reject bad input with messages naming the field."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest

from dockyard.core.config import Settings, ephemeral_overlap, load_settings
from dockyard.core.errors import ConfigError, ValidationError
from dockyard.core.models import Color, Event, Slot, SlotState, decode_spec
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.fakes import FakeRuntime

GOOD = {"id": "agent-1", "repo": "https://github.com/acme/agent"}


def test_good_spec_has_defaults() -> None:
    spec = decode_spec(GOOD)
    assert spec.container_port == 8000
    assert spec.health.path == "/health"
    assert spec.grace_period_s == 30
    assert spec.auto_promote is True


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"id": "Bad_Slug"}, "$.id"),
        ({"id": "-x"}, "$.id"),
        ({"id": "x" * 41}, "$.id"),
        ({"container_port": 0}, "$.container_port"),
        ({"container_port": 70000}, "$.container_port"),
        ({"env": {"1BAD": "x"}}, "$.env"),
        ({"env": {"OK": "line\nbreak"}}, "$.env"),
        ({"build_args": {"A": "nul\x00"}}, "$.build_args"),
        ({"health": {"deadline_s": 0}}, "$.health.deadline_s"),
        ({"resources": {"memory_mb": 1}}, "$.resources.memory_mb"),
        ({"unknown": 1}, "unknown"),
        ({"ref": "bad ref with spaces"}, "$.ref"),
        ({"workdir": "relative"}, "$.workdir"),
        ({"workdir": "/app/../etc"}, "workdir"),
        ({"logs_tmpfs_mb": -1}, "$.logs_tmpfs_mb"),
        ({"gateway_env": {"OPENAI_BASE_URL": "openai"}}, "$.gateway_env"),
        ({"gateway_env": {"BAD-NAME": ""}}, "$.gateway_env"),
    ],
)
def test_bad_spec_names_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        decode_spec({**GOOD, **patch})
    assert field in info.value.message


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc"])
@pytest.mark.parametrize("name", ["subdir", "dockerfile"])
def test_paths_must_stay_relative(name: str, path: str) -> None:
    with pytest.raises(ValidationError, match=name):
        decode_spec({**GOOD, name: path})


def test_image_mode_needs_an_image() -> None:
    with pytest.raises(ValidationError, match="image is required"):
        decode_spec({**GOOD, "build_mode": "image"})


def test_spec_from_json_bytes_and_bad_json() -> None:
    assert decode_spec(msgspec.json.encode(GOOD)).id == "agent-1"
    with pytest.raises(ValidationError, match="not valid JSON"):
        decode_spec(b"{not json")


def test_models_round_trip_through_json() -> None:
    slot = Slot(deployment_id="a", color=Color.BLUE, state=SlotState.PROMOTED, host_port=40001)
    assert msgspec.json.decode(msgspec.json.encode(slot), type=Slot) == slot
    event = Event(deployment_id="a", kind="x", color=Color.GREEN)
    assert msgspec.json.decode(msgspec.json.encode(event), type=Event) == event
    assert Color.BLUE.other is Color.GREEN


def test_settings_from_env_file_and_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "d.toml"
    cfg.write_text('port = 9001\nruntime = "docker"\n[plugins.podman]\nx = 1\n')
    s = load_settings(
        cfg, environ={"DOCKYARD_PORT": "9002", "DOCKYARD_DISABLE_PLUGINS": "a,b"}, host="127.0.0.2"
    )
    assert (s.port, s.runtime, s.host, s.disable_plugins) == (
        9002,
        "docker",
        "127.0.0.2",
        ["a", "b"],
    )
    assert s.plugin_options("podman") == {"x": 1}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DOCKYARD_PORT": "abc"}, "port"),
        (
            {"DOCKYARD_PORT_RANGE_START": "50000", "DOCKYARD_PORT_RANGE_END": "40000"},
            "port_range_end",
        ),
        ({"DOCKYARD_CONFIG": "/nonexistent.toml"}, "does not exist"),
    ],
)
def test_bad_settings_are_clear(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)


def test_the_default_lease_range_avoids_this_hosts_ephemeral_ports() -> None:
    """The kernel picks outgoing connections' local ports from ip_local_port_range; a
    leased port in there can be taken when its container is published."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    s = Settings()
    assert s.port_range_end < low or s.port_range_start > high, (low, high, s)
    assert ephemeral_overlap(s.port_range_start, s.port_range_end) is None


def test_a_lease_range_inside_the_ephemeral_range_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sysctl = tmp_path / "ipv4"
    sysctl.mkdir()
    (sysctl / "ip_local_port_range").write_text("32768\t60999\n")
    (sysctl / "ip_local_reserved_ports").write_text("\n")
    note = ephemeral_overlap(40000, 41000, sysctl)
    assert note is not None
    assert "port_range 40000-41000 overlaps the kernel's ephemeral port range 32768-60999" in note
    assert "ip_local_reserved_ports" in note
    assert ephemeral_overlap(61000, 61999, sysctl) is None
    assert ephemeral_overlap(30000, 32767, sysctl) is None
    (sysctl / "ip_local_reserved_ports").write_text("8080,40000-41000\n")
    assert ephemeral_overlap(40000, 41000, sysctl) is None  # reserved: the kernel avoids them
    assert ephemeral_overlap(40000, 41001, sysctl) is not None

    # What `dockyard serve` logs on this host with a range inside its ephemeral ports.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    services = Services.build(
        Settings(data_dir=str(tmp_path / "data"), port_range_start=low, port_range_end=low + 10),
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        sources={},
    )
    with caplog.at_level(logging.WARNING, logger="dockyard.core.services"):
        asyncio.run(_start_and_close(services))
    assert any("overlaps the kernel's ephemeral port range" in r.message for r in caplog.records)


async def _start_and_close(services: Services) -> None:
    await services.start()
    await services.close()

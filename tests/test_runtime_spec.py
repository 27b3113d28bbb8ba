"""The runtime contract's pure parts: how a container learns its gateway."""

from __future__ import annotations

from dockyard.core.runtime import GATEWAY_ENV, ContainerSpec, gateway_variables


def test_gateway_variables_default_to_openai_base_url() -> None:
    spec = ContainerSpec(name="a", image="i", container_port=8000)
    assert gateway_variables(spec, "http://10.0.0.1:9999/") == {GATEWAY_ENV: "http://10.0.0.1:9999"}


def test_gateway_variables_carry_each_suffix() -> None:
    spec = ContainerSpec(
        name="a",
        image="i",
        container_port=8000,
        gateway_env={
            "SANDBOX_GATEWAY_URL": "",
            "OPENAI_BASE_URL": "/openai/v1",
            "CHUTES_BASE_URL": "/chutes/v1",
        },
    )
    assert gateway_variables(spec, "http://10.0.0.1:9999/gw") == {
        "SANDBOX_GATEWAY_URL": "http://10.0.0.1:9999/gw",
        "OPENAI_BASE_URL": "http://10.0.0.1:9999/gw/openai/v1",
        "CHUTES_BASE_URL": "http://10.0.0.1:9999/gw/chutes/v1",
    }

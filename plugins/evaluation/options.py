"""The evaluation plugin's options: ``[plugins.evaluation]`` in the configuration.

Admission limits, default timeouts and the image policy of evaluations. Read from
``settings.plugin_options("evaluation")`` (TOML ``[plugins.evaluation]``); the old
top-level ``eval_<option>`` settings (and ``DOCKYARD_EVAL_<OPTION>`` variables), and
``gc_evaluations_max_age_days``/``gc_evaluations_max_mb`` (now ``gc_max_age_days`` and
``gc_max_mb``), are still read for one release: ``core/config.py`` moves them here and
warns once.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dockyard.core.config import Settings
from dockyard.core.errors import ConfigError
from dockyard.core.models import Model

#: The name the plugin registers under, and its options table (``[plugins.evaluation]``).
PLUGIN_NAME = "evaluation"
#: The validator's sandbox: its gateway variables and their URL suffixes.
VALIDATOR_GATEWAY_VARS = {
    "SANDBOX_GATEWAY_URL": "",
    "OPENAI_BASE_URL": "/openai/v1",
    "CHUTES_BASE_URL": "/chutes/v1",
}
#: The tag ``dockyard sandbox-image build`` gives the agent sandbox image by default.
SANDBOX_IMAGE = "localhost/dockyard/agent-sandbox:latest"

EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class EvaluationConfig(Model):
    """Everything an operator sets about evaluations."""

    max_builds: Annotated[int, Meta(ge=1, le=64)] = 2
    max_agents: Annotated[int, Meta(ge=1, le=256)] = 4
    request_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 25.0
    task_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 180.0
    tasks_per_agent: Annotated[int, Meta(ge=1, le=64)] = 5
    max_steps: Annotated[int, Meta(ge=1, le=100)] = 12
    health_deadline_s: Annotated[float, Meta(gt=0, le=1800)] = 20.0
    session_ttl_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    max_lifetime_s: Annotated[float, Meta(gt=0, le=86400)] = 3600.0
    keep_images: bool = True
    # The variable evaluated agents find the operator's LLM gateway (``agent_gateway``) in.
    gateway_env: EnvName = "OPENAI_BASE_URL"
    # The variables an evaluated agent finds its gateway in (name -> suffix of the gateway's
    # URL), as Autoppia's validator sets them; ``gateway_env`` is added (suffix "") when it
    # is not one of them. Each holds the address the container really reaches.
    gateway_vars: dict[EnvName, Annotated[str, Meta(pattern=r"^(/[A-Za-z0-9._~/-]{0,255})?$")]] = (
        msgspec.field(default_factory=lambda: dict(VALIDATOR_GATEWAY_VARS))
    )
    # The image ``build_mode: "image"`` evaluations run when the miner names none
    # (``dockyard sandbox-image build`` makes it).
    sandbox_image: Annotated[str, Meta(max_length=255)] | None = SANDBOX_IMAGE
    # Garbage collection of finished evaluations' records (``dockyard gc``, kind
    # ``evaluations``): older than this many days go, then the oldest until they fit
    # ``gc_max_mb`` MiB; 0: no such limit. (Were ``gc_evaluations_max_age_days`` and
    # ``gc_evaluations_max_mb``, still read for one release.)
    gc_max_age_days: Annotated[float, Meta(ge=0)] = 30.0
    gc_max_mb: Annotated[float, Meta(ge=0)] = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EvaluationConfig:
        """The options in ``settings``; ConfigError names a bad one."""
        raw: dict[str, Any] = settings.plugin_options(PLUGIN_NAME)
        gateway_vars = raw.get("gateway_vars")
        if isinstance(gateway_vars, str):  # from the environment: NAME=suffix,NAME2=/v1
            pairs = (p.strip().partition("=") for p in gateway_vars.split(",") if p.strip())
            raw["gateway_vars"] = {key.strip(): suffix.strip() for key, _, suffix in pairs}
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid [plugins.{PLUGIN_NAME}] option: {exc}") from None

    def gateway_variables(self) -> dict[str, str]:
        """The gateway variables of evaluated agents: ``gateway_vars`` plus ``gateway_env``
        (suffix ``""``) when it is not one of them."""
        return {self.gateway_env: "", **self.gateway_vars}

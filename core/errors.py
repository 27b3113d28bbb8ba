"""One exception hierarchy for dockyard, each error carrying a stable reason code.

The API maps these to HTTP in one place (``dockyard.api.app``); the CLI prints their message.
A validator can record ``reason`` verbatim: reason codes never change meaning.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DockyardError(Exception):
    """Root of every error dockyard raises on purpose."""

    reason: ClassVar[str] = "internal_error"
    status_code: ClassVar[int] = 500

    def __init__(self, message: str, *, reason: str | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason  # type: ignore[misc]
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return body


class ConfigError(DockyardError):
    """The operator's configuration is invalid or names something that does not exist."""

    reason = "invalid_config"
    status_code = 500


class ValidationError(DockyardError):
    """A request or spec is invalid; the message names the field."""

    reason = "invalid_input"
    status_code = 400


class Unprocessable(ValidationError):
    """A request that matches the API schema but cannot be done as asked: fields that
    contradict each other, a name nobody registered (HTTP 422; the message names the field).
    """

    reason = "unprocessable"
    status_code = 422


class PolicyRefused(DockyardError):
    """A ``dockyard_check_spec`` implementation refused a deployment."""

    reason = "policy_refused"
    status_code = 422


class UnknownPluginError(ConfigError):
    """A runtime, router, store, strategy, protocol or source name nobody registered."""

    reason = "unknown_plugin"


class PluginError(DockyardError):
    """A plugin is broken: an implementation without a spec, a duplicate registration, ..."""

    reason = "plugin_error"


class NotFound(DockyardError):
    """The named deployment, revision or container does not exist."""

    reason = "not_found"
    status_code = 404


class Conflict(DockyardError):
    """The target exists already, or another operation holds it."""

    reason = "conflict"
    status_code = 409


class IllegalTransition(DockyardError):
    """A slot was asked to move between two states the state machine does not connect."""

    reason = "illegal_transition"
    status_code = 409


class PortPoolExhausted(DockyardError):
    """Every host port in the configured pool is leased."""

    reason = "port_pool_exhausted"
    status_code = 503


class StoreError(DockyardError):
    """The state store failed (disk, corruption, lock timeout)."""

    reason = "store_error"
    status_code = 503


class RuntimeUnavailable(DockyardError):
    """The container runtime cannot be reached or started (e.g. Podman is not installed)."""

    reason = "runtime_unavailable"
    status_code = 503


class RuntimeOperationError(DockyardError):
    """The container runtime refused or failed an operation."""

    reason = "runtime_error"
    status_code = 502


class BuildFailed(RuntimeOperationError):
    """An image build failed; ``detail['log_tail']`` holds the last lines of its log."""

    reason = "build_failed"


class BuildTimeout(BuildFailed):
    """An image build ran past its wall-clock timeout and was stopped."""

    reason = "build_timeout"


class LimitsNotEnforceable(DockyardError):
    """``require_limits`` is set and this host cannot enforce resource limits."""

    reason = "limits_not_enforceable"
    status_code = 503


class EgressNotEnforceable(DockyardError):
    """``require_egress`` is set and this host cannot hold agents to their network policy."""

    reason = "egress_not_enforceable"
    status_code = 503


class SourceError(DockyardError):
    """Fetching source failed or was refused. ``reason`` is one of the stable codes:
    ``invalid_repo_url``, ``repo_unreachable``, ``ref_not_found``, ``repo_too_large``,
    ``fetch_timeout``, ``subdir_not_found``, ``path_escapes_repo``, ``dockerfile_not_found``,
    and ``source_error`` for an unexpected failure (a crashed fetch worker). A refusal once
    the commit is known (after the fetch) carries it in ``detail['commit']``."""

    reason = "source_error"
    status_code = 422

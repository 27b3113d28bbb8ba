"""The evaluation flow: deploy a miner's agent as an ephemeral deployment, relay its tasks
(or hand the validator a session), record every answer, and always clean up.

One :class:`EvaluationService` per dockyard process, started and stopped by the app's
lifespan after the deployment controller. Admission control: at most ``max_agents``
evaluations hold a running agent, at most ``max_builds`` build-mode ones deploy (fetch,
build, start, probe) at once (image-mode ones need no build and are not held back), a batch
at most its ``concurrency``; the rest wait in one FIFO queue whose
positions are visible. Every evaluation is stored at each change; on start, unfinished ones
end ``failed`` with ``controller_restarted`` and what they left (deployment, containers,
port leases, route) is found by its labels and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from dockyard.core.config import Settings
from dockyard.core.controller import Controller
from dockyard.core.errors import (
    Conflict,
    DockyardError,
    NotFound,
    SourceError,
    Unprocessable,
)
from dockyard.core.logs import add_field
from dockyard.core.logs import bind as bind_log_ids
from dockyard.core.models import DeploymentSpec, HealthCheck, now
from dockyard.core.plugins import DockyardPluginManager, check_spec
from dockyard.core.store import StateStore
from dockyard.core.views import DeployOutcome
from dockyard.plugins.evaluation import records
from dockyard.plugins.evaluation.events import announce
from dockyard.plugins.evaluation.models import (
    Batch,
    BatchProgress,
    EvaluateBatchRequest,
    EvaluateMinerRequest,
    Evaluation,
    EvaluationOptions,
    Limits,
    Miner,
    Progress,
    Session,
    TaskResult,
)
from dockyard.plugins.evaluation.options import EvaluationConfig
from dockyard.plugins.protocols import AgentEndpoint, AgentError, AgentProtocol, task_id_of

log = logging.getLogger(__name__)

#: Spec label (and so container label) naming the evaluation a deployment belongs to.
EVALUATION_LABEL = "dockyard_evaluation"
#: The correlation id of an evaluation's log lines (``evaluation_id``, ``eval=`` in text).
EVALUATION_LOG_ID = add_field("evaluation_id", "eval")
EVALUATION_PREFIX = "ev-"
BATCH_PREFIX = "batch-"
#: Env names an evaluation request may never set: provider keys stay with the gateway.
SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)
#: Source failures that are zero-score reasons of their own; any other deploy failure is
#: ``deploy_failed`` (the dockyard reason is kept in ``detail_reason``).
SOURCE_REASONS = {
    "invalid_repo_url": "invalid_github_url",
    "repo_unreachable": "repo_unreachable",
    "ref_not_found": "ref_not_found",
    "policy_refused": "policy_refused",
}
#: How long a cancel waits for the evaluation's cleanup before answering.
CANCEL_WAIT_S = 60.0
#: Failures whose build log tail the evaluation keeps (the log itself goes with cleanup).
BUILD_FAILURES = frozenset({"build_failed", "build_timeout", "dockerfile_refused"})
#: Bounds of ``Evaluation.build_log_tail``: lines, characters per line, bytes in all.
BUILD_LOG_TAIL_LINES = 40
BUILD_LOG_LINE_CHARS = 400
BUILD_LOG_TAIL_BYTES = 8 * 1024
#: ``name=value`` / ``name: value`` where the name says secret, and dockyard's own tokens.
_SECRET_ASSIGNMENT = re.compile(
    r"((?<![A-Za-z0-9_.-])"  # a whole name (bounds the backtracking on long words)
    r"[A-Za-z0-9_.-]*(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)[A-Za-z0-9_.-]*"
    r"[\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)",
    re.I,
)
_BEARER = re.compile(r"(bearer\s+)\S+", re.I)
_DOCKYARD_TOKEN = re.compile(r"\bdy_[A-Za-z0-9]+_[A-Za-z0-9_-]+")


class Refused(Exception):
    """The evaluation cannot go on: a stable zero-score reason and a message."""

    def __init__(self, reason: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail


@dataclass
class Run:
    """An active evaluation and what drives it."""

    evaluation: Evaluation
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: (state, reason, message, detail) applied once cleanup is over.
    outcome: tuple[str, str | None, str | None, str | None] | None = None
    cancel_reason: str | None = None
    #: Env for the agent; kept here only, never stored or shown.
    env: dict[str, str] = field(default_factory=dict)


def build_log_tail(lines: list[str], masked_values: list[str]) -> list[str]:
    """The last lines of a build log, bounded (:data:`BUILD_LOG_TAIL_LINES` lines of at most
    :data:`BUILD_LOG_LINE_CHARS` characters, :data:`BUILD_LOG_TAIL_BYTES` in all) and with
    secrets masked: the given values (the evaluation's env), values assigned to names that
    say KEY/TOKEN/SECRET/PASSWORD/CREDENTIAL, bearer credentials, dockyard tokens."""
    masked = sorted((v for v in masked_values if len(v) >= 4), key=len, reverse=True)
    out: list[str] = []
    size = 0
    for raw in reversed(lines[-BUILD_LOG_TAIL_LINES:]):
        line = raw.rstrip("\r\n")[: 2 * BUILD_LOG_LINE_CHARS]  # bounds the masking's work
        for value in masked:
            line = line.replace(value, "***")
        line = _SECRET_ASSIGNMENT.sub(r"\1***", line)
        line = _BEARER.sub(r"\1***", line)
        line = _DOCKYARD_TOKEN.sub("dy_***", line)
        if len(line) > BUILD_LOG_LINE_CHARS:
            line = line[: BUILD_LOG_LINE_CHARS - 3] + "..."
        size += len(line.encode()) + 1
        if size > BUILD_LOG_TAIL_BYTES:
            break
        out.append(line)
    return out[::-1]


def _read_tail(path: Path, max_bytes: int = 64 * 1024) -> list[str]:
    """The last lines of a file, reading at most ``max_bytes`` (a partial first line goes)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return lines[1:] if size > max_bytes else lines


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def map_reason(reason: str | None) -> str:
    return SOURCE_REASONS.get(reason or "", "deploy_failed")


class EvaluationService:
    """Runs evaluations on top of one deployment controller."""

    def __init__(
        self,
        controller: Controller,
        *,
        store: StateStore,
        pm: DockyardPluginManager,
        settings: Settings,
    ) -> None:
        """:param controller: deploys, watches and removes the evaluated agents (through its
        answers only); :param store: keeps the evaluations (plugin records); :param pm:
        the plugins (agent protocols, policy, event observers); :param settings: dockyard's
        settings (``[plugins.evaluation]`` among them)."""
        self.controller = controller
        self.store = store
        self.pm = pm
        self.settings = settings
        self.config = EvaluationConfig.from_settings(self.settings)
        self.protocols: dict[str, AgentProtocol] = {
            name: factory(self.settings) for name, factory in pm.registries.protocols.items()
        }
        self._runs: dict[str, Run] = {}
        self._queue: list[str] = []
        self._admitted: set[str] = set()
        self._builds = asyncio.Semaphore(self.config.max_builds)
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    def occupancy(self) -> tuple[Counter[str], int, int]:
        """What is unfinished now: evaluations by state, how many wait for admission, how
        many are admitted (holding an agent). Read by the metrics at scrape time."""
        states = Counter(run.evaluation.state for run in self._runs.values())
        return states, len(self._queue), len(self._admitted)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """End what a previous process left unfinished, reap its leftovers."""
        self._http = aiohttp.ClientSession()
        await self.recover()

    async def stop(self) -> None:
        """Cancel queued and running evaluations (each cleans up), then close."""
        self._stopping = True
        for evaluation_id in list(self._queue):
            await self._cancel_queued(self._runs[evaluation_id], "controller_stopped")
        tasks = []
        for run in list(self._runs.values()):
            if run.task is not None and not run.task.done():
                run.cancel_reason = "controller_stopped"
                run.task.cancel()
                tasks.append(run.task)
        if tasks:
            await asyncio.wait(tasks, timeout=120)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def recover(self) -> None:
        """Unfinished stored evaluations end ``failed`` with ``controller_restarted``; every
        deployment, container and lease labelled as an evaluation's is removed."""
        store = self.store
        for record in await records.list_stored(store, finished=False):
            if record.key in self._runs:
                continue
            try:
                evaluation = msgspec.convert(record.value, Evaluation)
            except msgspec.ValidationError:
                log.warning("stored evaluation %s cannot be read; dropping it", record.key)
                await records.delete(store, record.key)
                continue
            await self._remove_deployment(evaluation.deployment_id)
            evaluation.state = "failed"
            evaluation.reason = "controller_restarted"
            evaluation.message = "the controller restarted during this evaluation"
            evaluation.queue_position = None
            evaluation.cleaned_up = True
            self._finish_results(evaluation, "cancelled", "controller_restarted")
            self._stamp_end(evaluation)
            await self._store(evaluation)
            log.info("evaluation %s ended: controller_restarted", evaluation.id)
        try:
            await self._reap()
        except DockyardError as exc:  # a runtime hiccup must not keep dockyard from starting
            log.warning("reaping evaluation leftovers failed (retried at the next start): %s", exc)

    async def _reap(self) -> None:
        """Remove every deployment and container labelled as an evaluation's that no active
        evaluation owns."""
        active = {run.evaluation.deployment_id for run in self._runs.values()}
        await self.controller.remove_labelled(EVALUATION_LABEL, keep=active)

    # -- submitting ----------------------------------------------------------------------
    async def submit(self, request: EvaluateMinerRequest) -> Evaluation:
        """Check and queue one miner's evaluation; refused sources end at once with their
        zero-score reason (nothing is deployed)."""
        run = self._new(request.miner, request, None, None)
        return await self._enqueue(run)

    async def submit_batch(self, request: EvaluateBatchRequest) -> Batch:
        """Queue one evaluation per miner, run at most ``concurrency`` at once."""
        concurrency = min(request.concurrency or self.config.max_agents, self.config.max_agents)
        batch_id = new_id(BATCH_PREFIX)
        runs = [self._new(m, request, batch_id, concurrency) for m in request.miners]
        for run in runs:
            await self._enqueue(run)
        return await self.batch(batch_id)

    def _new(
        self,
        miner: Miner,
        options: EvaluationOptions,
        batch_id: str | None,
        concurrency: int | None,
    ) -> Run:
        protocol = self.protocols.get(options.protocol)
        if protocol is None:
            known = ", ".join(sorted(self.protocols)) or "none"
            raise Unprocessable(f"protocol: unknown {options.protocol!r} (known: {known})")
        if options.mode == "session" and not protocol.stateful:
            raise Unprocessable(
                f"mode: a session needs a stateful protocol; {options.protocol!r} is one-shot"
            )
        tasks = miner.tasks if miner.tasks is not None else options.tasks
        relayed = options.mode == "relay"
        if options.mode == "relay" and not tasks:
            raise Unprocessable("tasks: an evaluation in relay mode needs at least one task")
        for index, task in enumerate(tasks):
            if not task_id_of(task):
                raise Unprocessable(f"tasks[{index}].id: every task needs an id")
            for name in ("prompt", "url"):
                if name in task and not isinstance(task[name], str):
                    raise Unprocessable(f"tasks[{index}].{name}: must be a string")
        bad = sorted(name for name in options.env if SECRET_ENV.search(name))
        if bad:
            raise Unprocessable(
                f"env: {', '.join(bad)}: keys and secrets are never passed to agents "
                "(agents reach LLMs through the operator's gateway)"
            )
        if miner.build_mode == "image" and not (miner.image or self.config.sandbox_image):
            raise Unprocessable("miner.image: required when build_mode is 'image'")
        s, t = self.config, options.timeouts
        limits = Limits(
            request_s=t.request_s or s.request_timeout_s,
            task_s=t.task_s or s.task_timeout_s,
            health_s=t.health_s or s.health_deadline_s,
            health_interval_s=t.health_interval_s,
            session_ttl_s=t.session_ttl_s or s.session_ttl_s,
            lifetime_s=s.max_lifetime_s,
            max_parallel_tasks=options.max_parallel_tasks or s.tasks_per_agent,
            max_steps=options.max_steps or s.max_steps,
            keep_image=s.keep_images if options.keep_image is None else options.keep_image,
        )
        evaluation_id = new_id(EVALUATION_PREFIX)
        evaluation = Evaluation(
            id=evaluation_id,
            deployment_id=evaluation_id,
            batch_id=batch_id,
            batch_concurrency=concurrency,
            miner=msgspec.structs.replace(miner, tasks=None),
            protocol=options.protocol,
            mode=options.mode,
            tools=options.tools,
            include_reasoning=options.include_reasoning,
            path_fallback=options.path_fallback,
            limits=limits,
            tasks=[dict(task) for task in tasks],
            # A session's tasks are the validator's to drive: no results of dockyard's.
            results=[] if not relayed else [TaskResult(task_id=task_id_of(t)) for t in tasks],
            progress=Progress(tasks_total=len(tasks) if relayed else 0),
            env_names=sorted(options.env),
            resources=options.resources,
            require_ref=options.require_ref,
        )
        return Run(evaluation, env=dict(options.env))

    async def _enqueue(self, run: Run) -> Evaluation:
        evaluation = run.evaluation
        try:
            await self._precheck(run)
        except Refused as refused:
            evaluation.state = "failed"
            evaluation.reason, evaluation.message = refused.reason, refused.message
            evaluation.detail_reason = refused.detail
            evaluation.cleaned_up = True
            self._finish_results(evaluation, "cancelled", refused.reason)
            self._stamp_end(evaluation)
            await self._store(evaluation)
            return evaluation
        if self._stopping:
            raise Conflict("dockyard is shutting down; evaluations are not accepted")
        self._runs[evaluation.id] = run
        self._queue.append(evaluation.id)
        self._dispatch()
        await self._save(run)
        return evaluation

    async def _precheck(self, run: Run) -> None:
        """Refuse what would fail anyway before it waits in the queue (no I/O)."""
        miner = run.evaluation.miner
        try:
            source = self.controller.source_for(miner.github_url)
            parse = getattr(source, "parse", None)
            url_ref = getattr(parse(miner.github_url), "ref_from_url", None) if parse else None
            validate = getattr(source, "validate", None)
            if validate is not None:
                validate(miner.github_url, miner.ref)
            if run.evaluation.require_ref and not (miner.ref or url_ref):
                raise Refused("missing_ref", "miner: a branch, tag or commit is required")
            await check_spec(self.pm, self._spec(run))
        except SourceError as exc:
            raise Refused(map_reason(exc.reason), exc.message, exc.reason) from None
        except DockyardError as exc:
            raise Refused(map_reason(exc.reason), exc.message, exc.reason) from None

    # -- admission -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start every queued evaluation the limits let through, oldest first; a batch at
        its concurrency lets later ones pass; then renumber the queue."""
        if not self._stopping:
            for evaluation_id in list(self._queue):
                if len(self._admitted) >= self.config.max_agents:
                    break
                run = self._runs[evaluation_id]
                evaluation = run.evaluation
                if evaluation.batch_id and evaluation.batch_concurrency:
                    running = sum(
                        1
                        for other in self._admitted
                        if self._runs[other].evaluation.batch_id == evaluation.batch_id
                    )
                    if running >= evaluation.batch_concurrency:
                        continue
                self._queue.remove(evaluation_id)
                self._admitted.add(evaluation_id)
                evaluation.queue_position = None
                run.task = asyncio.create_task(self._run(run), name=f"evaluation:{evaluation_id}")
        for position, evaluation_id in enumerate(self._queue, 1):
            self._runs[evaluation_id].evaluation.queue_position = position

    # -- one evaluation ------------------------------------------------------------------
    async def _run(self, run: Run) -> None:
        evaluation = run.evaluation
        bind_log_ids(evaluation_id=evaluation.id, deployment_id=evaluation.deployment_id)
        try:
            async with asyncio.timeout(evaluation.limits.lifetime_s):
                agent_url = await self._deploy(run)
                if evaluation.mode == "session":
                    await self._hold_session(run, agent_url)
                else:
                    await self._relay(run, agent_url)
        except Refused as refused:
            run.outcome = ("failed", refused.reason, refused.message, refused.detail)
        except TimeoutError:
            lifetime = evaluation.limits.lifetime_s
            run.outcome = (
                "failed",
                "evaluation_timeout",
                f"the evaluation ran past its lifetime of {lifetime:g} s",
                None,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            reason = run.cancel_reason or "cancelled"
            run.outcome = ("cancelled", reason, f"the evaluation was cancelled ({reason})", None)
        except Exception as exc:
            log.exception("evaluation %s crashed", evaluation.id)
            run.outcome = ("failed", "internal_error", str(exc) or type(exc).__name__, None)
        finally:
            await self._clean_up_protected(run)
            self._admitted.discard(evaluation.id)
            self._runs.pop(evaluation.id, None)
            self._dispatch()

    async def _deploy(self, run: Run) -> str:
        """Deploy through the controller (build slots bounded); the agent's base URL."""
        evaluation = run.evaluation
        evaluation.state = "deploying"
        evaluation.started_at = now()
        await self._save(run)
        spec = self._spec(run)
        # Only a build needs a build slot: image-mode agents start in parallel (up to
        # max_agents, the admission limit), while builds stay capped.
        gate = self._builds if spec.build_mode == "dockerfile" else contextlib.nullcontext()
        async with gate:
            try:
                await self.controller.create(spec)
            except DockyardError as exc:
                raise Refused(map_reason(exc.reason), exc.message, exc.reason) from None
            bound = (
                self.settings.fetch_timeout_s
                + self.settings.build_timeout_s
                + evaluation.limits.health_s
                + 60
            )
            try:
                outcome = await self.controller.finished(spec.id, bound)
            except TimeoutError:
                raise Refused(
                    "deploy_failed", f"the deploy took over {bound:g} s", "deploy_timeout"
                ) from None
        _provenance(evaluation, outcome)
        if not outcome.ok or outcome.url is None:
            detail = outcome.reason or "not_promoted"
            raise Refused(map_reason(detail), outcome.message or detail, detail)
        evaluation.deployed_at = now()
        if evaluation.started_at is not None:
            evaluation.deploy_s = round(evaluation.deployed_at - evaluation.started_at, 3)
        url = outcome.url
        evaluation.agent_url = url
        evaluation.state = "running"
        await self._save(run)
        return url

    def _spec(self, run: Run) -> DeploymentSpec:
        evaluation = run.evaluation
        miner = evaluation.miner
        env = {**run.env, **self.sandbox_env(miner)}
        gateway_vars = self.config.gateway_variables()
        gateway = (self.settings.agent_gateway or "").strip()
        if gateway:
            # The gateway as the host sees it; a runtime that enforces the network policy
            # replaces each with the address the container reaches it at.
            url = (gateway if "://" in gateway else f"http://{gateway}").rstrip("/")
            env.update({name: url + suffix for name, suffix in gateway_vars.items()})
        limits = evaluation.limits
        logs = {} if miner.logs_tmpfs_mb is None else {"logs_tmpfs_mb": miner.logs_tmpfs_mb}
        return DeploymentSpec(
            id=evaluation.deployment_id,
            repo=miner.github_url,
            ref=miner.ref,
            subdir=miner.subdir,
            build_mode=miner.build_mode,
            dockerfile=miner.dockerfile,
            image=miner.image
            or (self.config.sandbox_image if miner.build_mode == "image" else None),
            command=list(miner.command),
            env=env,
            container_port=miner.container_port,
            health=HealthCheck(
                path=miner.health_path,
                interval_s=min(limits.health_interval_s, limits.health_s),
                timeout_s=min(5.0, limits.health_s),
                deadline_s=limits.health_s,
            ),
            resources=evaluation.resources,
            grace_period_s=0,
            auto_promote=True,
            labels={EVALUATION_LABEL: evaluation.id},
            workdir=miner.workdir,
            gateway_env=gateway_vars,
            **logs,
        )

    @staticmethod
    def sandbox_env(miner: Miner) -> dict[str, str]:
        """What the validator's sandbox tells every agent besides its gateway: its port, the
        miner's uid (when known) and unbuffered Python output. These override the request's
        ``env``."""
        env = {"SANDBOX_AGENT_PORT": str(miner.container_port), "PYTHONUNBUFFERED": "1"}
        if miner.uid is not None:
            env["SANDBOX_AGENT_UID"] = str(miner.uid)
        return env

    async def _relay(self, run: Run, agent_url: str) -> None:
        """Every task to the agent, at most ``max_parallel_tasks`` at once."""
        evaluation = run.evaluation
        limits = evaluation.limits
        protocol = self.protocols[evaluation.protocol]
        assert self._http is not None
        agent = AgentEndpoint(
            self._http,
            agent_url,
            limits.request_s,
            limits.max_steps,
            tools=None if evaluation.tools is None else msgspec.to_builtins(evaluation.tools),
            include_reasoning=evaluation.include_reasoning,
            path_fallback=evaluation.path_fallback,
        )
        gate = asyncio.Semaphore(limits.max_parallel_tasks)

        async def one(index: int) -> None:
            async with gate:
                await self._solve(run, protocol, agent, index)

        await asyncio.gather(*(one(i) for i in range(len(evaluation.tasks))))
        results = evaluation.results
        if not any(r.outcome == "ok" for r in results):
            if all(r.outcome == "timeout" for r in results):
                run.outcome = (
                    "finished",
                    "task_timeout",
                    "no task was answered in time",
                    None,
                )
            else:
                run.outcome = ("finished", "all_tasks_failed", "every task failed", None)
        else:
            run.outcome = ("finished", None, None, None)

    async def _solve(
        self, run: Run, protocol: AgentProtocol, agent: AgentEndpoint, index: int
    ) -> None:
        evaluation = run.evaluation
        task = evaluation.tasks[index]
        result = evaluation.results[index]
        result.outcome = "running"
        result.started_at = now()
        started = time.monotonic()
        task_s = evaluation.limits.task_s
        try:
            answer = await asyncio.wait_for(protocol.solve(agent, task), timeout=task_s)
        except TimeoutError:
            result.outcome, result.reason = "timeout", "task_timeout"
            result.message = f"no complete answer within {task_s:g} s"
        except AgentError as exc:
            result.outcome = "timeout" if exc.reason == "task_timeout" else "failed"
            result.reason, result.message = exc.reason, exc.message
            if exc.raw is not None:
                result.raw = [exc.raw]
        else:
            result.actions = answer.actions
            result.recording = answer.recording
            result.raw = answer.raw
            result.steps = answer.steps
            result.web_agent_id = self._agent_id(evaluation.miner, answer.web_agent_id)
            if answer.error:
                result.outcome, result.reason = "failed", "agent_error"
                result.message = answer.error
            else:
                result.outcome = "ok"
        finally:
            result.finished_at = now()
            result.duration_s = round(time.monotonic() - started, 3)
            if result.outcome == "running":
                result.outcome, result.reason = "cancelled", "cancelled"
            self._count(evaluation)
        await self._save(run)

    @staticmethod
    def _agent_id(miner: Miner, answered: str | None) -> str | None:
        """The miner's identity when the validator gave one, else what the agent said."""
        if miner.web_agent_id:
            return miner.web_agent_id
        if miner.uid is not None:
            return str(miner.uid)
        return answered

    async def _hold_session(self, run: Run, agent_url: str) -> None:
        """Hand the agent to the validator until it finishes the session or the TTL ends."""
        evaluation = run.evaluation
        protocol = self.protocols[evaluation.protocol]
        ttl = evaluation.limits.session_ttl_s
        opened = now()
        evaluation.session = Session(
            url=agent_url,
            step_url=agent_url.rstrip("/") + (protocol.step_path or "/step"),
            protocol=evaluation.protocol,
            ttl_s=ttl,
            opened_at=opened,
            expires_at=opened + ttl,
        )
        evaluation.state = "session"
        await self._save(run)
        try:
            await asyncio.wait_for(run.session_done.wait(), timeout=ttl)
        except TimeoutError:
            evaluation.session.closed_by = "ttl"
            evaluation.session.closed_at = now()
            run.outcome = ("expired", "session_expired", f"the session's {ttl:g} s TTL ended", None)
            return
        evaluation.session.closed_by = "validator"
        evaluation.session.closed_at = now()
        run.outcome = ("finished", None, None, None)

    # -- cleanup -------------------------------------------------------------------------
    async def _clean_up_protected(self, run: Run) -> None:
        """Clean up even when cancelled again meanwhile, then apply the outcome."""
        evaluation = run.evaluation
        evaluation.state = "cleaning"
        cleanup = asyncio.ensure_future(self._clean_up(run))
        while not cleanup.done():
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            except Exception:
                break
        if cleanup.done() and not cleanup.cancelled() and cleanup.exception() is not None:
            error = cleanup.exception()
            log.error("cleaning up evaluation %s failed", evaluation.id, exc_info=error)
        state, reason, message, detail = run.outcome or ("failed", "internal_error", None, None)
        evaluation.state = state  # type: ignore[assignment]
        evaluation.reason, evaluation.message, evaluation.detail_reason = reason, message, detail
        if evaluation.session is not None and evaluation.session.closed_by is None:
            evaluation.session.closed_by = "cancel"
            evaluation.session.closed_at = now()
        self._finish_results(evaluation, "cancelled", reason or "cancelled")
        self._stamp_end(evaluation)
        with contextlib.suppress(Exception):
            await self._save(run)

    async def _clean_up(self, run: Run) -> None:
        evaluation = run.evaluation
        with contextlib.suppress(DockyardError):
            await self._capture_provenance(evaluation)
        self._capture_build_log(run)
        await self._remove_deployment(evaluation.deployment_id)
        evaluation.image_kept = await self._apply_image_policy(evaluation)
        evaluation.cleaned_up = True

    async def _remove_deployment(self, deployment_id: str) -> None:
        """Everything a deployment left: record, containers, port leases, route (also
        under an id whose record is gone)."""
        await self.controller.delete(deployment_id, missing_ok=True)

    async def _apply_image_policy(self, evaluation: Evaluation) -> bool | None:
        """Keep the image (the next evaluation of this commit reuses it) or remove it."""
        if evaluation.image is None or evaluation.miner.build_mode != "dockerfile":
            return None
        if evaluation.limits.keep_image:
            return True
        in_use = any(
            run.evaluation.image == evaluation.image
            or (
                run.evaluation.miner.github_url == evaluation.miner.github_url
                and run.evaluation.state in ("deploying", "running", "session")
            )
            for run in self._runs.values()
            if run.evaluation.id != evaluation.id
        )
        if in_use:
            return True
        try:
            await self.controller.remove_image(evaluation.image)
        except DockyardError as exc:
            log.warning("removing image %s failed: %s", evaluation.image, exc.message)
            return True
        return False

    async def _capture_provenance(self, evaluation: Evaluation) -> None:
        """The exact commit (fetched, or refused after the fetch), the image and the hosts
        a failed build's proxy refused, as the controller knows them while the deployment
        exists."""
        _provenance(evaluation, await self.controller.outcome(evaluation.deployment_id))

    def _capture_build_log(self, run: Run) -> None:
        """Keep the tail of a failed build's log: removing the deployment removes the log."""
        outcome = run.outcome
        if outcome is None or outcome[3] not in BUILD_FAILURES:
            return
        deployment_id = run.evaluation.deployment_id
        found = self.controller.build_logs(deployment_id)
        if not found:
            return
        latest = max(found, key=lambda p: p.stat().st_mtime)
        run.evaluation.build_log_tail = build_log_tail(_read_tail(latest), list(run.env.values()))

    # -- bookkeeping ---------------------------------------------------------------------
    @staticmethod
    def _count(evaluation: Evaluation) -> None:
        results = evaluation.results
        evaluation.progress = Progress(
            tasks_total=len(results),
            tasks_done=sum(r.outcome not in ("pending", "running") for r in results),
            tasks_ok=sum(r.outcome == "ok" for r in results),
        )

    def _finish_results(self, evaluation: Evaluation, outcome: str, reason: str) -> None:
        for result in evaluation.results:
            if result.outcome in ("pending", "running"):
                result.outcome = outcome  # type: ignore[assignment]
                result.reason = reason
        self._count(evaluation)

    @staticmethod
    def _stamp_end(evaluation: Evaluation) -> None:
        evaluation.finished_at = now()
        evaluation.queue_position = None
        evaluation.ok = evaluation.state == "finished" and evaluation.reason is None
        evaluation.total_s = round(evaluation.finished_at - evaluation.created_at, 3)

    async def _save(self, run: Run) -> None:
        async with run.lock:
            await self._store(run.evaluation)

    async def _store(self, evaluation: Evaluation) -> None:
        evaluation.updated_at = now()
        await records.save(self.store, evaluation)
        await announce(self.pm, evaluation)

    # -- queries and commands ------------------------------------------------------------
    async def get(self, evaluation_id: str) -> Evaluation:
        run = self._runs.get(evaluation_id)
        if run is not None:
            return run.evaluation
        record = await records.load(self.store, evaluation_id)
        if record is None:
            raise NotFound(f"evaluation {evaluation_id!r} does not exist")
        return msgspec.convert(record.value, Evaluation)

    async def batch(self, batch_id: str) -> Batch:
        members = await records.list_stored(self.store, batch_id=batch_id)
        if not members:
            raise NotFound(f"batch {batch_id!r} does not exist")
        evaluations = [await self.get(record.key) for record in members]
        progress = BatchProgress(
            total=len(evaluations),
            finished=sum(e.final for e in evaluations),
            ok=sum(e.ok for e in evaluations),
            queued=sum(e.state == "queued" for e in evaluations),
            running=sum(not e.final and e.state != "queued" for e in evaluations),
        )
        return Batch(
            id=batch_id,
            state="finished" if progress.finished == progress.total else "running",
            concurrency=evaluations[0].batch_concurrency,
            progress=progress,
            evaluations=evaluations,
        )

    async def list(self, *, state: str | None = None, limit: int = 100) -> list[Evaluation]:
        """Active ones first (in queue order), then the stored ones, newest first."""
        out = [run.evaluation for run in self._runs.values()]
        seen = {e.id for e in out}
        for record in reversed(await records.list_stored(self.store)):
            if record.key not in seen:
                out.append(msgspec.convert(record.value, Evaluation))
        if state is not None:
            out = [e for e in out if e.state == state]
        return out[:limit]

    async def cancel(self, evaluation_id: str) -> Evaluation | Batch:
        """Cancel an evaluation, or every unfinished one of a batch; answers once cleanup
        is over (bounded); cancelling a finished evaluation changes nothing."""
        if evaluation_id.startswith(BATCH_PREFIX):
            batch = await self.batch(evaluation_id)
            # Queued members leave the queue before any running one ends (and would let
            # the next one start); the running ones are cancelled and cleaned in parallel.
            await asyncio.gather(
                *(self._cancel_one(member.id) for member in batch.evaluations if not member.final)
            )
            return await self.batch(evaluation_id)
        await self._cancel_one(evaluation_id)
        return await self.get(evaluation_id)

    async def _cancel_one(self, evaluation_id: str) -> None:
        run = self._runs.get(evaluation_id)
        if run is None:
            await self.get(evaluation_id)  # NotFound for a stranger
            return
        if evaluation_id in self._queue:
            await self._cancel_queued(run, "cancelled")
            return
        if run.task is not None and not run.task.done():
            run.cancel_reason = run.cancel_reason or "cancelled"
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)

    async def _cancel_queued(self, run: Run, reason: str) -> None:
        evaluation = run.evaluation
        with contextlib.suppress(ValueError):
            self._queue.remove(evaluation.id)
        self._runs.pop(evaluation.id, None)
        evaluation.state = "cancelled"
        evaluation.reason = reason
        evaluation.message = f"cancelled while queued ({reason})"
        evaluation.cleaned_up = True
        self._finish_results(evaluation, "cancelled", reason)
        self._stamp_end(evaluation)
        await self._save(run)
        self._dispatch()

    async def finish_session(self, evaluation_id: str, report: list[Any]) -> Evaluation:
        """The validator is done with the session: record its report, clean up."""
        run = self._runs.get(evaluation_id)
        evaluation = run.evaluation if run else await self.get(evaluation_id)
        if run is None or evaluation.state != "session" or evaluation.session is None:
            raise Conflict(
                f"evaluation {evaluation_id!r} holds no open session (it is {evaluation.state})"
            )
        evaluation.session.report = list(report)
        run.session_done.set()
        if run.task is not None:
            await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)
        return await self.get(evaluation_id)


def _provenance(evaluation: Evaluation, outcome: DeployOutcome) -> None:
    """Copy what the deploy resolved (commit, ref, image) onto the evaluation."""
    evaluation.commit = outcome.commit or evaluation.commit
    evaluation.resolved_ref = outcome.resolved_ref or evaluation.resolved_ref
    if outcome.image:
        evaluation.image = outcome.image
        evaluation.image_reused = outcome.image_reused
    if outcome.build_refused:
        evaluation.build_refused = list(outcome.build_refused)

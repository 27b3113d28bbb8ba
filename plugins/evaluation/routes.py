"""The validator integration routes: evaluate miners from their git code.

Mounted by the evaluation plugin through ``dockyard_api_plugins`` (its ``__init__``), with the
``evaluations`` dependency (the plugin's :class:`EvaluationService`); every route needs the
``evaluate`` scope. Evaluations are asynchronous: a POST answers 202 with the evaluation
(or batch) and its id; ``GET /v1/integration/evaluation/{id}`` shows its progress and
per-task results as they come.
"""

from __future__ import annotations

import re
from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from dockyard.api.errors import errors
from dockyard.core.errors import ValidationError
from dockyard.plugins.evaluation.models import (
    Batch,
    EvaluateBatchRequest,
    EvaluateMinerRequest,
    Evaluation,
    EvaluationList,
    FinishSessionRequest,
)
from dockyard.plugins.evaluation.service import BATCH_PREFIX, EvaluationService

SCOPE = {"scope": "evaluate"}
MAX_ID = 64
EVALUATION_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
#: An evaluation (or batch) id in a path: the pattern is in the schema, and checked.
EvaluationId = Annotated[
    str,
    PathParameter(
        pattern=EVALUATION_ID.pattern,
        max_length=MAX_ID,
        description="an evaluation id (`ev-...`) or a batch id (`batch-...`)",
    ),
]


def _evaluation_post(
    path: str, operation_id: str, summary: str, *codes: int, status_code: int = HTTP_200_OK
) -> post:
    """A POST route of the integration: the ``evaluate`` scope, these error answers."""
    return post(
        path,
        operation_id=operation_id,
        summary=summary,
        status_code=status_code,
        responses=errors(*codes),
        opt=SCOPE,
    )


def _evaluation_get(path: str, operation_id: str, summary: str) -> get:
    """A GET route of the integration: the ``evaluate`` scope."""
    return get(path, operation_id=operation_id, summary=summary, opt=SCOPE)


def _submit(path: str, operation_id: str, summary: str) -> post:
    """A route that queues evaluations: 202 with what was queued (and its id)."""
    return _evaluation_post(
        path, operation_id, summary, 409, 422, 503, status_code=HTTP_202_ACCEPTED
    )


def _check_id(evaluation_id: str) -> str:
    if not EVALUATION_ID.match(evaluation_id):
        raise ValidationError(f"id: {evaluation_id[:MAX_ID]!r} is not an evaluation id")
    return evaluation_id


class IntegrationRoutes(Controller):
    """Evaluations of miners' agents: one, a batch, their status, cancel, sessions."""

    path = "/v1/integration"
    tags = ["integration"]

    @_submit("/evaluate-miner", "evaluateMiner", "Evaluate one miner's agent from its git code")
    async def evaluate_miner(
        self,
        data: JSONBody[EvaluateMinerRequest],
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation:
        return await evaluations.submit(data)

    @_submit(
        "/evaluate-miners-batch",
        "evaluateMinersBatch",
        "Evaluate many miners, at most `concurrency` at once",
    )
    async def evaluate_batch(
        self,
        data: JSONBody[EvaluateBatchRequest],
        evaluations: NamedDependency[EvaluationService],
    ) -> Batch:
        return await evaluations.submit_batch(data)

    @_evaluation_get(
        "/evaluation/{evaluation_id:str}",
        "getEvaluation",
        "An evaluation (or a batch): state, queue position, progress, results",
    )
    async def show(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation | Batch:
        if _check_id(evaluation_id).startswith(BATCH_PREFIX):
            return await evaluations.batch(evaluation_id)
        return await evaluations.get(evaluation_id)

    @_evaluation_get(
        "/evaluations",
        "listEvaluations",
        "Evaluations: active ones first, then the stored ones, newest first",
    )
    async def list_evaluations(
        self,
        evaluations: NamedDependency[EvaluationService],
        state_filter: Annotated[
            str | None, QueryParameter(name="state", description="only this state")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> EvaluationList:
        return EvaluationList(evaluations=await evaluations.list(state=state_filter, limit=limit))

    @_evaluation_post(
        "/evaluation/{evaluation_id:str}/cancel",
        "cancelEvaluation",
        "Cancel an evaluation, or every unfinished one of a batch; cleans up",
        409,
        503,
    )
    async def cancel(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation | Batch:
        return await evaluations.cancel(_check_id(evaluation_id))

    @_evaluation_post(
        "/evaluation/{evaluation_id:str}/finish",
        "finishSession",
        "End an evaluation's step session (optionally with the validator's report)",
        409,
        422,
        503,
    )
    async def finish(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
        data: JSONBody[FinishSessionRequest | None] = None,
    ) -> Evaluation:
        report = data.results if data is not None else []
        return await evaluations.finish_session(_check_id(evaluation_id), report)

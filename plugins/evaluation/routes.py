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


def _check_id(evaluation_id: str) -> str:
    if not EVALUATION_ID.match(evaluation_id):
        raise ValidationError(f"id: {evaluation_id[:MAX_ID]!r} is not an evaluation id")
    return evaluation_id


class IntegrationRoutes(Controller):
    """Evaluations of miners' agents: one, a batch, their status, cancel, sessions."""

    path = "/v1/integration"
    tags = ["integration"]

    @post(
        "/evaluate-miner",
        operation_id="evaluateMiner",
        summary="Evaluate one miner's agent from its git code",
        status_code=HTTP_202_ACCEPTED,
        responses=errors(409, 422, 503),
        opt=SCOPE,
    )
    async def evaluate_miner(
        self,
        data: JSONBody[EvaluateMinerRequest],
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation:
        return await evaluations.submit(data)

    @post(
        "/evaluate-miners-batch",
        operation_id="evaluateMinersBatch",
        summary="Evaluate many miners, at most `concurrency` at once",
        status_code=HTTP_202_ACCEPTED,
        responses=errors(409, 422, 503),
        opt=SCOPE,
    )
    async def evaluate_batch(
        self,
        data: JSONBody[EvaluateBatchRequest],
        evaluations: NamedDependency[EvaluationService],
    ) -> Batch:
        return await evaluations.submit_batch(data)

    @get(
        "/evaluation/{evaluation_id:str}",
        operation_id="getEvaluation",
        summary="An evaluation (or a batch): state, queue position, progress, results",
        opt=SCOPE,
    )
    async def show(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation | Batch:
        if _check_id(evaluation_id).startswith(BATCH_PREFIX):
            return await evaluations.batch(evaluation_id)
        return await evaluations.get(evaluation_id)

    @get(
        "/evaluations",
        operation_id="listEvaluations",
        summary="Evaluations: active ones first, then the stored ones, newest first",
        opt=SCOPE,
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

    @post(
        "/evaluation/{evaluation_id:str}/cancel",
        operation_id="cancelEvaluation",
        summary="Cancel an evaluation, or every unfinished one of a batch; cleans up",
        status_code=HTTP_200_OK,
        responses=errors(409, 503),
        opt=SCOPE,
    )
    async def cancel(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
    ) -> Evaluation | Batch:
        return await evaluations.cancel(_check_id(evaluation_id))

    @post(
        "/evaluation/{evaluation_id:str}/finish",
        operation_id="finishSession",
        summary="End an evaluation's step session (optionally with the validator's report)",
        status_code=HTTP_200_OK,
        responses=errors(409, 422, 503),
        opt=SCOPE,
    )
    async def finish(
        self,
        evaluation_id: EvaluationId,
        evaluations: NamedDependency[EvaluationService],
        data: JSONBody[FinishSessionRequest | None] = None,
    ) -> Evaluation:
        report = data.results if data is not None else []
        return await evaluations.finish_session(_check_id(evaluation_id), report)

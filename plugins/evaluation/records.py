"""Evaluations as the store keeps them: plugin records in the namespace ``evaluation``.

Each evaluation is one record (key: its id, value: the whole :class:`Evaluation`), labelled
with what is queried: ``state``, ``finished`` (``"true"``/``"false"``) and ``batch_id``.
The SQLite store's migration 3 moved the evaluations stored before plugin records existed
into this namespace, with the same labels.

:func:`evaluations_older_than` and :func:`delete_evaluations_older_than` are what a garbage
collector calls to prune finished evaluations.
"""

from __future__ import annotations

import msgspec

from dockyard.core.gc import GcContext, InUse, Item, Kind, Retention
from dockyard.core.store import PluginRecord, StateStore
from dockyard.plugins.evaluation.models import FINAL_STATES, Evaluation
from dockyard.plugins.evaluation.options import EvaluationConfig

#: The records' namespace: the plugin's name.
NAMESPACE = "evaluation"


def _flag(value: bool) -> str:
    return "true" if value else "false"


async def save(store: StateStore, evaluation: Evaluation) -> PluginRecord:
    """Create or replace the evaluation's record."""
    labels = {"state": evaluation.state, "finished": _flag(evaluation.state in FINAL_STATES)}
    if evaluation.batch_id is not None:
        labels["batch_id"] = evaluation.batch_id
    return await store.put_record(
        PluginRecord(
            namespace=NAMESPACE,
            key=evaluation.id,
            value=msgspec.to_builtins(evaluation),
            labels=labels,
            created_at=evaluation.created_at,
            updated_at=evaluation.updated_at,
        )
    )


async def load(store: StateStore, evaluation_id: str) -> PluginRecord | None:
    """The evaluation's record, or None."""
    return await store.get_record(NAMESPACE, evaluation_id)


async def list_stored(
    store: StateStore, *, finished: bool | None = None, batch_id: str | None = None
) -> list[PluginRecord]:
    """Stored evaluations, oldest first, filtered by ``finished`` and ``batch_id``."""
    labels: dict[str, str] = {}
    if finished is not None:
        labels["finished"] = _flag(finished)
    if batch_id is not None:
        labels["batch_id"] = batch_id
    return await store.list_records(NAMESPACE, labels=labels)


async def delete(store: StateStore, evaluation_id: str) -> None:
    """Remove the evaluation's record; an unknown id is not an error."""
    await store.delete_record(NAMESPACE, evaluation_id)


async def evaluations_older_than(store: StateStore, before: float) -> list[str]:
    """Ids of the finished evaluations last written before ``before`` (a Unix time),
    oldest first: what a garbage collector may prune."""
    stale = await store.list_records(NAMESPACE, labels={"finished": "true"}, updated_before=before)
    return [record.key for record in stale]


async def delete_evaluations_older_than(store: StateStore, before: float) -> list[str]:
    """Delete the finished evaluations last written before ``before``; returns their ids.
    Unfinished ones are never pruned (their service still owns them)."""
    pruned = await evaluations_older_than(store, before)
    for evaluation_id in pruned:
        await store.delete_record(NAMESPACE, evaluation_id)
    return pruned


def gc_kind(context: GcContext) -> Kind:
    """The ``evaluations`` kind of garbage collection (``dockyard_register_gc_kinds``):
    finished evaluations' records are removable, their age their last update, their size
    their JSON; a running one is in use, and so are its journal entries and its image.
    Kept as ``[plugins.evaluation]`` ``gc_max_age_days`` and ``gc_max_mb`` say."""
    store = context.store
    config = EvaluationConfig.from_settings(context.settings)

    async def mark_used(used: InUse) -> None:
        for record in await list_stored(store, finished=False):
            used.running.add(record.key)
            image = record.value.get("image")
            if image:
                used.images.add(str(image))

    async def inventory(used: InUse) -> list[Item]:
        return [
            Item(
                name=record.key,
                bytes=len(msgspec.json.encode(record.value)),
                at=record.updated_at,
                in_use=record.labels.get("finished") != "true" or record.key in used.running,
            )
            for record in await list_stored(store)
        ]

    async def remove(item: Item) -> None:
        await delete(store, item.name)

    retention = Retention.of(config.gc_max_age_days, config.gc_max_mb)
    return Kind("evaluations", inventory, remove, mark_used, retention)

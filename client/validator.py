"""``ValidatorIntegration``: what a validator calls instead of a miner's own endpoint.

    async with ValidatorIntegration("http://127.0.0.1:8800", token=...) as vi:
        result = await vi.evaluate_miner_from_github(
            miner_github_url="https://github.com/miner/agent",
            miner_branch="main",
            task_prompt=task.prompt,
            task_url=task.url,
        )
        solutions = result.solutions()   # [TaskSolution(task_id, actions, web_agent_id, ...)]
        if result.reason: ...            # a stable zero-score reason, e.g. "ref_not_found"

dockyard deploys the miner's code, relays the task(s), records the answers and the exact
commit, and cleans up, whatever happens. It speaks the validator's protocol, ``step``
(``POST /step`` with the validator's exact body), unless ``protocol`` says otherwise
(``act`` for agents that serve only ``/act``; ``solve_task`` for the oldest ones).
"""

from __future__ import annotations

import uuid
from typing import Any

from dockyard.client.closing import AsyncClosing
from dockyard.client.models import Batch, Evaluation
from dockyard.client.rest import DEFAULT_URL, DockyardClient


class ValidatorIntegration(AsyncClosing):
    """Evaluate miners from their GitHub code through a running dockyard."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        client: DockyardClient | None = None,
        protocol: str = "step",
        timeouts: dict[str, float] | None = None,
        wait_timeout_s: float = 3600,
        poll_s: float = 1.0,
    ) -> None:
        self.client = client or DockyardClient(url, token=token)
        self._own_client = client is None
        self.protocol = protocol
        self.timeouts = dict(timeouts or {})
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s

    async def close(self) -> None:
        if self._own_client:
            await self.client.close()

    @staticmethod
    def miner(
        miner_github_url: str,
        miner_branch: str | None = None,
        *,
        subdir: str = "",
        uid: int | None = None,
        hotkey: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A miner as the API takes it (``fields``: build_mode, image, command,
        container_port, health_path, web_agent_id, tasks)."""
        miner: dict[str, Any] = {"github_url": miner_github_url, "ref": miner_branch}
        if subdir:
            miner["subdir"] = subdir
        if uid is not None:
            miner["uid"] = uid
        if hotkey is not None:
            miner["hotkey"] = hotkey
        miner.update({k: v for k, v in fields.items() if v is not None})
        return miner

    def _options(self, tasks: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"tasks": tasks, "protocol": self.protocol}
        if self.timeouts:
            body["timeouts"] = dict(self.timeouts)
        body.update({k: v for k, v in options.items() if v is not None})
        return body

    async def evaluate_miner_from_github(
        self,
        miner_github_url: str,
        miner_branch: str | None = None,
        task_prompt: str | None = None,
        task_url: str | None = None,
        *,
        task_id: str | None = None,
        tasks: list[dict[str, Any]] | None = None,
        subdir: str = "",
        uid: int | None = None,
        hotkey: str | None = None,
        miner_fields: dict[str, Any] | None = None,
        wait: bool = True,
        **options: Any,
    ) -> Evaluation:
        """Deploy the miner's agent, relay the task (``task_prompt`` + ``task_url``, or
        ``tasks``: IWA task objects), clean up; the evaluation once it ended (or at once
        with ``wait=False``). ``options``: protocol, mode, timeouts, max_parallel_tasks,
        max_steps, resources, env, require_ref, keep_image."""
        if tasks is None:
            if task_prompt is None and options.get("mode") != "session":
                raise ValueError("give task_prompt and task_url, or tasks")
            tasks = []
            if task_prompt is not None:
                tasks.append(
                    {
                        "id": task_id or uuid.uuid4().hex,
                        "prompt": task_prompt,
                        "url": task_url or "",
                    }
                )
        miner = self.miner(
            miner_github_url, miner_branch, subdir=subdir, uid=uid, hotkey=hotkey,
            **(miner_fields or {}),
        )  # fmt: skip
        evaluation = await self.client.evaluate_miner(
            {"miner": miner, **self._options(tasks, options)}
        )
        if not wait or evaluation.finished:
            return evaluation
        until = None
        if options.get("mode") == "session":

            def until(view: Any) -> bool:
                return bool(view.finished or view.state == "session")

        view = await self.client.wait_for_evaluation(
            evaluation.id, timeout_s=self.wait_timeout_s, poll_s=self.poll_s, until=until
        )
        assert isinstance(view, Evaluation)
        return view

    async def evaluate_miners_from_github(
        self,
        miners: list[dict[str, Any]],
        tasks: list[dict[str, Any]] | None = None,
        *,
        concurrency: int | None = None,
        wait: bool = True,
        **options: Any,
    ) -> Batch:
        """Evaluate many miners (each a dict as :meth:`miner` makes, optionally with its own
        ``tasks``), at most ``concurrency`` at once; the batch once every member ended."""
        body = self._options(tasks or [], options)
        body["miners"] = miners
        if concurrency is not None:
            body["concurrency"] = concurrency
        batch = await self.client.evaluate_miners_batch(body)
        if not wait or batch.finished:
            return batch
        view = await self.client.wait_for_evaluation(
            batch.id, timeout_s=self.wait_timeout_s, poll_s=self.poll_s
        )
        assert isinstance(view, Batch)
        return view

    async def cancel(self, evaluation_or_batch_id: str) -> Evaluation | Batch:
        return await self.client.cancel_evaluation(evaluation_or_batch_id)

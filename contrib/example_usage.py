"""Evaluate miners through a running dockyard, as a validator would (dockyard.client).

    dockyard serve --allow-local-repo $PWD          # in another terminal
    .venv/bin/python contrib/example_usage.py --token dy_...

By default it evaluates contrib/example-agent from this checkout (trusted with
--allow-local-repo; it needs the base image from contrib/base-image/build.sh). Give
--repo https://github.com/<miner>/<agent> [--ref main] [--subdir src] for a real miner.
It runs one evaluation with the seed's call, a batch, and a step session driven by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import msgspec

from dockyard.client import ApiError, ValidatorIntegration

HERE = Path(__file__).resolve().parent


def show(title: str, value: object) -> None:
    print(f"\n== {title}")
    print(json.dumps(value, indent=2, default=str)[:3000])


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DOCKYARD_URL", "http://127.0.0.1:8800"))
    parser.add_argument("--token", default=os.environ.get("DOCKYARD_TOKEN"))
    parser.add_argument("--repo", default=str(HERE.parent), help="miner repository URL")
    parser.add_argument("--ref", default=None, help="branch, tag or commit")
    parser.add_argument("--subdir", default=None, help="default: contrib/example-agent")
    args = parser.parse_args()
    subdir = args.subdir if args.subdir is not None else (
        "contrib/example-agent" if args.repo == str(HERE.parent) else ""
    )  # fmt: skip

    async with ValidatorIntegration(args.url, token=args.token, poll_s=0.5) as vi:
        # 1. The seed's call: deploy the miner, relay one task, clean up.
        result = await vi.evaluate_miner_from_github(
            miner_github_url=args.repo,
            miner_branch=args.ref,
            task_prompt="Navigate to the homepage",
            task_url="https://example.com/",
            subdir=subdir,
            uid=1,
        )
        show(
            f"evaluation {result.id}: {result.state} reason={result.reason} commit={result.commit}",
            msgspec.to_builtins(result.solutions()),  # the validator's TaskSolutions
        )

        # 2. A batch: the same code twice plus a branch that does not exist.
        batch = await vi.evaluate_miners_from_github(
            [
                vi.miner(args.repo, args.ref, subdir=subdir, uid=2),
                vi.miner(args.repo, args.ref, subdir=subdir, uid=3),
                vi.miner(args.repo, "no-such-branch", subdir=subdir, uid=4),
            ],
            tasks=[{"id": "t1", "prompt": "Open the page", "url": "https://example.com/"}],
            concurrency=2,
        )
        show(
            f"batch {batch.id}: {batch.progress.ok}/{batch.progress.total} ok",
            [(e.miner.uid if e.miner else None, e.state, e.reason) for e in batch.evaluations],
        )

        # 3. A step session: the validator drives the agent itself, step by step.
        opened = await vi.evaluate_miner_from_github(
            args.repo, args.ref, subdir=subdir, protocol="step", mode="session"
        )
        if opened.session is None:
            show("session refused", {"state": opened.state, "reason": opened.reason})
            return 1
        async with aiohttp.ClientSession() as http:
            for index in range(3):
                step = {"task_id": "s1", "prompt": "Open it", "url": "https://example.com/",
                        "step_index": index, "history": []}  # fmt: skip
                async with http.post(opened.session.step_url, json=step) as answer:
                    body = await answer.json(content_type=None)
                show(f"step {index} via {opened.session.step_url}", body)
                if body.get("done"):
                    break
        done = await vi.client.finish_session(opened.id, [{"task_id": "s1", "score": 1.0}])
        show(f"session {done.id}", {"state": done.state, "cleaned_up": done.cleaned_up})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except ApiError as exc:
        print(f"example_usage: {exc}", file=sys.stderr)
        sys.exit(2)

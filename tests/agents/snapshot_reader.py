"""A lenient agent that reads the page from ``snapshot_html`` (the older field name) and
says what it saw: under the validator that key is never sent, so it sees nothing."""

from typing import Any

from wire import serve


def answer(body: dict[str, Any]) -> dict[str, Any]:
    page = body.get("snapshot_html")
    return {
        "protocol_version": "1.0",
        "tool_calls": [],
        "content": f"snapshot_html: {'absent' if page is None else len(page)}",
        "done": True,
    }


if __name__ == "__main__":
    serve("/step", answer, strict=False)

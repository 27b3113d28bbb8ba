# ruff: noqa: E501
"""The browser tools Autoppia's validator offers an agent in every step request, as data.

Derived from the action models of autoppia/autoppia_iwa (commit 0bcf312, June 2026) under
their pinned pydantic 2.11.5: one tool per registered action, named ``browser.`` plus the
action's tool name (``user.request_input`` for ``request_user_input``; ``done`` and
``evaluate`` are not offered), described by the first line of the action's docstring, with
the action's JSON schema (its ``type`` field and ``title`` removed) as ``parameters``. This
is what IWA's ``StepRequest.tools`` holds when the client offers tools; the order is the
order the actions register in.

``ACTION_TYPES`` maps every name an answer may use for an action (its type without
``Action``, its tool name or an alias; lower case, without ``_``, ``-`` or spaces) to the
action type the validator records in a step's history (``ClickAction``, ``TypeAction``...).
"""

from __future__ import annotations

import copy
from typing import Any

_SELECTOR_DEFS: dict[str, Any] = {
    "Selector": {
        "description": "Represents a strategy for locating elements on a web page.",
        "properties": {
            "type": {"$ref": "#/$defs/SelectorType"},
            "attribute": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "default": None,
                "title": "Attribute",
            },
            "value": {"title": "Value", "type": "string"},
            "case_sensitive": {"default": False, "title": "Case Sensitive", "type": "boolean"},
        },
        "required": ["type", "value"],
        "title": "Selector",
        "type": "object",
    },
    "SelectorType": {
        "description": "Enumeration of supported selector strategies.",
        "enum": ["attributeValueSelector", "tagContainsSelector", "xpathSelector"],
        "title": "SelectorType",
        "type": "string",
    },
}

# The ``selector`` field as the actions declare it: mandatory, optional, or one of a click's
# two ways to say where (the other is the ``x``, ``y`` pair).
_REQUIRED_SELECTOR: dict[str, Any] = {
    "$ref": "#/$defs/Selector",
    "description": "The selector used to locate the target element for the action. This is mandatory.",
}
_OPTIONAL_SELECTOR: dict[str, Any] = {
    "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
    "default": None,
    "description": "The selector to locate the target element. Optional for actions not targeting specific elements.",
}
_CLICK_TARGET: dict[str, Any] = {
    "selector": {
        "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
        "default": None,
        "description": "Selector for the element to click. Required if x, y are not provided.",
    },
    "x": {
        "anyOf": [{"type": "integer"}, {"type": "null"}],
        "default": None,
        "description": "X-coordinate for the click, relative to the top-left corner of the viewport.",
        "title": "X",
    },
    "y": {
        "anyOf": [{"type": "integer"}, {"type": "null"}],
        "default": None,
        "description": "Y-coordinate for the click, relative to the top-left corner of the viewport.",
        "title": "Y",
    },
}


def _tool(
    name: str, description: str, properties: dict[str, Any], required: list[str] | None = None
) -> dict[str, Any]:
    """One offered tool: the action's fields as ``properties`` inside the schema every action shares."""
    parameters: dict[str, Any] = {
        "$defs": copy.deepcopy(_SELECTOR_DEFS),
        "additionalProperties": True,
        "description": description,
        "properties": copy.deepcopy(properties),
    }
    if required is not None:
        parameters["required"] = required
    parameters["type"] = "object"
    return {"name": name, "description": description, "parameters": parameters}


VALIDATOR_TOOLS: list[dict[str, Any]] = [
    _tool(
        "browser.base_action_with_selector",
        "Base class for actions that require a `Selector` to identify an element.",
        {"selector": _REQUIRED_SELECTOR},
        ["selector"],
    ),
    _tool(
        "browser.assert",
        "Asserts that specific text exists within the page's main frame content.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "text_to_assert": {
                "description": "The text content to check for existence on the page.",
                "title": "Text To Assert",
                "type": "string",
            },
        },
        ["text_to_assert"],
    ),
    _tool(
        "browser.base_click",
        "Base class for click-related actions that support both selector and coordinate-based clicks.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.click",
        "Clicks an element identified by a selector, or at specific coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.dblclick",
        "Double-clicks an element identified by a selector or coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.drag_and_drop",
        "Performs a drag-and-drop operation between two elements.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "sourceSelector": {"title": "Sourceselector", "type": "string"},
            "targetSelector": {"title": "Targetselector", "type": "string"},
        },
        ["sourceSelector", "targetSelector"],
    ),
    _tool(
        "browser.extract",
        "Extracts deterministic text from the page, optionally filtered by a query or selector.",
        {
            "selector": {
                "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
                "default": None,
                "description": "Optional selector to scope extraction.",
            },
            "query": {
                "default": "",
                "description": "Optional query used to filter the extracted content.",
                "title": "Query",
                "type": "string",
            },
            "include_html": {
                "default": False,
                "description": "If true, returns HTML instead of visible text.",
                "title": "Include Html",
                "type": "boolean",
            },
            "max_chars": {
                "default": 4000,
                "description": "Maximum characters to return.",
                "title": "Max Chars",
                "type": "integer",
            },
        },
    ),
    _tool(
        "browser.dropdown_options",
        "Retrieves all options (text and value) from a <select> dropdown element.",
        {"selector": _REQUIRED_SELECTOR},
        ["selector"],
    ),
    _tool(
        "browser.go_back",
        "Navigates to the previous page in browser history.",
        {"selector": _OPTIONAL_SELECTOR},
    ),
    _tool(
        "browser.hold_key",
        "Hold a keyboard key down, optionally for a duration, and release it.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "key": {
                "description": "Keyboard key to hold/release. Use Playwright key names.",
                "title": "Key",
                "type": "string",
            },
            "duration_ms": {
                "anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "null"}],
                "default": None,
                "description": "Optional duration in ms to hold before releasing.",
                "title": "Duration Ms",
            },
            "release": {
                "default": False,
                "description": "If true, only releases the key instead of pressing it.",
                "title": "Release",
                "type": "boolean",
            },
        },
        ["key"],
    ),
    _tool(
        "browser.hover",
        "Hovers the mouse cursor over an element identified by a selector.",
        {"selector": _REQUIRED_SELECTOR},
        ["selector"],
    ),
    _tool(
        "browser.idle",
        "Represents an intentional idle state or pause. Does nothing.",
        {"selector": _OPTIONAL_SELECTOR},
    ),
    _tool(
        "browser.left_click_drag",
        "Left-click drag from a start selector/(x,y) to a target selector/(x,y).",
        {
            "selector": {
                "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
                "default": None,
                "description": "Start selector. If omitted, x/y must be provided.",
            },
            "x": {
                "anyOf": [{"type": "integer"}, {"type": "null"}],
                "default": None,
                "description": "Start X coordinate.",
                "title": "X",
            },
            "y": {
                "anyOf": [{"type": "integer"}, {"type": "null"}],
                "default": None,
                "description": "Start Y coordinate.",
                "title": "Y",
            },
            "targetSelector": {
                "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
                "default": None,
                "description": "Target selector. If omitted, targetX/targetY must be provided.",
            },
            "targetX": {
                "anyOf": [{"type": "integer"}, {"type": "null"}],
                "default": None,
                "description": "Target X coordinate.",
                "title": "Targetx",
            },
            "targetY": {
                "anyOf": [{"type": "integer"}, {"type": "null"}],
                "default": None,
                "description": "Target Y coordinate.",
                "title": "Targety",
            },
            "steps": {
                "default": 1,
                "description": "Number of intermediate mouse move steps during the drag.",
                "title": "Steps",
                "type": "integer",
            },
        },
    ),
    _tool(
        "browser.middleclick",
        "Middle-clicks an element identified by a selector or coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.mouse_down",
        "Presses the left mouse button down on a selector or at coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.mouse_move",
        "Moves the mouse to a selector center or to specific coordinates.",
        {
            **_CLICK_TARGET,
            "steps": {
                "default": 1,
                "description": "Number of intermediate mouse move steps (animation).",
                "title": "Steps",
                "type": "integer",
            },
        },
    ),
    _tool(
        "browser.mouse_up",
        "Releases the left mouse button on a selector or at coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.navigate",
        "Navigates the browser to a URL, or goes back/forward in history.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "url": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "default": None,
                "description": "The URL to navigate to. Required unless go_back or go_forward is true.",
                "title": "Url",
            },
            "go_back": {
                "default": False,
                "description": "If true, navigates to the previous page in history.",
                "title": "Go Back",
                "type": "boolean",
            },
            "go_forward": {
                "default": False,
                "description": "If true, navigates to the next page in history.",
                "title": "Go Forward",
                "type": "boolean",
            },
        },
    ),
    _tool(
        "user.request_input",
        "Request structured input from the user before continuing execution.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "prompt": {
                "description": "Prompt/question presented to the user.",
                "title": "Prompt",
                "type": "string",
            },
            "options": {
                "anyOf": [{"items": {"type": "string"}, "type": "array"}, {"type": "null"}],
                "default": None,
                "description": "Optional list of suggested choices.",
                "title": "Options",
            },
            "allow_free_form": {
                "default": True,
                "description": "Whether the user can answer outside the suggested options.",
                "title": "Allow Free Form",
                "type": "boolean",
            },
            "question_id": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "default": None,
                "description": "Optional stable identifier for mapping the answer.",
                "title": "Question Id",
            },
            "required": {
                "default": True,
                "description": "Whether answering this question is required to continue.",
                "title": "Required",
                "type": "boolean",
            },
        },
        ["prompt"],
    ),
    _tool(
        "browser.rightclick",
        "Right-clicks an element identified by a selector or coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.screenshot",
        "Takes a screenshot of the current page.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "file_path": {
                "default": "",
                "description": "The file path where the screenshot should be saved.",
                "title": "File Path",
                "type": "string",
            },
            "full_page": {
                "default": False,
                "description": "Whether to capture the full scrollable page.",
                "title": "Full Page",
                "type": "boolean",
            },
        },
    ),
    _tool(
        "browser.scroll",
        "Scrolls the page up, down, left, right, to a text, or by a specific amount.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "value": {
                "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
                "default": None,
                "description": "Scroll amount or target. If int: scroll by that many px in the chosen direction. If None: scroll by viewport size in the chosen direction. If str: one of {'top','bottom','left','right','max','start','end'} or text to scroll into view.",
                "title": "Value",
            },
            "up": {
                "default": False,
                "description": "Scroll vertically up.",
                "title": "Up",
                "type": "boolean",
            },
            "down": {
                "default": False,
                "description": "Scroll vertically down.",
                "title": "Down",
                "type": "boolean",
            },
            "left": {
                "default": False,
                "description": "Scroll horizontally left.",
                "title": "Left",
                "type": "boolean",
            },
            "right": {
                "default": False,
                "description": "Scroll horizontally right.",
                "title": "Right",
                "type": "boolean",
            },
        },
    ),
    _tool(
        "browser.search",
        "Searches the web using a search engine and opens the results page.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "query": {"description": "Search query to run.", "title": "Query", "type": "string"},
            "engine": {
                "default": "duckduckgo",
                "description": "Search engine: duckduckgo, google, or bing.",
                "title": "Engine",
                "type": "string",
            },
        },
        ["query"],
    ),
    _tool(
        "browser.select",
        "Selects an option in a dropdown (<select>) element.",
        {
            "selector": _REQUIRED_SELECTOR,
            "value": {
                "description": "The value, label, or index of the option to select.",
                "title": "Value",
                "type": "string",
            },
        },
        ["selector", "value"],
    ),
    _tool(
        "browser.select_dropdown",
        "Selects a specific option within a <select> dropdown element by its visible text.",
        {
            "selector": _REQUIRED_SELECTOR,
            "text": {
                "description": "The exact visible text of the option to select.",
                "title": "Text",
                "type": "string",
            },
            "timeout_ms": {
                "default": 1000,
                "description": "Maximum time in milliseconds to wait for the element and option.",
                "title": "Timeout Ms",
                "type": "integer",
            },
        },
        ["selector", "text"],
    ),
    _tool(
        "browser.send_keys",
        "Presses keyboard keys. Can be used for shortcuts or special keys.",
        {
            "selector": _OPTIONAL_SELECTOR,
            "keys": {
                "description": "The key or key combination to press (e.g., 'Enter', 'Control+C', 'ArrowDown').",
                "title": "Keys",
                "type": "string",
            },
        },
        ["keys"],
    ),
    _tool(
        "browser.submit",
        "Submits a form by pressing Enter on a specific element.",
        {"selector": _REQUIRED_SELECTOR},
        ["selector"],
    ),
    _tool(
        "browser.tripleclick",
        "Triple-clicks an element identified by a selector or coordinates.",
        _CLICK_TARGET,
    ),
    _tool(
        "browser.input",
        "Fills an input field identified by a selector with the given text. Clears the field first.",
        {
            "selector": {
                "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
                "default": None,
                "description": "Selector for the element to type into. Required if 'text' is not provided.",
            },
            "text": {
                "description": "The text to type into the element.",
                "title": "Text",
                "type": "string",
            },
        },
        ["text"],
    ),
    _tool(
        "browser.undefined",
        "Represents an undefined or placeholder action. Does nothing.",
        {"selector": _OPTIONAL_SELECTOR},
    ),
    _tool(
        "browser.wait",
        "Waits for a specific condition: an element to appear or a fixed duration.",
        {
            "selector": {
                "anyOf": [{"$ref": "#/$defs/Selector"}, {"type": "null"}],
                "default": None,
                "description": "Selector for an element to wait for. If provided, waits for the element.",
            },
            "time_seconds": {
                "anyOf": [{"type": "number"}, {"type": "null"}],
                "default": None,
                "description": "Duration in seconds to wait. If provided without a selector, pauses execution.",
                "title": "Time Seconds",
            },
            "timeout_seconds": {
                "default": 5.0,
                "description": "Maximum time in seconds to wait for the selector.",
                "title": "Timeout Seconds",
                "type": "number",
            },
        },
    ),
]

ACTION_TYPES: dict[str, str] = {
    "baseactionwithselector": "base_action_with_selector",
    "assert": "AssertAction",
    "baseclick": "base_click",
    "click": "ClickAction",
    "done": "DoneAction",
    "doubleclick": "DoubleClickAction",
    "dblclick": "DoubleClickAction",
    "draganddrop": "DragAndDropAction",
    "evaluate": "EvaluateAction",
    "extract": "ExtractAction",
    "getdropdownoptions": "GetDropDownOptionsAction",
    "dropdownoptions": "GetDropDownOptionsAction",
    "goback": "GoBackAction",
    "holdkey": "HoldKeyAction",
    "hover": "HoverAction",
    "idle": "IdleAction",
    "leftclickdrag": "LeftClickDragAction",
    "middleclick": "MiddleClickAction",
    "mousedown": "MouseDownAction",
    "mousemove": "MouseMoveAction",
    "mouseup": "MouseUpAction",
    "navigate": "NavigateAction",
    "requestuserinput": "RequestUserInputAction",
    "rightclick": "RightClickAction",
    "screenshot": "ScreenshotAction",
    "scroll": "ScrollAction",
    "search": "SearchAction",
    "select": "SelectAction",
    "selectdropdownoption": "SelectDropDownOptionAction",
    "selectdropdown": "SelectDropDownOptionAction",
    "sendkeysiwa": "SendKeysIWAAction",
    "sendkeys": "SendKeysIWAAction",
    "submit": "SubmitAction",
    "tripleclick": "TripleClickAction",
    "type": "TypeAction",
    "input": "TypeAction",
    "undefined": "UndefinedAction",
    "wait": "WaitAction",
}

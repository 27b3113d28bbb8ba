"""One reader of Dockerfiles: parser directives, continuation lines and comments, as the
engines read them, and the images a Dockerfile needs from the engine's store.

The build safety check (:func:`dockyard.core.builds.check_dockerfile`) and the engines' base
image check (:func:`external_images`) both read instructions through :func:`parse`, so they
agree on where an instruction ends: the ``# escape=`` directive (backslash or backtick)
decides what continues a line, and comment lines inside a continued instruction are
dropped, as Docker's and Buildah's parsers do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dockyard.core.errors import BuildFailed

#: A parser directive: ``# name=value`` in the leading comment lines.
_DIRECTIVE = re.compile(r"^\s*#\s*([A-Za-z]+)\s*=\s*(.*?)\s*$")
_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)
ESCAPES = ("\\", "`")


@dataclass(frozen=True)
class Instruction:
    """One instruction, its continuation lines joined: ``keyword`` upper-cased, ``args``
    the rest, ``line`` the number of its first line."""

    line: int
    keyword: str
    args: str

    @property
    def text(self) -> str:
        return f"{self.keyword} {self.args}".rstrip()


@dataclass(frozen=True)
class Dockerfile:
    """A Dockerfile as the engines read it."""

    #: Parser directives, lower-cased name to (line, value), in the order given.
    directives: dict[str, tuple[int, str]] = field(default_factory=dict)
    escape: str = "\\"
    instructions: list[Instruction] = field(default_factory=list)


def _directives(lines: list[str]) -> dict[str, tuple[int, str]]:
    """The leading parser directives: they end at the first line that is not one (a blank
    line, another comment, an instruction)."""
    found: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        match = _DIRECTIVE.match(line)
        if match is None:
            break
        found.setdefault(match.group(1).lower(), (number, match.group(2)))
    return found


def parse(text: str) -> Dockerfile:
    """Read ``text``: directives first, then instructions, a line ending in the escape
    character continued on the next; comment lines and blank lines inside a continued
    instruction are dropped.

    :raises BuildFailed: an ``escape`` directive that is neither ``\\`` nor a backtick.
    """
    lines = text.splitlines()
    directives = _directives(lines)
    escape = directives.get("escape", (0, "\\"))[1]
    if escape not in ESCAPES:
        raise BuildFailed(
            f"Dockerfile line {directives['escape'][0]}: invalid escape token {escape!r} "
            "(a backslash or a backtick)",
            reason="dockerfile_refused",
        )
    instructions: list[Instruction] = []
    parts: list[str] = []
    first = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # between instructions, or inside a continued one: dropped either way
        if not parts:
            first = number
        body = line.rstrip()
        if body.endswith(escape):
            parts.append(body[: -len(escape)])
            continue
        parts.append(body)
        instructions.append(_instruction(first, parts))
        parts = []
    if parts:
        instructions.append(_instruction(first, parts))
    return Dockerfile(directives=directives, escape=escape, instructions=instructions)


def _instruction(line: int, parts: list[str]) -> Instruction:
    joined = " ".join(part.strip() for part in parts if part.strip())
    keyword, _, args = joined.partition(" ")
    return Instruction(line=line, keyword=keyword.upper(), args=args.strip())


def _expand(word: str, args: Mapping[str, str | None]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        value = args.get(name)
        op = match.group("op")
        if op == "-":
            return value if value else match.group("word")
        if op == "+":
            return match.group("word") if value else ""
        return value or ""

    return _VARIABLE.sub(substitute, word)


class _Stages:
    """The stages read so far and the external images they need, for
    :func:`external_images`."""

    def __init__(self, build_args: Mapping[str, str]) -> None:
        self.build_args = build_args
        self.global_args: dict[str, str | None] = {}
        self.names: list[str] = []  # lower-cased stage names ("" for an unnamed stage)
        self.found: list[str] = []
        #: Where each external image is named: (line, the word as written, the image).
        self.places: list[tuple[int, str, str]] = []

    def resolve(self, word: str, what: str) -> str:
        value = _expand(word, self.global_args).strip()
        if not value or "$" in value:
            raise BuildFailed(
                f"Dockerfile {what} {word!r}: cannot tell which image this is before the "
                "build (images are never pulled, so every base image is checked first)",
                reason="dockerfile_refused",
            )
        return value

    def need(self, image: str, line: int = 0, word: str = "") -> None:
        if image == "scratch" or image.lower() in self.names:
            return
        self.places.append((line, word or image, image))
        if image not in self.found:
            self.found.append(image)

    def read(self, instruction: Instruction) -> None:
        words = instruction.args.split()
        if instruction.keyword == "ARG" and not self.names:
            for word in words:
                name, eq, default = word.partition("=")
                self.global_args[name] = self.build_args.get(
                    name, default.strip("\"'") if eq else None
                )
        elif instruction.keyword == "FROM":
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            if not words:
                raise BuildFailed("Dockerfile FROM without an image", reason="dockerfile_refused")
            self.need(self.resolve(words[0], "FROM"), instruction.line, words[0])
            named = len(words) >= 3 and words[1].lower() == "as"
            self.names.append(words[2].lower() if named else "")
        elif instruction.keyword == "COPY":
            for word in words:
                if not word.startswith("--from="):
                    continue
                source = self.resolve(word.removeprefix("--from="), "COPY --from")
                if not (source.isdigit() and int(source) < len(self.names)):
                    self.need(source, instruction.line, word)


def external_images(text: str, build_args: Mapping[str, str] | None = None) -> list[str]:
    """Images a Dockerfile needs from the engine's store: every ``FROM`` and ``COPY --from``
    reference that is neither ``scratch`` nor an earlier stage, global ``ARG`` values (and
    ``build_args``) substituted, in order, without duplicates.

    :raises BuildFailed: a reference that cannot be resolved statically.
    """
    stages = _Stages(build_args or {})
    for instruction in parse(text).instructions:
        stages.read(instruction)
    return stages.found


def rewrite_images(
    text: str, images: Mapping[str, str], build_args: Mapping[str, str] | None = None
) -> str:
    """``text`` with every external image that ``images`` maps (``FROM python:3.11-slim``,
    ``COPY --from=python:3.11-slim``) replaced by its local image, written literally; the
    rest of the Dockerfile byte for byte.

    :raises BuildFailed: a reference that cannot be resolved statically.
    """
    stages = _Stages(build_args or {})
    for instruction in parse(text).instructions:
        stages.read(instruction)
    lines = text.split("\n")
    for number, word, image in stages.places:
        target = images.get(image)
        if target is None or not 0 < number <= len(lines):
            continue
        old = lines[number - 1]
        if word.startswith("--from="):
            lines[number - 1] = old.replace(word, f"--from={target}", 1)
        else:
            keyword = re.match(r"^\s*FROM\s+(?:--\S+\s+)*", old, re.IGNORECASE)
            at = keyword.end() if keyword else 0
            lines[number - 1] = old[:at] + old[at:].replace(word, target, 1)
    return "\n".join(lines)


__all__ = ["Dockerfile", "Instruction", "external_images", "parse", "rewrite_images"]

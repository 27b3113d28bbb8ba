"""What a plugin brings to the command line: subcommands and their handlers.

``dockyard.api.cli`` builds its parser, then calls every ``dockyard_cli_commands(register)``
implementation once with a :class:`CliRegistrar`. A plugin adds a subcommand with
``register.api_command(...)`` (it talks to a running dockyard: it gets ``--url`` and
``--token``, and its handler is called with the parsed arguments) or
``register.local_command(...)`` (it works on this host: its handler is called with the
parsed arguments and the loaded settings). Each returns the subcommand's
``argparse.ArgumentParser`` for the plugin to add its arguments to. The CLI reports the
errors a handler raises the way it reports its own (one line, ``dockyard: error: ...``).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dockyard.core.config import Settings
from dockyard.core.errors import PluginError
from dockyard.core.plugins import DockyardPluginManager, call_registrar, current_plugin

#: The attribute of the parsed arguments that holds a plugin command's :class:`CliCommand`.
PLUGIN_COMMAND = "plugin_command"
#: An API command's handler: the parsed arguments; returns the exit code (or an awaitable).
ApiHandler = Callable[[argparse.Namespace], int | Awaitable[int]]
#: A local command's handler: the parsed arguments and the settings; returns the exit code.
LocalHandler = Callable[[argparse.Namespace, Settings], int | Awaitable[int]]


@dataclass(frozen=True)
class CliCommand:
    """One subcommand a plugin added: who added it, and how it runs."""

    name: str
    plugin: str
    api: ApiHandler | None = None
    local: LocalHandler | None = None


@dataclass
class CliRegistrar:
    """The registrar ``dockyard_cli_commands`` receives (see ``core/hookspecs.py``).

    :param subcommands: the main parser's subcommands (``add_subparsers`` result).
    :param api_parent: the parser holding ``--url`` and ``--token``, a parent of every
        API command.
    """

    subcommands: Any
    api_parent: argparse.ArgumentParser
    commands: dict[str, CliCommand] = field(default_factory=dict)

    def api_command(
        self, name: str, run: ApiHandler, *, help: str, **parser_options: Any
    ) -> argparse.ArgumentParser:
        """Add ``dockyard NAME`` talking to a running dockyard (``--url``, ``--token``);
        ``run(args)`` runs it. ``parser_options`` go to ``add_parser`` (``description``...)."""
        self._claim(name)
        parser = self.subcommands.add_parser(
            name, parents=[self.api_parent], help=help, **parser_options
        )
        self._add(parser, CliCommand(name, current_plugin(), api=run))
        return parser

    def local_command(
        self, name: str, run: LocalHandler, *, help: str, **parser_options: Any
    ) -> argparse.ArgumentParser:
        """Add ``dockyard NAME`` working on this host; ``run(args, settings)`` runs it, with
        the settings loaded from ``--config`` (and the arguments ``serve`` also has, such as
        ``--runtime`` and ``--podman-socket``, when the command adds them)."""
        self._claim(name)
        parser = self.subcommands.add_parser(name, help=help, **parser_options)
        self._add(parser, CliCommand(name, current_plugin(), local=run))
        return parser

    def _add(self, parser: argparse.ArgumentParser, command: CliCommand) -> None:
        self.commands[command.name] = command
        parser.set_defaults(**{PLUGIN_COMMAND: command})

    def _claim(self, name: str) -> None:
        if name in self.subcommands.choices:
            owner = self.commands[name].plugin if name in self.commands else "dockyard"
            raise PluginError(
                f"command {name!r} added twice (by {owner!r} and {current_plugin()!r})"
            )


def collect_cli_commands(
    pm: DockyardPluginManager, subcommands: Any, api_parent: argparse.ArgumentParser
) -> CliRegistrar:
    """Every plugin's commands, added to ``subcommands`` through ``dockyard_cli_commands``."""
    registrar = CliRegistrar(subcommands, api_parent)
    call_registrar(pm, "dockyard_cli_commands", registrar)
    return registrar

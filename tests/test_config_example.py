"""``contrib/dockyard.toml.example`` against the configuration model: every setting is in
it once with its default and a line of meaning, nothing else is, and it loads back to the
defaults. Regenerate it with ``dockyard config example > contrib/dockyard.toml.example``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from dockyard.api.cli import main
from dockyard.core.config import Settings, load_settings
from dockyard.core.config_example import MEANINGS, defaults, example_toml, plugin_tables
from dockyard.core.plugins import build_plugin_manager
from tests.conftest import ROOT

EXAMPLE = ROOT / "contrib" / "dockyard.toml.example"
SETTING_LINE = re.compile(r"^(#\s*)?([a-z_][a-z0-9_]*)\s*=", re.M)
#: The settings; deprecated aliases (default UNSET, the old eval_* names) are left out.
FIELDS = [f.name for f in msgspec.structs.fields(Settings) if f.default is not msgspec.UNSET]


def settings_part(text: str) -> str:
    """The file up to the plugin tables (each commented out, with its own option lines)."""
    return text.split("\n# [plugins.sqlite]\n")[0]


def test_the_file_is_what_the_model_generates() -> None:
    pm = build_plugin_manager()
    assert EXAMPLE.read_text() == example_toml(plugin_tables(pm.list_name_plugin())), (
        "contrib/dockyard.toml.example is stale: "
        "dockyard config example > contrib/dockyard.toml.example"
    )


def test_every_setting_once_and_nothing_else() -> None:
    text = EXAMPLE.read_text()
    named = [m.group(2) for m in SETTING_LINE.finditer(settings_part(text))]
    assert sorted(named) == sorted(name for name in FIELDS if name != "plugins")
    assert "\n# [plugins.sqlite]\n" in text
    assert set(MEANINGS) == set(FIELDS), "MEANINGS and the Settings fields differ"


def test_each_value_is_its_default_and_each_unset_one_is_unset() -> None:
    text = EXAMPLE.read_text()
    written = tomllib.loads(text)
    commented = {m.group(2) for m in SETTING_LINE.finditer(settings_part(text)) if m.group(1)}
    for name, default in defaults().items():
        if name == "plugins":
            continue
        if name in commented:
            assert default is None, f"{name} is commented out but has a default"
        else:
            assert written[name] == default, f"{name}: the example differs from the default"
    # each setting's line of meaning sits right above it
    for name in FIELDS:
        if name != "plugins":
            assert re.search(rf"^# {re.escape(MEANINGS[name])}\n(# )?{name} = ", text, re.M)


def test_it_loads_back_to_the_defaults(tmp_path: Path) -> None:
    assert load_settings(EXAMPLE, environ={}) == Settings()
    # an uncommented unset setting still parses (the examples are valid values)
    body = EXAMPLE.read_text().replace("# podman_socket = ", "podman_socket = ")
    (tmp_path / "d.toml").write_text(body)
    assert load_settings(tmp_path / "d.toml", environ={}).podman_socket is not None


def test_a_setting_without_a_meaning_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from dockyard.core import config_example

    monkeypatch.delitem(config_example.MEANINGS, "gc_interval_s")
    with pytest.raises(KeyError, match="gc_interval_s"):
        example_toml()


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


def test_the_evaluation_plugins_table_lists_each_option_with_its_default() -> None:
    from dockyard.plugins.evaluation import EvaluationConfig

    table = EXAMPLE.read_text().split("\n# [plugins.evaluation]\n")[1]
    options = (m.group(0)[2:] for m in re.finditer(r"^# [a-z_]+ = .*$", table, re.M))
    shown = tomllib.loads("\n".join(options))
    assert shown == msgspec.to_builtins(EvaluationConfig())

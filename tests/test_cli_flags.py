"""The command line is built from the stage configs: every option is declared once.

Each config field is a flag of its command (help from its description, default from the
config, shown in --help) or is marked recipe-only; no command writes a default of its own.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from typer.testing import CliRunner

from vpd.cli import app, data_app
from vpd.flags import cli_mode, flag_name, flag_type


def _commands() -> dict[str, Any]:
    """command name -> its callback, for the top-level and `data` commands."""
    out = {}
    for typer_app, prefix in ((app, ""), (data_app, "data ")):
        for c in typer_app.registered_commands:
            out[prefix + (c.name or c.callback.__name__)] = c.callback
    return out


def _config_commands() -> dict[str, tuple[Any, Any]]:
    """The commands built by config_command: name -> (callback, parameters)."""
    return {
        name: (cb, inspect.signature(cb).parameters)
        for name, cb in _commands().items()
        if hasattr(cb, "__wrapped__")
    }


CONFIGS = {
    "data synth": "vpd.data.synth:SynthConfig",
    "data import": "vpd.data.importer:ImportConfig",
    "sample": "vpd.sample.runner:SampleConfig",
    "execute": "vpd.execute.runner:ExecuteConfig",
    "verify": "vpd.verify:VerifyConfig",
    "rationalize": "vpd.rationalize:RationalizeConfig",
    "eval": "vpd.evaluate:EvalConfig",
    "tune": "vpd.tune.config:TuneConfig",
    "export": "vpd.export:ExportConfig",
}


def _cls(spec: str) -> Any:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_stage_command_is_built_from_its_config() -> None:
    assert set(CONFIGS) <= set(_config_commands())


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_a_flag_or_recipe_only_and_no_default_is_written_twice(
    command: str,
) -> None:
    cls = _cls(CONFIGS[command])
    _, params = _config_commands()[command]
    for name, field in cls.model_fields.items():
        if cli_mode(field) is False:
            # Recipe-only (or filled by a group of flags): it says so and why.
            assert field.description, f"{cls.__name__}.{name}: a recipe-only field says what it is"
            continue
        assert name in params, f"{cls.__name__}.{name} has no flag on `vpd {command}`"
        assert field.description, f"{cls.__name__}.{name} has no description (its help)"
        assert flag_type(field) is not None
        info = params[name].default
        # The flag's own default is None (not given: not passed) or required: the value
        # that runs is the config's, never a second copy in the CLI.
        assert info.default in (None, ...), f"--{name} writes a default of its own"


def test_help_shows_the_configs_defaults_and_the_examples() -> None:
    from vpd.sample.runner import SampleConfig

    runner = CliRunner()
    for command in _commands():
        res = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (command, res.output)
        if command in CONFIGS or command in ("run", "status", "merge"):
            assert "Example" in res.output, command
    out = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"}).output
    for name in ("k", "shots", "max_tokens", "temperature"):
        default = SampleConfig.model_fields[name].default
        flag = flag_name(name, SampleConfig.model_fields[name])
        line = next(ln for ln in out.splitlines() if ln.startswith("│") and f" {flag} " in ln)
        assert f"[default: ({default})]" in line, line


def test_a_flag_reaches_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config a command builds holds the flags typed (KEY=VALUE lists as dicts) and the
    config's own defaults for the rest."""
    import vpd.execute

    built: list[Any] = []

    def run_execute(cfg: Any) -> dict[str, Any]:
        built.append(cfg)
        raise SystemExit(0)  # the stage itself is not what this test is about

    monkeypatch.setattr(vpd.execute, "run_execute", run_execute)
    args = ["execute", "s.jsonl", "--questions", "q.jsonl", "--out", "o.jsonl",
            "--tool-opt", "device=cpu", "--tool-opt", "k=3", "--workers", "4"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (cfg,) = built
    assert cfg.tools == {"device": "cpu", "k": 3} and cfg.workers == 4
    assert str(cfg.samples) == "s.jsonl" and str(cfg.out) == "o.jsonl"
    assert cfg.timeout == type(cfg).model_fields["timeout"].default

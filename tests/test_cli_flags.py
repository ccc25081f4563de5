"""The command line is built from the stage configs: every option is declared once.

Each config field is a flag of its command (help from its description, default from the
config, shown in --help) or is marked recipe-only; no command writes a default of its own.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from pydantic import BaseModel, Field, field_validator
from typer.testing import CliRunner

from vpd.cli import app, data_app
from vpd.errors import VpdError
from vpd.flags import Group, cli_mode, flag_name, flag_type, stage_command


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
    "tune-writer": "vpd.writer.train:WriterConfig",
    "export": "vpd.export:ExportConfig",
    "view": "vpd.view.command:ViewConfig",
    "sdvp": "vpd.sdvp.config:SdvpConfig",
    "run": "vpd.pipeline:RunConfig",
    "status": "vpd.report:StatusConfig",
    "report": "vpd.report:ReportConfig",
    "merge": "vpd.store:MergeConfig",
    "serve": "vpd.llm.serve:ServeConfig",
}


def _cls(spec: str) -> Any:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_command_is_built_from_its_config() -> None:
    assert set(CONFIGS) == set(_config_commands()) == set(_commands()) - {"data"}


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
        if command != "data":
            assert "Example" in res.output, command
    out = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"}).output
    for name in ("k", "shots", "max_tokens", "temperature"):
        default = SampleConfig.model_fields[name].default
        flag = flag_name(name, SampleConfig.model_fields[name])
        line = next(ln for ln in out.splitlines() if ln.startswith("│") and f" {flag} " in ln)
        assert f"[default: ({default})]" in line, line


class _Inner(BaseModel):
    url: list[str] = Field(default_factory=list, description="A URL (repeat).",
                           json_schema_extra={"flag": "base-url"})  # fmt: skip
    retries: int = Field(2, description="Retries.")


class _Toy(BaseModel):
    src: Path = Field(description="Input.")
    k: int = Field(5, ge=1, description="How many.")
    mode: Literal["a", "b"] = Field("a", description="Mode.")
    tags: list[str] | None = Field(None, description="A tag (repeat).")
    opts: dict[str, Any] = Field(default_factory=dict, description="KEY=VALUE.",
                                 json_schema_extra={"cli": "key=value", "flag": "opt"})  # fmt: skip
    parts: list[str] | None = Field(
        None, description="Comma list.", json_schema_extra={"cli": "text"}
    )
    lora: bool = Field(True, description="LoRA or full.", json_schema_extra={"flag": "lora/--full"})
    inner: dict[str, Any] = Field(default_factory=dict, description="The group.",
                                  json_schema_extra={"cli": False})  # fmt: skip
    hidden: str = Field("x", description="Recipe-only.", json_schema_extra={"cli": False})

    @field_validator("parts", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return v.split(",") if isinstance(v, str) else v


def test_a_flag_reaches_its_config() -> None:
    """Flags typed reach the config converted (KEY=VALUE lists as a dict, text as typed,
    the group as one dict); flags not typed leave the config's defaults; a bad value is one
    line naming the flag as typed."""
    toy = typer.Typer()
    runs: list[_Toy] = []

    @stage_command(toy, "go", _Toy, runs.append, lambda cfg, s: "done", args=("src",),
                   group=Group(_Inner, "inner"))  # fmt: skip
    def go(options: dict[str, Any]) -> None:
        """Run the toy stage."""

    @toy.callback()
    def _root() -> None:  # a group of commands, so `go` is named on the command line
        """Toy."""

    res = CliRunner().invoke(toy, ["go", "in.txt", "--k", "3", "--mode", "b", "--tags", "x",
                                   "--tags", "y", "--opt", "a=1", "--opt", "b=[1, 2]",
                                   "--parts", "p,q", "--full", "--base-url", "u1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (cfg,) = runs
    assert cfg.src == Path("in.txt") and cfg.k == 3 and cfg.mode == "b"
    assert cfg.tags == ["x", "y"] and cfg.opts == {"a": 1, "b": [1, 2]}
    assert cfg.parts == ["p", "q"] and cfg.lora is False and cfg.hidden == "x"
    assert cfg.inner == {"url": ["u1"]}  # retries not typed: not passed
    runs.clear()
    CliRunner().invoke(toy, ["go", "in.txt"])
    assert runs[0] == _Toy(src=Path("in.txt"))  # every default the config's own
    res = CliRunner().invoke(toy, ["go", "in.txt", "--k", "0", "--opt", "z=1"])
    assert isinstance(res.exception, VpdError)
    assert str(res.exception) == "--k: Input should be greater than or equal to 1"
    help_text = CliRunner().invoke(toy, ["go", "--help"], env={"COLUMNS": "200"}).output
    assert "--hidden" not in help_text and "--base-url" in help_text and "--lora" in help_text

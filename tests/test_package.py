"""vpd as an installed package: a wheel built from this tree, installed into a fresh venv,
works from a folder outside the checkout (prompts and recipes are package data).

How the fresh venv gets the project's dependencies: it is made ``--without-pip``, the
wheel goes in with ``--no-deps --no-index`` (by this interpreter's pip, ``--python``), and a
``.pth`` file appends the running interpreter's site-packages (the project's .venv, where
`make setup` installed them) to the venv's path. So nothing is downloaded (no network
guarantee, no multi-GB torch), yet ``import vpd`` can only find the wheel's copy: the
venv's own site-packages comes first, and the checkout's editable hook is a ``.pth`` in
.venv that a path added this way never runs (``--system-site-packages`` would not do:
from a venv it reaches the base Python, not .venv). The children run with PYTHONPATH unset
from a temporary cwd, and the checks assert ``vpd.__file__`` is the venv's.

The wheel is built with ``--no-build-isolation`` (the .venv's setuptools, offline) from a
copy of pyproject.toml, README.md and vpd/, so the build writes no build/ or egg-info into
the checkout that other runs are using.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, read_jsonl
from vpd.resources import find_recipe, prompts_dir, recipes_dir

RENDER = r"""
import importlib.metadata, json, vpd
from vpd.pipeline import load_recipe
from vpd.resources import find_recipe
from vpd.sample.prompt import PromptTemplate, render_api_spec
t = PromptTemplate("viper/v1")
msgs = t.messages("How many red circles are there?", shots=2)
recipe = find_recipe("ablation-cpu.yaml")
print(json.dumps({
    "vpd": vpd.__file__, "folder": str(t.folder), "id": t.id, "messages": msgs,
    "spec": render_api_spec(False), "requires": importlib.metadata.requires("vpd"),
    "recipe": str(recipe), "recipe_sections": sorted(load_recipe(recipe)),
}))
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_NO_INDEX"] = "1"  # nothing in this test may reach a package index
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _package_files(root: Path) -> set[str]:
    """Every file of the package folder, as wheel member names (vpd/...)."""
    return {
        p.relative_to(root.parent).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "vpd", src / "vpd", ignore=skip)
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(dist), str(src)],
        cwd=tmp,
    )  # fmt: skip
    (wheel,) = dist.glob("vpd-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        cwd=tmp,
    )  # fmt: skip
    purelib = _run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "vpd_test_deps.pth").write_text("\n".join(deps) + "\n", encoding="utf-8")
    work = tmp / "work"  # the cwd of every check: no vpd/, prompts/ or recipes/ here
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "work": work, "src": src}


def test_the_wheel_holds_every_file_of_the_package(installed) -> None:
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
    missing = sorted(_package_files(installed["src"] / "vpd") - names)
    assert missing == [], f"not in the wheel (add to package-data in pyproject.toml): {missing}"
    assert "vpd/prompts/viper/v1/system.txt" in names
    assert "vpd/recipes/demo-cpu.yaml" in names


def test_data_synth_and_sample_help_run_from_outside_the_checkout(installed) -> None:
    venv, work = installed["venv"], installed["work"]
    vpd = str(venv / "bin" / "vpd")
    _run([vpd, "data", "synth", "--out", "data", "--n", "5", "--no-progress"], cwd=work)
    qs = read_jsonl(work / "data" / "train.jsonl") + read_jsonl(work / "data" / "test.jsonl")
    assert len(qs) == 5 and all((work / "data" / q["image"]).is_file() for q in qs)
    help_text = _run([vpd, "sample", "--help"], cwd=work).stdout
    assert "--prompt" in help_text and "Usage" in help_text
    # the console script runs the wheel's vpd, not the checkout's
    assert Path(venv / "bin" / "vpd").read_text().startswith(f"#!{venv}")


def test_the_shipped_prompt_renders_with_the_api_spec(installed) -> None:
    venv, work = installed["venv"], installed["work"]
    out = json.loads(_run([str(venv / "bin" / "python"), "-c", RENDER], cwd=work).stdout)
    assert Path(out["vpd"]).is_relative_to(venv), out["vpd"]  # the wheel's copy, not REPO's
    assert Path(out["folder"]).is_relative_to(venv) and out["id"].startswith("viper/v1@")
    msgs = out["messages"]
    assert msgs[0]["role"] == "system" and out["spec"].strip() in msgs[0]["content"]
    assert len(msgs) == 1 + 2 * 2 + 1  # system, two shots, the question
    assert msgs[-1]["content"].endswith("How many red circles are there?")
    # a recipe by name is the shipped one, and its `extends:` resolves beside it
    assert Path(out["recipe"]).is_relative_to(venv)
    assert {"data", "sample", "tune"} <= set(out["recipe_sections"])
    # the package declares a torch range; the exact CPU pin is the Makefile's alone
    torch_req = [r for r in out["requires"] if r.startswith("torch")]
    assert torch_req and all("==" not in r and ">=" in r for r in torch_req), torch_req


def test_a_bare_recipe_name_is_the_shipped_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = recipes_dir() / "demo-cpu.yaml"
    assert find_recipe("demo-cpu.yaml") == shipped and find_recipe("demo-cpu") == shipped
    # a path with a folder is never redirected: its typo stays "not found"
    assert find_recipe("recipes/demo-cpu.yaml") == Path("recipes/demo-cpu.yaml")
    assert find_recipe("nope.yaml") == Path("nope.yaml")
    (tmp_path / "demo-cpu.yaml").write_text("data: {}\n")  # a file of the user's own wins
    assert find_recipe("demo-cpu.yaml") == Path("demo-cpu.yaml")
    # the checkout's top-level folders are the package's, through links
    assert (REPO / "recipes").resolve() == recipes_dir().resolve()
    assert (REPO / "prompts").resolve() == prompts_dir().resolve()

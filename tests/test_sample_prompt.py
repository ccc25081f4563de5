"""Prompt templates: API spec in step with vpd.tools.api, example pools, retrieval, extraction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vpd.errors import VpdError
from vpd.execute.static import check_program
from vpd.sample.extract import extract_program
from vpd.sample.prompt import PROMPTS_DIR, PromptTemplate, api_surface, render_api_spec, spec_names
from vpd.tools.visprog import check_visprog


def test_api_spec_file_matches_the_api() -> None:
    text = (PROMPTS_DIR / "viper/v1/api.txt").read_text()
    assert text == render_api_spec(), "regenerate: python -m vpd.sample.prompt --write-api-spec"
    attrs, methods, helpers = api_surface()
    defs, spec_attrs = spec_names(text)
    assert defs == set(methods) | set(helpers)  # nothing missing, nothing invented
    assert spec_attrs == set(attrs)
    for name in ["find", "exists", "verify_property", "best_text_match", "simple_query",
                 "compute_depth", "crop", "overlaps_with", "llm_query", "best_image_match",
                 "distance", "bool_to_yesno", "coerce_to_numeric"]:  # fmt: skip
        assert name in defs
    assert "lower < upper" in text  # the coordinate convention reaches the model


@pytest.mark.parametrize(
    "folder", sorted(p.parent.name for p in PROMPTS_DIR.glob("viper/*/api*.txt"))
)
def test_every_viper_prompt_spec_is_generated_from_the_api(folder: str) -> None:
    files = sorted((PROMPTS_DIR / "viper" / folder).glob("api*.txt"))
    assert len(files) == 1, files  # one spec per prompt: the one {api} becomes
    compact = files[0].name == "api_compact.txt"
    text = files[0].read_text()
    assert text == render_api_spec(compact), (
        "regenerate: python -m vpd.sample.prompt --write-api-spec"
    )
    attrs, methods, helpers = api_surface()
    defs, spec_attrs = spec_names(text)
    assert defs == set(methods) | set(helpers) and spec_attrs == set(attrs)
    assert "lower < upper" in text
    system = PromptTemplate(f"viper/{folder}").system
    assert text.strip() in system and "{api}" not in system


def test_compact_spec_is_much_shorter_and_has_no_docstrings() -> None:
    full, compact = render_api_spec(), render_api_spec(compact=True)
    assert len(compact) < 0.6 * len(full)
    assert "Returns" not in compact and "    def find(self, object_name: str)" in compact


def test_viper_pool_programs_pass_the_sandbox_static_check() -> None:
    pool = PromptTemplate("viper/v1").examples
    assert len(pool) >= 40
    for ex in pool:
        res = check_program(ex.program)
        assert res.ok, (ex.question, res)
        got = extract_program(f"```python\n{ex.program}\n```", "viper")
        assert got.valid and got.program.strip() == ex.program.strip()


def test_visprog_pool_programs_parse() -> None:
    pool = PromptTemplate("visprog/v1").examples
    assert len(pool) >= 25
    for ex in pool:
        assert check_visprog(ex.program) is None, ex.question


def test_pools_cover_every_synthetic_form() -> None:
    qs = " ".join(e.question for e in PromptTemplate("viper/v1").examples)
    for form in ["How many", "Is there", "Are there any", "Does the image contain",
                 "What color is", "What shape is", "small or large", "How big",
                 "left of", "right of", "above", "below", "There is one", "more", "fewer",
                 "greater than", "less than", "shaped like", "in color",
                 "a small one"]:  # fmt: skip
        assert form in qs, form


def test_retrieval_picks_the_same_form_and_never_the_question_itself() -> None:
    p = PromptTemplate("viper/v1")
    q = "How many yellow triangles are there?"
    shots = p.select(q, 3)
    assert len(shots) == 3 and "How many" in shots[-1].question  # most similar is last
    asked = p.examples[0].question
    assert all(e.question != asked for e in p.select(asked, 10))
    rel = p.select("What shape is the object to the left of the red star?", 2)
    assert "left of" in rel[-1].question
    msgs = p.messages(q, 2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == q and msgs[2]["content"].startswith("```python\ndef execute")
    assert p.messages(q, 0)[1:] == [{"role": "user", "content": q}]


def test_prompt_id_hashes_the_template_files(tmp_path: Path) -> None:
    p = PromptTemplate("viper/v1")
    assert p.id.startswith("viper/v1@") and len(p.id.split("@")[1]) == 8
    copy = tmp_path / "viper" / "v1"
    shutil.copytree(PROMPTS_DIR / "viper/v1", copy)
    assert PromptTemplate(str(copy)).id == p.id
    with open(copy / "examples.jsonl", "a") as f:
        f.write(json.dumps({"question": "Is it?", "program": "def execute_command(image):\n"
                            "    return 'yes'"}) + "\n")  # fmt: skip
    assert PromptTemplate(str(copy)).id != p.id
    with pytest.raises(VpdError, match="not found"):
        PromptTemplate("viper/v999")


@pytest.mark.parametrize(
    ("text", "valid", "why"),
    [
        ("```python\ndef execute_command(image):\n    return 'a'\n```\nThis works.", True, None),
        (
            "Here:\ndef execute_command(image):\n    p = ImagePatch(image)\n"
            "    return p.simple_query()\n"
            "Explanation: it asks.",
            True,
            None,
        ),  # fmt: skip
        ("```python\ndef count(image):\n    return '3'\n```", True, None),
        (
            "```python\nfrom x import ImagePatch\n\n"
            "def execute_command(image):\n    return '1'\n```",
            True,
            None,
        ),  # fmt: skip
        ("def execute_command(image):\n    x = 1\n    return x\n    if (", True, None),  # cut tail
        ("def execute_command(image):\n    x = 1\n", False, "never returns"),
        ("I am sorry, I cannot see images.", False, "no function"),
        ("", False, "empty"),
        ("def execute_command(image, other):\n    return 1\n", False, "one argument"),
    ],
)
def test_viper_extraction(text: str, valid: bool, why: str | None) -> None:
    got = extract_program(text, "viper")
    assert got.valid is valid, got
    if why:
        assert why in (got.reason or "")
    else:
        assert got.program.startswith("def execute_command(image")
        assert check_program(got.program).ok


def test_visprog_extraction() -> None:
    text = "Steps:\n```\nBOX0=LOC(image=IMAGE,object='dog')\nANSWER0=COUNT(box=BOX0)\n```"
    got = extract_program(text, "visprog")
    assert got.valid and got.repaired == "added the final RESULT step"
    bad = extract_program("BOX0=LOC(image=IMAGE,object=dog)\n", "visprog")
    assert not bad.valid and bad.reason.startswith("visprog:")

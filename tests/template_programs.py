"""Hand-written correct programs for every synthetic question template (vpd.data.synth).

``viper_program(question_record)`` returns a ViperGPT program (``def execute_command(image)``)
for the question, ``visprog_program(...)`` a VisProg program for the templates that have
one (``None`` otherwise). The slots (descriptions, direction, property) are read from the
question TEXT with the phrasings synth.py uses; the template name only picks the program
shape, as an LLM would pick it from the few-shot examples. Relations follow synth.py:
"A left of X" means A's centre x < X's centre x (above: y, which grows upward).
"""

from __future__ import annotations

import re
from typing import Any

DIR_WORDS = r"(?:to the left of|left of|to the right of|right of|above|below)"
_DIR = {
    "to the left of": "left",
    "left of": "left",
    "to the right of": "right",
    "right of": "right",
    "above": "above",
    "below": "below",
}
# A relation as a comparison of patch centres (x grows right, y grows UP).
_CMP = {
    "left": "p.horizontal_center < ref.horizontal_center",
    "right": "p.horizontal_center > ref.horizontal_center",
    "above": "p.vertical_center > ref.vertical_center",
    "below": "p.vertical_center < ref.vertical_center",
}
_VISPROG_CROP = {
    "left": "CROP_LEFTOF",
    "right": "CROP_RIGHTOF",
    "above": "CROP_ABOVE",
    "below": "CROP_BELOW",
}


def _strip_article(p: str) -> str:
    return re.sub(r"^(?:a|an|the)\s+", "", p.strip())


def _m(pattern: str, q: str) -> re.Match[str]:
    m = re.fullmatch(pattern, q)
    if m is None:
        raise ValueError(f"question does not match its template: {q!r}")
    return m


# ----------------------------------------------------------------------------- slots


def slots(rec: dict[str, Any]) -> dict[str, str]:
    """The template's slots read from the question text."""
    q = rec["question"]
    t = rec["meta"]["template"]
    if t.startswith("count_"):
        m = _m(
            r"(?:How many|What is the number of) (.+?)"
            r"(?: are there| are in the image| can you see)?\?",
            q,
        )
        return {"desc": m.group(1)}
    if t.startswith("exists_"):
        m = _m(r"(?:Is there|Are there any|Does the image contain) (.+?)(?: in the image)?\?", q)
        return {"desc": _strip_article(m.group(1))}
    if t.startswith("attribute_"):
        m = _m(
            r"(?:What (?:color|shape|size) is the|What is the (?:color|shape) of the|"
            r"Which (?:color|shape) is the|Is the|How big is the) (.+?)(?: small or large)?\?",
            q,
        )
        return {"desc": m.group(1), "query": t.split("_")[1]}
    if t.startswith("relation_") or t.startswith("multihop_attr_"):
        m = _m(
            rf"(?:What (?:color|shape) is the (?:shape|object)|"
            rf"What is the (?:color|shape) of the object|There is one (?:shape|object)) "
            rf"({DIR_WORDS}) the (.+?)(?:\. What (?:color|shape) is it)?\?",
            q,
        )
        return {"dir": _DIR[m.group(1)], "ref": m.group(2), "query": t.split("_")[-1]}
    if t.startswith("multihop_count_"):
        m = _m(rf"(?:How many|What is the number of) (.+?)(?: are)? ({DIR_WORDS}) the (.+)\?", q)
        return {"desc": m.group(1), "dir": _DIR[m.group(2)], "ref": m.group(3)}
    if t.startswith("multihop_exists_"):
        m = _m(rf"(?:Is there|Are there any) (.+?) ({DIR_WORDS}) the (.+)\?", q)
        return {"desc": _strip_article(m.group(1)), "dir": _DIR[m.group(2)], "ref": m.group(3)}
    if t.startswith("compare_"):
        m = _m(
            r"(?:Are there (more|fewer) (.+) than (.+)|"
            r"Is the number of (.+) (greater|less) than the number of (.+))\?",
            q,
        )
        if m.group(1):
            a, b = m.group(2), m.group(3)
        else:
            a, b = m.group(4), m.group(6)
        return {"a": a, "b": b, "more": "yes" if t.endswith("_more") else "no"}
    if t.startswith("yesno_"):
        prop = t.split("_")[1]
        if prop == "shape":
            m = _m(r"Is the (.+?) (?:shaped like )?an? (\w+)\?", q)
        elif prop == "color":
            m = _m(r"Is the (.+?) (\w+)(?: in color)?\?", q)
        else:
            m = _m(r"Is the (.+?) (?:a )?(\w+)(?: one)?\?", q)
        return {"desc": m.group(1), "value": m.group(2), "prop": prop}
    raise ValueError(f"no program for template {t!r}")


# ----------------------------------------------------------------------------- ViperGPT


def viper_program(rec: dict[str, Any]) -> str:
    """A correct ViperGPT program for the question (slots filled from its text)."""
    t = rec["meta"]["template"]
    s = slots(rec)
    if t.startswith("count_"):
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    patches = image_patch.find({s["desc"]!r})
    return str(len(patches))
"""
    if t.startswith("exists_"):
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    return bool_to_yesno(image_patch.exists({s["desc"]!r}))
"""
    if t.startswith("attribute_"):
        options = {
            "color": ["red", "orange", "yellow", "green", "blue", "purple"],
            "shape": ["circle", "square", "triangle", "star"],
            "size": ["small", "large"],
        }[s["query"]]
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    patches = image_patch.find({s["desc"]!r})
    if len(patches) == 0:
        return image_patch.simple_query({rec["question"]!r})
    return patches[0].best_text_match({options!r})
"""
    if t.startswith("relation_") or t.startswith("multihop_attr_"):
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    refs = image_patch.find({s["ref"]!r})
    if len(refs) == 0:
        return image_patch.simple_query({rec["question"]!r})
    ref = refs[0]
    # The question says exactly one shape is on that side.
    candidates = [p for p in image_patch.find("shape") if {_CMP[s["dir"]]}]
    if len(candidates) == 0:
        return image_patch.simple_query({rec["question"]!r})
    return candidates[0].simple_query("What {s["query"]} is this?")
"""
    if t.startswith("multihop_count_") or t.startswith("multihop_exists_"):
        ret = "str(len(hits))" if "count" in t else "bool_to_yesno(len(hits) > 0)"
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    ref = image_patch.find({s["ref"]!r})[0]
    hits = [p for p in image_patch.find({s["desc"]!r}) if {_CMP[s["dir"]]}]
    return {ret}
"""
    if t.startswith("compare_"):
        op = ">" if s["more"] == "yes" else "<"
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    n_a = len(image_patch.find({s["a"]!r}))
    n_b = len(image_patch.find({s["b"]!r}))
    return bool_to_yesno(n_a {op} n_b)
"""
    if t.startswith("yesno_"):
        return f"""
def execute_command(image):
    image_patch = ImagePatch(image)
    patches = image_patch.find({s["desc"]!r})
    if len(patches) == 0:
        return "no"
    return bool_to_yesno(patches[0].verify_property({s["desc"]!r}, {s["value"]!r}))
"""
    raise ValueError(f"no program for template {t!r}")


# ----------------------------------------------------------------------------- VisProg


def visprog_program(rec: dict[str, Any]) -> str | None:
    """A VisProg program for count / exists / attribute / multihop count+exists questions."""
    t = rec["meta"]["template"]
    s = slots(rec)
    if t.startswith("count_"):
        return (
            f"BOX0=LOC(image=IMAGE,object={s['desc']!r})\n"
            "ANSWER0=COUNT(box=BOX0)\n"
            "FINAL_RESULT=RESULT(var=ANSWER0)"
        )
    if t.startswith("exists_"):
        return (
            f"BOX0=LOC(image=IMAGE,object={s['desc']!r})\n"
            "ANSWER0=COUNT(box=BOX0)\n"
            "ANSWER1=EVAL(expr=\"'yes' if {ANSWER0} > 0 else 'no'\")\n"
            "FINAL_RESULT=RESULT(var=ANSWER1)"
        )
    if t.startswith("attribute_"):
        return (
            f"BOX0=LOC(image=IMAGE,object={s['desc']!r})\n"
            "IMAGE0=CROP(image=IMAGE,box=BOX0)\n"
            f"ANSWER0=VQA(image=IMAGE0,question='What {s['query']} is this?')\n"
            "FINAL_RESULT=RESULT(var=ANSWER0)"
        )
    if t.startswith("multihop_count_") or t.startswith("multihop_exists_"):
        final = (
            "FINAL_RESULT=RESULT(var=ANSWER0)"
            if "count" in t
            else "ANSWER1=EVAL(expr=\"'yes' if {ANSWER0} > 0 else 'no'\")\n"
            "FINAL_RESULT=RESULT(var=ANSWER1)"
        )
        return (
            f"BOX0=LOC(image=IMAGE,object={s['ref']!r})\n"
            f"IMAGE0={_VISPROG_CROP[s['dir']]}(image=IMAGE,box=BOX0)\n"
            f"BOX1=LOC(image=IMAGE0,object={s['desc']!r})\n"
            "ANSWER0=COUNT(box=BOX1)\n" + final
        )
    return None

"""Two-image questions (NLVR2) through the ImagePatch API and VisProg's LEFT/RIGHT.

The images come from `vpd data import --format nlvr2`; programs get one patch per image
and name images only by position, which the parent maps to the files. The sandboxed run
(`vpd execute`) must give what the same programs give in-process, with every traced tool
call saying which image it looked at; an index the question lacks is a protocol error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO
from vpd.data.importer import ImportConfig, run_import
from vpd.data.synth import render_scene
from vpd.execute import ExecuteConfig, run_execute
from vpd.execute.pool import Job, Limits, SandboxPool
from vpd.records import Question, Sample
from vpd.tools.api import ImagePatch, best_image_match, make_image_handle
from vpd.tools.backends import get_backend
from vpd.tools.namespace import run_inprocess
from vpd.tools.server import ToolServer
from vpd.tools.visprog import check_visprog, run_visprog
from vpd.verify import VerifyConfig, run_verify

# left: two red circles; right: three blue squares
SCENES = {
    0: [("circle", "red", 60, 60), ("circle", "red", 180, 190)],
    1: [("square", "blue", 50, 50), ("square", "blue", 128, 128), ("square", "blue", 205, 205)],
}

VIPER_COMPARE = """def execute_command(left_image, right_image):
    circles = ImagePatch(left_image).find("circle")
    squares = right_image.find("square")
    return bool_to_yesno(len(squares) > len(circles))
"""
VIPER_COUNTS = """def execute_command(left_image, right_image):
    return [len(left_image.find("shape")), len(right_image.find("shape"))]
"""
VISPROG_COMPARE = """BOX0=LOC(image=LEFT,object='circle')
BOX1=LOC(image=RIGHT,object='square')
ANSWER0=COUNT(box=BOX0)
ANSWER1=COUNT(box=BOX1)
ANSWER2=EVAL(expr='{ANSWER1} > {ANSWER0}')
FINAL_ANSWER=RESULT(var=ANSWER2)"""
VISPROG_ONE_IMAGE = """BOX0=LOC(image=IMAGE,object='circle')
ANSWER0=COUNT(box=BOX0)
FINAL_RESULT=RESULT(var=ANSWER0)"""
VIPER_ONE_IMAGE = """def execute_command(image):
    return len(image.find("circle"))
"""

PROGRAMS = [
    ("viper", VIPER_COMPARE),
    ("visprog", VISPROG_COMPARE),
    ("viper", VIPER_COUNTS),
    ("visprog", VISPROG_ONE_IMAGE),
    ("viper", VIPER_ONE_IMAGE),
]


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported NLVR2 questions file whose pair is two synthetic scenes."""
    root = tmp_path_factory.mktemp("nlvr2")
    (root / "dev").mkdir()
    for i, objs in SCENES.items():
        scene = {
            "width": 256,
            "height": 256,
            "objects": [
                {"shape": s, "color": c, "size": "large", "r": 18, "_cx": x, "_cy": y}
                for s, c, x, y in objs
            ],
        }
        render_scene(scene).save(root / "dev" / f"dev-7-1-img{i}.png")
    row = {
        "identifier": "dev-7-1-0",
        "sentence": "There are more squares in the right image than circles in the left image.",
        "label": "True",
    }
    (root / "dev.json").write_text(json.dumps(row) + "\n")
    out = root / "data" / "questions.jsonl"
    run_import(ImportConfig(input=root / "dev.json", out=out, fmt="nlvr2", progress=False))
    return out


def _images(questions: Path) -> list[Path]:
    q = Question.model_validate_json(questions.read_text().splitlines()[0])
    return [questions.parent / p for p in q.meta["images"]]


def test_inprocess_two_images(nlvr2: Path) -> None:
    server = ToolServer(get_backend("synthetic"))
    images = _images(nlvr2)
    answer, trace = run_inprocess(VIPER_COMPARE, images, server)
    assert answer == "yes"
    assert [(t.name, t.image) for t in trace] == [("find", 0), ("find", 1)]
    assert len(json.loads(trace[0].result)) == 2 and len(json.loads(trace[1].result)) == 3
    assert run_inprocess(VIPER_COUNTS, images, server)[0] == "2, 3"
    answer, trace = run_inprocess(VISPROG_COMPARE, images, server, syntax="visprog")
    assert answer == "yes" and [t.image for t in trace] == [0, 1]
    # The same program on the left image alone: a one-image question has IMAGE only.
    assert run_inprocess(VISPROG_ONE_IMAGE, images[:1], server, syntax="visprog")[0] == "2"


def test_sandboxed_execute_matches_inprocess_and_verifies(nlvr2: Path) -> None:
    work = nlvr2.parent
    samples = work / "samples.jsonl"
    with samples.open("w") as f:
        for k, (syntax, prog) in enumerate(PROGRAMS):
            s = Sample(id=f"dev-7-1-0#{k}", qid="dev-7-1-0", k=k, program=prog, syntax=syntax)
            f.write(s.model_dump_json() + "\n")
    out = work / "executions.jsonl"
    run_execute(ExecuteConfig(samples=samples, questions=nlvr2, out=out, workers=2, progress=False))
    rows = {r["k"]: r for r in map(json.loads, out.read_text().splitlines())}
    server = ToolServer(get_backend("synthetic"))
    for k, (syntax, prog) in enumerate(PROGRAMS[:3]):
        answer, trace = run_inprocess(prog, _images(nlvr2), server, syntax=syntax)
        assert (rows[k]["status"], rows[k]["answer"]) == ("ok", answer)
        assert [(t["name"], t["image"], t["result"]) for t in rows[k]["trace"]] == [
            (t.name, t.image, t.result) for t in trace
        ]
    assert rows[2]["answer"] == "2, 3"  # each patch saw its own image
    assert rows[3]["status"] == "error"
    assert "this question's images are LEFT, RIGHT, not IMAGE" in rows[3]["error"]
    assert rows[4]["status"] == "error" and "positional argument" in rows[4]["error"]

    verified = work / "verified.jsonl"
    run_verify(
        VerifyConfig(executions=out, samples=samples, questions=nlvr2, out=verified, progress=False)
    )
    kept = {
        r["k"]: (r["metric"], r["kept"]) for r in map(json.loads, verified.read_text().splitlines())
    }
    assert kept[0] == ("nlvr2", True) and kept[1] == ("nlvr2", True) and not kept[2][1]


def test_image_index_is_checked_by_the_parent(nlvr2: Path) -> None:
    left, right = (str(p.resolve()) for p in _images(nlvr2))
    peek = "def execute_command(*images):\n    return peek_image({})\n"
    jobs = [
        Job("right", peek.format(1), left, more_images=(right,)),
        Job("beyond", peek.format(2), left, more_images=(right,)),
        Job("bool", peek.format("True"), left, more_images=(right,)),
        Job("one-image", peek.format(1), left),
    ]
    ns = "tests.fixtures.image_index_api:build_namespace"
    with SandboxPool(Limits(timeout_s=5), workers=2, namespace=ns, extra_paths=[str(REPO)]) as pool:
        res = {r.id: r for r in pool.run(jobs, ToolServer(get_backend("synthetic")))}
    assert (res["right"].status, res["right"].answer) == ("ok", "256, 256")
    assert res["right"].trace[0].image == 1
    for jid in ("beyond", "bool", "one-image"):
        assert res[jid].status == "crash", jid
        assert "tool call for an image the question lacks" in res[jid].error


def test_patches_of_two_images_stay_apart() -> None:
    calls: list[tuple] = []

    def caller(op: str, box: object, args: dict, image: int = 0) -> object:
        calls.append((op, image))
        return [[0, 0, 5, 5]] if op == "find" else [10, 10]

    left, right = make_image_handle(caller), make_image_handle(caller, 1)
    a, b = left.find("x")[0], right.find("x")[0]
    assert a != b  # same box, different images
    assert ImagePatch(right).width == 10 and calls[-1] == ("size", 1)
    with pytest.raises(ValueError, match="same image"):
        best_image_match([a, b], ["x"])
    assert ("find", 0) in calls and ("find", 1) in calls


def test_visprog_image_names() -> None:
    assert check_visprog(VISPROG_COMPARE) is None  # checked before the images are known
    with pytest.raises(ValueError, match="1 or 2 images"):
        run_visprog(VISPROG_COMPARE, [make_image_handle(lambda *a, **k: None)] * 3)


def test_nlvr2_prompt_pool_runs_on_two_images(nlvr2: Path) -> None:
    from vpd.sample.prompt import PromptTemplate

    prompt = PromptTemplate("visprog/nlvr2")
    assert len(prompt.examples) >= 8 and prompt.family == "visprog"
    server = ToolServer(get_backend("synthetic"))
    for ex in prompt.examples:
        assert check_visprog(ex.program) is None, ex.question
        answer, trace = run_inprocess(ex.program, _images(nlvr2), server, syntax="visprog")
        if "VQA(" not in ex.program:  # a VQA step may answer anything; counts are yes/no
            assert answer in ("yes", "no"), (ex.question, answer)
        assert {t.image for t in trace} <= {0, 1}

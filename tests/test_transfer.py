"""verify's transfer check (vpd.transfer): a program right for the wrong reason is dropped.

The word maps and the rewriting on constructed questions; then the real sandbox and tools
on a generated synthetic set: the hand-written correct program of a relation question
(tests/template_programs.py) is kept, a program that returns its question's answer as a
constant is kept exactly when every partner question shares that answer, and a re-run
runs no partner program again.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import read_jsonl, run_vpd, write_jsonl, write_png
from tests.template_programs import viper_program
from vpd.data.synth import generate
from vpd.execute import ExecuteConfig, run_execute
from vpd.records import Question, Sample
from vpd.runpaths import RunPaths
from vpd.stages import STAGES
from vpd.tools.backends import get_backend
from vpd.tools.namespace import run_inprocess
from vpd.tools.server import ToolServer
from vpd.transfer import (
    TransferCheck,
    rewrite_program,
    spread_programs,
    template_key,
    word_map,
)
from vpd.verify import VerifyConfig, run_verify, transfer_dir

KEYS = ["template", "phrasing"]


# ----------------------------------------------------------------------------- word maps


@pytest.mark.parametrize(
    ("src", "dst", "want"),
    [
        # equal-length runs map word by word; plurals bring their singular
        (
            "How many large orange circles are there?",
            "How many small red stars are there?",
            {"large": "small", "orange": "red", "circles": "stars", "circle": "star"},
        ),
        # a swap is one substitution, done at once
        (
            "Is the number of stars less than the number of circles?",
            "Is the number of circles less than the number of stars?",
            {"stars": "circles", "circles": "stars", "star": "circle", "circle": "star"},
        ),
        # runs of other lengths map as phrases; an added word takes the next one along
        ("What color is the shape left of the red shape?",
         "What color is the shape left of the large blue shape?", {"red": "large blue"}),
        ("How many circles are there?", "How many large circles are there?",
         {"circles": "large circles", "circle": "large circle"}),
        # "object" also stands unchanged earlier: the run maps as one phrase
        ("What color is the object left of the blue object?",
         "What color is the object left of the red square?", {"blue object": "red square"}),
        ("Is the square small?", "Is the square small?", {}),
    ],
)  # fmt: skip
def test_word_map(src: str, dst: str, want: dict[str, str]) -> None:
    assert word_map(src, dst) == want


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("Is it red?", "Are there any large shapes?"),  # nothing shared
        # "red" would map to "blue" and to "green"
        ("Is the red circle left of the red square?",
         "Is the blue circle left of the green square?"),
    ],
)  # fmt: skip
def test_word_map_refuses_what_is_not_a_substitution(src: str, dst: str) -> None:
    assert word_map(src, dst) is None


def test_rewrite_touches_strings_only() -> None:
    program = (
        "def execute_command(image):\n"
        "    image_patch = ImagePatch(image)\n"
        "    # the red square, left of it\n"
        "    ref = image_patch.find('red square')[0]\n"
        "    left = [p for p in image_patch.find('shape') if p.left < ref.left]\n"
        '    return left[0].simple_query("What color is the shape Left of the red  square?")\n'
    )
    got = rewrite_program(program, {"red": "blue", "square": "circle", "left": "right"})
    assert "find('blue circle')" in got
    # code, comments and names stay; a capital stays; runs of spaces are one word gap
    assert "p.left < ref.left" in got and "left = [p" in got
    assert "# the red square, left of it" in got
    assert '"What color is the shape Right of the blue  circle?"' in got
    assert rewrite_program(program, {}) == program


def test_rewrite_visprog_quoted_arguments() -> None:
    program = "BOX0=LOC(image=IMAGE,object='red square')\nFINAL=RESULT(var=BOX0)"
    got = rewrite_program(program, {"red": "green"}, syntax="visprog")
    assert got == "BOX0=LOC(image=IMAGE,object='green square')\nFINAL=RESULT(var=BOX0)"


def test_template_key_meta_else_text() -> None:
    q = Question(id="a", image="i.png", question="Is it red?",
                 meta={"template": "yesno_color", "phrasing": 1})  # fmt: skip
    assert template_key(q, KEYS) == ("meta", "yesno_color", "1")
    bare = Question(id="b", image="i.png", question="Is it  RED?")
    assert template_key(bare, KEYS) == ("text", "is it red")
    assert template_key(q, []) == ("text", "is it red")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Question]]:
    out = tmp_path_factory.mktemp("transfer_synth")
    generate(out, n=300, seed=7, test_frac=0.0)
    qs = [Question(**json.loads(line)) for line in (out / "train.jsonl").read_text().splitlines()]
    return out, qs


def test_correct_programs_rewrite_into_each_others(synth: tuple[Path, list[Question]]) -> None:
    """The point of the rewriting: a correct program of a question, rewritten for another
    question of its template, answers that question as its own correct program does (the
    hand-written programs read their slots from the question text). Run on the real tools
    for every pair of a generated set whose words map one for one."""
    root, qs = synth
    server = ToolServer(get_backend("synthetic"))
    groups: dict[tuple, list[Question]] = defaultdict(list)
    for q in qs:
        groups[template_key(q, KEYS)].append(q)
    own: dict[str, str] = {}
    pairs = 0
    for group in groups.values():
        for a in group:
            for b in group:
                mapping = word_map(a.question, b.question)
                if a is b or mapping is None or any(" " in k for k in mapping):
                    continue
                if b.id not in own:
                    own[b.id], _ = run_inprocess(viper_program(b.model_dump()), root / b.image,
                                                 server)  # fmt: skip
                program = rewrite_program(viper_program(a.model_dump()), mapping)
                got, _ = run_inprocess(program, root / b.image, server)
                assert got == own[b.id], (a.question, b.question, program)
                pairs += 1
    assert pairs > 500


# ----------------------------------------------------------------------------- the stage


def _relation_inputs(root: Path, qs: list[Question], n: int) -> tuple[list[Question], Path]:
    """Samples for the first ``n`` relation-colour questions: k0 the correct program, k1
    the question's answer as a constant (right here, for the wrong reason)."""
    groups: dict[tuple, list[Question]] = defaultdict(list)
    for q in qs:
        groups[template_key(q, KEYS)].append(q)

    def partners(q: Question) -> int:
        group = groups[template_key(q, KEYS)]
        return sum(p.image != q.image and word_map(q.question, p.question) is not None
                   for p in group)  # fmt: skip

    chosen = [q for q in qs if q.meta["qtype"] == "relation" and partners(q) >= 3][:n]
    assert len(chosen) == n
    rows = []
    for q in chosen:
        constant = f"def execute_command(image):\n    return {q.answers[0]!r}\n"
        rows += [
            {"id": f"{q.id}#0", "qid": q.id, "k": 0, "program": viper_program(q.model_dump())},
            {"id": f"{q.id}#1", "qid": q.id, "k": 1, "program": constant},
        ]
    return chosen, write_jsonl(root / "samples.jsonl", rows)


def test_partners_spread_over_the_answers(tmp_path: Path) -> None:
    """A contrast set: partners with another answer first, then one with the question's
    own, in turn; one-for-one word maps before phrase maps; the same choice on a re-run."""
    colours = ["red", "blue", "green", "purple", "orange", "yellow"]

    def q(i: int, text: str, answer: str) -> Question:
        return Question(id=f"q{i}", image=f"i{i}.png", question=text, answers=[answer],
                        meta={"template": "exists_color", "phrasing": 0})  # fmt: skip

    pool = [q(0, "Is there a red square?", "no")]
    pool += [q(i, f"Is there a {colours[i % 5 + 1]} square?", "yes" if i % 3 else "no")
             for i in range(1, 13)]  # fmt: skip
    pool += [q(20 + i, f"Is there a large {c} square?", "no") for i, c in enumerate(colours)]
    check = TransferCheck(pool, partners=3, min_right=1.0, keys=KEYS, metric="auto",
                          threshold=None, execute={}, questions=tmp_path / "q.jsonl",
                          work=tmp_path / "w")  # fmt: skip
    options = check.candidates(pool[0])
    assert len(options) == 18 and sum(o.phrase for o in options) == 6
    by_id = {p.id: p for p in pool}
    program = "def execute_command(image):\n    return bool_to_yesno(find('square'))\n"
    for k in range(20):
        sample = Sample(id=f"q0#{k}", qid="q0", k=k, program=program)
        got = check.partners_of(sample, options)
        assert [by_id[p.question.id].answers[0] for p in got] == ["yes", "no", "yes"]
        assert all(" " not in p.program.split("'")[1] for p in got)  # one-for-one maps
        assert [p.question.id for p in check.partners_of(sample, options)] == [
            p.question.id for p in got
        ]
    # the order within an answer is the sample's own: other programs meet other partners
    firsts = {check.partners_of(Sample(id=f"q0#{k}", qid="q0", k=k, program=program),
                                options)[0].question.id for k in range(20)}  # fmt: skip
    assert len(firsts) > 1
    # more answers than partners: each partner brings another one
    many = [q(40 + i, f"What color is the {s}?", c)
            for i, (s, c) in enumerate([("square", "red"), ("circle", "red"),
                                        ("star", "blue"), ("triangle", "green")])]  # fmt: skip
    many = [m.model_copy(update={"meta": {"template": "color", "phrasing": 0}}) for m in many]
    check = TransferCheck(many, partners=3, min_right=1.0, keys=KEYS, metric="auto",
                          threshold=None, execute={}, questions=tmp_path / "q.jsonl",
                          work=tmp_path / "w")  # fmt: skip
    got = check.partners_of(Sample(id="q40#0", qid="q40", k=0, program=program),
                            check.candidates(many[0]))  # fmt: skip
    answers = [p.question.answers[0] for p in got]
    assert sorted(answers[:2]) == ["blue", "green"] and answers[2] == "red"


def test_verify_drops_programs_right_for_the_wrong_reason(
    synth: tuple[Path, list[Question]], tmp_path: Path
) -> None:
    root, qs = synth
    chosen, samples = _relation_inputs(tmp_path, qs, 8)
    questions = root / "train.jsonl"
    executions = tmp_path / "executions.jsonl"
    run_execute(ExecuteConfig(samples=samples, questions=questions, out=executions,
                              progress=False))  # fmt: skip
    out = tmp_path / "verified.jsonl"
    cfg = VerifyConfig(executions=executions, samples=samples, questions=questions, out=out,
                       transfer=3, progress=False)  # fmt: skip
    summary = run_verify(cfg)
    got = {r["id"]: r for r in read_jsonl(out)}
    by_id = {q.id: q for q in qs}
    partners = {sid: r["transfer"]["on"] for sid, r in got.items()}
    work = transfer_dir(out)
    runs = {e["id"]: e for e in read_jsonl(work / "executions.jsonl")}
    # one run per distinct (partner, rewritten program): the constants repeat
    distinct = {(s["qid"], s["program"]) for s in read_jsonl(work / "samples.jsonl")}
    assert len(runs) == len(distinct) <= 3 * len(got)
    dropped = 0
    for q in chosen:
        good, const = got[f"{q.id}#0"], got[f"{q.id}#1"]
        assert good["correct"] and const["correct"]
        # the partners: three other questions of the template, on other images
        for sid in (good["id"], const["id"]):
            assert len(partners[sid]) == 3
            for pid in partners[sid]:
                p = by_id[pid]
                assert pid != q.id and p.image != q.image
                assert template_key(p, KEYS) == template_key(q, KEYS)
        assert good["kept"]
        assert good["transfer"] == {"checked": 3, "right": 3, "passed": True,
                                    "on": partners[good["id"]]}  # fmt: skip
        # The constant is a string too: a colour named in the question is replaced in it.
        same = sum(
            by_id[pid].answers[0]
            == (word_map(q.question, by_id[pid].question) or {}).get(q.answers[0], q.answers[0])
            for pid in partners[const["id"]]
        )
        assert const["transfer"] == {"checked": 3, "right": same, "passed": same == 3,
                                     "on": partners[const["id"]]}  # fmt: skip
        assert const["kept"] is (same == 3)
        if same < 3:
            dropped += 1
            assert const["reason"].startswith(f"right here, wrong on {3 - same} of 3 other")
    assert dropped >= 5
    fun = summary["funnel"]
    assert fun["transfer_checked"] == 2 * len(chosen)
    assert fun["transfer_failed"] == dropped
    assert fun["kept"] == 2 * len(chosen) - dropped

    # The partner runs are a cache: verify again from scratch runs none of them twice.
    before = (work / "executions.jsonl").read_text()
    out.unlink()
    run_verify(cfg)
    assert (work / "executions.jsonl").read_text() == before
    assert len(read_jsonl(work / "samples.jsonl")) == len(runs)
    assert {r["id"]: r for r in read_jsonl(out)} == got


def test_a_question_without_partners_is_kept_unchecked(tmp_path: Path) -> None:
    """No other question of its template (no meta, no repeated text): nothing to check on."""
    root = tmp_path
    (root / "img").mkdir()
    write_png(root / "img" / "a.png")
    questions = write_jsonl(root / "q.jsonl", [
        {"id": "q1", "image": "img/a.png", "question": "Is it red?", "answers": ["yes"]},
        {"id": "q2", "image": "img/a.png", "question": "Is it blue?", "answers": ["no"]},
    ])  # fmt: skip
    samples = write_jsonl(root / "s.jsonl", [
        {"id": "q1#0", "qid": "q1", "k": 0,
         "program": "def execute_command(image):\n    return 'yes'\n"},
    ])  # fmt: skip
    executions = root / "e.jsonl"
    run_execute(ExecuteConfig(samples=samples, questions=questions, out=executions,
                              progress=False))  # fmt: skip
    out = root / "v.jsonl"
    run_verify(VerifyConfig(executions=executions, samples=samples, questions=questions,
                            out=out, transfer=3, progress=False))  # fmt: skip
    (rec,) = read_jsonl(out)
    assert rec["kept"]
    assert rec["transfer"] == {"checked": 0, "right": 0, "passed": True, "on": []}


def test_cli_transfer_flags(synth: tuple[Path, list[Question]], tmp_path: Path) -> None:
    root, qs = synth
    _, samples = _relation_inputs(tmp_path, qs, 2)
    questions = root / "train.jsonl"
    executions = tmp_path / "e.jsonl"
    ran = run_vpd("execute", str(samples), "--questions", str(questions), "--out", str(executions))
    assert ran.returncode == 0, ran.stderr
    out = tmp_path / "v.jsonl"
    args = ["verify", str(executions), "--samples", str(samples), "--questions", str(questions),
            "--out", str(out), "--transfer", "2", "--transfer-min", "0.5",
            "--execute", "timeout=5"]  # fmt: skip
    res = run_vpd(*args)
    assert res.returncode == 0, res.stderr
    assert "correct programs checked on other questions of their template" in res.stderr
    assert "wrong on other questions" in res.stderr  # the funnel table
    meta = json.loads(Path(str(out) + ".meta.json").read_text())["config"]
    assert meta["transfer"] == {"order": "contrast", "partners": 2, "min": 0.5, "keys": KEYS,
                                "execute": {"timeout": 5}}  # fmt: skip
    assert all(r["transfer"]["checked"] == 2 for r in read_jsonl(out) if r["correct"])
    # A bad option for the partner runs is an error before anything is written.
    typo = tmp_path / "typo.jsonl"
    bad = run_vpd(*args[:7], str(typo), "--transfer", "2", "--execute", "timout=5")
    assert bad.returncode == 2
    assert "--execute: execute option timout: Extra inputs are not permitted" in bad.stderr
    assert not list(tmp_path.glob("typo.jsonl*"))
    bad = run_vpd(*args[:-2], "--transfer", "-1")
    assert bad.returncode == 2 and "--transfer" in bad.stderr


def test_recipes_run_the_partners_with_the_run_tools(tmp_path: Path) -> None:
    """In `vpd run`, verify's partner programs (and each writer round's) run under the
    execute section's options, the recipe's tiny tool VLM included; a recipe without
    ``transfer`` keeps its verify options as they were (its fingerprints too)."""
    p = RunPaths(tmp_path / "run")
    recipe = {
        "execute": {"timeout": 5, "tools": {"vqa": "tiny"}},
        "tune": {"tiny_lm_layers": 2},
        "verify": {"transfer": 3},
        "writer": {"rounds": 2},
    }
    want = {"timeout": 5, "tools": {"vqa": "tiny", "tiny_lm_layers": 2}}
    (job,) = STAGES["verify"].jobs(recipe, p)
    assert job.fields["execute"] == want
    assert job.config("verify").fingerprint()["transfer"]["execute"] == want
    rounds = STAGES["writer"].jobs(recipe, p)
    assert [j.fields["verify"]["execute"] for j in rounds] == [want, want]
    own = {**recipe, "verify": {"transfer": 3, "execute": {"timeout": 1}}}
    assert STAGES["verify"].jobs(own, p)[0].fields["execute"] == {"timeout": 1}
    (plain,) = STAGES["verify"].jobs({**recipe, "verify": {"policy": "all"}}, p)
    assert "execute" not in plain.fields


# ----------------------------------------------------------------------------- spreading


def test_spread_fills_each_template_with_programs_right_on_their_questions(
    tmp_path: Path,
) -> None:
    """spread_programs: kept programs of a template with fewer than ``target`` solved
    questions teach other questions of it, each verified on the real tools against that
    question's own label; never a solved question, another template or a question outside
    the pool; templates already at ``target`` get nothing; a shortcut that fails its tries
    spreads nowhere; a second call runs nothing again."""
    root = tmp_path / "synth"
    generate(root, n=1500, seed=7, test_frac=0.0)  # enough questions per template
    qs = [Question(**json.loads(line)) for line in (root / "train.jsonl").read_text().splitlines()]
    groups: dict[tuple, list[Question]] = defaultdict(list)
    for q in qs:
        groups[template_key(q, KEYS)].append(q)

    def exact(q: Question, g: list[Question]) -> int:  # one-for-one partners on other images
        maps = [word_map(q.question, p.question) for p in g if p.image != q.image]
        return sum(m is not None and not any(" " in k + v for k, v in m.items()) for m in maps)

    big = [g for g in groups.values() if exact(g[0], g) >= 6]
    assert len(big) >= 6
    kept: list[tuple[Question, Sample]] = []
    # three templates with one solved question (its right program), one with four, one
    # with a constant that is right on its own question only by its label
    for g in big[:3]:
        kept.append((g[0], Sample(id=f"{g[0].id}#0", qid=g[0].id, k=0,
                                  program=viper_program(g[0].model_dump()))))  # fmt: skip
    full = big[3]
    kept += [(q, Sample(id=f"{q.id}#0", qid=q.id, k=0, program=viper_program(q.model_dump())))
             for q in full[:4]]  # fmt: skip
    shortcut = next(g for g in big[4:] if len({p.answers[0] for p in g}) > 1)
    constant = f"def execute_command(image):\n    return {shortcut[0].answers[0]!r}\n"
    kept.append((shortcut[0], Sample(id=f"{shortcut[0].id}#0", qid=shortcut[0].id, k=0,
                                     program=constant)))  # fmt: skip
    pool = [q for q in qs if q.id != big[0][-1].id]  # one question of a template is not offered
    questions = root / "train.jsonl"

    def check() -> TransferCheck:
        return TransferCheck(pool, partners=4, min_right=1.0, keys=KEYS, metric="auto",
                             threshold=None, execute={}, questions=questions,
                             work=tmp_path / "spread")  # fmt: skip

    got = spread_programs(kept, check(), target=4)
    solved = {q.id for q, _ in kept}
    server = ToolServer(get_backend("synthetic"))
    per_template: dict[tuple, int] = defaultdict(int)
    sources = {s.id: q for q, s in kept}
    for sp in got:
        src = sources[sp.source]
        assert template_key(sp.question, KEYS) == template_key(src, KEYS)
        assert sp.question.id not in solved and sp.question.id != big[0][-1].id
        assert sp.question.image != src.image
        # verified on the question's own image and label, not copied from the source
        answer, _ = run_inprocess(sp.program, root / sp.question.image, server)
        assert answer == sp.answer == sp.question.answers[0]
        per_template[template_key(src, KEYS)] += 1
    # each of the three one-question templates filled to 4; the full one and the shortcut
    # (wrong on another answer of its template) spread nothing
    assert {template_key(g[0], KEYS): 3 for g in big[:3]} == dict(per_template)
    assert len({sp.question.id for sp in got}) == len(got) == 9
    runs = (tmp_path / "spread" / "executions.jsonl").read_text()
    again = spread_programs(kept, check(), target=4)
    assert [(s.question.id, s.program) for s in again] == [(s.question.id, s.program) for s in got]
    assert (tmp_path / "spread" / "executions.jsonl").read_text() == runs

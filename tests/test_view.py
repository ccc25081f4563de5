"""`vpd view`, its ratings and `vpd report --ratings`.

The site is built from a small run made by the real commands (synth questions, hand-written
programs and broken ones, `vpd execute`, `vpd verify`, `vpd rationalize`, the run report)
and opened in a real headless Chromium (tests/browser.py): the index loads without a console
error and its filters change the count, a question page draws a box group per box-returning
call, ratings survive a reload and export as the JSONL `vpd report --ratings` reads. Where
Chromium cannot be had the browser tests skip with the reason, unless $VPD_REQUIRE_BROWSER
is set (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import browser
from tests.helpers import invoke_vpd, main_vpd, read_jsonl, write_jsonl, write_png
from tests.template_programs import viper_program
from vpd.report import write_report
from vpd.view.data import call_boxes, fnv1a, shard_count, shard_of
from vpd.view.ratings import ratings_table, read_ratings
from vpd.view.server import make_server

# A program that finds two things, then fails: a dropped program with two box calls.
BROKEN = """def execute_command(image):
    image_patch = ImagePatch(image)
    shapes = image_patch.find('shape')
    circles = image_patch.find('circle')
    return shapes.nothing
"""


def _site_js(path: Path) -> Any:
    """The object a site's data script assigns (``window.X=...;`` or ``VPD_SHARD(...);``)."""
    text = path.read_text(encoding="utf-8").strip().rstrip(";")
    m = re.match(r"^(?:window\.\w+=|VPD_SHARD\()(.*?)\)?$", text, re.S)
    assert m, text[:80]
    return json.loads(m.group(1))


def _question(site: Path, qid: str) -> dict[str, Any]:
    n = _site_js(site / "data" / "meta.js")["n_shards"]
    return _site_js(site / "data" / "q" / f"{shard_of(qid, n):05d}.js")[qid]


def _drawn(q: dict[str, Any]) -> int:
    """The program a question page draws first: the first kept, else the first that ran."""
    ps = q["programs"]
    for pred in (lambda p: p.get("kept"), lambda p: p["status"] == "ok"):
        hit = next((i for i, p in enumerate(ps) if pred(p)), None)
        if hit is not None:
            return hit
    return 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory by the real stages: 2 programs per training question (the template
    program and BROKEN), executed, verified, rationalized; a VLM arm's answers on the test
    questions (right on every other one); the run report with its plots."""
    d = tmp_path_factory.mktemp("view-run")
    invoke_vpd("data", "synth", "--out", str(d / "data"), "--n", "16", "--no-progress")
    train = d / "data" / "train.jsonl"
    qs = read_jsonl(train)
    samples = write_jsonl(
        d / "samples.jsonl",
        [
            {"id": f"{q['id']}#{k}", "qid": q["id"], "k": k, "program": prog}
            for q in qs
            for k, prog in enumerate([viper_program(q), BROKEN])
        ],
    )
    steps = [
        ("execute", str(samples), "--questions", str(train), "--out", str(d / "executions.jsonl"),
         "--workers", "2"),
        ("verify", str(d / "executions.jsonl"), "--samples", str(samples), "--questions",
         str(train), "--out", str(d / "verified.jsonl")),
        ("rationalize", str(d / "verified.jsonl"), "--questions", str(train), "--out",
         str(d / "sft.jsonl")),
    ]  # fmt: skip
    for args in steps:
        code, err = main_vpd(*args, "--no-progress")
        assert code == 0, err
    test = read_jsonl(d / "data" / "test.jsonl")
    write_jsonl(
        d / "eval" / "vpd.jsonl",
        [
            {
                "id": q["id"],
                "qid": q["id"],
                "prediction": q["answers"][0] if i % 2 == 0 else "zebra",
                "score": 1.0 if i % 2 == 0 else 0.0,
                "qtype": q["meta"]["qtype"],
            }
            for i, q in enumerate(test)
        ],
    )
    (d / "recipe.yaml").write_text("data: {n: 16}\n", encoding="utf-8")
    write_report(d)
    return d


@pytest.fixture(scope="module")
def site(run: Path) -> Path:
    res = invoke_vpd("view", str(run), "--rate")
    assert f"view -> {run / 'view' / 'index.html'}" in res.output
    return run / "view"


@pytest.fixture(scope="module")
def two_image_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """From stage files (no run dir): an NLVR2-style question whose program finds a box in
    each image, with a rationale and two arms' answers."""
    d = tmp_path_factory.mktemp("view-two")
    write_png(d / "left.png", 64)
    write_png(d / "right.png", 64, (20, 20, 200))
    q = {
        "id": "nlvr2-0",
        "image": "left.png",
        "question": "Is there a red square in the left image and a blue one in the right?",
        "answers": ["True"],
        "dataset": "nlvr2",
        "split": "dev",
        "meta": {"images": ["left.png", "right.png"]},
    }
    trace = [
        {"name": "find", "args": {"name": "square", "patch": [0, 0, 1, 1]},
         "result": "[[0.1,0.2,0.3,0.4]]", "ms": 1.0, "image": 0},
        {"name": "find", "args": {"name": "square", "patch": [0, 0, 1, 1]},
         "result": "[[0.5,0.6,0.9,0.8],[0.0,0.0,0.2,0.2]]", "ms": 1.0, "image": 1},
        {"name": "exists", "args": {"name": "red square", "patch": [0.1, 0.2, 0.3, 0.4]},
         "result": "true", "ms": 1.0, "image": 0},
    ]  # fmt: skip
    ver = {
        "id": "nlvr2-0#0", "qid": "nlvr2-0", "answer": "True", "score": 1.0, "kept": True,
        "reason": "kept", "program": "def execute_command(left, right):\n    return 'True'\n",
        "trace": trace, "k": 0, "status": "ok",
    }  # fmt: skip
    sft = {
        "id": "nlvr2-0/rationale", "image": "left.png", "task": "rationale", "qid": "nlvr2-0",
        "sample": "nlvr2-0#0",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text":
             "I find a square at [0.50, 0.60, 0.90, 0.80]. So the answer is True."}]},
        ],
    }  # fmt: skip
    pred = {"id": "nlvr2-0", "qid": "nlvr2-0", "prediction": "False", "score": 0.0}
    other = {**pred, "prediction": "True", "score": 1.0}
    invoke_vpd(
        "view",
        "--questions", str(write_jsonl(d / "q.jsonl", [q])),
        "--verified", str(write_jsonl(d / "v.jsonl", [ver])),
        "--sft", str(write_jsonl(d / "sft.jsonl", [sft])),
        "--preds", str(write_jsonl(d / "vpd.jsonl", [pred])),
        "--preds", f"other={write_jsonl(d / 'o.jsonl', [other])}",
        "--out", str(d / "site"),
    )  # fmt: skip
    return d / "site"


# ----------------------------------------------------------------------------- the site files


def test_site_joins_the_stage_files_per_question(run: Path, site: Path) -> None:
    verified = read_jsonl(run / "verified.jsonl")
    questions = [
        *read_jsonl(run / "data" / "train.jsonl"),
        *read_jsonl(run / "data" / "test.jsonl"),
    ]
    meta = _site_js(site / "data" / "meta.js")
    index = _site_js(site / "data" / "index.js")
    assert meta["rate"] is True and meta["arms"] == ["vpd"] and meta["has_report"] is True
    assert meta["n_shards"] == shard_count(len(questions))
    assert index["id"] == [q["id"] for q in questions]
    kept = {v["qid"] for v in verified if v["kept"]}
    assert 0 < len(kept) < len(questions)
    for i, q in enumerate(questions):
        mine = [v for v in verified if v["qid"] == q["id"]]
        assert index["nprog"][i] == len(mine)
        assert index["nkept"][i] == sum(v["kept"] for v in mine)
        assert index["types"][index["type"][i]] == q["meta"]["qtype"]
        rec = _question(site, q["id"])
        assert [p["id"] for p in rec["programs"]] == [f"{q['id']}#0", f"{q['id']}#1"][: len(mine)]
        for p in rec["programs"]:
            v = next(x for x in mine if x["id"] == p["id"])
            assert (p["status"], p["answer"], p["kept"], p["reason"]) == (
                v["status"], v["answer"], v["kept"], v["reason"],
            )  # fmt: skip
        assert len(rec["rationales"]) == (q["id"] in kept)
        for url in rec["images"]:  # relative to the site: the page finds the image
            assert (site / url).resolve().is_file()
    # The arm: right on every other test question, "." where it did not answer (train).
    test_ids = [q["id"] for q in read_jsonl(run / "data" / "test.jsonl")]
    col = index["arm"]["vpd"]
    assert "".join(col[index["id"].index(t)] for t in test_ids) == "".join(
        "1" if i % 2 == 0 else "0" for i in range(len(test_ids))
    )
    assert set(col[: len(questions) - len(test_ids)]) == {"."}
    # The report is the first page, its plots copied beside it.
    page = (site / "index.html").read_text(encoding="utf-8")
    assert "<table>" in page and "Funnel" in page
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (site / src).is_file(), src


def test_call_boxes_are_the_box_returning_calls() -> None:
    find = {"name": "find", "args": {}, "result": '[[0.1,0.2,0.3,0.4],[0,0,1,1],"+3 more"]'}
    assert call_boxes(find) == [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0]]
    assert call_boxes({"name": "find", "result": "[]"}) == []  # found nothing: still a box call
    assert call_boxes({"name": "crop", "result": "[0.5,0.5,1,1]"}) == [[0.5, 0.5, 1.0, 1.0]]
    for other in ({"name": "exists", "result": "true"}, {"name": "size", "result": "[256,256]"},
                  {"name": "simple_query", "result": "\"[1, 2, 3, 4]\""},
                  {"name": "find", "result": "error: boom"}):  # fmt: skip
        assert call_boxes(other) is None, other


def test_shard_hash_is_fnv1a() -> None:
    # Reference values of 32-bit FNV-1a; common.js computes the same over UTF-8 bytes.
    assert fnv1a("") == 0x811C9DC5
    assert fnv1a("a") == 0xE40C292C
    assert fnv1a("foobar") == 0xBF9CF968


def test_stage_files_site_keeps_both_images_and_each_calls_image(two_image_site: Path) -> None:
    q = _question(two_image_site, "nlvr2-0")
    assert len(q["images"]) == 2 and all((two_image_site / u).is_file() for u in q["images"])
    assert [c.get("image") for c in q["programs"][0]["trace"]] == [0, 1, 0]
    assert q["arms"] == {
        "vpd": {"prediction": "False", "score": 0.0},
        "other": {"prediction": "True", "score": 1.0},
    }
    # Without a run report the first page is the index.
    index_page = (two_image_site / "index.html").read_text(encoding="utf-8")
    assert index_page == (two_image_site / "questions.html").read_text(encoding="utf-8")


def test_images_are_linked_or_copied_into_the_site(two_image_site: Path, tmp_path: Path) -> None:
    src = two_image_site.parent
    out = tmp_path / "site"
    args = ("view", "--questions", str(src / "q.jsonl"), "--out", str(out))
    invoke_vpd(*args)
    q = _question(out, "nlvr2-0")
    linked = [out / u for u in q["images"]]
    assert all(p.is_symlink() and p.resolve().parent == src.resolve() for p in linked)
    before = (src / "left.png").read_bytes()
    # The same folder rebuilt with copies: files of its own, the originals untouched.
    invoke_vpd(*args, "--copy-images")
    q = _question(out, "nlvr2-0")
    copied = [out / u for u in q["images"]]
    assert copied == linked and not any(p.is_symlink() for p in copied)
    assert copied[0].read_bytes() == before == (src / "left.png").read_bytes()


def test_vpd_run_writes_the_view_and_vpd_report_rewrites_the_report(tmp_path: Path) -> None:
    from vpd.pipeline import run_pipeline

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {n: 10, progress: false}\n", encoding="utf-8")
    run_pipeline(recipe, tmp_path / "run")
    site = tmp_path / "run" / "view"
    assert _site_js(site / "data" / "meta.js")["n_questions"] == 10
    assert "Funnel" in (site / "index.html").read_text(encoding="utf-8")
    (tmp_path / "run" / "report.md").unlink()
    assert "report: " in invoke_vpd("report", str(tmp_path / "run")).output
    assert (tmp_path / "run" / "report.md").exists()


def test_view_without_inputs_is_one_line_error(tmp_path: Path) -> None:
    code, err = main_vpd("view")
    assert code == 2 and err.count("\n") == 1 and "RUN_DIR" in err, err
    code, err = main_vpd("view", str(tmp_path / "nowhere"))
    assert code == 2 and "not found" in err, err
    code, err = main_vpd("report")
    assert code == 2 and "--ratings" in err, err


# ----------------------------------------------------------------------------- ratings


def _rating(rid: str, qtype: str, a: bool | None, f: bool | None, c: bool | None, **kw: Any):
    return {"id": rid, "qid": rid.split("/")[0], "type": qtype, "answer_right": a,
            "factual": f, "consistent": c, **kw}  # fmt: skip


def test_ratings_table_by_hand(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            _rating("q1/rationale", "count", True, False, True),
            _rating("q2/rationale", "count", True, True, True),
            _rating("q3/rationale", "color", False, True, None),  # consistency not rated
            _rating("q1/rationale", "count", True, True, True),  # changed their mind: counts
            _rating("q4/rationale", "color", True, True, False, rater="b"),
        ],
    )
    recs = read_ratings([path])
    assert [r.id for r in recs] == ["q2/rationale", "q3/rationale", "q1/rationale", "q4/rationale"]
    t = ratings_table(recs)
    a = t["all"]
    assert a["rationales"] == 4
    # answer right 3 of 4, factual 4 of 4 (q1's first line replaced), consistent 2 of 3.
    assert (a["answer_right"]["share"], a["answer_right"]["n"]) == (0.75, 4)
    assert (a["factual"]["share"], a["factual"]["n"]) == (1.0, 4)
    assert (a["consistent"]["share"], a["consistent"]["n"]) == (pytest.approx(2 / 3, abs=1e-6), 3)
    # All yes: every resample is all yes, the interval is the point.
    assert (a["factual"]["lo"], a["factual"]["hi"]) == (1.0, 1.0)
    per = {r["group"]: r for r in t["per_type"]}
    assert list(per) == ["color", "count"]
    # color: answer right 1 of 2. Resampling 2 items gives a mean of 0, 1/2 or 1 with
    # chances 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles are 0 and 1.
    c = per["color"]["answer_right"]
    assert (c["share"], c["n"], c["lo"], c["hi"]) == (0.5, 2, 0.0, 1.0)
    assert per["color"]["consistent"]["n"] == 1 and per["count"]["consistent"]["share"] == 1.0
    assert t["per_source"] == []  # one source: no per-source rows
    assert t["raters"] == ["", "b"]


def test_report_prints_and_writes_the_ratings_table(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            _rating("q1/rationale", "count", True, True, True),
            _rating("q2/vpd", "count", False, True, False, source="arm:vpd"),
        ],  # fmt: skip
    )
    out = tmp_path / "table.md"
    res = invoke_vpd("report", "--ratings", str(path), "--out", str(out))
    assert "| **all** | 2 | 50.0% [0.0, 100.0] (2) | 100.0% [100.0, 100.0] (2) |" in res.output
    assert "| arm:vpd | 1 | 0.0% [0.0, 0.0] (1) |" in res.output  # the per-source table
    assert out.read_text(encoding="utf-8") in res.output
    assert json.loads(out.with_suffix(".json").read_text())["all"]["rationales"] == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "factual": "maybe"}])
    code, err = main_vpd("report", "--ratings", str(bad))
    assert code == 2 and "bad.jsonl:1" in err and "qid" in err, err


def test_server_serves_the_site_and_appends_ratings(site: Path, tmp_path: Path) -> None:
    ratings = tmp_path / "ratings.jsonl"
    httpd = make_server(site, 0, ratings)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/questions.html") as r:
            assert b"data/index.js" in r.read()

        def post(obj: Any) -> int:
            req = urllib.request.Request(
                f"{base}/api/ratings", data=json.dumps(obj).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(req) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post(_rating("q1/rationale", "count", True, None, None)) == 200
        assert post(_rating("q1/rationale", "count", True, True, False)) == 200
        assert post({"id": "q2/rationale"}) == 400  # no qid: not a rating
        assert post([1, 2]) == 400
        assert len(read_jsonl(ratings)) == 2
        with urllib.request.urlopen(f"{base}/api/ratings") as r:
            (got,) = json.loads(r.read())
        assert (got["id"], got["factual"], got["consistent"]) == ("q1/rationale", True, False)
    finally:
        httpd.shutdown()
        httpd.server_close()


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def chrome() -> Any:
    why = browser.unavailable()
    if why is None:
        try:
            b = browser.Chromium()
        except browser.BrowserError as e:
            why = f"chromium does not start: {e}"
    if why is not None:
        if os.environ.get(browser.REQUIRE):
            pytest.fail(f"{why} (and ${browser.REQUIRE} is set)")
        pytest.skip(why)
    yield b
    b.close()


def _count(b: Any) -> int:
    return int(b.eval("document.getElementById('count').dataset.n"))


def _select(b: Any, name: str, value: str) -> None:
    b.eval(
        f"""(() => {{ const s = document.querySelector('select[name="{name}"]');
        const want = {json.dumps(value)} + ' ';
        s.value = Array.from(s.options).find(o => o.text.startsWith(want)).value;
        s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()"""
    )


def test_index_loads_clean_and_filters_change_the_count(chrome: Any, site: Path) -> None:
    chrome.clear_events()
    chrome.goto((site / "questions.html").as_uri())
    assert chrome.errors() == []
    index = _site_js(site / "data" / "index.js")
    n = index["n"]
    assert _count(chrome) == n
    assert chrome.eval("document.querySelectorAll('#rows tr').length") == min(n, 100)
    _select(chrome, "type", "count")
    want = sum(index["types"][t] == "count" for t in index["type"])
    assert 0 < _count(chrome) == want < n
    _select(chrome, "kept", "kept")
    both = sum(
        index["types"][t] == "count" and k > 0
        for t, k in zip(index["type"], index["nkept"], strict=True)
    )
    assert _count(chrome) == both
    # The other facets' counts follow: "kept" under type=count says how many it would keep.
    opt = chrome.eval("document.querySelector('select[name=kept]').selectedOptions[0].text")
    assert opt == f"kept ({both})"
    _select(chrome, "arm:vpd", "wrong")
    assert _count(chrome) == 0  # wrong answers are on test questions, which have no programs
    # Filters live in the URL: a link with a search opens with it applied.
    chrome.goto("about:blank", ready="true")
    chrome.goto((site / "questions.html").as_uri() + "#q=" + index["id"][3])
    assert _count(chrome) == 1
    assert chrome.errors() == []


def test_question_page_draws_a_box_group_per_box_call(chrome: Any, site: Path) -> None:
    index = _site_js(site / "data" / "index.js")
    # A question whose drawn program makes two or more box-returning calls.
    for qid in index["id"]:
        q = _question(site, qid)
        if not q["programs"]:
            continue
        calls = [c for c in q["programs"][_drawn(q)]["trace"] if call_boxes(c) is not None]
        if len(calls) >= 2:
            break
    else:
        pytest.fail("no question with two box calls in the run")
    chrome.clear_events()
    chrome.goto((site / "question.html").as_uri() + "?id=" + qid)
    assert chrome.errors() == []
    assert chrome.eval("document.querySelector('.imgbox img').naturalWidth") > 0
    assert chrome.eval("document.querySelectorAll('.imgbox g.call').length") == len(calls)
    boxes = [b for c in calls for b in call_boxes(c)]
    assert chrome.eval("document.querySelectorAll('.imgbox g.call rect').length") == len(boxes)
    # y runs from the image bottom in the trace, from the top in SVG.
    if boxes:
        left, lo, r, up = boxes[0]
        got = chrome.eval(
            "Array.from(document.querySelector('.imgbox g.call rect').attributes)"
            ".filter(a => 'xywidthheight'.includes(a.name)).map(a => Number(a.value))"
        )
        assert got == pytest.approx(
            [left * 1000, (1 - up) * 1000, (r - left) * 1000, (up - lo) * 1000], abs=0.1
        )
    # Hovering a call's group shows the call and its result.
    tip = chrome.eval(
        """(() => { const g = document.querySelector('.imgbox g.call');
        g.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 5, clientY: 5}));
        return document.getElementById('tip').textContent; })()"""
    )
    assert tip.startswith("#") and "find(" in tip and "→" in tip
    # The trace beside the program: BROKEN's two finds on the lines that make them.
    broken = next(i for i, p in enumerate(q["programs"]) if p["program"] == BROKEN)
    chips = chrome.eval(
        f"Array.from(document.querySelectorAll('.prog[data-pi=\"{broken}\"] table.code tr'))"
        ".map(tr => Array.from(tr.querySelectorAll('.chip')).map(c => Number(c.dataset.call)))"
    )
    assert chips == [[], [], [0], [1], []]
    # Another program drawn: as many groups as its box calls.
    other = next((i for i, p in enumerate(q["programs"]) if i != _drawn(q)), None)
    if other is not None:
        chrome.eval(f"document.querySelector('.prog[data-pi=\"{other}\"] .phead').click()")
        n_other = sum(call_boxes(c) is not None for c in q["programs"][other]["trace"])
        assert chrome.eval("document.querySelectorAll('.imgbox g.call').length") == n_other


def test_two_image_question_draws_each_call_on_its_image(chrome: Any, two_image_site: Path) -> None:
    chrome.clear_events()
    chrome.goto((two_image_site / "question.html").as_uri() + "?id=nlvr2-0")
    assert chrome.errors() == []
    per_image = chrome.eval(
        "Array.from(document.querySelectorAll('.imgbox'))"
        ".map(b => b.querySelectorAll('g.call rect').length)"
    )
    assert per_image == [1, 2]
    # The rationale's box has the colour of the call that found it, and shows on hover.
    span = chrome.eval("document.querySelector('.rbox').style.getPropertyValue('--c')")
    call = chrome.eval(
        "document.querySelector('.imgbox[data-img=\"1\"] g.call').style.getPropertyValue('--c')"
    )
    assert span == call
    shown = chrome.eval(
        """(() => { const over = new MouseEvent('mouseover', {bubbles: true});
        document.querySelector('.rbox').dispatchEvent(over);
        return document.querySelectorAll('.imgbox[data-img="1"] g.rat.show rect.hi').length; })()"""
    )
    assert shown == 1
    assert chrome.eval("document.querySelectorAll('table.arms tr').length") == 2


def test_three_ratings_survive_a_reload_and_export_as_the_report_reads(
    chrome: Any, site: Path, run: Path
) -> None:
    index = _site_js(site / "data" / "index.js")
    first = next(i for i, n in enumerate(index["nrat"]) if n)
    chrome.goto((site / "question.html").as_uri() + "?id=" + index["id"][first])
    chrome.eval("localStorage.clear()")
    chrome.reload()
    verdicts = [("y", "y", "y"), ("y", "n", "y"), ("n", "y", "n")]
    rated = []
    for i, keys in enumerate(verdicts):
        if i:  # the next question with a rationale, by the keyboard
            before = chrome.eval("location.href")
            chrome.key("ArrowRight")
            chrome.wait_for(f"location.href !== {json.dumps(before)} && window.VPD_READY === true")
        qid = chrome.eval("new URLSearchParams(location.search).get('id')")
        rated.append(qid)
        for k in keys:
            chrome.key(k)
    assert len(set(rated)) == 3
    chrome.reload()
    assert chrome.eval("document.getElementById('nrated').textContent") == "3 rated"
    # The last question's buttons show its rating again after the reload.
    on = chrome.eval(
        "Array.from(document.querySelectorAll('.ratcard .rq'))"
        ".map(r => r.querySelector('button.on').dataset.v)"
    )
    assert on == ["0", "1", "0"]
    chrome.eval("document.getElementById('export').click()")
    out = chrome.wait_download("ratings.jsonl")
    recs = {r.qid: r for r in read_ratings([out])}
    assert set(recs) == set(rated)
    for qid, keys in zip(rated, verdicts, strict=True):
        r = recs[qid]
        assert (r.answer_right, r.factual, r.consistent) == tuple(k == "y" for k in keys)
        assert r.id == f"{qid}/rationale" and r.source == "sft"
        assert r.type == _question(site, qid)["type"]
    t = ratings_table(list(recs.values()))
    assert t["all"]["factual"]["share"] == pytest.approx(2 / 3, abs=1e-6)


def test_served_page_posts_ratings_and_loads_the_servers(
    chrome: Any, site: Path, tmp_path: Path
) -> None:
    ratings = tmp_path / "ratings.jsonl"
    httpd = make_server(site, 0, ratings)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    index = _site_js(site / "data" / "index.js")
    qid = index["id"][next(i for i, n in enumerate(index["nrat"]) if n)]
    url = f"http://127.0.0.1:{httpd.server_address[1]}/question.html?id={qid}"
    try:
        chrome.clear_events()
        chrome.goto(url)
        chrome.eval("localStorage.clear()")
        chrome.eval('document.querySelector(\'.rq[data-qi="1"] button[data-v="0"]\').click()')
        chrome.wait_for("true", timeout=1)
        for _ in range(100):
            if ratings.exists() and ratings.read_text():
                break
            chrome.wait_for("new Promise(r => setTimeout(() => r(true), 50))")
        (rec,) = read_jsonl(ratings)
        assert (rec["id"], rec["factual"], rec["answer_right"]) == (f"{qid}/rationale", False, None)
        # Another browser (here: this one, its storage wiped) gets the server's ratings.
        chrome.eval("localStorage.clear()")
        chrome.reload()
        chrome.wait_for("document.getElementById('nrated').textContent === '1 rated'")
        assert chrome.errors() == []
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_page_shows_the_images_the_program_ran_on(tmp_path: Path) -> None:
    """One `meta.images` entry (or an empty name) is no two-image question: execute runs the
    program on `image`, and the page shows that image, not the stray list."""
    write_png(tmp_path / "main.png", 32)
    write_png(tmp_path / "stray.png", 32, (20, 20, 200))
    base = {"question": "Is there a square?", "answers": ["yes"], "image": "main.png"}
    qs = [
        {**base, "id": "one", "meta": {"images": ["stray.png"]}},
        {**base, "id": "blank", "meta": {"images": ["stray.png", ""]}},
        {**base, "id": "two", "meta": {"images": ["stray.png", "main.png"]}},
    ]
    invoke_vpd("view", "--questions", str(write_jsonl(tmp_path / "q.jsonl", qs)),
               "--out", str(tmp_path / "site"))  # fmt: skip
    shown = {
        qid: [
            (tmp_path / "site" / u).resolve().name
            for u in _question(tmp_path / "site", qid)["images"]
        ]
        for qid in ("one", "blank", "two")
    }
    assert shown == {"one": ["main.png"], "blank": ["main.png"], "two": ["stray.png", "main.png"]}

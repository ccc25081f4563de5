"""`vpd execute` end to end: the real CLI, the real sandbox, the real ToolServer.

The hand-written template programs (tests/template_programs.py) run through the
`vpd execute` command line with the synthetic backend on `vpd data synth` scenes, and
must give exactly what the same programs give in-process (vpd.tools.namespace.run_inprocess):
answers, statuses and traces. Then the run is killed with SIGKILL mid-way and resumed,
and hostile programs (the escape corpus, and abuse of the real tool API) are mixed with
benign ones in one run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.escapes.corpus import BAD, ESCAPES
from tests.helpers import REPO, read_jsonl, run_vpd, vpd_argv
from tests.template_programs import viper_program, visprog_program
from vpd.records import Sample
from vpd.tools.backends import get_backend
from vpd.tools.namespace import run_inprocess
from vpd.tools.server import ToolServer

N_QUESTIONS = 120
MARKER = Path("/tmp/vpd_escape_marker")


def _fn(body: str) -> str:
    lines = body.strip("\n").splitlines()
    return "def execute_command(image):\n" + "\n".join("    " + ln for ln in lines) + "\n"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exec_int")
    r = run_vpd("data", "synth", "--out", str(out), "--n", str(N_QUESTIONS), "--seed", "11",
             "--test-frac", "0", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out / "train.jsonl"


@pytest.fixture(scope="module")
def questions(synth: Path) -> list[dict[str, Any]]:
    return read_jsonl(synth)


@pytest.fixture(scope="module")
def samples(synth: Path, questions: list[dict[str, Any]]) -> tuple[Path, dict[str, dict]]:
    """k = 0..2 per question: the ViperGPT program, the VisProg one (or ViperGPT again),
    and the ViperGPT one again (an LLM often samples the same program twice)."""
    path = synth.parent / "samples.jsonl"
    meta: dict[str, dict] = {}
    with path.open("w") as f:
        for rec in questions:
            vp = visprog_program(rec)
            progs = [("viper", viper_program(rec)), ("visprog", vp) if vp else
                     ("viper", viper_program(rec)), ("viper", viper_program(rec))]  # fmt: skip
            for k, (syntax, prog) in enumerate(progs):
                s = Sample(id=f"{rec['id']}#{k}", qid=rec["id"], k=k, program=prog, syntax=syntax)
                f.write(s.model_dump_json() + "\n")
                meta[s.id] = {"rec": rec, "syntax": syntax, "program": prog}
    return path, meta


@pytest.fixture(scope="module")
def inprocess(synth: Path, samples: tuple[Path, dict[str, dict]]) -> dict[str, tuple]:
    """sample id -> (answer, trace) from running the same program in this process."""
    server = ToolServer(get_backend("synthetic"))
    out = {}
    for sid, m in samples[1].items():
        answer, trace = run_inprocess(
            m["program"], synth.parent / m["rec"]["image"], server, syntax=m["syntax"]
        )
        out[sid] = (answer, trace)
    return out


@pytest.fixture(scope="module")
def clean_run(synth: Path, samples: tuple[Path, dict[str, dict]]) -> tuple[list[dict], str]:
    """One uninterrupted `vpd execute` run of every sample (rows, CLI output)."""
    out = synth.parent / "exec_clean.jsonl"
    r = run_vpd("execute", str(samples[0]), "--questions", str(synth), "--out", str(out),
             "--workers", "2", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return read_jsonl(out), r.stdout + r.stderr


# ----------------------------------------------------------------------------- 1. accuracy


def _group(template: str) -> str:
    return "_".join(template.split("_")[:2])


def test_cli_matches_inprocess(
    clean_run: tuple[list[dict], str],
    samples: tuple[Path, dict[str, dict]],
    inprocess: dict[str, tuple],
) -> None:
    rows, output = clean_run
    meta = samples[1]
    assert sorted(r["id"] for r in rows) == sorted(meta), "every sample exactly once"
    assert {r["status"] for r in rows} == {"ok"}, [r for r in rows if r["status"] != "ok"][:3]
    stats: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        m = meta[r["id"]]
        answer, trace = inprocess[r["id"]]
        assert r["answer"] == answer, (r["id"], m["program"])
        # The same calls with the same (normalized) args and results, in the same order.
        want = [(t.name, t.args, t.result) for t in trace]
        assert [(t["name"], t["args"], t["result"]) for t in r["trace"]] == want, r["id"]
        for call in r["trace"]:
            assert all(0.0 <= v <= 1.0 for v in call["args"]["patch"]), call
            if call["name"] in ("find", "crop"):
                assert re.fullmatch(r"[\[\]0-9.,]*", call["result"]), call
        key = (m["syntax"], _group(m["rec"]["meta"]["template"]))
        stats[key][0] += r["answer"] == m["rec"]["answers"][0]
        stats[key][1] += 1
    assert sum(n for (syn, _), (_, n) in stats.items() if syn == "visprog") >= 20
    for key, (c, n) in stats.items():
        if n >= 10:
            assert c / n >= 0.95, f"{key}: {c}/{n}"
    m = re.search(r"tool cache hit rate (\d+)%", output)
    assert m and int(m.group(1)) > 0, output  # k programs per question share tool calls


def test_rerun_after_completion_does_nothing(
    clean_run: tuple[list[dict], str], synth: Path, samples: tuple[Path, dict[str, dict]]
) -> None:
    out = synth.parent / "exec_clean.jsonl"
    before = out.read_bytes()
    r = run_vpd("execute", str(samples[0]), "--questions", str(synth), "--out", str(out),
             "--workers", "2", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "0 written" in r.stdout + r.stderr
    assert out.read_bytes() == before


# ----------------------------------------------------------------------------- 2. kill -9


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids[ppid].append(int(d))
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing


def _kill_when(cmd: list[str], out: Path, lines: int) -> set[int]:
    """Start `cmd`, SIGKILL it once `out` has `lines` lines; return its descendants then."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            n = out.read_bytes().count(b"\n") if out.exists() else 0
            if n >= lines:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        family = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return family


def test_kill9_and_resume(
    clean_run: tuple[list[dict], str], synth: Path, samples: tuple[Path, dict[str, dict]]
) -> None:
    out = synth.parent / "exec_killed.jsonl"
    cmd = vpd_argv("execute", str(samples[0]), "--questions", str(synth), "--out", str(out),
                   "--workers", "2", "--no-progress")  # fmt: skip
    total = len(samples[1])
    kept = b""  # the complete records a kill left: each later run must keep them as they are
    for at in (total // 8, total // 2):
        family = _kill_when(cmd, out, at)
        assert family, "the CLI had a sandbox zygote (and children) running"
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in family if _alive(p)], "orphan sandbox processes left behind"
        data = out.read_bytes()
        assert data.startswith(kept), "a resumed run rewrote what the killed one had written"
        kept = data[: data.rfind(b"\n") + 1]  # a torn last line is the resume's to redo
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes().startswith(kept), "resumed, not restarted: the first records stay"
    # ... and only the rest was executed (rich may wrap the summary line).
    done, said = kept.count(b"\n"), " ".join(r.stderr.split())
    assert re.search(rf"\b{total - done} written \(.*\b{done} already done", said), said
    rows = read_jsonl(out)
    ids = [x["id"] for x in rows]
    assert len(ids) == len(set(ids)) == total, "every sample exactly once"
    clean = {x["id"]: (x["status"], x["answer"]) for x in clean_run[0]}
    assert {x["id"]: (x["status"], x["answer"]) for x in rows} == clean


# ----------------------------------------------------------------------------- 3. hostile mix

# Abuse of the REAL tool API: (name, program, statuses it may end with, answer if ok).
ABUSE: list[tuple[str, str, set[str], str | None]] = [
    ("crop_huge", _fn("p = image.crop(-10 ** 9, -10 ** 9, 10 ** 9, 10 ** 9)\n"
                      "return len(p.find('circle')) == len(image.find('circle'))"),
     {"ok"}, "yes"),
    # 4000 digits still cross the wire (json's limit is 4300); the API may clip or refuse.
    ("crop_bigint", _fn("n = 10\nreturn image.crop(0, 0, n ** 4000, n ** 4000).width == "
                        "image.width"), {"ok", "error"}, "yes"),
    ("crop_negative", _fn("p = image.crop(50, 50, -50, -50)\n"
                          "return str(p.width) + ' ' + str(len(p.find('circle')))"),
     {"ok"}, "0 0"),
    ("crop_hugeint", _fn("n = 10\nreturn image.crop(0, 0, n ** 5000, 1).width"), {"error"}, None),
    ("crop_nan", _fn("return image.crop(float('nan'), 0, 10, 10).width"), {"error"}, None),
    ("crop_inf", _fn("return image.crop(0, 0, float('inf'), 10).width"), {"error"}, None),
    ("patch_nan", _fn("return ImagePatch(image, 0, 0, float('-inf'), 5).width"), {"error"}, None),
    ("find_3mb", _fn("n = 3\nreturn len(image.find('x' * (n * 10 ** 6)))"), {"error"}, None),
    ("query_3mb", _fn("n = 3\nreturn image.simple_query('What color ' + 'x' * (n * 10 ** 6))"),
     {"error"}, None),
    ("find_10mb", _fn("n = 10\nreturn len(image.find('x' * (n * 10 ** 6)))"), {"error"}, None),
    ("find_object", _fn("return len(image.find(image))"), {"ok"}, "0"),
    ("find_generator", _fn("return len(image.find((i for i in range(3))))"), {"ok"}, "0"),
    ("text_match_objects",
     _fn("return image.best_text_match([image, (i for i in range(2)), None, 1.5]) != ''"),
     {"ok"}, "yes"),
    ("text_match_5000", _fn("return image.best_text_match([str(i) for i in range(5000)])"),
     {"error"}, None),
    ("image_match_bomb",
     _fn("return best_image_match([image] * 2000, ['x' + str(i) for i in range(2000)], True)"),
     {"error"}, None),
    ("crop_chain", _fn("p = image\nfor i in range(5000):\n    p = p.crop(0, 0, p.width, p.height)"
                       "\nreturn 1"), {"error"}, None),
    ("crop_recursion", "def deep(p, n):\n    return deep(p.crop(0, 0, p.width, p.height), n + 1)\n"
     + _fn("return deep(image, 0)"), {"error"}, None),
    ("find_crop_find",
     _fn("ps = [image]\nwhile ps:\n    ps = [q.crop(0, 0, q.width, q.height) for q in ps] + "
         "image.find('circle')\nreturn 1"), {"error", "oom"}, None),
    ("flood_distinct", _fn("for i in range(10 ** 6):\n    image.find('circle ' + str(i))\n"
                           "return 1"), {"error"}, None),
    ("flood_swallowed", _fn("for i in range(10 ** 6):\n    try:\n        image.exists('circle')\n"
                            "    except Exception:\n        pass\nreturn 'done'"), {"error"}, None),
    ("llm_without_llm", _fn("return llm_query('x' * 100)"), {"error"}, None),
]  # fmt: skip


# Hostile or broken VisProg programs: refused by its parser (-> violation), never run.
_VP_END = "\nFINAL_RESULT=RESULT(var=ANSWER0)"
VISPROG_BAD: list[tuple[str, str, set[str], str | None]] = [
    ("vp_dunder", 'ANSWER0=EVAL(expr="().__class__")' + _VP_END, {"violation"}, None),
    ("vp_pow_bomb", 'ANSWER0=EVAL(expr="9 ** 9 ** 9")' + _VP_END, {"violation"}, None),
    # refused when evaluated (an error), still never run
    ("vp_str_bomb", "ANSWER0=EVAL(expr=\"'x' * 100000000\")" + _VP_END, {"error"}, None),
    ("vp_import", "ANSWER0=IMPORT(name='os')" + _VP_END, {"violation"}, None),
    ("vp_syntax", "BOX0=LOC(image=IMAGE,object='circle'" + _VP_END, {"violation"}, None),
    ("vp_huge", "BOX0=LOC(image=IMAGE,object='circle')\n" * 5000, {"violation"}, None),
]


def test_escapes_and_tool_abuse_with_benign(
    synth: Path, questions: list[dict[str, Any]], inprocess: dict[str, tuple]
) -> None:
    hostile = [(n, p, allowed, None) for n, p, allowed in ESCAPES if not n.startswith("leak_")]
    hostile += ABUSE + VISPROG_BAD
    path = synth.parent / "samples_hostile.jsonl"
    expect: dict[str, tuple[str, set[str], str | None]] = {}
    with path.open("w") as f:
        # Each hostile program is followed by a benign one: the run (and its tool server)
        # must come out of every attack answering correctly.
        for i, (name, prog, allowed, answer) in enumerate(hostile):
            rec = questions[i % len(questions)]
            for k, (p, syn, st, ans) in enumerate(
                [(prog, "visprog" if name.startswith("vp_") else "viper", allowed, answer),
                 (viper_program(rec), "viper", {"ok"}, inprocess[f"{rec['id']}#0"][0])]
            ):  # fmt: skip
                sid = f"{rec['id']}#{100 + 2 * i + k}"
                s = Sample(id=sid, qid=rec["id"], k=100 + 2 * i + k, program=p, syntax=syn)
                f.write(s.model_dump_json() + "\n")
                expect[sid] = (name if k == 0 else f"benign after {name}", st, ans)
    out = synth.parent / "exec_hostile.jsonl"
    MARKER.unlink(missing_ok=True)
    r = run_vpd("execute", str(path), "--questions", str(synth), "--out", str(out),
             "--workers", "2", "--timeout", "2", "--memory-mb", "256", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_jsonl(out)
    assert sorted(x["id"] for x in rows) == sorted(expect)
    wrong = []
    for x in rows:
        name, allowed, answer = expect[x["id"]]
        if x["status"] not in allowed or (x["status"] == "ok" and x["answer"] != answer):
            wrong.append((name, x["status"], x["answer"], x["error"]))
        if name in {n for n, *_ in ESCAPES}:
            assert x["status"] in BAD, (name, x)
    assert not wrong, wrong
    assert not MARKER.exists()


def test_tool_time_budget(synth: Path, questions: list[dict[str, Any]]) -> None:
    """Programs that make the shared server work hard on purpose are stopped by their own
    tool-time budget; the next program is served normally."""
    from vpd.execute import ExecuteConfig, run_execute

    rec = questions[0]
    hog = _fn(
        "for i in range(200):\n"
        "    best_image_match([image] * 250, ['x' + str(i) + str(j) for j in range(250)])\n"
        "return 1"
    )
    path = synth.parent / "samples_hog.jsonl"
    with path.open("w") as f:
        for k, p in enumerate([hog, viper_program(rec)]):
            f.write(Sample(id=f"{rec['id']}#{k}", qid=rec["id"], k=k, program=p).model_dump_json())
            f.write("\n")
    out = synth.parent / "exec_hog.jsonl"
    cfg = ExecuteConfig(
        samples=path, questions=synth, out=out, workers=1, tool_time=0.5, progress=False
    )
    t0 = time.monotonic()
    run_execute(cfg)
    rows = {x["k"]: x for x in read_jsonl(out)}
    assert rows[0]["status"] == "timeout" and "tool calls took over" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["answer"] == rec["answers"][0]
    assert time.monotonic() - t0 < 30

"""The VPD ablation: comparison statistics, each arm's data, the programs arm, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import check_summary
from vpd.evaluate import compare_arms, majority_predictions
from vpd.metrics import paired_bootstrap
from vpd.pipeline import load_recipe, run_pipeline
from vpd.programs import ProgramsConfig, delegated, run_programs
from vpd.rationalize import ANSWER_SUFFIX, RationalizeConfig, run_rationalize
from vpd.records import Execution, Question, ToolCall
from vpd.report import write_report, writer_markdown
from vpd.runpaths import RunPaths
from vpd.stages import STAGES, upstream
from vpd.store import read_records
from vpd.tune.labels import LabelsConfig, run_labels


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_of_a_constant_difference_is_that_constant() -> None:
    r = paired_bootstrap([1, 1, 0, 1], [0, 0, -1, 0], n_boot=500)
    assert r["diff"] == r["lo"] == r["hi"] == 1.0 and r["n"] == 4 and r["excludes_zero"]


def test_bootstrap_interval_by_hand() -> None:
    # Differences (1, 0): a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1.
    r = paired_bootstrap([1, 1], [0, 1], n_boot=20_000, seed=1)
    assert (r["diff"], r["lo"], r["hi"]) == (0.5, 0.0, 1.0) and not r["excludes_zero"]
    # Differences (1, 0, 0, 0): the mean is K/4, K ~ Binomial(4, 1/4); P(K = 0) = 0.32 >
    # 0.025 and P(K <= 2) = 0.949 < 0.975 <= P(K <= 3) = 0.996: interval [0, 0.75].
    r = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], n_boot=20_000, seed=2)
    assert (r["diff"], r["lo"], r["hi"]) == (0.25, 0.0, 0.75)
    # 90% interval of the same: P(K <= 2) = 0.949 >= 0.95? no -> still 0.75 at 95%, but
    # at level 0.8 the 90% quantile is K = 2 (P(K <= 1) = 0.738 < 0.9 <= 0.949).
    r = paired_bootstrap([1, 0, 0, 0], [0, 0, 0, 0], n_boot=20_000, level=0.8, seed=2)
    assert (r["lo"], r["hi"]) == (0.0, 0.5)


def test_bootstrap_is_seeded_and_checks_its_input() -> None:
    a = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    b = [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7)["diff"] == 0.4
    assert paired_bootstrap([], [])["diff"] is None
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1], [1, 0])


def test_compare_arms_pairs_questions_and_splits_by_type() -> None:
    a = {"q1": ("count", 1.0), "q2": ("count", 1.0), "q3": ("color", 0.0), "q4": ("color", 1.0)}
    b = {"q1": ("count", 0.0), "q2": ("count", 1.0), "q3": ("color", 0.0), "q9": ("color", 1.0)}
    c = compare_arms(a, b, n_boot=2000)
    assert c["all"]["n"] == 3 and c["all"]["diff"] == pytest.approx(1 / 3, abs=1e-6)
    assert c["per_type"]["count"]["n"] == 2 and c["per_type"]["count"]["diff"] == 0.5
    assert c["per_type"]["color"] == {**c["per_type"]["color"], "diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_majority_predictions_score_each_question() -> None:
    def q(i: str, t: str, a: str) -> Question:
        return Question(id=i, image="x.png", question="?", answers=[a], meta={"qtype": t})

    train = [q("t1", "count", "2"), q("t2", "count", "2"), q("t3", "count", "3")]
    test = [q("a", "count", "2"), q("b", "count", "5"), q("c", "exists", "yes")]
    got = majority_predictions(train, test)
    assert got["a"] == ("count", "2", 1.0) and got["b"] == ("count", "2", 0.0)
    assert got["c"][0] == "exists" and got["c"][2] == 0.0  # falls back to the overall "2"


# ----------------------------------------------------------------------------- arm data


def _verified(p: RunPaths, keep: dict[str, str]) -> None:
    """Kept programs for the questions of ``keep`` (qid -> answer), one traced call each."""
    rows = []
    for qid, ans in keep.items():
        call = {"name": "find", "args": {"name": "circle"}, "result": "[[0.1, 0.1, 0.2, 0.2]]"}
        rows.append(
            {
                "id": f"{qid}#0",
                "qid": qid,
                "answer": ans,
                "score": 1.0,
                "kept": True,
                "reason": "correct",
                "program": "def execute_command(image): ...",
                "trace": [call],
            }
        )
    p.verified.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_arm_trains_on_its_own_data(synth_dir: Path, tmp_path: Path) -> None:
    import shutil

    p = RunPaths(tmp_path / "run")
    shutil.copytree(synth_dir, p.data_dir)
    train = list(read_records(p.train, Question))
    keep = {q.id: q.answers[0] for q in train[:3]}
    _verified(p, keep)
    run_rationalize(
        RationalizeConfig(
            verified=p.verified, questions=p.train, out=p.sft, add_labelled=True, progress=False
        )
    )
    p.sft_labels.parent.mkdir(parents=True)
    s = run_labels(LabelsConfig(questions=p.train, out=p.sft_labels, progress=False))
    check_summary(run_labels, s)
    assert s["answer_records"] == len(train)

    labels = _lines(p.sft_labels)
    vpd = _lines(p.sft)
    # labels: one answer per training question, its human label, and no rationale at all.
    assert {r["task"] for r in labels} == {"answer"}
    assert sorted(r["id"] for r in labels) == sorted(f"{q.id}/answer" for q in train)
    by_q = {q.id: q for q in train}
    for r in labels:
        q = by_q[r["qid"]]
        assert r["messages"][0]["content"][1]["text"] == f"{q.question}\n{ANSWER_SUFFIX}"
        assert r["messages"][1]["content"][0]["text"] == q.answers[0]
    # vpd: VPD's mix, exactly: the same answers, plus a rationale per kept question.
    assert sorted(r["id"] for r in vpd) == sorted(
        [f"{q.id}/answer" for q in train] + [f"{qid}/rationale" for qid in keep]
    )
    answers = {
        r["id"]: r["messages"][1]["content"][0]["text"] for r in vpd if r["task"] == "answer"
    }
    assert answers == {r["id"]: r["messages"][1]["content"][0]["text"] for r in labels}
    # Re-running writes nothing new (the resume contract).
    assert (
        run_labels(LabelsConfig(questions=p.train, out=p.sft_labels, progress=False))[
            "answer_records"
        ]
        == 0
    )

    # VPD's objective (the question layout, the default): the labels arm tunes on the vpd
    # arm's very file, the rationale term weighed 0.
    recipe = {"data": {}, "rationalize": {"add_labelled": True}, "tune": {"epochs": 1}}
    recipe["labels"] = {}
    (vpd_tune,) = STAGES["tune"].jobs(recipe, p)
    (lab_tune,) = STAGES["labels"].jobs(recipe, p)
    vpd_job, lab_job = vpd_tune.fields, lab_tune.fields
    assert vpd_job["sft"] == lab_job["sft"] == p.sft
    assert lab_job["out"] == p.model_labels and lab_job["task_weights"] == {"rationale": 0.0}
    assert {k: v for k, v in lab_job.items() if k not in ("out", "task_weights")} == {
        k: v for k, v in vpd_job.items() if k != "out"
    }

    # The records layout: the vpd arm on rationalize's output, the labels arm on labels'.
    recipe = {
        "data": {},
        "rationalize": {"add_labelled": True},
        "tune": {"epochs": 1, "layout": "records"},
        "labels": {},
    }
    (job,) = STAGES["tune"].jobs(recipe, p)
    assert job.fields["sft"] == p.sft and job.fields["out"] == p.model
    p.model.mkdir()
    (p.model / "summary.json").write_text(json.dumps({"steps": 17}))
    made, tuned = STAGES["labels"].jobs(recipe, p)
    assert made.fields == {"questions": p.train, "out": p.sft_labels}
    assert tuned.fields["sft"] == p.sft_labels and tuned.fields["out"] == p.model_labels
    assert tuned.fields["max_steps"] == 17  # the same step budget as the vpd arm
    recipe["labels"] = {"budget": "epochs"}
    assert "max_steps" not in STAGES["labels"].jobs(recipe, p)[1].fields


def test_labels_budget_needs_the_vpd_arm(tmp_path: Path) -> None:
    from vpd.errors import VpdError

    records = {"layout": "records"}
    with pytest.raises(VpdError, match="budget"):
        STAGES["labels"].jobs({"data": {}, "tune": records, "labels": {}}, RunPaths(tmp_path))
    with pytest.raises(VpdError, match="steps or epochs"):
        STAGES["labels"].jobs({"labels": {"budget": "tokens"}}, RunPaths(tmp_path))


def test_seeds_tune_and_evaluate_each_vlm_arm_once_per_seed(tmp_path: Path) -> None:
    p = RunPaths(tmp_path)
    recipe = {"seeds": [0, 1, 2], "data": {"val_frac": 0.1}, "tune": {"epochs": 1}}
    recipe.update({"labels": {}, "eval": {}})
    made, *tunes = STAGES["tune"].jobs(recipe, p)
    assert made.runner.run is run_labels and made.fields == {"questions": p.val, "out": p.sft_val}
    assert [(j.fields["seed"], j.fields["out"]) for j in tunes] == [
        (0, p.model), (1, tmp_path / "model-seed1"), (2, tmp_path / "model-seed2")
    ]  # fmt: skip
    assert all(j.fields["val"] == p.sft_val for j in tunes)
    labels = STAGES["labels"].jobs(recipe, p)
    lab = p.model_labels
    assert [j.fields["out"] for j in labels] == [
        lab, lab.with_name("model-seed1"), lab.with_name("model-seed2")
    ]  # fmt: skip
    evals = STAGES["eval"].jobs({**recipe, "eval": {"untuned": False}}, p)
    assert [(j.fields["model"], j.fields["out"]) for j in evals] == [
        (p.model_labels / "final", p.preds("labels")),
        (p.model_labels.with_name("model-seed1") / "final", p.preds("labels", 1)),
        (p.model_labels.with_name("model-seed2") / "final", p.preds("labels", 2)),
        (p.model / "final", p.preds("vpd")),
        (tmp_path / "model-seed1" / "final", p.preds("vpd", 1)),
        (tmp_path / "model-seed2" / "final", p.preds("vpd", 2)),
    ]
    from vpd.errors import VpdError

    for bad in ([0, 0], [], ["a"], 3):
        with pytest.raises(VpdError, match="seeds"):
            STAGES["tune"].jobs({**recipe, "seeds": bad}, p)


def test_pooled_seeds_average_each_questions_score_then_resample_questions() -> None:
    from vpd.evaluate import pool_seeds

    # Two seeds of arm a, two of b, on three questions (q3 missing from a's seed 1).
    a = [{"q1": ("count", 1.0), "q2": ("count", 0.0), "q3": ("exists", 1.0)},
         {"q1": ("count", 0.0), "q2": ("count", 1.0)}]  # fmt: skip
    pooled = pool_seeds(a)
    assert pooled == {"q1": ("count", 0.5), "q2": ("count", 0.5)}  # every seed's questions
    b = pool_seeds([{"q1": ("count", 0.0), "q2": ("count", 0.0)}] * 2)
    r = compare_arms(pooled, b, n_boot=20_000, seed=0)
    # Differences (0.5, 0.5): a constant, so the interval is that constant.
    assert (r["all"]["diff"], r["all"]["lo"], r["all"]["hi"]) == (0.5, 0.5, 0.5)
    # Differences (1, 0) after pooling (seeds (1, 1) and (0, 0)): the mean of a resample
    # is 0, 0.5 or 1, so the 95% interval is [0, 1], as for one seed with those scores.
    c = pool_seeds([{"q1": ("t", 1.0), "q2": ("t", 0.0)}, {"q1": ("t", 1.0), "q2": ("t", 0.0)}])
    z = pool_seeds([{"q1": ("t", 0.0), "q2": ("t", 0.0)}] * 2)
    r = compare_arms(c, z, n_boot=20_000, seed=1)["all"]
    assert (r["diff"], r["lo"], r["hi"]) == (0.5, 0.0, 1.0)


def test_arms_rerun_only_after_what_they_read() -> None:
    chain = {"data", "sample", "execute", "verify", "rationalize", "tune", "labels", "eval"}
    # Re-tuning (or re-sampling) never re-runs the teacher, unless it is the tuned writer.
    assert upstream("programs", chain | {"programs"}) == {"data"}
    with_writer = upstream("programs", chain | {"programs", "writer"})
    assert with_writer == {"data", "writer", "verify", "execute", "sample"}
    assert {"tune", "rationalize", "sample", "data"} <= upstream("labels")
    assert {"labels", "tune", "data"} <= upstream("eval")


# ----------------------------------------------------------------------------- programs arm


def _answer_yes(messages, seed, i) -> str:  # noqa: ANN001
    text = messages[-1]["content"]
    last = [ln for ln in str(text).splitlines() if ln.strip()][-1]
    if "How many" in last:  # a program that fails: scores 0, not skipped
        return "```python\ndef execute_command(image):\n    return 1 / 0\n```"
    return "```python\ndef execute_command(image):\n    return 'yes'\n```"


def test_programs_arm_scores_one_greedy_program_per_question(synth_dir: Path, tmp_path: Path):
    test = list(read_records(synth_dir / "test.jsonl", Question))
    with FakeOpenAIServer(reply=_answer_yes) as server:
        cfg = ProgramsConfig(
            questions=synth_dir / "test.jsonl",
            out=tmp_path / "programs",
            sample={
                "shots": 0,
                "llm": {"backend": "openai", "base_urls": [server.base_url]},
                "k": 5,
            },
            execute={"backend": "synthetic", "workers": 1},
            limit=6,
            progress=False,
        )
        rep = run_programs(cfg)
        check_summary(run_programs, rep)
        calls = len(server.requests)
    first = test[:6]
    want = [1.0 if q.answers[0] == "yes" and "How many" not in q.question else 0.0 for q in first]
    assert rep["n"] == 6 and rep["accuracy"] == pytest.approx(sum(want) / 6, abs=1e-6)
    samples = _lines(tmp_path / "programs" / "samples.jsonl")
    assert len(samples) == 6 and {s["k"] for s in samples} == {0}  # k=1 whatever sample says
    assert {s["temperature"] for s in samples} == {0.0}  # greedy
    assert rep["s_per_question"] > 0 and sum(rep["statuses"].values()) == 6
    preds = _lines(tmp_path / "programs" / "preds.jsonl")
    assert [p["score"] for p in preds] == want
    # Resuming does not ask the LLM again and keeps the timing of the run that did the work.
    with FakeOpenAIServer(reply=_answer_yes) as server:
        cfg.sample["llm"]["base_urls"] = [server.base_url]
        again = run_programs(cfg)
        assert not server.requests
    assert calls > 0 and again["s_per_question"] == rep["s_per_question"]


def test_programs_arm_counts_the_answers_it_delegated_to_simple_query(
    synth_dir: Path, tmp_path: Path
) -> None:
    """Even questions get ``simple_query(<the question>)``, odd ones a program that asks
    the tool something else and composes: only the first are counted as delegated, right
    or wrong as their scores say."""
    first = list(read_records(synth_dir / "test.jsonl", Question))[:6]

    def reply(messages, seed, i) -> str:  # noqa: ANN001
        text = str(messages[-1]["content"])
        n, q = next((n, q) for n, q in enumerate(first) if q.question in text)
        body = (
            f"return ImagePatch(image).simple_query({q.question!r})"
            if n % 2 == 0
            else "return ImagePatch(image).find('shape')[0].simple_query('What color is this?')"
        )
        return f"```python\ndef execute_command(image):\n    {body}\n```"

    with FakeOpenAIServer(reply=reply) as server:
        rep = run_programs(
            ProgramsConfig(
                questions=synth_dir / "test.jsonl",
                out=tmp_path / "programs",
                sample={"shots": 0, "llm": {"backend": "openai", "base_urls": [server.base_url]}},
                execute={"backend": "synthetic", "workers": 1},
                limit=6,
                progress=False,
            )
        )
    check_summary(run_programs, rep)
    preds = _lines(tmp_path / "programs" / "preds.jsonl")
    assert rep["statuses"] == {"ok": 6}
    handed = [p for n, p in enumerate(preds) if n % 2 == 0]
    assert rep["delegated"]["n"] == 3
    assert rep["delegated"]["right"] == sum(p["score"] for p in handed)
    per: dict[str, dict[str, float]] = {}
    for p in handed:
        row = per.setdefault(p["qtype"], {"n": 0, "right": 0.0})
        row["n"] += 1
        row["right"] += p["score"]
    assert rep["delegated"]["per_type"] == per


def test_delegated_is_the_tools_reply_to_the_whole_question_returned_as_it_is() -> None:
    q = "What color is the circle left of the red square?"
    call = ToolCall(name="simple_query", args={"question": q.upper() + " "}, result='"blue"')
    other = ToolCall(name="simple_query", args={"question": "What color?"}, result='"blue"')

    def run(*trace: ToolCall, answer: str | None = "Blue.", status: str = "ok") -> Execution:
        return Execution(id="x", qid="q", status=status, answer=answer, trace=list(trace))

    assert delegated(q, run(call))  # case, spacing and a final period do not matter
    assert not delegated(q, run(other))  # a question of its own: the program composed
    assert not delegated(q, run(call, answer="red"))  # it asked, then answered otherwise
    assert not delegated(q, run(call, answer=None, status="error"))
    assert not delegated(q, run())


def test_the_writer_table_shows_each_rounds_delegated_answers() -> None:
    def row(r: int, **prog: object) -> dict:
        arm = {"accuracy": 0.5, "n": 4, "per_type": {"count": {"accuracy": 0.5, "n": 4}}}
        return {"round": r, "questions": 4, "questions_with_kept": 2, "kept_rate": 0.5,
                "programs": {**arm, **prog}}  # fmt: skip

    md = writer_markdown([row(0), row(1, delegated={"n": 3, "right": 2.0, "per_type": {}})])
    header = next(x for x in md if x.startswith("| round"))
    cells = {x.split(" | ")[0]: x.strip("| ").split(" | ") for x in md if x[:4] in ("| 0 ", "| 1 ")}
    at = header.strip("| ").split(" | ").index("delegated")
    assert cells["| 0"][at] == "-"  # scored before the count existed
    assert cells["| 1"][at] == "3 (2 right)"


# ----------------------------------------------------------------------------- report


def _fake_eval(
    p: RunPaths,
    arm: str,
    scores: dict[str, float],
    test: list[Question],
    s: float,
    seed: int | None = None,
) -> None:
    out = p.preds(arm, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    qt = {q.id: q.meta["qtype"] for q in test}
    rows = [
        {"id": qid, "qid": qid, "prediction": "x", "score": v, "qtype": qt[qid]}
        for qid, v in scores.items()
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(r["qtype"], []).append(r["score"])
    rep = {
        "accuracy": sum(scores.values()) / len(scores),
        "n": len(scores),
        "per_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in per.items()},
        "s_per_question": s,
    }
    Path(str(out) + ".report.json").write_text(json.dumps(rep))


def test_report_holds_every_arm_the_intervals_and_the_speeds(synth_dir: Path, tmp_path: Path):
    import shutil

    p = RunPaths(tmp_path / "run")
    shutil.copytree(synth_dir, p.data_dir)
    test = list(read_records(p.test, Question))
    ids = [q.id for q in test]
    _fake_eval(p, "untuned", dict.fromkeys(ids, 0.0), test, 0.5)
    _fake_eval(p, "labels", {q: float(i % 2) for i, q in enumerate(ids)}, test, 0.5)
    _fake_eval(p, "vpd", dict.fromkeys(ids, 1.0), test, 0.4)
    p.programs.mkdir()
    shutil.copy(p.preds("labels"), p.programs / "preds.jsonl")
    rep = json.loads(Path(str(p.preds("labels")) + ".report.json").read_text())
    (p.programs / "report.json").write_text(json.dumps({**rep, "s_per_question": 6.0}))

    write_report(p.root)
    r = json.loads((p.root / "report.json").read_text())
    assert list(r["accuracy"]) == ["untuned", "labels", "vpd", "programs", "majority"]
    for arm in r["accuracy"].values():
        assert {"accuracy", "n", "per_type", "s_per_question"} <= set(arm)
    assert r["accuracy"]["vpd"]["accuracy"] == 1.0
    maj = majority_predictions(list(read_records(p.train, Question)), test)
    want = sum(s for _, _, s in maj.values()) / len(maj)
    assert r["accuracy"]["majority"]["accuracy"] == pytest.approx(want, abs=1e-6)
    c = r["comparisons"]
    assert {"vpd - labels", "vpd - majority", "labels - majority", "vpd - programs"} == set(c)
    assert c["vpd - majority"]["all"]["diff"] == pytest.approx(1 - want, abs=1e-6)
    assert c["vpd - labels"]["all"]["n"] == len(ids)
    assert set(c["vpd - labels"]["per_type"]) == {q.meta["qtype"] for q in test}
    assert r["speed"]["programs_over_vpd"] == 15.0
    md = (p.root / "report.md").read_text()
    assert "## VPD against its ablations" in md and "| vpd - labels | **all** |" in md
    assert "15.0x" in md
    assert (p.root / "accuracy.png").stat().st_size > 1000
    for arm in ("labels", "vpd", "majority"):  # each bar's 95% interval
        lo, hi = r["accuracy"][arm]["interval"]
        assert lo <= r["accuracy"][arm]["accuracy"] <= hi


def test_report_pools_the_seeds_of_each_tuned_arm(synth_dir: Path, tmp_path: Path) -> None:
    import shutil

    p = RunPaths(tmp_path / "run")
    shutil.copytree(synth_dir, p.data_dir)
    (p.root / "recipe.yaml").write_text(yaml.safe_dump({"seeds": [0, 1], "data": {}}))
    test = list(read_records(p.test, Question))
    ids = [q.id for q in test]
    n = len(ids)
    # vpd: seed 0 right on every question, seed 1 on the first half; labels: none right.
    _fake_eval(p, "vpd", dict.fromkeys(ids, 1.0), test, 0.4)
    _fake_eval(p, "vpd", {q: float(i < n // 2) for i, q in enumerate(ids)}, test, 0.4, seed=1)
    for seed in (None, 1):
        _fake_eval(p, "labels", dict.fromkeys(ids, 0.0), test, 0.4, seed=seed)
    write_report(p.root)
    r = json.loads((p.root / "report.json").read_text())
    vpd = r["accuracy"]["vpd"]
    want = (1.0 + (n // 2) / n) / 2
    assert vpd["accuracy"] == pytest.approx(want, abs=1e-6)
    assert [s["seed"] for s in vpd["seeds"]] == [0, 1]
    assert vpd["seeds"][1]["accuracy"] == pytest.approx((n // 2) / n, abs=1e-6)
    c = r["comparisons"]["vpd - labels"]
    assert c["pooled"]["all"]["diff"] == c["all"]["diff"] == pytest.approx(want, abs=1e-6)
    assert c["pooled"]["seeds"] == [0, 1]
    assert c["seeds"]["0"]["diff"] == 1.0 and c["seeds"]["0"]["lo"] == 1.0
    assert c["seeds"]["1"]["diff"] == pytest.approx((n // 2) / n, abs=1e-6)
    md = (p.root / "report.md").read_text()
    assert "seeds pooled" in md and "all, seed 1" in md and "seed 0 100.0%" in md


def test_shipped_ablation_recipes_run_every_arm() -> None:
    root = Path(__file__).parents[1] / "recipes"
    full = load_recipe(root / "ablation-cpu.yaml")
    assert {"labels", "eval", "programs"} <= set(full)
    demo = load_recipe(root / "demo-cpu.yaml")
    assert "programs" in demo and "eval" in demo
    # The same data (so the same test split) as the demo: inherited, never restated.
    assert "data" not in yaml.safe_load((root / "ablation-cpu.yaml").read_text())
    assert full["data"] == demo["data"] and full["sample"] == demo["sample"]


def test_run_pipeline_rejects_an_unknown_budget(tmp_path: Path) -> None:
    from vpd.errors import VpdError

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"data": {"n": 10, "progress": False}, "labels": {"budget": 3}}))
    with pytest.raises(VpdError, match="budget"):
        run_pipeline(r, tmp_path / "run", report=False)

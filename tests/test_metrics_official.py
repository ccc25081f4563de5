"""`vpd verify --metric auto` scores each benchmark exactly as the field runs its official
script: the prediction post-processed as the field's standard scripts do, then the script.

Each ``official_*`` function below re-states the scoring logic of the benchmark's own
evaluation script (cited), run on the ORIGINAL fixture files with the planted predictions
in the script's own input form; each ``post_*`` function re-states the post-processing
(cited). The same predictions go through `vpd data import` -> executions -> `vpd verify`,
and every sample's score, and the average over the questions the script averages over,
must equal the script's on the post-processed predictions (``--metric auto``) and on the
raw ones (``--metric <name>_strict``).

Scripts: VQA v2 / OK-VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(GT-Vision-Lab/VQA); GQA ``eval.py`` (gqadataset.org); A-OKVQA
``evaluation/eval_predictions.py`` (allenai/aokvqa); TallyQA ``utils.accuracy``
(manoja328/tallyqacode); POPE ``evaluate.py`` (RUCAIBox/POPE); NLVR2 ``nlvr2/eval/metrics.py``
(lil-lab/nlvr). Post-processing: GQA ``scripts/convert_gqa_for_eval.py`` and
``llava/eval/model_vqa.py`` (haotian-liu/LLaVA); VQA v2 ``lmms_eval/tasks/vqav2/utils.py``
(EvolvingLMMs-Lab/lmms-eval).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import read_jsonl
from vpd.cli import app
from vpd.data.importer import ImportConfig, run_import
from vpd.metrics import (
    aokvqa_mc,
    count_match,
    in_official_accuracy,
    nlvr2_consistency,
    nlvr2_match,
    pope_answer,
    pope_summary,
    resolve_metric,
    score_answer,
    vqa_accuracy,
)
from vpd.records import Execution, Question, Sample
from vpd.verify import VerifyConfig, run_verify

FIX = Path(__file__).parent / "fixtures" / "official"

# ----------------------------------------------------------------------------- the scripts

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]  # fmt: skip
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(\,)(\d)")
_MANUAL = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                   ["0", *map(str, range(11))], strict=True))  # fmt: skip
_CONTRACT = {"dont": "don't", "isnt": "isn't", "whats": "what's"}  # the ones the cases use


def _punct(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The script passes re.UNICODE positionally, i.e. as the count.
    return _PERIOD.sub("", out, count=int(re.UNICODE))


def _digit_article(text: str) -> str:
    words = [_MANUAL.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ("a", "an", "the")]
    return " ".join(_CONTRACT.get(w, w) for w in words)


def official_vqa(gt_answers: list[dict], res_ans: str) -> float:
    """vqaEval.py, one question: answers are the annotation's answer dicts."""
    gts = [dict(a) for a in gt_answers]
    for a in gts:
        a["answer"] = a["answer"].replace("\n", " ").replace("\t", " ").strip()
    res = res_ans.replace("\n", " ").replace("\t", " ").strip()
    if len({a["answer"] for a in gts}) > 1:
        for a in gts:
            a["answer"] = _digit_article(_punct(a["answer"]))
        res = _digit_article(_punct(res))
    accs = []
    for gt in gts:
        others = [item for item in gts if item != gt]
        matching = [item for item in others if item["answer"] == res]
        accs.append(min(1, float(len(matching)) / 3))
    return float(sum(accs)) / len(accs)


def post_vqa(text: str) -> str:
    """lmms-eval's vqav2_process_results: whitespace, then vqaEval's two normalization
    steps, on every answer and the prediction whether or not the answers agree."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digit_article(_punct(text))


def lmms_vqa(gt_answers: list[dict], res_ans: str) -> float:
    """vqaEval.py's leave-one-out score on both sides post-processed (lmms-eval)."""
    gts = [{**a, "answer": post_vqa(a["answer"])} for a in gt_answers]
    res = post_vqa(res_ans)
    accs = []
    for gt in gts:
        others = [item for item in gts if item != gt]
        accs.append(min(1, float(len([i for i in others if i["answer"] == res])) / 3))
    return float(sum(accs)) / len(accs)


def post_gqa(text: str) -> str:
    """LLaVA: model_vqa.py writes ``outputs.strip()``; convert_gqa_for_eval.py hands
    eval.py ``res['text'].rstrip('.').lower()``."""
    return text.strip().rstrip(".").lower()


def official_gqa(questions: dict, predictions: dict) -> tuple[dict, float]:
    """GQA eval.py: per-question correctness and accuracy over balanced questions."""
    per = {qid: float(predictions[qid] == q["answer"]) for qid, q in questions.items()}
    bal = [per[qid] for qid, q in questions.items() if q["isBalanced"]]
    return per, sum(bal) / len(bal)


def official_aokvqa(dataset: list, preds: dict, multiple_choice: bool) -> tuple[dict, float]:
    """eval_predictions.eval_aokvqa(strict=False): per question and the average."""
    data = {d["question_id"]: d for d in dataset}
    if not multiple_choice:
        data = {k: v for k, v in data.items() if v["difficult_direct_answer"] is False}
    per = {}
    for q, d in data.items():
        pred = preds[q]
        if multiple_choice:
            per[q] = float(pred == d["choices"][d["correct_choice_idx"]])
        else:
            per[q] = min(1.0, sum(pred == da for da in d["direct_answers"]) / 3.0)
    return per, sum(per.values()) / len(per)


def official_tallyqa(gt: list[int], pred: list[str]) -> list[float]:
    """utils.accuracy on integer arrays: elementwise gt == int(prediction)."""
    return [float(g == int(p)) for g, p in zip(gt, pred, strict=True)]


def official_pope(answers: list[str], labels: list[str]) -> dict:
    """POPE evaluate.py: reading of each answer, then the confusion counts and scores."""
    preds = []
    for text in answers:
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    gold = [0 if x == "no" else 1 for x in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold, strict=True))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "per": [float(p == g) for p, g in zip(preds, gold, strict=True)],
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "yes_ratio": preds.count(1) / len(preds),
    }


def official_nlvr2(csv_text: str, labelled: list[dict]) -> tuple[dict, float, float]:
    """nlvr2/eval/metrics.py: CSV "identifier,prediction" lines against the JSON lines."""
    predictions = {}
    for line in csv_text.splitlines():
        if line:
            splits = line.strip().split(",")
            predictions[splits[0]] = splits[1]
    per, consistent = {}, {}
    for ex in labelled:
        anon = ex["identifier"].split("-")
        anon[2] = ""
        anon = "-".join(anon)
        consistent.setdefault(anon, True)
        ok = predictions[ex["identifier"]].lower() == ex["label"].lower()
        per[ex["identifier"]] = float(ok)
        if not ok:
            consistent[anon] = False
    return per, sum(per.values()) / len(per), sum(consistent.values()) / len(consistent)


# ----------------------------------------------------------------------------- plumbing


def _images(root: Path, *names: str) -> Path:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6)).save(p, "PNG" if p.suffix == ".png" else "JPEG")
    return root


def _import(tmp: Path, fmt: str, src: Path, images: tuple[str, ...], **kw: object) -> Path:
    root = _images(tmp / "images", *images)
    out = tmp / "questions.jsonl"
    run_import(ImportConfig(input=src, out=out, fmt=fmt, image_root=root, progress=False, **kw))
    return out


def _verify(
    tmp: Path, questions: Path, planted: dict[str, list[str]], metric: str = "auto"
) -> dict[str, dict]:
    """Plant answers as executions of k programs per question; verify with ``metric``."""
    samples, execs = tmp / "samples.jsonl", tmp / "executions.jsonl"
    with open(samples, "w") as fs, open(execs, "w") as fe:
        for qid, answers in planted.items():
            for k, ans in enumerate(answers):
                sid = f"{qid}#{k}"
                fs.write(Sample(id=sid, qid=qid, k=k, program="...").model_dump_json() + "\n")
                ex = Execution(id=sid, qid=qid, status="ok", answer=ans)
                fe.write(ex.model_dump_json() + "\n")
    out = tmp / f"verified.{metric}.jsonl"
    cfg = VerifyConfig(
        executions=execs,
        samples=samples,
        questions=questions,
        out=out,
        metric=metric,  # type: ignore[arg-type]
        progress=False,
    )
    run_verify(cfg)
    return {r["id"]: r for r in read_jsonl(out)}


def _questions(path: Path) -> dict[str, Question]:
    return {q.id: q for q in read_jsonl(path, Question)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- per format


VQA_PLANTED = {
    # 7 of 10 "down" and three others: answers disagree, so both sides are normalized.
    "262148000": ["down", "Down.", "table", "at the table", "skateboards", "DOWN!"],
    "262148001": ["watching", "spectating", "Watching!", "spectate"],
    "262148002": ["picnic table", "table", "skateboard", "picnic-table", "a table"],
    # All ten say "no": vqaEval.py compares the raw prediction (no normalization at all).
    "393225000": ["no", "No", "no.", " no\n", "yes"],
    "393225001": ["2", "two", "3", "Two.", "1", "2.0"],
    "393225002": ["white", "White", "the white", "white\t"],
}


def test_vqav2_auto_matches_vqaeval(tmp_path: Path) -> None:
    qfile = _import(
        tmp_path,
        "vqav2",
        FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
        ("COCO_val2014_000000262148.jpg", "COCO_val2014_000000393225.jpg"),
        annotations=FIX / "vqav2" / "v2_mscoco_val2014_annotations.json",
    )
    anns = json.loads((FIX / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())
    gts = {str(a["question_id"]): a["answers"] for a in anns["annotations"]}
    got = _verify(tmp_path, qfile, VQA_PLANTED)
    strict = _verify(tmp_path, qfile, VQA_PLANTED, "vqa_strict")
    for qid, preds in VQA_PLANTED.items():
        for k, pred in enumerate(preds):
            rec, raw = got[f"{qid}#{k}"], strict[f"{qid}#{k}"]
            assert (rec["metric"], raw["metric"]) == ("vqa", "vqa_strict")
            assert rec["score"] == pytest.approx(lmms_vqa(gts[qid], pred), abs=1e-12), pred
            assert raw["score"] == pytest.approx(official_vqa(gts[qid], pred), abs=1e-12), pred
    # The case that tells the two apart: ten agreeing answers.
    assert got["393225000#1"]["score"] == 1.0  # "No" post-processed to "no"
    assert strict["393225000#1"]["score"] == 0.0  # vqaEval.py: raw "No" != "no"
    assert got["393225001#1"]["score"] == 1.0  # "two" -> "2" when answers disagree
    assert got["262148000#2"]["score"] == pytest.approx(0.3)  # one annotator of ten
    # The same predictions' overall accuracy (first sample of each question).
    ours = _mean([got[f"{q}#0"]["score"] for q in VQA_PLANTED])
    theirs = _mean([lmms_vqa(gts[q], p[0]) for q, p in VQA_PLANTED.items()])
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_okvqa_auto_is_the_vqa_script(tmp_path: Path) -> None:
    qfile = _import(
        tmp_path,
        "okvqa",
        FIX / "okvqa" / "OpenEnded_mscoco_val2014_questions.json",
        ("COCO_val2014_000000297147.jpg",),
        annotations=FIX / "okvqa" / "mscoco_val2014_annotations.json",
    )
    anns = json.loads((FIX / "okvqa" / "mscoco_val2014_annotations.json").read_text())
    gts = {str(a["question_id"]): a["answers"] for a in anns["annotations"]}
    planted = {"2971475": ["racing", "race", "Motocross", "bmx"], "2971476": ["fern", "palm"]}
    got = _verify(tmp_path, qfile, planted)
    strict = _verify(tmp_path, qfile, planted, "vqa_strict")
    for qid, preds in planted.items():
        for k, pred in enumerate(preds):
            assert got[f"{qid}#{k}"]["score"] == pytest.approx(lmms_vqa(gts[qid], pred))
            assert strict[f"{qid}#{k}"]["score"] == pytest.approx(official_vqa(gts[qid], pred))


def test_gqa_auto_matches_eval_py(tmp_path: Path) -> None:
    src = FIX / "gqa" / "testdev_balanced_questions.json"
    qfile = _import(tmp_path, "gqa", src, ("n161313.jpg", "n15740.jpg"))
    planted = {
        "201307251": ["no", "No.", "no.", " no", "No"],
        "201640614": ["bus", "a bus", "Bus", "buses", "BUS.."],
        "201307252": ["no", "yes", "No!", "no", "nope"],  # not balanced: outside the accuracy
        "05451384": ["yes", "yes ", "Yes.", "yes,", "YES"],
    }
    got = _verify(tmp_path, qfile, planted)
    strict = _verify(tmp_path, qfile, planted, "gqa_strict")
    raw = json.loads(src.read_text())  # the first entry of the duplicated key is imported
    raw["201640614"] = {**raw["201640614"], "answer": "bus", "isBalanced": True}
    questions = {qid: raw[qid] for qid in planted}
    qs = _questions(qfile)
    for k in range(5):
        preds = {qid: p[k] for qid, p in planted.items()}
        for recs, name, post in ((got, "gqa", post_gqa), (strict, "gqa_strict", str)):
            per, acc = official_gqa(questions, {q: post(p) for q, p in preds.items()})
            for qid in planted:
                assert recs[f"{qid}#{k}"]["metric"] == name
                assert recs[f"{qid}#{k}"]["score"] == per[qid], (name, preds[qid])
            counted = [
                recs[f"{qid}#{k}"]["score"]
                for qid in planted
                if in_official_accuracy(qs[qid], name)
            ]
            assert _mean(counted) == pytest.approx(acc)
    # A GQA program answering "No." for the gold "no": kept under gqa, lost under strict.
    assert (got["201307251#1"]["score"], got["201307251#1"]["kept"]) == (1.0, True)
    assert (strict["201307251#1"]["score"], strict["201307251#1"]["kept"]) == (0.0, False)
    assert not in_official_accuracy(qs["201307252"], "gqa")
    assert not in_official_accuracy(qs["201307252"], "gqa_strict")


def test_aokvqa_auto_direct_answer_and_multiple_choice(tmp_path: Path) -> None:
    src = FIX / "aokvqa" / "aokvqa_v1p0_val.json"
    dataset = [d for d in json.loads(src.read_text()) if "choices" in d][:3]
    imgs = ("val2017/000000461751.jpg", "val2017/000000000040.jpg")
    da_planted = {
        "22jbM6gDxdaMaunuzgrsBB": ["cigarette", "cigar", "Cigarette", "cigarettes", "A cigar."],
        "2e6P6CeHSQ3wVYgjmqAN7v": ["30", "thirty", "30th", "Thirty", "30."],
        "2t3CvbUhhHs9GzSFnYqGUw": ["sun", "shade", "hat", "sun protection", "Shade"],  # difficult
    }
    qfile = _import(tmp_path / "da", "aokvqa", src, imgs)
    got = _verify(tmp_path / "da", qfile, da_planted)
    strict = _verify(tmp_path / "da", qfile, da_planted, "aokvqa_da_strict")
    qs = _questions(qfile)
    # aokvqa_da: the script on both sides under the VQA normalization.
    normalized = [
        {**d, "direct_answers": [post_vqa(a) for a in d["direct_answers"]]} for d in dataset
    ]
    for k in range(5):
        preds = {q: p[k] for q, p in da_planted.items()}
        for recs, name, data, post in (
            (got, "aokvqa_da", normalized, post_vqa),
            (strict, "aokvqa_da_strict", dataset, str),
        ):
            per, acc = official_aokvqa(data, {q: post(p) for q, p in preds.items()}, False)
            assert set(per) == {q for q in da_planted if in_official_accuracy(qs[q], name)}
            for qid in per:
                assert recs[f"{qid}#{k}"]["metric"] == name
                assert recs[f"{qid}#{k}"]["score"] == per[qid], (name, preds[qid])
            assert _mean([recs[f"{q}#{k}"]["score"] for q in per]) == pytest.approx(acc)
    assert got["22jbM6gDxdaMaunuzgrsBB#1"]["score"] == 1 / 3
    assert got["22jbM6gDxdaMaunuzgrsBB#4"]["score"] == 1 / 3  # "A cigar." -> "cigar"
    assert strict["22jbM6gDxdaMaunuzgrsBB#4"]["score"] == 0.0
    assert (
        got["22jbM6gDxdaMaunuzgrsBB#2"]["score"],
        strict["22jbM6gDxdaMaunuzgrsBB#2"]["score"],
    ) == (1.0, 0.0)

    mc_planted = {
        "22jbM6gDxdaMaunuzgrsBB": ["cigarette", "toothpick", "Cigarette", "D"],
        "2e6P6CeHSQ3wVYgjmqAN7v": ["thirty", "ten", "Thirty.", "B"],
        "2t3CvbUhhHs9GzSFnYqGUw": ["sun", "rain", "sun ", "A"],
    }
    qfile = _import(tmp_path / "mc", "aokvqa", src, imgs, setting="mc")
    got = _verify(tmp_path / "mc", qfile, mc_planted)
    strict = _verify(tmp_path / "mc", qfile, mc_planted, "aokvqa_mc_strict")
    # aokvqa_mc: the script on both sides as GQA's post-processing leaves them.
    short = [{**d, "choices": [post_gqa(c) for c in d["choices"]]} for d in dataset]
    for k in range(3):  # choice strings, as the script takes them
        preds = {q: p[k] for q, p in mc_planted.items()}
        for recs, name, data, post in (
            (got, "aokvqa_mc", short, post_gqa),
            (strict, "aokvqa_mc_strict", dataset, str),
        ):
            per, acc = official_aokvqa(data, {q: post(p) for q, p in preds.items()}, True)
            for qid in per:
                assert recs[f"{qid}#{k}"]["metric"] == name
                assert recs[f"{qid}#{k}"]["score"] == per[qid], (name, preds[qid])
            assert _mean([recs[f"{q}#{k}"]["score"] for q in per]) == pytest.approx(acc)
    assert [got[f"{q}#2"]["score"] for q in mc_planted] == [1.0, 1.0, 1.0]
    assert [strict[f"{q}#2"]["score"] for q in mc_planted] == [0.0, 0.0, 0.0]
    # A bare option letter (the imported question lists "A. ..."): read as that choice.
    assert [got[f"{q}#3"]["score"] for q in mc_planted] == [1.0, 0.0, 1.0]
    assert [strict[f"{q}#3"]["score"] for q in mc_planted] == [1.0, 0.0, 1.0]


def test_aokvqa_two_thirds_is_written_unrounded(tmp_path: Path) -> None:
    """Two of the ten direct answers say "shade": 2/3, in the verified record as the float
    2/3 itself (0.666...), not 0.6667."""
    src = FIX / "aokvqa" / "aokvqa_v1p0_val.json"
    imgs = ("val2017/000000461751.jpg", "val2017/000000000040.jpg")
    qfile = _import(tmp_path, "aokvqa", src, imgs)
    for metric in ("aokvqa_da", "aokvqa_da_strict"):
        got = _verify(tmp_path, qfile, {"2t3CvbUhhHs9GzSFnYqGUw": ["shade"]}, metric)
        line = (tmp_path / f"verified.{metric}.jsonl").read_text()
        assert got["2t3CvbUhhHs9GzSFnYqGUw#0"]["score"] == 2 / 3
        assert '"score":0.6666666666666666' in line.replace(" ", "")


def test_tallyqa_auto_matches_accuracy(tmp_path: Path) -> None:
    src = FIX / "tallyqa" / "test.json"
    imgs = ("VG_100K_2/2410408.jpg", "val2014/COCO_val2014_000000000042.jpg", "VG_100K/10.jpg")
    qfile = _import(tmp_path, "tallyqa", src, imgs)
    raw = {str(d["question_id"]): d for d in json.loads(src.read_text())[:3]}
    planted = {"30095774": ["4", "3", "04", "5"], "900001": ["2", "1", "02", "20"],
               "900002": ["0", "1", "00", "10"]}  # fmt: skip
    got = _verify(tmp_path, qfile, planted)
    for k in range(4):
        theirs = official_tallyqa(
            [raw[q]["answer"] for q in planted], [p[k] for p in planted.values()]
        )
        ours = [got[f"{q}#{k}"]["score"] for q in planted]
        assert ours == theirs
        assert {got[f"{q}#{k}"]["metric"] for q in planted} == {"count"}
    # Free text from a program or VLM is read as a number first.
    q = _questions(qfile)["30095774"]
    assert score_answer("four", q, "auto") == 1.0 and score_answer("4 lights", q) == 0.0


POPE_ANSWERS = [
    "Yes, there is a snowboard in the image.",
    "No",
    "There is no car.",  # -> no
    "NO",  # -> yes: the script only looks for "No", "no" and "not"
    "Not that I can see",  # -> yes: "Not" is none of them
    "I do not see one",  # -> no
]


def test_pope_auto_matches_evaluate_py(tmp_path: Path) -> None:
    src = FIX / "pope" / "coco_pope_adversarial.json"
    imgs = ("COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg")
    qfile = _import(tmp_path, "pope", src, imgs)
    labels = [_questions(qfile)[str(i)].answers[0] for i in range(1, 7)]
    # Two prediction files: the list above, and it rotated by one.
    runs = [POPE_ANSWERS, POPE_ANSWERS[1:] + POPE_ANSWERS[:1]]
    planted = {str(i + 1): [r[i] for r in runs] for i in range(6)}
    got = _verify(tmp_path, qfile, planted)
    for k, answers in enumerate(runs):
        ref = official_pope(answers, labels)
        assert [got[f"{i}#{k}"]["score"] for i in range(1, 7)] == ref["per"]
        assert {got[f"{i}#{k}"]["metric"] for i in range(1, 7)} == {"pope"}
        ours = pope_summary(answers, labels)
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert ours[key] == pytest.approx(ref[key]), key
    assert [pope_answer(a) for a in POPE_ANSWERS] == ["yes", "no", "no", "yes", "yes", "no"]
    assert pope_answer("No\n") == "yes"  # split on " " only, as the script does


def test_nlvr2_auto_matches_metrics_py(tmp_path: Path) -> None:
    src = FIX / "nlvr2" / "dev.json"
    imgs = tuple(f"dev/dev-850-{p}-img{i}.png" for p in (0, 2) for i in (0, 1))
    qfile = _import(tmp_path, "nlvr2", src, imgs)
    labelled = [json.loads(x) for x in src.read_text().splitlines()][:4]
    runs = [
        ["False", "True", "True", "False"],  # all right
        ["false", "TRUE", "False", "False"],  # case does not matter; one wrong
        ["True", "False", "true", "false"],
        ["False.", "True.", "True", "false."],  # a sentence's period: right only post-processed
    ]
    planted = {ex["identifier"]: [r[i] for r in runs] for i, ex in enumerate(labelled)}
    got = _verify(tmp_path, qfile, planted)
    strict = _verify(tmp_path, qfile, planted, "nlvr2_strict")
    for k, preds in enumerate(runs):
        for recs, name, post in ((got, "nlvr2", post_gqa), (strict, "nlvr2_strict", str)):
            csv_text = "\n".join(
                f"{ex['identifier']},{post(p)}" for ex, p in zip(labelled, preds, strict=True)
            )
            per, acc, consistency = official_nlvr2(csv_text, labelled)
            ours = {i: recs[f"{i}#{k}"]["score"] for i in per}
            assert ours == per, (name, preds)
            assert {recs[f"{i}#{k}"]["metric"] for i in per} == {name}
            assert nlvr2_consistency({i: s == 1.0 for i, s in ours.items()}) == pytest.approx(
                consistency
            )
            assert _mean(list(ours.values())) == pytest.approx(acc)
    assert [got[f"{ex['identifier']}#3"]["score"] for ex in labelled] == [1.0] * 4
    assert [strict[f"{ex['identifier']}#3"]["score"] for ex in labelled] == [0.0, 0.0, 1.0, 0.0]
    # Programs answer the posed question with yes/no: the same as True/False.
    q = _questions(qfile)["dev-850-2-0"]
    assert [nlvr2_match(p, q.answers) for p in ("yes", "Yes", "true", "no", "y", "Yes.")] == [
        1.0, 1.0, 1.0, 0.0, 0.0, 1.0
    ]  # fmt: skip
    assert nlvr2_match("Yes.", q.answers, strict=True) == 0.0


def test_verify_cli_metric_auto(tmp_path: Path) -> None:
    src = FIX / "gqa" / "testdev_balanced_questions.json"
    qfile = _import(tmp_path, "gqa", src, ("n161313.jpg", "n15740.jpg"))
    _verify(tmp_path, qfile, {"201307251": ["no", "No"]})  # writes samples/executions
    out = tmp_path / "cli.jsonl"
    res = CliRunner().invoke(
        app,
        ["verify", str(tmp_path / "executions.jsonl"), "--samples", str(tmp_path / "samples.jsonl"),
         "--questions", str(qfile), "--out", str(out), "--metric", "auto", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["metric"], r["score"], r["kept"]) for r in recs] == [
        ("gqa", 1.0, True),
        ("gqa", 1.0, True),  # "No": lower-cased as LLaVA's convert_gqa_for_eval.py does
    ]
    strict = tmp_path / "cli.strict.jsonl"
    res = CliRunner().invoke(
        app,
        ["verify", str(tmp_path / "executions.jsonl"), "--samples", str(tmp_path / "samples.jsonl"),
         "--questions", str(qfile), "--out", str(strict), "--metric", "gqa_strict",
         "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in strict.read_text().splitlines()]
    assert [(r["metric"], r["score"], r["kept"]) for r in recs] == [
        ("gqa_strict", 1.0, True),
        ("gqa_strict", 0.0, False),
    ]
    assert "gqa" in CliRunner().invoke(app, ["verify", "--help"]).output


# ----------------------------------------------------------------------------- unit cases


@pytest.mark.parametrize(
    ("answers", "pred"),
    [
        (["yes"] * 10, "Yes"),
        (["yes"] * 10, "yes\n"),
        (["2"] * 3 + ["3"] * 7, "two"),
        (["dont"] * 4 + ["do not"] * 6, "dont"),
        (["1000"] * 5 + ["1,000"] * 5, "1,000"),
        (["red white"] * 4 + ["red"] * 6, "red-white"),
        (["red white"] * 4 + ["red"] * 6, "red - white"),
        (["3.5"] * 4 + ["3"] * 6, "3.5"),
        (["none"] * 4 + ["0"] * 6, "zero"),
        (["a" + "." * 40] * 3 + ["b"] * 7, "a" + "." * 40),
        (["whats up"] * 5 + ["x"] * 5, "what's up"),
    ],
)
def test_vqa_normalization_cases(answers: list[str], pred: str) -> None:
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    assert vqa_accuracy(pred, answers) == pytest.approx(lmms_vqa(gts, pred))
    assert vqa_accuracy(pred, answers, strict=True) == pytest.approx(official_vqa(gts, pred))


def test_more_than_32_periods_keeps_the_rest() -> None:
    # vqaEval's periodStrip.sub(..., re.UNICODE) strips at most 32 periods.
    text = "." * 40
    assert _punct(text) == "." * 8


def test_auto_picks_the_official_metric() -> None:
    def q(dataset: str, **meta: object) -> Question:
        return Question(id="1", image="x", question="?", answers=["a"], dataset=dataset, meta=meta)

    assert [
        resolve_metric(q(d))
        for d in ("vqav2", "okvqa", "gqa", "aokvqa", "tallyqa", "pope", "nlvr2", "VQA-v2")
    ] == ["vqa", "vqa", "gqa", "aokvqa_da", "count", "pope", "nlvr2", "vqa"]
    assert resolve_metric(q("aokvqa", setting="mc", choices=["a", "b"])) == "aokvqa_mc"
    assert resolve_metric(q("aokvqa", choices=["a", "b"])) == "aokvqa_da"
    assert resolve_metric(q("mine", choices=["a", "b"])) == "mc"  # generic data: lenient


def test_aokvqa_mc_letters_and_bad_index() -> None:
    choices = ["A", "b", "c", "d"]
    assert aokvqa_mc("A", choices, 0) == 1.0  # a choice that is a letter stays a choice
    assert aokvqa_mc("B", choices, 1) == 1.0 and aokvqa_mc("(c)", choices, 2) == 1.0
    assert aokvqa_mc("b", choices, 7) == 0.0 and aokvqa_mc("b", choices, None) == 0.0
    assert count_match("four", ["4"]) == 1.0

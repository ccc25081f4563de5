"""The official files of the benchmarks VPD and SDVP report on, read as released.

One source class per layout; ``vpd.data.importer.run_import`` drives them (rejects,
resume, progress) exactly as it drives the generic JSONL/CSV/HF importer. For every
format the official question id is the record id, ``dataset`` is the format's name,
``image`` is the image path relative to the output file's folder, and what the format
carries that a user may slice by goes to ``meta`` (``meta.qtype`` is the breakdown the
official script reports, where it has one). A file without answers (a test split)
imports with empty ``answers``; a labelled file's row that lacks its answer is rejected.
Images are looked up under ``image_root`` (default: the input file's folder), also in the
split's sub-folder (``val2014/``, ``val2017/``, ``dev/``...), so the root of a COCO or
NLVR2 download works for every split; an image found nowhere rejects the row.

- ``gqa``: ``{split}_balanced_questions.json`` / ``{split}_all_questions.json``, a dict
  question id -> {question, imageId, answer, fullAnswer, isBalanced, types, groups, ...};
  a folder of chunk files (``train_all_questions/``) is read whole. Images
  ``<imageId>.jpg``. meta: imageId, isBalanced, types, groups, fullAnswer, semanticStr,
  entailed, equivalent, qtype = types.structural.
- ``vqav2`` / ``okvqa``: the questions file (``{"data_subtype", "questions": [{question_id,
  image_id, question}]}``) plus, for labelled splits, ``annotations`` (``{"annotations":
  [{question_id, image_id, answers: [{answer, answer_id, ...}], question_type,
  answer_type, multiple_choice_answer}]}``): all human answers in file order. Images
  ``COCO_<data_subtype>_<image_id:012>.jpg`` (test-dev uses the test2015 images). meta:
  image_id, question_type, answer_type, multiple_choice_answer, qtype = answer_type.
- ``aokvqa``: ``aokvqa_v1p0_{split}.json``, a list of {question_id, image_id, question,
  choices, correct_choice_idx, direct_answers, difficult_direct_answer, rationales}.
  Images ``<image_id:012>.jpg`` (COCO 2017). ``setting`` da (default): answers are the 10
  direct answers; mc: the question lists the choices as "A. ...", answers hold the
  correct choice, ``meta.setting = "mc"`` (the metric follows it). meta: image_id,
  choices, correct_choice_idx, direct_answers, difficult_direct_answer, rationales.
- ``tallyqa``: ``train.json`` / ``test.json``, a list of {question_id, image, image_id,
  question, answer (int), issimple, data_source}; ``image`` is relative to the image root.
  meta: image_id, issimple, data_source, qtype simple/complex.
- ``pope``: JSON lines {question_id, image, text, label (yes/no)}; meta.setting random /
  popular / adversarial from the file name, qtype = ``category`` where the file has one.
- ``nlvr2``: JSON lines {identifier, sentence, label (True/False), left_url, right_url,
  writer, synset, query, directory (train)}. The statement is posed as a yes/no question
  (answers "yes"/"no"); the images are ``<identifier without its last -N>-img0.png`` (left,
  the record's ``image``) and ``-img1.png`` (right); ``meta.images`` holds both.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpd.data.rows import Row, count_lines, jsonable, jsonl_rows, list_rows, load_json
from vpd.errors import VpdError

FORMATS: tuple[str, ...] = ("gqa", "vqav2", "okvqa", "aokvqa", "tallyqa", "pope", "nlvr2")
NLVR2_QUESTION = "Is this statement about the left and right images true? {sentence}"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

Candidates = list[Path]  # where one image may be, in order of preference


class OfficialSource(ABC):
    """Rows of one official file and how each becomes a question (see module docstring).

    ``prepare(row)`` -> ``(id, [candidates per image], fields)`` or ``ValueError`` (a
    reject with the message as reason); ``images(refs)`` -> output-relative paths, or
    ``ValueError`` when an image exists nowhere.
    """

    name = ""

    def __init__(
        self,
        path: Path,
        *,
        out_dir: Path,
        image_root: Path | None = None,
        annotations: Path | None = None,
        split: str | None = None,
        setting: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.out_dir = Path(out_dir).resolve()
        base = self.path if self.path.is_dir() else self.path.parent
        self.image_root = Path(image_root) if image_root is not None else base
        self.annotations = Path(annotations) if annotations is not None else None
        self.split = split
        self.setting = setting

    # ---------------------------------------------------------------- per format
    @abstractmethod
    def rows(self) -> tuple[Iterator[Row], int | None]:
        """(rows, total or None); reads the file, so it runs before any ``prepare``."""

    @abstractmethod
    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        """(id, [candidate paths per image], Question fields) or ``ValueError``."""

    def row_id(self, row: Row) -> str | None:
        """The row's id for a reject record, when it has one."""
        return None

    # ---------------------------------------------------------------- shared
    def images(self, refs: list[Candidates], rid: str = "") -> list[str]:
        out = []
        for cands in refs:
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise ValueError(f"missing image file: {cands[0]}")
            out.append(os.path.relpath(found.resolve(), self.out_dir))
        return out

    def _in_root(self, name: str, *subdirs: str) -> Candidates:
        """``root/name``, then ``root/<subdir>/name`` for each non-empty sub-folder."""
        return [self.image_root / name] + [self.image_root / d / name for d in subdirs if d]

    def _fields(
        self, question: str, answers: list[str], split: str, meta: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "question": question,
            "answers": answers,
            "dataset": self.name,
            "split": self.split or split,
            "meta": {k: v for k, v in meta.items() if v is not None and jsonable(v)},
        }


# ----------------------------------------------------------------------------- helpers


def _need(data: dict[str, Any], key: str) -> Any:
    if key not in data or data[key] is None:
        raise ValueError(f"missing field {key!r}")
    return data[key]


def _text(data: dict[str, Any], key: str) -> str:
    v = _need(data, key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"empty {key!r}")
    return v.strip()


def _ident(data: dict[str, Any], key: str) -> str:
    v = _need(data, key)
    if isinstance(v, bool) or not isinstance(v, str | int) or not str(v).strip():
        raise ValueError(f"{key!r} must be a string or an integer, got {v!r}")
    return str(v).strip()


def _int(data: dict[str, Any], key: str) -> int:
    v = _need(data, key)
    if isinstance(v, bool):
        raise ValueError(f"{key!r} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise ValueError(f"{key!r} must be an integer, got {v!r}")


def _str_list(data: dict[str, Any], key: str) -> list[str]:
    v = _need(data, key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key!r} must be a list of strings")
    return list(v)


def _prefix_split(stem: str) -> str:
    """``testdev_balanced_questions`` -> ``testdev``; ``aokvqa_v1p0_val`` -> ``val``."""
    if stem.startswith("aokvqa_"):
        return stem.rsplit("_", 1)[-1]
    return stem.split("_")[0]


# ----------------------------------------------------------------------------- GQA


class _DupKeys(dict):
    """A JSON object whose keys repeat: keeps every pair so each can be a row."""

    pairs: list[tuple[str, Any]]


def _keep_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        d = _DupKeys(d)
        d.pairs = pairs
    return d


class GqaSource(OfficialSource):
    name = "gqa"

    def _files(self) -> list[Path]:
        if self.path.is_dir():  # train_all_questions/: chunk files of one dict
            files = sorted(self.path.glob("*.json"))
            if not files:
                raise VpdError(f"{self.path}: no .json question files in this folder")
            return files
        return [self.path]

    def rows(self) -> tuple[Iterator[Row], int | None]:
        pairs: list[tuple[str, Any]] = []
        for f in self._files():
            data = load_json(f, object_pairs_hook=_keep_duplicate_keys)
            if not isinstance(data, dict):
                raise VpdError(
                    f"{f}: a GQA questions file is a JSON object keyed by question id, "
                    f"got a {type(data).__name__}"
                )
            pairs.extend(data.pairs if isinstance(data, _DupKeys) else data.items())
        self.labelled = any(isinstance(e, dict) and "answer" in e for _, e in pairs)
        self.file_split = _prefix_split(self.path.stem)
        return self._rows(pairs), len(pairs)

    @staticmethod
    def _rows(pairs: list[tuple[str, Any]]) -> Iterator[Row]:
        for i, (qid, entry) in enumerate(pairs, 1):
            if not isinstance(entry, dict):
                raw = json.dumps({qid: entry}, default=str)
                yield Row(i, None, raw, f"question {qid}: expected a JSON object")
                continue
            yield Row(i, {"questionId": qid, **entry})

    def row_id(self, row: Row) -> str | None:
        return str((row.data or {}).get("questionId") or "") or None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        qid = _ident(d, "questionId")
        question = _text(d, "question")
        image_id = _ident(d, "imageId")
        answers = [str(_need(d, "answer"))] if self.labelled else []
        types = d.get("types") if isinstance(d.get("types"), dict) else {}
        meta = {
            "imageId": image_id,
            "isBalanced": d.get("isBalanced"),
            "types": types or None,
            "groups": d.get("groups"),
            "fullAnswer": d.get("fullAnswer"),
            "semanticStr": d.get("semanticStr"),
            "entailed": d.get("entailed"),
            "equivalent": d.get("equivalent"),
            "qtype": types.get("structural"),
        }
        refs = [self._in_root(f"{image_id}.jpg", "images")]
        return qid, refs, self._fields(question, answers, self.file_split, meta)


# ----------------------------------------------------------------------------- VQA v2, OK-VQA

_COCO_SUBTYPE = re.compile(r"(train|val|test)(\d{4})")


class VqaSource(OfficialSource):
    """VQA v2 (and OK-VQA, which is released in the same two-file layout)."""

    name = "vqav2"

    def rows(self) -> tuple[Iterator[Row], int | None]:
        data = load_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise VpdError(
                f"{self.path}: not a VQA questions file (expected an object with a "
                "'questions' list)"
            )
        subtype = data.get("data_subtype")
        if not isinstance(subtype, str) or not subtype:
            m = _COCO_SUBTYPE.search(self.path.name)
            if m is None:
                raise VpdError(
                    f"{self.path}: no data_subtype, and the file name names no COCO split "
                    "(e.g. val2014): cannot tell the image names"
                )
            subtype = m.group(0)
        self.subtype = subtype
        # test-dev questions are a subset of test2015 and use its images.
        self.image_subtype = "test2015" if subtype.startswith("test-dev") else subtype
        self.anns: dict[str, dict[str, Any]] | None = None
        if self.annotations is not None:
            adata = load_json(self.annotations)
            if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
                raise VpdError(
                    f"{self.annotations}: not a VQA annotations file (expected an object "
                    "with an 'annotations' list)"
                )
            self.anns = {}
            for a in adata["annotations"]:
                if isinstance(a, dict) and "question_id" in a:
                    self.anns.setdefault(str(a["question_id"]), a)
        questions = data["questions"]
        return list_rows(questions), len(questions)

    def row_id(self, row: Row) -> str | None:
        v = (row.data or {}).get("question_id")
        return str(v) if isinstance(v, str | int) else None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        qid = _ident(d, "question_id")
        question = _text(d, "question")
        image_id = _int(d, "image_id")
        meta: dict[str, Any] = {"image_id": image_id}
        answers: list[str] = []
        if self.anns is not None:
            ann = self.anns.get(qid)
            if ann is None:
                raise ValueError(f"no annotation for question {qid} in {self.annotations}")
            if ann.get("image_id") not in (None, image_id):
                raise ValueError(
                    f"annotation of question {qid} is for image {ann.get('image_id')}, "
                    f"the question for image {image_id}"
                )
            raw = ann.get("answers")
            if not isinstance(raw, list) or not raw:
                raise ValueError(f"annotation of question {qid} has no 'answers' list")
            for a in raw:
                if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                    raise ValueError(f"annotation of question {qid}: an answer without text")
                answers.append(a["answer"])
            meta.update(
                question_type=ann.get("question_type"),
                answer_type=ann.get("answer_type"),
                multiple_choice_answer=ann.get("multiple_choice_answer"),
                qtype=ann.get("answer_type"),
            )
        name = f"COCO_{self.image_subtype}_{image_id:012d}.jpg"
        refs = [self._in_root(name, self.image_subtype)]
        return qid, refs, self._fields(question, answers, self.subtype, meta)


class OkvqaSource(VqaSource):
    name = "okvqa"


# ----------------------------------------------------------------------------- A-OKVQA


class AokvqaSource(OfficialSource):
    name = "aokvqa"

    def rows(self) -> tuple[Iterator[Row], int | None]:
        items = load_json(self.path)
        if not isinstance(items, list):
            raise VpdError(f"{self.path}: an A-OKVQA file is a JSON list of questions")
        self.labelled = any(
            isinstance(e, dict) and ("direct_answers" in e or "correct_choice_idx" in e)
            for e in items
        )
        self.file_split = _prefix_split(self.path.stem)
        # COCO 2017 folder of the split (the test_w_ans file is the test split).
        self.coco = self.file_split.split("_")[0] + "2017"
        return list_rows(items), len(items)

    def row_id(self, row: Row) -> str | None:
        v = (row.data or {}).get("question_id")
        return str(v) if isinstance(v, str | int) else None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        qid = _ident(d, "question_id")
        question = _text(d, "question")
        image_id = _int(d, "image_id")
        choices = _str_list(d, "choices")
        meta: dict[str, Any] = {
            "image_id": image_id,
            "choices": choices,
            "difficult_direct_answer": d.get("difficult_direct_answer"),
        }
        answers: list[str] = []
        if self.labelled:
            direct = _str_list(d, "direct_answers")
            idx = _int(d, "correct_choice_idx")
            if not 0 <= idx < len(choices):
                raise ValueError(f"correct_choice_idx {idx} is not an index of the choices")
            meta.update(correct_choice_idx=idx, direct_answers=direct)
            meta["rationales"] = d.get("rationales")
            answers = [choices[idx]] if self.setting == "mc" else direct
        if self.setting == "mc":
            if len(choices) > len(_LETTERS):
                raise ValueError("more choices than letters")
            options = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
            question = f"{question}\n{options}"
            meta["setting"] = "mc"
        refs = [self._in_root(f"{image_id:012d}.jpg", self.coco)]
        return qid, refs, self._fields(question, answers, self.file_split, meta)


# ----------------------------------------------------------------------------- TallyQA


class TallyqaSource(OfficialSource):
    name = "tallyqa"

    def rows(self) -> tuple[Iterator[Row], int | None]:
        items = load_json(self.path)
        if not isinstance(items, list):
            raise VpdError(f"{self.path}: a TallyQA file is a JSON list of questions")
        self.labelled = any(isinstance(e, dict) and "answer" in e for e in items)
        return list_rows(items), len(items)

    def row_id(self, row: Row) -> str | None:
        v = (row.data or {}).get("question_id")
        return str(v) if isinstance(v, str | int) else None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        qid = _ident(d, "question_id")
        question = _text(d, "question")
        image = _text(d, "image")
        answers: list[str] = []
        if self.labelled:
            _need(d, "answer")
            try:
                count = _int(d, "answer")
            except ValueError as e:
                raise ValueError(f"{e} (a count)") from None
            answers = [str(count)]
        simple = d.get("issimple")
        meta = {
            "image_id": d.get("image_id"),
            "issimple": simple,
            "data_source": d.get("data_source"),
            "qtype": None if simple is None else ("simple" if simple else "complex"),
        }
        return qid, [self._in_root(image)], self._fields(question, answers, self.path.stem, meta)


# ----------------------------------------------------------------------------- POPE


class PopeSource(OfficialSource):
    name = "pope"

    def rows(self) -> tuple[Iterator[Row], int | None]:
        stem = self.path.stem.lower()
        self.pope_setting = next(
            (s for s in ("random", "popular", "adversarial") if s in stem), None
        )
        return jsonl_rows(self.path), count_lines(self.path)

    def row_id(self, row: Row) -> str | None:
        v = (row.data or {}).get("question_id")
        return str(v) if isinstance(v, str | int) else None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        qid = _ident(d, "question_id")
        question = _text(d, "text")
        image = _text(d, "image")
        label = _text(d, "label").lower()
        if label not in ("yes", "no"):
            raise ValueError(f"label must be yes or no, got {d['label']!r}")
        used = {"question_id", "text", "image", "label"}
        meta = {k: v for k, v in d.items() if k not in used}
        meta["setting"] = meta.get("setting") or self.pope_setting
        if isinstance(d.get("category"), str):
            meta["qtype"] = d["category"]
        refs = [self._in_root(image, "val2014")]
        return qid, refs, self._fields(question, [label], self.path.stem, meta)


# ----------------------------------------------------------------------------- NLVR2


class Nlvr2Source(OfficialSource):
    name = "nlvr2"

    def rows(self) -> tuple[Iterator[Row], int | None]:
        return jsonl_rows(self.path), count_lines(self.path)

    def row_id(self, row: Row) -> str | None:
        v = (row.data or {}).get("identifier")
        return v if isinstance(v, str) else None

    def prepare(self, row: Row) -> tuple[str, list[Candidates], dict[str, Any]]:
        d = row.data or {}
        ident = _text(d, "identifier")
        parts = ident.split("-")
        if len(parts) < 4:
            raise ValueError(f"identifier {ident!r} is not split-set-pair-sentence")
        sentence = _text(d, "sentence")
        label = _text(d, "label")
        if label.lower() not in ("true", "false"):
            raise ValueError(f"label must be True or False, got {label!r}")
        split = parts[0]
        pair = ident.rsplit("-", 1)[0]  # the image pair: identifier without the sentence id
        directory = str(d["directory"]) if d.get("directory") is not None else ""
        refs = [
            self._in_root(
                f"{pair}-img{i}.png", directory, split, f"{split}/{directory}" if directory else ""
            )
            for i in (0, 1)
        ]
        keep = ("writer", "synset", "query", "directory", "left_url", "right_url")
        meta = {k: d.get(k) for k in keep}
        meta.update(sentence=sentence, label=label)
        question = NLVR2_QUESTION.format(sentence=sentence)
        answers = ["yes" if label.lower() == "true" else "no"]
        return ident, refs, self._fields(question, answers, split, meta)


SOURCES: dict[str, type[OfficialSource]] = {
    "gqa": GqaSource,
    "vqav2": VqaSource,
    "okvqa": OkvqaSource,
    "aokvqa": AokvqaSource,
    "tallyqa": TallyqaSource,
    "pope": PopeSource,
    "nlvr2": Nlvr2Source,
}


def open_source(fmt: str, path: Path, **options: Any) -> OfficialSource:
    """The source of official format ``fmt`` for ``path`` (options: see OfficialSource)."""
    if fmt not in SOURCES:
        raise VpdError(f"unknown official format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir() and fmt != "gqa":
        raise VpdError(f"{path} is a folder; --format {fmt} reads a file")
    return SOURCES[fmt](path, **options)

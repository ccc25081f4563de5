"""Optional LLM judge for open answers that string metrics reject ("crimson" vs "red").

Verdicts are cached in a JSONL file (one line per distinct ``(question, answers,
prediction)``), so a resumed or repeated run asks the LLM nothing twice and gives
the same verdicts. The prompt lives in ``prompts/judge/<version>/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.llm import make_llm_from_spec
from vpd.llm.base import GenParams
from vpd.metrics import normalize_answer
from vpd.resources import prompts_dir

JUDGE_PROMPT_VERSION = "v1"
PROMPTS_DIR = prompts_dir() / "judge"

JudgeItem = tuple[str, list[str], str]  # (question, reference answers, prediction)


def judge_fingerprint(llm_spec: dict[str, Any]) -> dict[str, Any]:
    """What makes two judged runs comparable: the LLM and the prompt version."""
    return {"llm": llm_spec, "prompt": JUDGE_PROMPT_VERSION}


def judge_key(item: JudgeItem) -> str:
    question, answers, pred = item
    text = json.dumps([question, list(answers), pred], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def parse_verdict(text: str) -> bool:
    """A "yes"/"correct"/"true" as the first word is a pass; anything else is a fail."""
    words = normalize_answer(text).split()
    return bool(words) and words[0] in ("yes", "correct", "true")


class LLMJudge:
    """``judge(items) -> list[bool]`` through any ``vpd.llm.base.LLM``, with a verdict cache."""

    def __init__(self, llm: Any, cache_path: Path, version: str = JUDGE_PROMPT_VERSION) -> None:
        self.llm = llm
        self.cache_path = Path(cache_path)
        folder = PROMPTS_DIR / version
        try:
            self.system = (folder / "system.txt").read_text(encoding="utf-8").strip()
            self.user = (folder / "user.txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise VpdError(f"judge prompt {version!r} not found in {folder}") from None
        self.cache: dict[str, bool] = {}
        self.hits = self.asked = 0
        if self.cache_path.exists():
            with open(self.cache_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # torn tail of a killed run: that verdict is asked again
                    try:
                        rec = json.loads(line)
                        self.cache[rec["key"]] = bool(rec["verdict"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def messages(self, item: JudgeItem) -> list[dict[str, Any]]:
        question, answers, pred = item
        body = (
            self.user.replace("{question}", question)
            .replace("{answers}", "; ".join(dict.fromkeys(answers)))
            .replace("{pred}", pred)
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": body}]

    def judge(self, items: list[JudgeItem]) -> list[bool]:
        keys = [judge_key(it) for it in items]
        new: dict[str, JudgeItem] = {}
        for k, it in zip(keys, items, strict=True):
            if k in self.cache:
                self.hits += 1
            elif k not in new:
                new[k] = it
        if new:
            todo = list(new.items())
            params = GenParams(n=1, temperature=0.0, max_tokens=8)
            results = self.llm.generate([self.messages(it) for _, it in todo], params)
            self.asked += len(todo)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                for (k, (q, answers, pred)), comps in zip(todo, results, strict=True):
                    raw = comps[0].text if comps else ""
                    verdict = parse_verdict(raw)
                    self.cache[k] = verdict
                    rec = {"key": k, "question": q, "answers": answers, "pred": pred,
                           "verdict": verdict, "raw": raw[:200]}  # fmt: skip
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return [self.cache[k] for k in keys]


def make_judge(llm_spec: dict[str, Any], cache_path: Path) -> LLMJudge:
    """Build the judge's LLM from a ``vpd.llm.LLMConfig``-shaped dict."""
    return LLMJudge(make_llm_from_spec(llm_spec), cache_path)

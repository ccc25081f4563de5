"""Program-writing prompts: versioned templates, the generated API spec, few-shot retrieval.

A prompt family/version lives in ``vpd/prompts/<family>/<version>/`` (package data;
``prompts/`` at the checkout's top is a link to it), or in any folder given by path:

- ``system.txt``: the instructions; ``{api}`` is replaced by the API spec file when present;
- ``api.txt`` or ``api_compact.txt`` (viper): the ImagePatch API spec, GENERATED from
  ``vpd.tools.api`` by :func:`render_api_spec` (full, or signatures only:
  ``python -m vpd.sample.prompt --write-api-spec``); a test keeps the files and the API in
  step, so the prompt never names a method the tools lack;
- ``user.txt``: the user turn, ``{question}`` replaced by the question;
- ``examples.jsonl``: the worked-example pool, ``{"question", "program"}`` per line.

``--shots N`` puts the N pool examples most similar to the question TEXT (BM25 over word
unigrams + bigrams) as earlier user/assistant turns, most similar last (nearest the
question). An example whose question equals the asked one is never used, so a pool can
never hand the model the answer program to the very question it is asked.

The prompt id ``<family>/<version>@<8 hex>`` hashes every template file, so a sample
records exactly which prompt text produced it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.llm.base import Messages
from vpd.resources import prompts_dir
from vpd.tools.api import ImagePatch
from vpd.tools.namespace import build_namespace

PROMPTS_DIR = prompts_dir()  # package data: there in a wheel as in a checkout
TEMPLATE_FILES = ("system.txt", "api.txt", "api_compact.txt", "user.txt", "examples.jsonl")
# The generated API spec files and the style each holds.
API_FILES = {"api.txt": False, "api_compact.txt": True}
_WORD = re.compile(r"[a-z0-9]+")
# Words that say nothing about which program fits (kept: numbers, shapes, relations...).
_STOP = frozenset("a an the is are of in to there it this that image picture".split())


# ----------------------------------------------------------------------------- API spec


def _summary(doc: str | None) -> str:
    """A docstring's description: the text before its first numpy-style section."""
    if not doc:
        return ""
    lines = []
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() in ("Parameters", "Returns", "Examples", "Attributes", "Methods"):
            break
        if re.fullmatch(r"-{3,}", line.strip()):
            lines.pop() if lines else None
            break
        lines.append(line)
    return " ".join(" ".join(lines).split())


def _first_sentence(text: str) -> str:
    """The first sentence (the prompt stays short: small LMs pay for every token)."""
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def _attributes(doc: str) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` from the class docstring's ``Attributes`` section."""
    text = inspect.cleandoc(doc)
    m = re.search(r"Attributes\n-+\n(.*?)(?:\n\n[A-Z][a-z]+\n-+\n|\Z)", text, re.S)
    if m is None:
        return []
    out: list[tuple[str, str, str]] = []
    for line in m.group(1).splitlines():
        head = re.fullmatch(r"(\w+) : (.+)", line.strip())
        if head and not line.startswith(" "):
            out.append((head.group(1), head.group(2).strip(), ""))
        elif out and line.strip():
            n, t, d = out[-1]
            out[-1] = (n, t, (d + " " + line.strip()).strip())
    return out


def _signature(fn: Any, drop_self: bool) -> str:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    parts = []
    for p in params:
        s = p.name
        if p.annotation is not inspect.Parameter.empty:
            s += f": {p.annotation}" if isinstance(p.annotation, str) else f": {p.annotation!r}"
        if p.default is not inspect.Parameter.empty:
            s += f" = {p.default!r}"
        parts.append(s)
    ret = sig.return_annotation
    arrow = "" if ret is inspect.Signature.empty else f" -> {ret}"
    return f"({', '.join(parts)}){arrow}"


def api_surface() -> tuple[list[str], list[str], list[str]]:
    """(ImagePatch attributes, ImagePatch methods, helper functions) programs may use."""
    attrs = [
        n for n, v in vars(ImagePatch).items() if isinstance(v, property) and not n.startswith("_")
    ]
    methods = [
        n for n, v in vars(ImagePatch).items() if inspect.isfunction(v) and not n.startswith("_")
    ]
    ns = build_namespace(lambda op, box, args: None)
    helpers = [
        n
        for n, v in ns.items()
        if not n.startswith("_") and n != "ImagePatch" and inspect.isfunction(v)
    ]
    return attrs, methods, helpers


def render_api_spec(compact: bool = False) -> str:
    """The ViperGPT API text for the prompt, from ``vpd.tools.api``'s code and docstrings.

    ``compact``: signatures only (no per-attribute comments or method docstrings), about a
    third of the tokens, for small models that copy their few-shot programs anyway.
    """
    attrs, methods, helpers = api_surface()
    doc_attrs = {n: (t, d) for n, t, d in _attributes(ImagePatch.__doc__ or "")}
    missing = [a for a in attrs if a not in doc_attrs]
    if missing:
        raise RuntimeError(f"ImagePatch attributes without docs: {missing}")
    gap = [] if compact else [""]

    def doc(fn: Any, indent: str) -> list[str]:
        return [] if compact else [f'{indent}"""{_first_sentence(_summary(fn.__doc__))}"""']

    def head(sig: str) -> str:
        return f"{sig}: ..." if compact else f"{sig}:"

    lines = ["class ImagePatch:", f'    """{_summary(ImagePatch.__doc__)}"""', *gap]
    for a in attrs:
        t, d = doc_attrs[a]
        lines.append(f"    {a}: {t}" if compact else f"    {a}: {t}  # {_first_sentence(d)}")
    lines += gap
    init = vars(ImagePatch)["__init__"]
    lines.append(head(f"    def __init__{_signature(init, False)}"))
    lines += doc(init, "        ")
    for m in methods:
        fn = vars(ImagePatch)[m]
        lines += gap
        lines.append(head(f"    def {m}{_signature(fn, False)}"))
        lines += doc(fn, "        ")
    ns = build_namespace(lambda op, box, args: None)
    for h in helpers:
        fn = ns[h]
        lines += [""] if not compact or h == helpers[0] else []
        lines.append(head(f"def {h}{_signature(fn, False)}"))
        lines += doc(fn, "    ")
    return "\n".join(lines).replace("'ImagePatch'", "ImagePatch") + "\n"


def spec_names(spec: str) -> tuple[set[str], set[str]]:
    """(method/function names, attribute names) a rendered spec mentions."""
    defs = set(re.findall(r"^\s*def (\w+)\(", spec, re.M)) - {"__init__"}
    attrs = set(re.findall(r"^    (\w+): ", spec, re.M))
    return defs, attrs


# ----------------------------------------------------------------------------- retrieval


def _terms(text: str) -> list[str]:
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


class BM25:
    """Okapi BM25 over word unigrams + bigrams (k1=1.2, b=0.75): small, exact, no deps."""

    def __init__(self, docs: list[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(_terms(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = (sum(self.lens) / len(self.lens)) if self.lens else 1.0
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> list[float]:
        q = set(_terms(query))
        out = []
        for tf, dl in zip(self.tfs, self.lens, strict=True):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * dl / max(self.avg, 1e-9))
            for t in q:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out


# ----------------------------------------------------------------------------- template


@dataclass(frozen=True)
class Example:
    question: str
    program: str


class PromptTemplate:
    """One prompt family/version: renders chat messages for a question."""

    def __init__(self, spec: str) -> None:
        folder = Path(spec).expanduser()
        if not (folder / "system.txt").is_file():
            folder = PROMPTS_DIR / spec
        if not (folder / "system.txt").is_file():
            known = sorted(
                f"{p.parent.parent.name}/{p.parent.name}"
                for p in PROMPTS_DIR.glob("*/*/system.txt")
            )
            raise VpdError(f"prompt {spec!r} not found (need {folder}/system.txt); known: {known}")
        self.folder = folder
        self.name = f"{folder.parent.name}/{folder.name}"
        self.family = folder.parent.name
        files = {f: folder / f for f in TEMPLATE_FILES if (folder / f).is_file()}
        h = hashlib.sha256()
        for f, p in sorted(files.items()):
            h.update(f.encode() + b"\0" + p.read_bytes() + b"\0")
        self.id = f"{self.name}@{h.hexdigest()[:8]}"
        spec = next((files[f] for f in API_FILES if f in files), None)
        api = spec.read_text(encoding="utf-8").strip() if spec else ""
        self.system = (folder / "system.txt").read_text(encoding="utf-8").strip()
        self.system = self.system.replace("{api}", api)
        user = files.get("user.txt")
        self.user = user.read_text(encoding="utf-8").strip() if user else "{question}"
        self.examples = self._load_examples(files.get("examples.jsonl"))
        self._bm25 = BM25([e.question for e in self.examples])

    @staticmethod
    def _load_examples(path: Path | None) -> list[Example]:
        if path is None:
            return []
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(Example(str(obj["question"]), str(obj["program"]).strip("\n")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise VpdError(f"{path}:{n}: bad example line ({e})") from None
        return out

    def select(self, question: str, shots: int) -> list[Example]:
        """The ``shots`` pool examples most similar to ``question``, most similar LAST."""
        if shots <= 0 or not self.examples:
            return []
        q = _norm(question)
        scores = self._bm25.scores(question)
        order = sorted(range(len(self.examples)), key=lambda i: (-scores[i], i))
        picked = [i for i in order if _norm(self.examples[i].question) != q][:shots]
        return [self.examples[i] for i in reversed(picked)]

    def assistant_turn(self, program: str) -> str:
        return f"```python\n{program}\n```" if self.family == "viper" else f"```\n{program}\n```"

    def messages(self, question: str, shots: int) -> Messages:
        msgs: Messages = [{"role": "system", "content": self.system}]
        for ex in self.select(question, shots):
            msgs.append({"role": "user", "content": self.user.replace("{question}", ex.question)})
            msgs.append({"role": "assistant", "content": self.assistant_turn(ex.program)})
        msgs.append({"role": "user", "content": self.user.replace("{question}", question)})
        return msgs


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(
        description="Regenerate prompts/viper/*/api*.txt from vpd.tools.api."
    )
    ap.add_argument("--write-api-spec", action="store_true")
    ap.add_argument("--compact", action="store_true", help="print the compact style")
    a = ap.parse_args()
    if a.write_api_spec:
        for name, compact in API_FILES.items():
            for p in sorted(PROMPTS_DIR.glob(f"viper/*/{name}")):
                p.write_text(render_api_spec(compact), encoding="utf-8")
                print(f"wrote {p}")
    else:
        print(render_api_spec(a.compact), end="")


if __name__ == "__main__":
    main()

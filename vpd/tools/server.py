"""The tool server: lives in the parent process, owns the backend, answers ToolRequests.

Programs (in sandbox workers) hold only boxes; every op reaches this server as a
:class:`~vpd.tools.protocol.ToolRequest`. The server

- validates the op and its arguments (a bad call is the program's error, not a crash),
- decodes each image once (LRU of decoded images shared by every program),
- answers from an LRU result cache keyed by ``req.cache_key()``, shared across programs:
  the k candidate programs of one question mostly ask the same things,
- groups cache misses by op so a model backend runs one batch per op,
- turns any backend failure into ``ToolResponse(ok=False, error=...)``,
- and summarizes a call for the execution trace (``summarize``): boxes normalized to 0..1
  with 2 decimals, long lists truncated, so traces stay small and resolution-free.

Ops (args): ``size`` () -> [width, height]; ``crop`` (left, lower, right, upper relative to
the patch) -> absolute clipped box; ``find`` (name) -> boxes; ``exists`` (name) -> bool;
``verify_property`` (name, prop) -> bool; ``best_text_match`` (options) -> str;
``simple_query`` (question) -> str; ``compute_depth`` () -> float; ``best_image_match``
(boxes, content) -> index; ``llm_query`` (question, long_answer) -> str.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from vpd.errors import ToolsUnavailable
from vpd.records import ToolCall
from vpd.tools.backends.base import Backend, ImageData, ToolError
from vpd.tools.protocol import Box, ToolRequest, ToolResponse

MAX_LIST = 8  # boxes shown per traced result; the rest become "+N more"
MAX_TEXT = 200  # characters of a traced string argument/result

# op -> required args with their JSON types (bool is not accepted where a number is wanted)
_ARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "size": {},
    "crop": {
        "left": (int, float),
        "lower": (int, float),
        "right": (int, float),
        "upper": (int, float),
    },
    "find": {"name": (str,)},
    "exists": {"name": (str,)},
    "verify_property": {"name": (str,), "prop": (str,)},
    "best_text_match": {"options": (list,)},
    "simple_query": {"question": (str,)},
    "compute_depth": {},
    "best_image_match": {"boxes": (list,), "content": (list,)},
    "llm_query": {"question": (str,), "long_answer": (bool,)},
}
_OPTIONAL = {"llm_query": {"long_answer"}}
OPS = tuple(_ARGS)


class ToolServer:
    """Answers tool requests with ``backend``; see the module docstring."""

    def __init__(self, backend: Backend, cache_size: int = 100_000, image_cache: int = 64) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self.image_cache = image_cache
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._images: OrderedDict[str, ImageData] = OrderedDict()
        self._lock = threading.Lock()  # one batch at a time: backends need not be thread-safe
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ public
    def call(self, req: ToolRequest) -> ToolResponse:
        return self.call_batch([req])[0]

    def call_batch(self, reqs: list[ToolRequest]) -> list[ToolResponse]:
        """Answer ``reqs`` in order; cache hits first, then misses grouped by op."""
        with self._lock:
            out: list[ToolResponse | None] = [None] * len(reqs)
            todo: dict[tuple, list[int]] = {}  # key -> positions (duplicates answered once)
            for i, req in enumerate(reqs):
                try:
                    key = req.cache_key()
                except (TypeError, ValueError):
                    out[i] = ToolResponse(False, error="tool arguments must be plain JSON values")
                    continue
                if key in self._cache:
                    self._cache.move_to_end(key)
                    self.hits += 1
                    out[i] = ToolResponse(True, self._cache[key])
                elif key in todo:
                    self.hits += 1  # same call twice in one batch: computed once
                    todo[key].append(i)
                else:
                    self.misses += 1
                    todo[key] = [i]
            by_op: dict[str, list[tuple[tuple, ToolRequest]]] = {}
            for key, pos in todo.items():
                by_op.setdefault(reqs[pos[0]].op, []).append((key, reqs[pos[0]]))
            for op, group in by_op.items():
                for (key, _), resp in zip(
                    group, self._run_op(op, [r for _, r in group]), strict=True
                ):
                    if resp.ok:
                        self._remember(key, resp.result)
                    for i in todo[key]:
                        out[i] = resp
            return [r if r is not None else ToolResponse(False, error="no answer") for r in out]

    def summarize(self, req: ToolRequest, result: Any) -> ToolCall:
        """A compact, resolution-free trace entry for one call (boxes in 0..1, 2 decimals)."""
        size = self._size_of(req.image)
        args: dict[str, Any] = {}
        if req.op != "crop":  # crop's pixel args are relative to its patch: its result says it
            for k, v in req.args.items():
                if k == "boxes" and isinstance(v, list):
                    args[k] = _truncate([_norm(b, size) for b in v])
                else:
                    args[k] = _compact(v)
        args["patch"] = _norm(req.box, size)
        if req.op == "find" and isinstance(result, list):
            shown: Any = _truncate([_norm(b, size) for b in result])
        elif req.op == "crop" and isinstance(result, list):
            shown = _norm(result, size)
        else:
            shown = _compact(result)
        return ToolCall(name=req.op, args=args, result=json.dumps(shown, separators=(",", ":")))

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    def close(self) -> None:
        self.backend.close()

    # ------------------------------------------------------------------ internals
    def _remember(self, key: tuple, result: Any) -> None:
        self._cache[key] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _image(self, path: str) -> ImageData:
        img = self._images.get(path)
        if img is None:
            img = ImageData.load(path)
            self._images[path] = img
            if len(self._images) > self.image_cache:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(path)
        return img

    def _size_of(self, path: str) -> tuple[int, int] | None:
        try:
            img = self._image(path)
        except ToolError:
            return None
        return img.width, img.height

    def _run_op(self, op: str, reqs: list[ToolRequest]) -> list[ToolResponse]:
        """One op for many requests: validate, load images, one backend batch."""
        out: list[ToolResponse | None] = [None] * len(reqs)
        items: list[tuple[int, tuple[Any, Box | None, dict]]] = []
        for i, req in enumerate(reqs):
            try:
                _validate(req)
                # llm_query is text-only: it must not fail on an unreadable image
                img = self._image(req.image) if op != "llm_query" else None
                box = _check_box(req.box)
                items.append((i, (img, box, req.args)))
            except ToolError as e:
                out[i] = ToolResponse(False, error=str(e))
        if items:
            try:
                results = self._dispatch(op, [it for _, it in items])
            except ToolsUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - a backend bug fails these calls, not the run
                results = [e] * len(items)
            for (i, _), res in zip(items, results, strict=True):
                if isinstance(res, Exception):
                    msg = str(res) if isinstance(res, ToolError) else f"{type(res).__name__}: {res}"
                    out[i] = ToolResponse(False, error=msg)
                else:
                    try:
                        out[i] = ToolResponse(True, _plain(res))
                    except ToolError as e:
                        out[i] = ToolResponse(False, error=str(e))
        return [r if r is not None else ToolResponse(False, error="no answer") for r in out]

    def _dispatch(self, op: str, items: list[tuple[ImageData, Box | None, dict]]) -> list[Any]:
        b = self.backend
        if op == "size":
            return [[img.width, img.height] for img, _, _ in items]
        if op == "crop":
            return _map(_crop, items)
        if op in ("find", "exists"):
            found = b.detect_batch([(img, box, a["name"]) for img, box, a in items])
            if op == "exists":
                return [r if isinstance(r, Exception) else bool(r) for r in found]
            return [r if isinstance(r, Exception) else [list(x) for x in r] for r in found]
        if op == "verify_property":
            res = b.verify_property_batch(
                [(img, box, a["name"], a["prop"]) for img, box, a in items]
            )
            return [r if isinstance(r, Exception) else bool(r) for r in res]
        if op == "best_text_match":
            return b.best_text_match_batch([(img, box, a["options"]) for img, box, a in items])
        if op == "simple_query":
            return b.answer_batch([(img, box, a["question"]) for img, box, a in items])
        if op == "compute_depth":
            return b.depth_batch([(img, box) for img, box, _ in items])
        if op == "llm_query":
            return b.llm_query_batch(
                [(a["question"], a.get("long_answer", True)) for _, _, a in items]
            )
        if op == "best_image_match":
            return self._best_image_match(items)
        raise ToolError(f"unknown tool op {op!r}")

    def _best_image_match(self, items: list[tuple[ImageData, Box | None, dict]]) -> list[Any]:
        """Index of the box whose best content score is highest (one flat scoring batch)."""
        flat: list[tuple[ImageData, Box | None, str]] = []
        spans: list[tuple[int, int, int] | Exception] = []
        for img, _, a in items:
            try:
                boxes = [_check_box(b) for b in a["boxes"]]
                content = a["content"]
                if not boxes or not content or not all(isinstance(c, str) for c in content):
                    raise ToolError("best_image_match needs patches and a list of strings")
            except ToolError as e:
                spans.append(e)
                continue
            spans.append((len(flat), len(boxes), len(content)))
            flat.extend((img, bx, c) for bx in boxes for c in content)
        scores = self.backend.match_score_batch(flat) if flat else []
        out: list[Any] = []
        for sp in spans:
            if isinstance(sp, Exception):
                out.append(sp)
                continue
            start, nb, nc = sp
            mine = scores[start : start + nb * nc]
            bad = next((s for s in mine if isinstance(s, Exception)), None)
            if bad is not None:
                out.append(bad)
                continue
            per_box = [max(mine[j * nc : (j + 1) * nc]) for j in range(nb)]
            out.append(per_box.index(max(per_box)))
        return out


# ----------------------------------------------------------------------------- helpers


def _validate(req: ToolRequest) -> None:
    spec = _ARGS.get(req.op)
    if spec is None:
        raise ToolError(f"unknown tool op {req.op!r}")
    optional = _OPTIONAL.get(req.op, set())
    for name, types in spec.items():
        if name not in req.args:
            if name in optional:
                continue
            raise ToolError(f"{req.op}() needs argument {name!r}")
        v = req.args[name]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise ToolError(f"{req.op}() argument {name!r} must be {want}, got {type(v).__name__}")
    extra = set(req.args) - set(spec)
    if extra:
        raise ToolError(f"{req.op}() got unexpected argument(s): {', '.join(sorted(extra))}")


def _plain(v: Any) -> Any:
    """A backend result as plain JSON data (numpy scalars/tuples converted): it crosses
    the wire to the sandboxed program."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if hasattr(v, "item"):  # numpy scalar
        return _plain(v.item())
    raise ToolError(f"the tool backend returned a non-JSON value ({type(v).__name__})")


def _check_box(box: Any) -> Box | None:
    if box is None:
        return None
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ToolError("a patch box must be 4 numbers [left, lower, right, upper]")
    left, lower, right, upper = (int(v) for v in box)
    return (left, lower, right, upper)


def _crop(img: ImageData, box: Box | None, a: dict) -> list[int]:
    """Crop coordinates are relative to the patch (ViperGPT); the result is absolute,
    clipped to the patch (an empty crop is allowed: it holds nothing)."""
    pl, plo, pr, pu = img.clip(box)
    left, lower = pl + int(a["left"]), plo + int(a["lower"])
    right, upper = pl + int(a["right"]), plo + int(a["upper"])
    left, right = min(max(left, pl), pr), min(max(right, pl), pr)
    lower, upper = min(max(lower, plo), pu), min(max(upper, plo), pu)
    return [left, lower, max(left, right), max(lower, upper)]


def _map(fn: Callable, items: list[tuple]) -> list[Any]:
    out: list[Any] = []
    for it in items:
        try:
            out.append(fn(*it))
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def _norm(box: Any, size: tuple[int, int] | None) -> Any:
    """Pixel box -> [l, lo, r, up] in 0..1 with 2 decimals (None = whole image)."""
    if box is None:
        return [0.0, 0.0, 1.0, 1.0]
    if size is None or not isinstance(box, (list, tuple)) or len(box) != 4:
        return box
    w, h = max(size[0], 1), max(size[1], 1)
    try:
        return [round(float(v) / d, 2) for v, d in zip(box, (w, h, w, h), strict=True)]
    except (TypeError, ValueError):
        return box


def _truncate(items: list[Any]) -> list[Any]:
    if len(items) <= MAX_LIST:
        return items
    return [*items[:MAX_LIST], f"+{len(items) - MAX_LIST} more"]


def _compact(v: Any) -> Any:
    if isinstance(v, str):
        return v if len(v) <= MAX_TEXT else v[:MAX_TEXT] + "..."
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return _truncate([_compact(x) for x in v])
    if isinstance(v, dict):
        return {str(k): _compact(x) for k, x in list(v.items())[:MAX_LIST]}
    return v

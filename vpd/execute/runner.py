"""`vpd execute`: run every sampled program in the sandbox and write executions JSONL."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.execute.pool import DEFAULT_NAMESPACE, Job, JobResult, Limits, SandboxPool, ToolHandler
from vpd.images import ImageChecks, resolve_image
from vpd.options import force_field, progress_field, shard_field
from vpd.progress import progress_bar
from vpd.records import Execution, Question, Sample
from vpd.store import (
    LabelledRejects,
    StageOutput,
    check_input,
    parse_shard,
    read_records,
)
from vpd.tools.backends import get_backend
from vpd.tools.server import ToolServer
from vpd.tune.model import TINY, TINY_OPTIONS, resolve_vlm
from vpd.vlm import model_digest, resolve_model_dir


class ExecuteConfig(BaseModel):
    """Run every sampled program in the sandbox against the vision tools.

    Each program runs in its own locked-down process (no files, no network, memory/CPU
    limits, a wall-clock timeout); statuses: ok, error, timeout, oom, violation, crash.
    Re-running the same command resumes.

    Every option of the execute stage (the CLI and recipes build this).
    """

    model_config = ConfigDict(extra="forbid")

    samples: Path = Field(description="Samples JSONL from `vpd sample`.")
    questions: Path = Field(description="Questions JSONL (the images).")
    out: Path = Field(description="Executions JSONL (one record per sample).")
    backend: str = Field("synthetic", description="Tool backend: synthetic or hf.")
    tools: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend option KEY=VALUE (repeatable), e.g. device=cuda, vqa=MODEL.",
        json_schema_extra={"cli": "key=value", "flag": "tool-opt"},
    )
    timeout: float = Field(10.0, gt=0, le=3600, description="Seconds per program (tools excluded).")
    workers: int | None = Field(
        None, ge=1, le=1024, description="Programs run at once (default: CPU cores)."
    )
    memory_mb: int = Field(512, ge=16, le=1 << 20, description="Memory per program, MB.")
    max_tool_calls: int = Field(200, ge=1, description="Tool calls per program.")
    max_stdout: int = Field(16 * 1024, ge=0, description="Bytes of print output kept per program.")
    tool_time: float = Field(
        60.0, gt=0, description="Seconds of tool-server time one program may use."
    )
    # Tests swap in a fake API; a user has no reason to.
    namespace: str = Field(
        DEFAULT_NAMESPACE,
        description="module:function building the API.",
        json_schema_extra={"cli": False},
    )
    shard: str | None = shard_field()
    force: bool = force_field()
    progress: bool = progress_field()

    def limits(self) -> Limits:
        return Limits(
            timeout_s=self.timeout,
            memory_mb=self.memory_mb,
            max_tool_calls=self.max_tool_calls,
            max_stdout=self.max_stdout,
            tool_time_s=self.tool_time,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The options that change results (workers and progress do not)."""
        fp = {
            "stage": "execute",
            "backend": self.backend,
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "max_tool_calls": self.max_tool_calls,
            "max_stdout": self.max_stdout,
            "tool_time": self.tool_time,
            "namespace": self.namespace,
        }
        if self.tools:  # only when set: outputs written before the option existed still resume
            fp["tools"] = self.tools
        return fp


def _question_images(path: Path, rejects: Any) -> dict[str, list[str]]:
    """qid -> absolute image paths (relative paths resolve against the questions' folder);
    bad question lines go to ``rejects``."""
    base = Path(path).resolve().parent
    out = {}
    for q in read_records(path, Question, rejects=LabelledRejects(rejects, "questions")):
        out[q.id] = [str(resolve_image(x, base).resolve()) for x in q.all_images()]
    if not out:
        raise VpdError(f"no valid questions in {path}")
    return out


def _count_todo(path: Path, so: StageOutput) -> int:
    """Cheap first pass for the progress bar total: owned, not yet done samples."""
    import json

    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line)
                sid, qid = obj["id"], obj["qid"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(sid, str) and isinstance(qid, str) and so.owns(qid) and not so.done(sid):
                n += 1
    return n


def resolve_tool_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Backend options with ``vqa: tiny`` (the tools' VLM mode with the embedded tiny VLM)
    turned into that model's folder (built once per machine, cached): the one that the
    options ``tiny_build`` / ``tiny_lm_layers`` describe (the pipeline passes its recipe's
    tune fields of those names), the defaults when they are not given."""
    opts = dict(options or {})
    build, layers = (opts.pop(k, None) for k in TINY_OPTIONS)  # never the backend's
    if opts.get("vqa") == TINY:
        opts["vqa"] = resolve_vlm(TINY, build, layers)
    return opts


def vqa_digest(options: dict[str, Any]) -> str | None:
    """A fingerprint of the tools' local VLM folder, so executions made with a model that
    was re-trained into the same folder are not resumed as if nothing had changed."""
    vqa = options.get("vqa")
    if isinstance(vqa, str) and Path(vqa).is_dir():
        return model_digest(resolve_model_dir(vqa))
    return None


def make_tool_server(backend: str, options: dict[str, Any] | None = None) -> ToolHandler:
    """The tool server for ``backend``, loaded once in this (the parent) process."""
    return ToolServer(get_backend(backend, **resolve_tool_options(options)))


def _cache_stats(tools: Any) -> dict[str, Any]:
    stats = getattr(tools, "cache_stats", None)
    stats = stats() if callable(stats) else stats
    if not isinstance(stats, dict):
        return {}
    hits, misses = stats.get("hits", 0), stats.get("misses", 0)
    total = hits + misses
    return {
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": hits / total if total else 0.0,
    }


@with_config(ConfigDict(extra="forbid"))
class ExecuteSummary(TypedDict, total=False):
    """What `vpd execute` returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    written: int
    already_done: int
    rejected: int
    statuses: dict[str, int]
    programs_run: int
    wall_s: float
    programs_per_s: float
    sandbox_layers: dict[str, Any]
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float


def run_execute(cfg: ExecuteConfig, tools: ToolHandler | None = None) -> ExecuteSummary:
    """Run the stage; ``tools`` overrides the backend's tool server (embedding, tests)."""
    t0 = time.perf_counter()
    shard = parse_shard(cfg.shard)
    # Before the sandbox pool and the tools. A shard's samples may be empty: that shard
    # owns no question.
    empty_ok = shard is not None
    check_input(cfg.samples, Sample, "samples", allow_empty=empty_ok)
    check_input(cfg.questions, Question, "questions")
    status: Counter[str] = Counter()
    inflight: dict[str, tuple[str, int]] = {}
    checks = ImageChecks()
    tool_options = resolve_tool_options(cfg.tools)
    fingerprint = cfg.fingerprint()
    digest = vqa_digest(tool_options)
    if digest is not None:
        fingerprint["vqa_digest"] = digest

    with StageOutput(cfg.out, fingerprint, shard=shard, force=cfg.force) as so:
        already = so.already
        images = _question_images(cfg.questions, so.rejects)
        todo = _count_todo(cfg.samples, so)

        def input_problem(s: Sample) -> str | None:
            # An image that cannot be read is the input's fault, not the program's: the
            # sample is rejected (not done), so a re-run executes it once the image is back.
            if s.qid not in images:
                return f"question {s.qid!r} not found in {cfg.questions}"
            if not so.owns(s.qid) or so.done(s.id):
                return None
            return checks.first_problem(images[s.qid])

        def write(rec: Execution) -> None:
            so.write(rec)
            status[rec.status] += 1
            bar.advance()

        def jobs() -> Iterator[Job]:
            for s in read_records(
                cfg.samples, Sample, rejects=so.rejects, check=input_problem, allow_empty=empty_ok
            ):
                if not so.owns(s.qid) or so.done(s.id) or s.id in inflight:
                    continue
                paths = images[s.qid]
                if not s.valid:
                    why = f"invalid sample: {s.reason or 'no program'}"
                    write(Execution(id=s.id, qid=s.qid, status="error", error=why, k=s.k))
                    continue
                inflight[s.id] = (s.qid, s.k)
                yield Job(
                    id=s.id,
                    program=s.program,
                    image=paths[0],
                    syntax=s.syntax,
                    more_images=tuple(paths[1:]),
                )

        def record(res: JobResult) -> Execution:
            qid, k = inflight.pop(res.id)
            return Execution(
                id=res.id,
                qid=qid,
                status=res.status,
                answer=res.answer,
                error=res.error,
                trace=res.trace,
                stdout=res.stdout,
                wall_ms=res.wall_ms,
                k=k,
            )

        if todo == 0:  # finished already: re-read inputs (rejects file) but start nothing
            for _ in read_records(
                cfg.samples, Sample, rejects=so.rejects, check=input_problem, allow_empty=empty_ok
            ):
                pass
            return _summary(so.written, already, so.rejects.count, status, 0, t0, {}, None)
        with (
            progress_bar("execute", total=todo, unit="programs", enabled=cfg.progress) as bar,
            SandboxPool(cfg.limits(), workers=cfg.workers, namespace=cfg.namespace) as pool,
        ):
            tools = tools if tools is not None else make_tool_server(cfg.backend, tool_options)
            for res in pool.run(jobs(), tools):
                write(record(res))
            layers = pool.layers
            forks = pool.stats["forks"]
            bar.complete()  # rejected samples were in the total
            bar_s = bar.elapsed
        written = so.written
        rejected = so.rejects.count
    return _summary(written, already, rejected, status, forks, t0, layers, tools, bar_s)


def _summary(
    written: int,
    already: int,
    rejected: int,
    status: Counter[str],
    forks: int,
    t0: float,
    layers: dict[str, Any],
    tools: Any,
    bar_s: float | None = None,
) -> dict[str, Any]:
    """``bar_s``: the progress bar's life, over which the rate is given (the bar's last
    line shows the same figure); the whole wall time when nothing ran."""
    wall = time.perf_counter() - t0
    rate_s = bar_s if bar_s else wall
    summary: dict[str, Any] = {
        "written": written,
        "already_done": already,
        "rejected": rejected,
        "statuses": dict(status),
        "programs_run": forks,
        "wall_s": round(wall, 3),
        "programs_per_s": round(written / rate_s, 2) if rate_s > 0 else 0.0,
        "sandbox_layers": layers,
    }
    summary.update(_cache_stats(tools))
    return summary


def summary_line(cfg: ExecuteConfig, s: dict[str, Any]) -> str:
    """What `vpd execute` prints when it is done."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())) or "nothing new"
    msg = (
        f"execute -> {cfg.out}: {s['written']} written ({counts}), {s['already_done']} "
        f"already done, {s['programs_per_s']} programs/s"
    )
    if "cache_hit_rate" in s:
        msg += f", tool cache hit rate {s['cache_hit_rate']:.0%}"
    if s["rejected"]:
        msg += f"; {s['rejected']} rejected input lines (see {cfg.out}.rejects.jsonl)"
    return msg

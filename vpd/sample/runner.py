"""``vpd sample``: ask an LLM for k candidate programs per question (resumable).

For each question of the shard, only the missing ``(qid, k)`` samples are asked for. The
prompt is a versioned template (``prompts/<family>/<version>``) with the ``shots`` pool
examples most similar to the question text. Every completion becomes a ``Sample`` record,
written (flushed) as soon as it arrives: a completion holding no usable program is kept
with ``valid=False`` and the reason, never dropped. A dead LLM server stops the run with a
one-line error after bounded retries; what was written stays and a re-run resumes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.llm import make_llm
from vpd.llm.base import LLM, Completion, GenParams, stream
from vpd.llm.config import LLMConfig
from vpd.options import force_field, progress_field, shard_field
from vpd.progress import progress_bar
from vpd.records import Question, Sample, Usage, sample_id
from vpd.sample.extract import extract_program
from vpd.sample.prompt import PromptTemplate
from vpd.store import StageOutput, parse_shard, read_records

RAW_KEEP = 4000  # characters of the raw completion kept on invalid / repaired samples


class SampleConfig(BaseModel):
    """Ask an LLM for K candidate programs per question (resumable: re-run to continue).

    Every option of ``vpd sample`` (CLI flags and the recipe's ``sample:`` section).
    """

    model_config = ConfigDict(extra="forbid")

    questions: Path = Field(description="Questions JSONL (vpd data synth/import).")
    out: Path = Field(description="Samples JSONL (k records per question).")
    k: int = Field(5, ge=1, le=1000, description="Programs per question.")
    temperature: float = Field(0.5, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(128, ge=1, description="Max new tokens per program.")
    shots: int = Field(3, ge=0, description="Few-shot examples retrieved per question.")
    prompt: str = Field("viper/v1", description="prompts/<family>/<version> or a folder.")
    syntax: Literal["viper", "visprog"] | None = Field(
        None, description="Program syntax (default: the prompt's family)."
    )
    seed: int = Field(0, description="Base seed (sample k uses seed*1000+k).")
    # Sample only the first N questions (file order, after sharding); None: all. A cheap
    # run can program a subset and train the rest on labels (`vpd rationalize --add-labelled`).
    limit: int | None = Field(None, ge=1, description="Only the first N questions (file order).")
    stop: list[str] | None = Field(
        None, description="Stop string (repeatable; default: the end of the code block)."
    )
    llm: LLMConfig = Field(
        default_factory=LLMConfig,
        description="The program writer (its fields are flags of vpd sample).",
        json_schema_extra={"cli": False},
    )
    shard: str | None = shard_field()
    force: bool = force_field()
    progress: bool = progress_field()

    def resolved_syntax(self, prompt: PromptTemplate) -> str:
        return self.syntax or ("visprog" if prompt.family == "visprog" else "viper")

    def resolved_stop(self) -> list[str]:
        # The closing fence of the answer's code block: nothing after it is program.
        return list(self.stop) if self.stop is not None else ["\n```"]

    def fingerprint(self, prompt: PromptTemplate) -> dict[str, Any]:
        """What changes the samples written (k may grow on resume: more samples, same file)."""
        return {
            "stage": "sample",
            "prompt_id": prompt.id,
            "syntax": self.resolved_syntax(prompt),
            "shots": self.shots,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": self.resolved_stop(),
            "llm": self.llm.fingerprint(),
        }


def sample_seed(base: int, k: int) -> int:
    """Seed of sample k: the same for every question (prompts differ), distinct per k."""
    return base * 1000 + k


def _to_sample(
    q: Question, k: int, c: Completion, syntax: str, model: str, cfg: SampleConfig, pid: str
) -> Sample:
    extra: dict[str, Any] = {"finish_reason": c.finish_reason}
    if c.error is not None:
        ex_program, valid, reason, repaired = "", False, f"LLM error: {c.error}", None
    else:
        ex = extract_program(c.text, syntax)
        ex_program, valid, reason, repaired = ex.program, ex.valid, ex.reason, ex.repaired
        if not valid and c.finish_reason == "length" and reason:
            reason += " (completion hit max_tokens)"
    if repaired:
        extra["repaired"] = repaired
    if not valid or repaired:
        extra["raw"] = c.text[:RAW_KEEP]
    return Sample(
        id=sample_id(q.id, k),
        qid=q.id,
        k=k,
        program=ex_program,
        syntax=syntax,  # type: ignore[arg-type]
        model=model,
        temperature=cfg.temperature,
        seed=c.seed,
        prompt_id=pid,
        usage=Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
        latency_s=round(c.latency_s, 4),
        valid=valid,
        reason=reason,
        **extra,
    )


def _chunk_size(cfg: SampleConfig, n: int) -> int:
    """Questions per LLM call: enough to keep the backend busy, small enough to stream."""
    if cfg.llm.backend == "openai":
        return max(1, 4 * cfg.llm.concurrency)
    if cfg.llm.backend == "vllm":
        return 256  # vLLM schedules a big batch itself
    # The local engine batches continuously: hand it many questions so rows stay busy.
    return max(1, 32 * cfg.llm.batch_size // max(1, n))


@with_config(ConfigDict(extra="forbid"))
class SampleSummary(TypedDict, total=False):
    """What `vpd sample` returns (rates over the progress bar's life).

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    prompt_id: str
    questions: int
    written: int
    valid: int
    invalid: int
    already_done: int
    rejected: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    samples_per_s: float | None
    tokens_per_s: float | None


def run_sample(cfg: SampleConfig, llm: LLM | None = None) -> SampleSummary:
    """Sample ``k`` programs per question into ``cfg.out``; returns a summary dict.

    ``llm``: an already-built LLM (tests, notebooks); by default one is built from
    ``cfg.llm`` when there is work to do and closed at the end.
    """
    t0 = time.perf_counter()
    prompt = PromptTemplate(cfg.prompt)
    syntax = cfg.resolved_syntax(prompt)
    shard = parse_shard(cfg.shard)
    summary: dict[str, Any] = {
        "out": str(cfg.out),
        "prompt_id": prompt.id,
        "questions": 0,
        "written": 0,
        "valid": 0,
        "invalid": 0,
        "already_done": 0,
        "rejected": 0,
    }
    owned_llm: LLM | None = None
    with StageOutput(cfg.out, cfg.fingerprint(prompt), shard=shard, force=cfg.force) as so:
        todo: dict[tuple[int, ...], list[Question]] = defaultdict(list)
        n_todo = 0
        for q in read_records(cfg.questions, Question, so.rejects):
            if not so.owns(q.id):
                continue
            if cfg.limit is not None and summary["questions"] >= cfg.limit:
                break
            summary["questions"] += 1
            missing = tuple(k for k in range(cfg.k) if not so.done(sample_id(q.id, k)))
            summary["already_done"] += cfg.k - len(missing)
            if missing:
                todo[missing].append(q)
                n_todo += len(missing)
        summary["rejected"] = so.rejects.count
        if n_todo == 0:
            summary["wall_s"] = round(time.perf_counter() - t0, 3)
            return summary
        tokens = [0, 0]
        try:
            with progress_bar(
                "sample", n_todo, "programs", enabled=cfg.progress, counters=("tok",)
            ) as bar:
                # The bar starts before the model loads (minutes for a big one), and says so.
                if llm is None:
                    bar.describe(f"sample: loading {cfg.llm.model or cfg.llm.backend}")
                    llm = owned_llm = make_llm(cfg.llm)
                bar.describe(f"sample: {llm.name}: encoding the first prompts")
                first = True
                for ks, qs in todo.items():
                    params = GenParams(
                        n=len(ks),
                        temperature=cfg.temperature,
                        max_tokens=cfg.max_tokens,
                        stop=cfg.resolved_stop(),
                        seeds=[sample_seed(cfg.seed, k) for k in ks],
                    )
                    step = _chunk_size(cfg, len(ks))
                    for s in range(0, len(qs), step):
                        chunk = qs[s : s + step]
                        batch = [prompt.messages(q.question, cfg.shots) for q in chunk]
                        for i, c in stream(llm, batch, params):
                            if first:
                                bar.describe("sample", announce=False)
                                first = False
                            q, k = chunk[i], ks[c.index]
                            rec = _to_sample(q, k, c, syntax, llm.name, cfg, prompt.id)
                            so.write(rec)
                            summary["valid" if rec.valid else "invalid"] += 1
                            tokens[0] += c.prompt_tokens
                            tokens[1] += c.completion_tokens
                            bar.advance()
                            bar.count("tok", c.completion_tokens)
                        so.sync()
                gen_s = bar.elapsed
        finally:
            summary["written"] = so.written
            if owned_llm is not None:
                owned_llm.close()
    wall = time.perf_counter() - t0
    # Rates over the bar's life (model loading included), the figures its last line shows.
    summary.update(
        model=llm.name,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        wall_s=round(wall, 3),
        samples_per_s=round(summary["written"] / gen_s, 3) if gen_s > 0 else None,
        tokens_per_s=round(tokens[1] / gen_s, 1) if gen_s > 0 else None,
    )
    return summary


def summary_line(cfg: SampleConfig, s: dict[str, Any]) -> str:
    """What `vpd sample` prints when it is done."""
    msg = (
        f"sample -> {s['out']}: {s['written']} written ({s['valid']} valid, {s['invalid']} "
        f"without a usable program), {s['already_done']} already done, {s['rejected']} rejected"
    )
    if s.get("samples_per_s"):
        msg += f"; {s['samples_per_s']} programs/s, {s['tokens_per_s']} generated tokens/s"
    return msg

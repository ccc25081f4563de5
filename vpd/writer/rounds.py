"""The rounds of expert iteration in `vpd run` (a recipe's ``writer:`` section).

Round ``r`` (1..N) tunes a writer on the kept programs of every earlier round (round 0 is
the run's own sample/execute/verify with the untuned writer), then samples the training
questions with it, executes and verifies them: its kept programs feed round ``r + 1``, and
the last round's writer is the run's program writer (the ``programs`` arm and SDVP use it,
and rationalize reads its verified programs).

Each round is a folder (``<run>/writer/round<r>/``: ``model/``, ``samples.jsonl``,
``executions.jsonl``, ``verified.jsonl``, ``round.json``) with its own fingerprint: its
options and the fingerprint of the round before it. A finished round with the same
fingerprint is skipped, an unfinished one resumes (each step keeps its own resume
contract), and one made under other options is an error unless ``force``, which moves that
round aside (``round<r>.<stamp>.bak``) and runs it again; the rounds after it then see a
new fingerprint before them and run again too. So raising ``rounds`` from 1 to 2 runs round
2 alone, and changing round 2's options leaves round 1 as it is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator, with_config
from typing_extensions import TypedDict

from vpd.errors import ConfigMismatch
from vpd.execute import ExecuteConfig, run_execute
from vpd.records import Question, Sample, Verified
from vpd.runpaths import round_files
from vpd.sample import SampleConfig, run_sample
from vpd.sample.prompt import PromptTemplate
from vpd.store import atomic_write, atomic_write_json, iter_ids, read_json, read_records, set_aside
from vpd.transfer import TransferCheck, spread_programs
from vpd.verify import VerifyConfig, run_verify
from vpd.writer.data import program_key
from vpd.writer.train import WriterConfig, run_writer

# The per-round options a recipe's ``writer:`` section may hold besides WriterConfig's.
ROUND_OPTIONS = ("rounds", "limit", "k", "temperature")


def writer_sample_options(
    sample: dict[str, Any], writer: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Sample options for the writer tuned in the round folder ``out``: ``sample`` with that
    writer's model, and the prompt and shots it was tuned with (``writer``'s, else
    WriterConfig's defaults)."""
    fields = WriterConfig.model_fields
    return {
        **sample,
        "prompt": writer.get("prompt", fields["prompt"].default),
        "shots": writer.get("shots", fields["shots"].default),
        "llm": {**(sample.get("llm") or {}), "model": str(round_files(out)["final"])},
    }


def prompt_tokens_per_request(samples: Path) -> float | None:
    """Mean prompt tokens per request of a samples file (each question's prompt once, not
    once per sample; None: no samples)."""
    per_q: dict[str, int] = {}
    if Path(samples).exists():
        for s in read_records(samples, Sample, allow_empty=True):
            per_q.setdefault(s.qid, s.usage.prompt_tokens)
    return round(sum(per_q.values()) / len(per_q), 1) if per_q else None


class RoundConfig(BaseModel):
    """One round of expert iteration: tune the writer on the kept programs so far, then
    sample, execute and verify the training questions with it."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=1, description="The round's number (round 0: the untuned writer).")
    out: Path = Field(description="The round's folder.")
    verified: list[Path] = Field(description="Verified JSONL of the rounds before it.")
    questions: Path = Field(description="The training questions.")
    exclude: list[Path] = Field(
        default_factory=list, description="Question files that must never reach the writer."
    )
    previous: Path | None = Field(None, description="The round before's folder (None: round 1).")
    writer: dict[str, Any] = Field(default_factory=dict, description="WriterConfig options.")
    sample: dict[str, Any] = Field(default_factory=dict, description="SampleConfig options.")
    execute: dict[str, Any] = Field(default_factory=dict, description="ExecuteConfig options.")
    verify: dict[str, Any] = Field(default_factory=dict, description="VerifyConfig options.")
    spread: int = Field(
        0,
        ge=0,
        description="Fill each template up to N training questions with a verified program "
        "before tuning: kept programs of a template with fewer, rewritten for its other "
        "training questions (vpd.transfer.spread_programs), teach each one they answer "
        "right. 0: off.",
    )
    force: bool = Field(False, description="Run again a round made under other options.")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="after")
    def _options(self) -> RoundConfig:
        # The recipe's writer/sample options are checked when the recipe is read, not
        # after the stages before this one have run.
        try:
            self.writer_config()
            self.sample_config()
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{where}: {err['msg']}") from None
        return self

    def writer_config(self) -> WriterConfig:
        """The round's writer tuning: the recipe's writer options, the run's files."""
        f = round_files(self.out)
        return WriterConfig(
            **{
                **self.writer,
                "verified": [*self.verified, *([f["spread"]] if self.spread else [])],
                "questions": self.questions,
                "exclude": self.exclude,
                "out": f["model"],
                "progress": self.progress,
                "force": self.force,
            }
        )

    def sample_config(self) -> SampleConfig:
        """The round's sampling: the sample options with the tuned writer."""
        fields = {
            **writer_sample_options(self.sample, self.writer, self.out),
            "questions": self.questions,
            "out": round_files(self.out)["samples"],
            "progress": self.progress,
        }
        return SampleConfig(**fields)

    def execute_config(self) -> ExecuteConfig:
        """The round's execution of its samples."""
        f = round_files(self.out)
        return ExecuteConfig(
            **{
                **self.execute,
                "samples": f["samples"],
                "questions": self.questions,
                "out": f["executions"],
                "progress": self.progress,
            }
        )

    def verify_config(self) -> VerifyConfig:
        """The round's verification of its executions (also the transfer options spread
        runs under)."""
        f = round_files(self.out)
        return VerifyConfig(
            **{
                **self.verify,
                "samples": f["samples"],
                "questions": self.questions,
                "executions": f["executions"],
                "out": f["verified"],
                "progress": self.progress,
            }
        )

    def fingerprint(self) -> str:
        """The round's options as its steps resolve them (an option written out at its
        default is the same round) and the fingerprint of the round before it. Its files are
        left out: they follow from the run directory and the round's number, so a copied or
        moved run keeps its rounds."""
        writer = self.writer_config().model_dump(mode="json", exclude=_NOT_OPTIONS | _FILES)
        sample = self.sample_config().model_dump(mode="json", exclude=_NOT_OPTIONS | _FILES)
        sample["llm"].pop("model")  # this round's writer
        mine = {
            "round": self.round,
            "rounds_before": len(self.verified),
            "writer": writer,
            "sample": sample,
            "execute": self.execute,
            "verify": self.verify,
            # only when on: rounds made before the option keep their fingerprint
            **({"spread": self.spread} if self.spread else {}),
        }
        before = (read_json(round_files(self.previous)["marker"]) or {}) if self.previous else {}
        text = json.dumps([mine, before.get("fingerprint")], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# What a step's config holds that does not change its output, and the files of the round.
_NOT_OPTIONS = {"progress", "force", "resume", "num_workers", "save_total_limit", "shard"}
_FILES = {"verified", "questions", "exclude", "out"}


@with_config(ConfigDict(extra="forbid"))
class RoundSummary(TypedDict, total=False):
    """What a round returns (also its ``round.json``'s ``summary``)."""

    round: int
    writer_examples: int
    spread_questions: int
    writer_questions: int
    writer_steps: int
    writer_train_s: float
    questions: int
    questions_with_kept: int
    kept_rate: float
    samples: int
    programs_per_s: float | None
    prompt_tokens_per_request: float | None
    sample_s: float
    wall_s: float
    skipped: bool


def run_round(cfg: RoundConfig) -> RoundSummary:
    """Run (or resume, or skip) one round; returns its summary."""
    t0 = time.time()
    f = round_files(cfg.out)
    fp = cfg.fingerprint()
    old = read_json(f["marker"])
    if old is not None and old.get("fingerprint") == fp and old.get("done"):
        return {**old["summary"], "skipped": True}
    if old is not None and old.get("fingerprint") != fp:
        if not cfg.force:
            raise ConfigMismatch(
                f"writer round {cfg.round} in {cfg.out} was made with other options (or after "
                "another round before it); --force runs it again (the old one is kept as .bak)"
            )
        set_aside(cfg.out)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(f["marker"], {"fingerprint": fp, "done": False})

    spread = run_spread(cfg) if cfg.spread else None
    wsum = run_writer(cfg.writer_config())
    ssum = run_sample(cfg.sample_config())
    run_execute(cfg.execute_config())
    vsum = run_verify(cfg.verify_config())
    funnel = vsum.get("funnel") or {}
    asked = int(funnel.get("questions_verified") or 0)
    with_kept = int(funnel.get("questions_with_kept") or 0)
    summary: RoundSummary = {
        "round": cfg.round,
        "writer_examples": int(wsum.get("examples") or 0),
        **({"spread_questions": spread} if spread is not None else {}),
        "writer_questions": int(wsum.get("questions") or 0),
        "writer_steps": int(wsum.get("steps") or 0),
        "writer_train_s": float(wsum.get("train_s") or 0.0),
        "questions": asked,
        "questions_with_kept": with_kept,
        "kept_rate": round(with_kept / asked, 4) if asked else 0.0,
        "samples": sum(1 for _ in iter_ids(f["samples"])),
        "programs_per_s": ssum.get("samples_per_s"),
        "prompt_tokens_per_request": prompt_tokens_per_request(f["samples"]),
        "sample_s": float(ssum.get("wall_s") or 0.0),
        "wall_s": round(time.time() - t0, 1),
        "skipped": False,
    }
    atomic_write_json(f["marker"], {"fingerprint": fp, "done": True, "summary": summary}, indent=2)
    return summary


def run_spread(cfg: RoundConfig) -> int:
    """Write the round's spread programs (``spread.jsonl``, Verified records the writer
    tunes on beside the kept ones; ``spread/``: their runs, which resume) and return how
    many there are. The kept programs are the distinct ones the writer would use
    (``per_question`` per question) of the rounds before; their rewrites run under the
    transfer check's execute options."""
    f = round_files(cfg.out)
    writer = cfg.writer_config()
    sample = cfg.sample_config()
    syntax = sample.resolved_syntax(PromptTemplate(sample.prompt))
    questions = {q.id: q for q in read_records(cfg.questions, Question)}
    kept: list[tuple[Question, Sample]] = []
    seen: dict[str, set[str]] = {}
    for path in cfg.verified:
        for rec in read_records(Path(path), Verified):
            q = questions.get(rec.qid)
            mine = seen.setdefault(rec.qid, set())
            key = program_key(rec.program)
            if not rec.kept or q is None or key in mine or len(mine) >= writer.per_question:
                continue
            mine.add(key)
            kept.append((q, Sample(id=rec.id, qid=q.id, k=0, program=rec.program, syntax=syntax)))
    verify = cfg.verify_config()
    check = TransferCheck(
        questions.values(),
        partners=cfg.spread,
        min_right=1.0,  # unused: spread_programs asks every one-for-one try right
        keys=verify.transfer_keys,
        metric=verify.metric,
        threshold=verify.threshold,
        execute=verify.execute or cfg.execute,
        questions=cfg.questions,
        work=f["spread_runs"],
        force=cfg.force,
    )
    spread = spread_programs(kept, check, cfg.spread)
    atomic_write(
        f["spread"],
        "".join(
            Verified(
                id=sp.sample_id,
                qid=sp.question.id,
                answer=sp.answer,
                score=1.0,
                kept=True,
                reason=f"spread: the program of {sp.source}, rewritten for this question",
                program=sp.program,
                source=sp.source,
            ).model_dump_json()
            + "\n"
            for sp in spread
        ),
    )
    return len(spread)

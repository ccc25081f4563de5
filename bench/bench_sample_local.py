"""Local sampling: vpd's engine vs the naive Hugging Face loop, measured in the same run.

Both sample k programs per question for the first demo questions (recipes/demo-cpu.yaml's
data: synth, n=1000, seed 0), with the same prompt, model, temperature and stop string.
The baseline is what a user writes first: one question at a time,
``model.generate(..., num_return_sequences=k)`` (``vpd.llm.local.naive_generate``), on the
model as ``from_pretrained`` loads it (float32, transformers' default, as the issue that
set the target measured it) and, with ``--baseline-dtype float32,same``, also on the
engine's own weights (bfloat16 where the CPU has AMX / AVX512-BF16).
Then both sets of programs are executed with the synthetic tools and verified, and the
share of questions with at least one correct program (the quality VPD needs) is printed
next to programs/s and generated tokens/s, with the ratio. The engine runs before and
after the baselines (the machine's speed drifts; the ratio takes both runs, which must
write the same programs).

    .venv/bin/python bench/bench_sample_local.py                 # 40 questions, k=5
    .venv/bin/python bench/bench_sample_local.py --baseline-questions 10   # quicker baseline
    .venv/bin/python bench/bench_sample_local.py --prompt viper/v1 --dtype float32
    .venv/bin/python bench/bench_sample_local.py --baseline-dtype float32,same  # two baselines
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpd.data.synth import generate  # noqa: E402
from vpd.execute import ExecuteConfig, run_execute  # noqa: E402
from vpd.llm import Completion, GenParams, LLMConfig, Messages  # noqa: E402
from vpd.llm.local import LocalLLM, naive_generate  # noqa: E402
from vpd.sample import SampleConfig, run_sample  # noqa: E402
from vpd.verify import VerifyConfig, run_verify  # noqa: E402


class NaiveHF:
    """The baseline as an ``LLM``: the engine's own model and tokenizer, plain generate."""

    def __init__(self, local: LocalLLM) -> None:
        self.local = local
        self.name = local.name

    def stream(self, batch: list[Messages], params: GenParams) -> Iterator[tuple[int, Completion]]:
        seeds = params.sample_seeds()
        for i, messages in enumerate(batch):
            prompt = self.local.prompt_ids(messages)
            res = naive_generate(self.local.model, self.local.tok, prompt, params, self.local.eos)
            for j, (text, n_tok, reason, dt) in enumerate(res):
                yield i, Completion(text, len(prompt), n_tok, dt, seeds[j], reason, j)

    def close(self) -> None:
        pass


def _questions(tmp: Path, n: int) -> Path:
    generate(tmp / "data", n=1000, seed=0, test_frac=0.2, progress=False)
    rows = (tmp / "data" / "train.jsonl").read_text().splitlines()[:n]
    out = tmp / "data" / f"first{n}.jsonl"
    out.write_text("".join(r + "\n" for r in rows))
    return out


def _arm(name: str, llm: Any, questions: Path, tmp: Path, a: argparse.Namespace) -> dict:
    cfg = SampleConfig(
        questions=questions,
        out=tmp / f"{name}.samples.jsonl",
        k=a.k,
        temperature=0.5,
        shots=3,
        max_tokens=128,
        prompt=a.prompt,
        seed=a.seed,
        progress=False,
        llm=LLMConfig(backend="local", batch_size=a.rows, dtype=a.dtype),
    )
    t0 = time.perf_counter()
    s = run_sample(cfg, llm=llm)
    wall = time.perf_counter() - t0
    ex = tmp / f"{name}.executions.jsonl"
    run_execute(ExecuteConfig(samples=cfg.out, questions=questions, out=ex, progress=False))
    ver = tmp / f"{name}.verified.jsonl"
    run_verify(
        VerifyConfig(executions=ex, samples=cfg.out, questions=questions, out=ver, progress=False)
    )
    kept_q = {json.loads(x)["qid"] for x in ver.read_text().splitlines() if json.loads(x)["kept"]}
    return {
        "programs": s["written"],
        "valid": s["valid"],
        "wall": wall,
        "prog_s": s["written"] / wall,
        "tok_s": s["completion_tokens"] / wall,
        "tokens": s["completion_tokens"],
        "questions": s["questions"],
        "with_correct": len(kept_q),
    }


def _programs(samples: Path) -> dict[tuple[str, int], str]:
    rows = (json.loads(x) for x in samples.read_text().splitlines())
    return {(r["qid"], r["k"]): r["program"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--baseline-questions", type=int, default=None, help="default: --questions")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rows", type=int, default=128, help="engine rows in flight (the demo's)")
    ap.add_argument("--prompt", default="viper/v1", help="prompt version (the demo's: viper/v1)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (both arms)")
    ap.add_argument(
        "--baseline-dtype", default="float32",
        help="dtype(s) of the naive loop's model, comma-separated; 'same' = the engine's "
        "(default float32: what from_pretrained gives)",
    )  # fmt: skip
    ap.add_argument("--skip-baseline", action="store_true")
    a = ap.parse_args()
    base_dtypes = [x.strip() for x in a.baseline_dtype.split(",") if x.strip()]
    if not base_dtypes or any(x not in ("same", "float32", "bfloat16") for x in base_dtypes):
        ap.error("--baseline-dtype: a comma-separated list of float32, bfloat16, same")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        qs = _questions(tmp, a.questions)
        local = LocalLLM(LLMConfig(backend="local", batch_size=a.rows, dtype=a.dtype))
        print(f"model {local.name} ({local.dtype}), prompt {a.prompt}, k={a.k}, rows {a.rows}")
        eng = _arm("engine", local, qs, tmp, a)
        rows = [("vpd engine", eng)]
        bases: list[tuple[str, dict]] = []
        if not a.skip_baseline:
            nb = a.baseline_questions or a.questions
            bq = _questions(tmp, nb) if nb != a.questions else qs
            for dt in base_dtypes:
                dt = local.dtype if dt == "same" else dt
                model = (
                    local if dt == local.dtype else LocalLLM(LLMConfig(backend="local", dtype=dt))
                )
                name = f"naive HF ({dt})"
                bases.append((name, _arm(f"naive-{dt}", NaiveHF(model), bq, tmp, a)))
            # The engine again after the baselines: this machine's speed drifts over the
            # minutes the baselines take, so the ratio uses both engine runs (their
            # programs must also be the same, bit for bit).
            again = _arm("engine2", local, qs, tmp, a)
            same = _programs(tmp / "engine.samples.jsonl") == _programs(
                tmp / "engine2.samples.jsonl"
            )
            rows = [("vpd engine (1st)", eng), *bases, ("vpd engine (2nd)", again)]
            eng = {
                "prog_s": (eng["programs"] + again["programs"]) / (eng["wall"] + again["wall"]),
                "tok_s": (eng["tokens"] + again["tokens"]) / (eng["wall"] + again["wall"]),
            }
        print(f"{'':20} {'questions':>9} {'programs':>8} {'wall s':>8} {'programs/s':>10} "
              f"{'gen tok/s':>9} {'q with a correct program':>25}")  # fmt: skip
        for name, r in rows:
            share = (
                f"{r['with_correct']}/{r['questions']} ({r['with_correct'] / r['questions']:.0%})"
            )
            print(f"{name:20} {r['questions']:9d} {r['programs']:8d} {r['wall']:8.1f} "
                  f"{r['prog_s']:10.2f} {r['tok_s']:9.1f} {share:>25}")  # fmt: skip
        if bases:
            print(f"the engine's two runs wrote the same programs: {'yes' if same else 'NO'}; "
                  f"both runs together: {eng['prog_s']:.2f} programs/s")  # fmt: skip
        for name, base in bases:
            print(f"speed-up over {name}: {eng['prog_s'] / base['prog_s']:.1f}x programs/s, "
                  f"{eng['tok_s'] / base['tok_s']:.1f}x generated tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()

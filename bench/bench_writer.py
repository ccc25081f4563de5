"""Sampling with a tuned program writer against the untuned one, measured in the same run.

The untuned writer is the demo's: SmolLM2-135M-Instruct with the full prompt (viper/v1: the
API spec and 3 retrieved shots). The tuned writer is a `vpd tune-writer` folder with its
own prompt (viper/writer: two lines, no shots): it has learned the API from its programs,
so each request is a fraction of the tokens. Both sample k programs for the same questions
(a synthetic set drawn with its own seed, so not the questions the writer trained on), on
vpd's engine with the demo's settings; the arms run A B A B (this machine's speed drifts)
and each arm's rate pools its two runs. The programs are then executed and verified, and
the share of questions with a correct program is printed beside programs/s and prompt
tokens per request, with the ratio.

    .venv/bin/python bench/bench_writer.py       # the last round of `make writer`
    .venv/bin/python bench/bench_writer.py --writer W --questions 40 --k 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpd.data.synth import generate  # noqa: E402
from vpd.execute import ExecuteConfig, run_execute  # noqa: E402
from vpd.llm import LLMConfig  # noqa: E402
from vpd.llm.local import LocalLLM  # noqa: E402
from vpd.sample import SampleConfig, run_sample  # noqa: E402
from vpd.verify import VerifyConfig, run_verify  # noqa: E402


def _questions(tmp: Path, n: int, seed: int) -> Path:
    generate(tmp / "data", n=max(n * 2, 50), seed=seed, test_frac=0.2, progress=False)
    rows = (tmp / "data" / "train.jsonl").read_text().splitlines()[:n]
    out = tmp / "data" / f"first{n}.jsonl"
    out.write_text("".join(r + "\n" for r in rows))
    return out


def _arm(name: str, llm: LocalLLM, prompt: str, shots: int, qs: Path, tmp: Path, k: int) -> dict:
    cfg = SampleConfig(
        questions=qs, out=tmp / f"{name}.samples.jsonl", k=k, temperature=0.5, shots=shots,
        max_tokens=128, prompt=prompt, progress=False,
        llm=LLMConfig(backend="local", model=llm.cfg.model, batch_size=llm.cfg.batch_size),
    )  # fmt: skip
    t0 = time.perf_counter()
    s = run_sample(cfg, llm=llm)
    wall = time.perf_counter() - t0
    ex = tmp / f"{name}.executions.jsonl"
    run_execute(ExecuteConfig(samples=cfg.out, questions=qs, out=ex, progress=False))
    ver = tmp / f"{name}.verified.jsonl"
    run_verify(VerifyConfig(executions=ex, samples=cfg.out, questions=qs, out=ver, progress=False))
    kept = {json.loads(x)["qid"] for x in ver.read_text().splitlines() if json.loads(x)["kept"]}
    rows = [json.loads(x) for x in cfg.out.read_text().splitlines()]
    per_q = {r["qid"]: r["usage"]["prompt_tokens"] for r in rows}
    return {
        "programs": s["written"],
        "wall": wall,
        "prompt_tokens": sum(per_q.values()) / max(len(per_q), 1),
        "questions": s["questions"],
        "kept": len(kept),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--writer",
        default="runs/writer-cpu/writer/round2/model/final",
        help="a tuned writer folder (default: the last round of `make writer`)",
    )
    ap.add_argument("--prompt", default="viper/writer", help="the tuned writer's prompt")
    ap.add_argument("--shots", type=int, default=0, help="the tuned writer's shots")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rows", type=int, default=128, help="engine rows in flight (the demo's)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the synthetic question set")
    a = ap.parse_args()
    if not (Path(a.writer) / "config.json").is_file():
        # `make bench` runs every bench with no options: this one needs a tuned writer.
        print(f"bench_writer: no tuned writer at {a.writer}; run `make writer` or pass --writer")
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        qs = _questions(tmp, a.questions, a.seed)
        untuned = LocalLLM(LLMConfig(backend="local", batch_size=a.rows))
        tuned = LocalLLM(LLMConfig(backend="local", model=a.writer, batch_size=a.rows))
        arms = {
            "untuned (viper/v1, 3 shots)": (untuned, "viper/v1", 3),
            f"tuned ({a.prompt}, {a.shots} shots)": (tuned, a.prompt, a.shots),
        }
        runs: dict[str, list[dict]] = {name: [] for name in arms}
        for rep in range(2):  # A B A B
            for i, (name, (llm, prompt, shots)) in enumerate(arms.items()):
                runs[name].append(_arm(f"{i}-{rep}", llm, prompt, shots, qs, tmp, a.k))
    print(f"{a.questions} questions (synth seed {a.seed}), k={a.k}, rows {a.rows}")
    print(f"{'':32} {'programs/s':>10} {'prompt tokens':>13} {'q with a kept program':>22}")
    rate = {}
    for name, rs in runs.items():
        rate[name] = sum(r["programs"] for r in rs) / sum(r["wall"] for r in rs)
        r = rs[0]
        share = f"{r['kept']}/{r['questions']} ({r['kept'] / r['questions']:.0%})"
        print(f"{name:32} {rate[name]:10.2f} {r['prompt_tokens']:13.0f} {share:>22}")
    base, new = rate.values()
    print(f"tuned / untuned: {new / base:.2f}x programs/s (two runs each, A B A B)")


if __name__ == "__main__":
    main()

"""Sandbox overhead and tool-cache sharing of `vpd execute`.

Measures, in one run:
1. baseline: the same trivial programs exec'd in-process (compile + exec + call, with the
   same tool answers), no isolation at all;
2. the sandbox: SandboxPool (zygote, one locked-down child per program) with --workers;
3. a k=5 workload (5 programs per question asking overlapping tool calls) through a
   caching tool server, reporting the cache hit rate;
4. the REAL path: `vpd data synth` scenes, the hand-written template programs
   (tests/template_programs.py, k=5 per question: ViperGPT and VisProg variants), the
   real ToolServer on the synthetic backend: programs/s through the sandbox (the pool, and
   the whole `run_execute` stage with its JSONL I/O) vs the same programs in-process
   (vpd.tools.namespace.run_inprocess), agreement of the answers, and the real cache hit rate.

Prints programs/s, ms/program, the sandbox/baseline ratio and the per-program overhead.

    .venv/bin/python bench/bench_execute.py --n 400 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vpd.execute.pool import Job, Limits, SandboxPool  # noqa: E402
from vpd.execute.static import check_program  # noqa: E402
from vpd.execute.worker import _State, build_builtins, to_answer  # noqa: E402
from vpd.records import ToolCall  # noqa: E402
from vpd.tools.protocol import ToolRequest, ToolResponse  # noqa: E402

FAKE_NS = "tests.escapes.fake_api:build_namespace"

TRIVIAL = "def execute_command(image):\n    return {i}\n"
ONE_CALL = "def execute_command(image):\n    return len(image.find('obj{q}'))\n"
K5 = [
    "def execute_command(image):\n    return len(image.find('cat'))\n",
    "def execute_command(image):\n    cats = image.find('cat')\n    return len(cats) > 0\n",
    "def execute_command(image):\n    return image.exists('cat')\n",
    "def execute_command(image):\n    n = len(image.find('cat'))\n"
    "    return bool_to_yesno(n > 1)\n",
    "def execute_command(image):\n    return len(image.find('cat')) + len(image.find('dog'))\n",
]


class Tools:
    """Deterministic answers; optional (image, op, box, args) cache like the ToolServer's."""

    def __init__(self, cache: bool) -> None:
        self.cache: dict | None = {} if cache else None
        self.hits = self.misses = 0

    def _answer(self, r: ToolRequest) -> Any:
        if r.op == "find":
            return [[0, 0, 5, 5]] * (len(r.args.get("name", "")) % 3)
        if r.op == "exists":
            return True
        return "red"

    def call_batch(self, reqs: list[ToolRequest]) -> list[ToolResponse]:
        out = []
        for r in reqs:
            if self.cache is None:
                out.append(ToolResponse(True, self._answer(r)))
                continue
            key = r.cache_key()
            if key in self.cache:
                self.hits += 1
            else:
                self.misses += 1
                self.cache[key] = self._answer(r)
            out.append(ToolResponse(True, self.cache[key]))
        return out

    def summarize(self, req: ToolRequest, result: Any) -> ToolCall:
        return ToolCall(name=req.op, args=req.args, result=str(result)[:100])


def _real_server() -> Any | None:
    """The project's ToolServer on the synthetic backend, if it is installed."""
    try:
        from vpd.execute.runner import make_tool_server

        return make_tool_server("synthetic")
    except Exception:
        return None


def baseline(programs: list[str], namespace: str) -> float:
    """In-process: same static check + compile + exec + call + answer conversion."""
    mod, _, fn = namespace.partition(":")
    factory = getattr(__import__(mod, fromlist=[fn]), fn)
    tools = Tools(cache=False)

    def caller(op: str, box: Any, args: dict) -> Any:
        (resp,) = tools.call_batch([ToolRequest(op, "/img.png", box, args)])
        return resp.result

    t0 = time.perf_counter()
    for src in programs:
        res = check_program(src)
        api = factory(caller)
        g = {k: v for k, v in api.items() if not k.startswith("_")}
        g["__builtins__"] = build_builtins(_State(100, 1000))
        exec(compile(res.tree, "<program>", "exec"), g)
        to_answer(g["execute_command"](api["_root_patch"]()), None)
    return time.perf_counter() - t0


def sandboxed(programs: list[str], workers: int, namespace: str, tools: Any) -> float:
    with SandboxPool(
        Limits(timeout_s=10), workers=workers, namespace=namespace, extra_paths=[str(REPO)]
    ) as pool:
        list(pool.run([Job("warm", programs[0], "/img.png")], tools))  # zygote is up and warm
        t0 = time.perf_counter()
        res = list(pool.run([Job(str(i), p, "/img.png") for i, p in enumerate(programs)], tools))
        wall = time.perf_counter() - t0
    bad = [r for r in res if r.status != "ok"]
    if bad:
        raise SystemExit(f"bench programs failed: {bad[0].status} {bad[0].error}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="programs per measurement")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--namespace", default=FAKE_NS, help="module:function of the tool API")
    a = ap.parse_args()

    print(f"sandbox bench: n={a.n} workers={a.workers} cores={os.cpu_count()}")
    for label, tmpl in (("trivial (no tool call)", TRIVIAL), ("one tool call", ONE_CALL)):
        progs = [tmpl.format(i=i, q=i % 7) for i in range(a.n)]
        base = baseline(progs, a.namespace)
        sand = sandboxed(progs, a.workers, a.namespace, Tools(cache=False))
        b_ms, s_ms = base / a.n * 1000, sand / a.n * 1000
        print(
            f"  {label:24s} in-process {b_ms:7.3f} ms/prog ({a.n / base:8.0f}/s) | "
            f"sandbox {s_ms:6.3f} ms/prog ({a.n / sand:6.0f}/s) | "
            f"ratio {s_ms / b_ms:6.1f}x | overhead {s_ms - b_ms:5.2f} ms/prog"
        )

    questions = max(1, a.n // 5)
    progs = [K5[k] for _ in range(questions) for k in range(5)]
    images = [f"/img{q}.png" for q in range(questions) for _ in range(5)]
    real = _real_server()
    tools = Tools(cache=True)
    with SandboxPool(
        Limits(timeout_s=10), workers=a.workers, namespace=a.namespace, extra_paths=[str(REPO)]
    ) as pool:
        jobs = [Job(str(i), p, img) for i, (p, img) in enumerate(zip(progs, images, strict=True))]
        t0 = time.perf_counter()
        list(pool.run(jobs, tools))
        wall = time.perf_counter() - t0
    rate = tools.hits / max(1, tools.hits + tools.misses)
    print(
        f"  k=5 workload: {len(progs)} programs on {questions} images in {wall:.2f}s; "
        f"tool calls {tools.hits + tools.misses}, cache hit rate {rate:.0%} "
        f"(ideal for this workload: {1 - 3 / 6:.0%})"
    )
    if real is None:
        print("  (vpd.tools.server not importable: used the bench's stand-in cache)")
        return
    real_tools(a.n, a.workers)


def real_tools(n: int, workers: int) -> None:
    """Template programs on synth scenes, real ToolServer: sandbox vs in-process."""
    import json
    import tempfile

    from tests.template_programs import viper_program, visprog_program
    from vpd.data.synth import generate
    from vpd.execute import ExecuteConfig, run_execute
    from vpd.records import Sample
    from vpd.tools.backends import get_backend
    from vpd.tools.namespace import run_inprocess
    from vpd.tools.server import ToolServer

    def server() -> ToolServer:
        return ToolServer(get_backend("synthetic"))

    questions = max(1, n // 5)
    with tempfile.TemporaryDirectory(prefix="vpd-bench-exec-") as tmp:
        root = Path(tmp)
        generate(root, n=questions, seed=5, test_frac=0.0)
        qfile = root / "train.jsonl"
        recs = [json.loads(line) for line in qfile.read_text().splitlines()]
        samples: list[Sample] = []
        for rec in recs:
            vi, vp = viper_program(rec), visprog_program(rec)
            variants = [("viper", vi), ("visprog", vp) if vp else ("viper", vi)] * 3
            for k, (syntax, prog) in enumerate(variants[:5]):
                sid = f"{rec['id']}#{k}"
                samples.append(Sample(id=sid, qid=rec["id"], k=k, program=prog, syntax=syntax))
        image = {r["id"]: str((root / r["image"]).resolve()) for r in recs}
        print(f"real tools (synthetic backend): {len(samples)} programs, k=5 on {len(recs)} "
              f"questions ({sum(s.syntax == 'visprog' for s in samples)} VisProg)")  # fmt: skip

        srv = server()
        t0 = time.perf_counter()
        want = {s.id: run_inprocess(s.program, image[s.qid], srv, s.syntax)[0] for s in samples}
        base = time.perf_counter() - t0
        base_rate = _hit_rate(srv)

        srv = server()
        jobs = [Job(s.id, s.program, image[s.qid], s.syntax) for s in samples]
        with SandboxPool(Limits(timeout_s=10), workers=workers) as pool:
            list(pool.run([Job("warm", TRIVIAL.format(i=0), jobs[0].image)], srv))
            t0 = time.perf_counter()
            got = {r.id: r.answer for r in pool.run(jobs, srv) if r.status == "ok"}
            sand = time.perf_counter() - t0
        sand_rate = _hit_rate(srv)
        same = sum(got.get(k) == v for k, v in want.items())

        sfile = root / "samples.jsonl"
        sfile.write_text("".join(s.model_dump_json() + "\n" for s in samples))
        cfg = ExecuteConfig(
            samples=sfile, questions=qfile, out=root / "exec.jsonl", workers=workers,
            progress=False,
        )  # fmt: skip
        summary = run_execute(cfg)
    m = len(samples)
    print(
        f"  in-process run_inprocess  {m / base:7.1f} programs/s ({base / m * 1000:6.2f} ms/prog)"
        f", cache hit rate {base_rate:.0%}\n"
        f"  sandbox pool (w={workers})      {m / sand:7.1f} programs/s ({sand / m * 1000:6.2f} "
        f"ms/prog), cache hit rate {sand_rate:.0%}; answers equal in-process: {same}/{m}\n"
        f"  run_execute stage         {summary['programs_per_s']:7.1f} programs/s "
        f"(incl. zygote start, JSONL I/O), cache hit rate {summary.get('cache_hit_rate', 0):.0%}"
        f"\n  sandbox / in-process time ratio: {sand / base:.2f}x"
    )


def _hit_rate(srv: Any) -> float:
    st = srv.cache_stats()
    return st["hits"] / max(1, st["hits"] + st["misses"])


if __name__ == "__main__":
    main()

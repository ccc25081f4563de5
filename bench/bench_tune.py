"""Training throughput and peak memory of `vpd tune` on CPU: LoRA vs full fine-tuning, or
variants of the tiny VLM and of the tuning (dtype, image tokens, LM layers, logits).

Runs the embedded tiny VLM (SmolLM2-135M + the pretrained tower + a 16-token resampler) for
a few optimizer steps on generated shape images in VPD's layout (every question an answer,
every other one a rationale too), each configuration in its own process so its peak RSS is
its own, and prints examples/s, peak RSS and the ratios, all measured in the same run.

    .venv/bin/python bench/bench_tune.py --steps 6 --batch-size 8
    .venv/bin/python bench/bench_tune.py --compare dtype=float32 dtype=bfloat16 --steps 6
        # bf16 autocast (AVX512-BF16) against fp32, the tiny VLM, LoRA
    .venv/bin/python bench/bench_tune.py --compare latents=64 latents=16 --steps 6
        # image tokens: a resampler of 64 latents (as many as the tower's patches) vs 16
    .venv/bin/python bench/bench_tune.py --compare logits=dense logits=sparse dropout=0.05
        # variant keys: dtype, latents, layers (LM layers), logits (dense|sparse), dropout
    .venv/bin/python bench/bench_tune.py --init /tmp/tiny-llava --steps 4   # any HF VLM
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# What a --compare variant may set, with its default (the CPU recipes' settings).
VARIANT_KEYS = {"dtype": "float32", "latents": 16, "layers": 30, "logits": "sparse", "dropout": 0.0}


def make_sft(folder: Path, n: int, seed: int = 0) -> Path:
    """n questions over drawn circle images, VPD's layout: an answer record each, and a
    rationale record for every other one (like a kept program's)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "sft.jsonl"

    def rec(qid: str, task: str, i: int, text: str) -> dict:
        return {
            "id": f"{qid}/{task}",
            "qid": qid,
            "image": f"img/{i}.png",
            "task": task,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ],
        }

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = rng.randint(1, 5)
            im = Image.new("RGB", (256, 256), "white")
            d = ImageDraw.Draw(im)
            for _ in range(k):
                x, y = rng.randint(0, 210), rng.randint(0, 210)
                d.ellipse([x, y, x + 40, y + 40], fill=rng.choice(["red", "blue", "green"]))
            im.save(folder / "img" / f"{i}.png")
            f.write(json.dumps(rec(f"b{i}", "answer", i, str(k))) + "\n")
            if i % 2 == 0:
                boxes = ", ".join("[0.12, 0.30, 0.25, 0.43]" for _ in range(k))
                why = f"I look for a circle and find {k} at {boxes}. So the answer is {k}."
                f.write(json.dumps(rec(f"b{i}", "rationale", i, why)) + "\n")
    return path


def child(args: argparse.Namespace) -> None:
    """One configuration; prints its summary + peak RSS as a JSON line."""
    from vpd.tune import load_tune_config, run_tune

    cfg = load_tune_config(
        sft=args.sft,
        out=args.out,
        init=args.init,
        tiny_lm_layers=args.tiny_lm_layers,
        lora=args.mode == "lora",
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=256,
        save_steps=10_000,
        merge=False,
        progress=False,
        sparse_logits=not args.dense,
        lora_dropout=args.lora_dropout,
        dtype=args.dtype,
    )
    s = run_tune(cfg)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Fastest step (steps 2..N): on a shared machine the mean mostly measures the neighbours.
    rows = [json.loads(x) for x in (Path(args.out) / "loss.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    s["best_step_s"] = round(min(gaps), 2) if gaps else s["train_s"]
    print("RESULT " + json.dumps({**s, "peak_rss_mb": round(rss_mb)}), flush=True)


def run_child(
    args: argparse.Namespace, mode: str, sft: Path, out: Path, layers: int | None, dense: bool,
    dropout: float, dtype: str = "float32", init: str | None = None,
) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--child", mode, "--sft", str(sft), "--out", str(out)]
    cmd += ["--init", init or args.init, "--steps", str(args.steps)]
    cmd += ["--batch-size", str(args.batch_size), "--lora-dropout", str(dropout), "--dtype", dtype]
    if layers:
        cmd += ["--tiny-lm-layers", str(layers)]
    if dense:
        cmd.append("--dense")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT ") :])
    r["best_ex_s"] = args.batch_size / max(r["best_step_s"], 1e-9)
    return r


def parse_variant(spec: str) -> dict:
    """``"dtype=bfloat16,latents=64"`` -> the full variant (unset keys at their default)."""
    out = dict(VARIANT_KEYS)
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in VARIANT_KEYS:
            sys.exit(f"--compare: expected KEY=VALUE with KEY in {sorted(VARIANT_KEYS)}: {spec!r}")
        try:
            out[key] = type(VARIANT_KEYS[key])(value)
        except ValueError:
            sys.exit(f"--compare {spec}: {key} must be a {type(VARIANT_KEYS[key]).__name__}")
    if out["dtype"] not in ("float32", "bfloat16") or out["logits"] not in ("dense", "sparse"):
        sys.exit(f"--compare {spec}: dtype float32|bfloat16, logits dense|sparse")
    if not 0 <= out["dropout"] < 1 or not 1 <= out["layers"] <= 30 or out["latents"] < 1:
        sys.exit(f"--compare {spec}: dropout in [0, 1), layers in 1..30, latents >= 1")
    return out


def variant_model(v: dict) -> str:
    """The tiny VLM of a variant: the default one, or one with another number of image
    tokens (its resampler barely trained: these runs time steps, they measure no accuracy)."""
    from vpd.tune.model import build_tiny_vlm
    from vpd.tune.resampler import DEFAULT_RESAMPLER

    layers = None if v["layers"] == 30 else v["layers"]
    if v["latents"] == DEFAULT_RESAMPLER.latents:
        return str(build_tiny_vlm(lm_layers=layers))
    quick = DEFAULT_RESAMPLER.model_copy(
        update={"latents": v["latents"], "steps": 1, "scenes": 8, "probe_scenes": 2}
    )
    return str(build_tiny_vlm(lm_layers=layers, resampler=quick, align=None))


def compare(args: argparse.Namespace, specs: list[str]) -> None:
    """LoRA throughput of the tiny VLM per variant; ratios against the first."""
    variants = [(spec, parse_variant(spec)) for spec in specs]
    inits = {spec: variant_model(v) for spec, v in variants}  # built outside the timed runs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft = make_sft(Path(tmp) / "data", args.examples)
        for i, (spec, v) in enumerate(variants):
            out = Path(tmp) / f"c{i}"
            results[spec] = run_child(
                args, "lora", sft, out, None, v["logits"] == "dense", v["dropout"],
                v["dtype"], inits[spec],
            )  # fmt: skip
    print(f"tiny VLM, LoRA, steps: {args.steps}  batch: {args.batch_size} questions  (CPU)")
    print(f"{'variant':>28} {'q/s mean':>9} {'q/s best':>9} {'peak RSS MB':>12} {'vs first':>9}")
    base = results[specs[0]]
    for spec, r in results.items():
        print(
            f"{spec:>28} {r['examples_per_s']:9.2f} {r['best_ex_s']:9.2f} {r['peak_rss_mb']:12d} "
            f"x{r['best_ex_s'] / max(base['best_ex_s'], 1e-9):8.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="tiny")
    ap.add_argument("--tiny-lm-layers", type=int, default=None, help="init=tiny: keep N layers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument(
        "--compare",
        nargs="+",
        help="init=tiny, LoRA: variants to compare, each KEY=VALUE[,KEY=VALUE] with keys "
        f"{', '.join(VARIANT_KEYS)}, e.g. dtype=float32 dtype=bfloat16",
    )
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: the library's)"
    )
    ap.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--sft", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    if args.compare:
        compare(args, args.compare)
        return
    if args.init == "tiny":  # build once, outside the timed children
        from vpd.tune.model import build_tiny_vlm

        build_tiny_vlm(lm_layers=args.tiny_lm_layers)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft = make_sft(Path(tmp) / "data", args.examples)
        for mode in ("full", "lora"):
            out = Path(tmp) / mode
            results[mode] = run_child(
                args, mode, sft, out, args.tiny_lm_layers, False, args.lora_dropout
            )
    layers = f" ({args.tiny_lm_layers} LM layers)" if args.tiny_lm_layers else ""
    print(f"model: {args.init}{layers}  steps: {args.steps}  batch: {args.batch_size}  (CPU, fp32)")
    print(
        f"{'mode':6} {'ex/s mean':>9} {'ex/s best':>9} {'best s/step':>11} "
        f"{'peak RSS MB':>12} {'trainable':>12}"
    )
    for mode, r in results.items():
        print(
            f"{mode:6} {r['examples_per_s']:9.2f} {r['best_ex_s']:9.2f} {r['best_step_s']:11.2f} "
            f"{r['peak_rss_mb']:12d} {r['trainable_params']:12,d}"
        )
    f, lo = results["full"], results["lora"]
    print(
        f"LoRA/full: speed (best step) x{lo['best_ex_s'] / max(f['best_ex_s'], 1e-9):.2f}, "
        f"speed (mean) x{lo['examples_per_s'] / max(f['examples_per_s'], 1e-9):.2f}, "
        f"peak RSS x{lo['peak_rss_mb'] / max(f['peak_rss_mb'], 1):.2f}"
    )


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of `vpd tune` on CPU: LoRA vs full fine-tuning,
or the tiny VLM with fewer language-model layers.

Runs the embedded tiny VLM (SmolLM2-135M + the pretrained SigLIP tower, 64 image tokens)
for a few optimizer steps on generated shape images, each configuration in its own process
so its peak RSS is its own, and prints examples/s, peak RSS and the ratios, all measured in
the same run.

    .venv/bin/python bench/bench_tune.py --steps 6 --batch-size 8
    .venv/bin/python bench/bench_tune.py --compare 30:dense,30:sparse,12:sparse --steps 6
        # LoRA on the tiny VLM: LM layers, and logits over the vocabulary everywhere (dense,
        # the model's own loss) or only where a label is (sparse, vpd tune's default)
    .venv/bin/python bench/bench_tune.py --compare 30:sparse:0.05,30:sparse:0 --steps 6
        # LoRA dropout 0.05 (the library default) against none (the CPU recipes)
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


def make_sft(folder: Path, n: int, seed: int = 0) -> Path:
    """n short answer/rationale records over drawn circle images (like the synthetic scenes)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "sft.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = rng.randint(1, 5)
            im = Image.new("RGB", (256, 256), "white")
            d = ImageDraw.Draw(im)
            for _ in range(k):
                x, y = rng.randint(0, 210), rng.randint(0, 210)
                d.ellipse([x, y, x + 40, y + 40], fill=rng.choice(["red", "blue", "green"]))
            im.save(folder / "img" / f"{i}.png")
            task = "answer" if i % 2 else "rationale"
            text = (
                str(k)
                if task == "answer"
                else f"I look for circles with find('circle'). It returns {k} patches. "
                f"So the answer is {k}."
            )
            rec = {
                "id": f"b{i}",
                "image": f"img/{i}.png",
                "task": task,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": "How many circles?"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": text}]},
                ],
            }
            f.write(json.dumps(rec) + "\n")
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
    )
    s = run_tune(cfg)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Fastest step (steps 2..N): on a shared machine the mean mostly measures the neighbours.
    rows = [json.loads(x) for x in (Path(args.out) / "loss.jsonl").read_text().splitlines()]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    s["best_step_s"] = round(min(gaps), 2) if gaps else s["train_s"]
    print("RESULT " + json.dumps({**s, "peak_rss_mb": round(rss_mb)}), flush=True)


def run_child(
    args: argparse.Namespace, mode: str, sft: Path, out: Path, layers: int | None, dense: bool,
    dropout: float,
) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--child", mode, "--sft", str(sft), "--out", str(out)]
    cmd += ["--init", args.init, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--lora-dropout", str(dropout)]
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


def compare(args: argparse.Namespace, specs: list[str]) -> None:
    """LoRA throughput of the tiny VLM per configuration; ratios against the first."""
    from vpd.tune.model import build_tiny_vlm

    configs = []
    for spec in specs:
        parts = spec.split(":")
        layers, kind = parts[0], parts[1] if len(parts) > 1 else ""
        try:  # no third part: --lora-dropout
            dropout = float(parts[2]) if len(parts) == 3 else args.lora_dropout
        except ValueError:
            dropout = -1.0
        if (
            len(parts) not in (2, 3) or kind not in ("dense", "sparse") or not layers.isdigit()
            or not 0 <= dropout < 1
        ):  # fmt: skip
            sys.exit(f"--compare: expected LAYERS:dense|sparse[:LORA_DROPOUT], got {spec!r}")
        configs.append((spec, None if int(layers) == 30 else int(layers), kind == "dense", dropout))
    for _, layers, _, _ in configs:  # build outside the timed children
        build_tiny_vlm(lm_layers=layers)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft = make_sft(Path(tmp) / "data", args.examples)
        for i, (spec, layers, dense, dropout) in enumerate(configs):
            out = Path(tmp) / f"c{i}"
            results[spec] = run_child(args, "lora", sft, out, layers, dense, dropout)
    print(f"tiny VLM, LoRA, steps: {args.steps}  batch: {args.batch_size}  (CPU, fp32)")
    print(f"{'config':>15} {'ex/s mean':>9} {'ex/s best':>9} {'peak RSS MB':>12} {'vs first':>9}")
    base = results[specs[0]]
    for spec, r in results.items():
        print(
            f"{spec:>15} {r['examples_per_s']:9.2f} {r['best_ex_s']:9.2f} {r['peak_rss_mb']:12d} "
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
        help="init=tiny, LoRA: compare LAYERS:dense|sparse[:LORA_DROPOUT] configurations, "
        "e.g. 30:sparse,12:sparse or 30:sparse:0.05,30:sparse:0",
    )
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
        compare(args, args.compare.split(","))
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

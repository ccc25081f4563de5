"""What this machine multiplies natively: the one rule behind every ``dtype: auto``.

bfloat16 pays only where the hardware multiplies it. A GPU with bf16 does; so does a CPU
with AMX or AVX512-BF16. On any other CPU torch emulates it: LoRA tuning of SmolLM2-135M
ran 36x slower than in float32 on an AVX2 EPYC (docs/experiments.md, section 11). So
``auto`` means bfloat16 where it is native and float32 (or float16 on an older GPU, for
inference) elsewhere, and an explicit ``bfloat16`` on a CPU without it gets a warning.
"""

from __future__ import annotations

from pathlib import Path

from vpd.progress import console


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU multiplies bfloat16 natively (AMX or AVX512-BF16). Off Linux
    (no /proc/cpuinfo) False: float32 is the safe default there."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def native_bf16(device: str) -> bool:
    """True when ``device`` ("cpu", "cuda", "cuda:1") multiplies bfloat16 natively."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return cpu_has_bf16()


def resolve_dtype(dtype: str, device: str, *, training: bool = False, quiet: bool = False) -> str:
    """``dtype`` with ``auto`` resolved for ``device``: bfloat16 where it is native, else
    float32 (float16 for inference on a GPU without bf16; training stays in float32 there,
    as fp16 training needs a loss scale). A non-``auto`` dtype is returned as asked, with a
    warning when it is bfloat16 on a CPU that would emulate it."""
    if dtype != "auto":
        if not quiet:
            warn_emulated(dtype, device)
        return dtype
    if native_bf16(device):
        return "bfloat16"
    if device.startswith("cuda") and not training:
        return "float16"
    return "float32"


def train_dtype(dtype: str, quiet: bool = False) -> str:
    """``dtype`` resolved for a training process: on the GPU when one is visible, else on
    the CPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_dtype(dtype, device, training=True, quiet=quiet)


def warn_emulated(dtype: str, device: str) -> None:
    if dtype == "bfloat16" and not device.startswith("cuda") and not cpu_has_bf16():
        console().print(
            "[yellow]warning:[/yellow] dtype bfloat16 on a CPU without AMX or AVX512-BF16: "
            "torch emulates it, many times slower than float32; use dtype auto",
            highlight=False,
        )

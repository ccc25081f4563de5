"""``dtype: auto``: bfloat16 only where the hardware multiplies it (vpd.hardware)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpd import hardware
from vpd.tune.config import TuneConfig

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"


@pytest.mark.parametrize(("text", "native"), [(ZEN3, False), (ZEN4, True), (SPR, True)])
def test_the_cpu_flags_tell_native_bf16(tmp_path: Path, text: str, native: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert hardware.cpu_has_bf16(info) is native


def test_no_cpuinfo_means_no_bf16(tmp_path: Path) -> None:
    assert hardware.cpu_has_bf16(tmp_path / "missing") is False


def test_auto_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.resolve_dtype("auto", "cpu") == "float32"
    assert hardware.resolve_dtype("auto", "cpu", training=True) == "float32"
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert hardware.resolve_dtype("auto", "cpu") == "bfloat16"
    assert hardware.resolve_dtype("auto", "cpu", training=True) == "bfloat16"


def test_a_gpu_without_bf16_infers_in_fp16_and_trains_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    assert hardware.resolve_dtype("auto", "cuda") == "float16"
    assert hardware.resolve_dtype("auto", "cuda:1", training=True) == "float32"


def test_an_explicit_emulated_bf16_is_kept_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    err = capsys.readouterr().err
    assert "without AMX or AVX512-BF16" in err and "dtype auto" in err
    assert hardware.resolve_dtype("float32", "cpu") == "float32"
    assert hardware.resolve_dtype("bfloat16", "cpu", quiet=True) == "bfloat16"
    assert capsys.readouterr().err == ""


def test_the_tune_fingerprint_holds_the_resolved_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run tuned with an explicit bfloat16 is not re-run under ``auto`` where bf16 is
    native; under ``auto`` on a CPU without it, it is (the weights would differ)."""
    sft = tmp_path / "s.jsonl"
    sft.write_text("{}\n")

    def fp(dtype: str) -> object:
        return TuneConfig(sft=sft, out=tmp_path / "o", dtype=dtype).fingerprint_fields()

    # native_bf16, not cpu_has_bf16: the same on a machine with a GPU
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    assert fp("auto") == fp("bfloat16")
    assert fp("auto")["dtype"] == "bfloat16"  # type: ignore[index]
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    assert fp("auto") == fp("float32") != fp("bfloat16")

"""Shared pytest fixtures (keep small: each one is used by several test files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpd import net


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers and launchers)."""
    return net.free_port()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic question set (40 questions, 8 images): images/, train/test.jsonl."""
    from vpd.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n=40, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_questions(synth_dir: Path) -> Path:
    """The train.jsonl of :func:`synth_dir`."""
    return synth_dir / "train.jsonl"

"""Expert iteration for the program writer: tune it on its own verified programs
(:mod:`vpd.writer.train`, `vpd tune-writer`) and the rounds of `vpd run`'s ``writer:``
section (:mod:`vpd.writer.rounds`)."""

from vpd.writer.train import WriterConfig, WriterSummary, run_writer, summary_line

__all__ = ["WriterConfig", "WriterSummary", "run_writer", "summary_line"]

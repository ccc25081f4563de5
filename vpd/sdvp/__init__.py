"""`vpd sdvp`: stepwise distillation of a teacher into the tools (SDVP, arXiv 2309.09809).

VPD distills whole programs into one VLM; SDVP (VisualProg Distiller) improves the program
pipeline itself. A teacher VLM (a well-trained, task-specific model: the run's own
VPD-tuned VLM, or any VLM folder) answers every VLM step of executed programs, and its
answers are distilled into the VLM the tools call for that step (the student), so the same
programs answer better with the distilled tools:

1. ``collect``: the sub-tasks of the chosen ops (``simple_query``, ``verify_property``,
   ``best_text_match``; VisProg's ``VQA`` step is a ``simple_query``) are read from the
   execution traces of both program syntaxes: the image, the region (the call's patch), the
   question the tool asks its VLM, and the object the program found that region by (the
   ``find``/``LOC`` box it overlaps most). One call made by several programs is one sub-task.
   Sub-tasks of held-out question types (``holdout_types``) are kept out of the distillation
   for the cross-task check.
2. ``teacher``: the Teacher Input Adapter shows each sub-task to the teacher as its ``view``
   (``pointer``: the whole image with the region drawn as a box, the visual pointer; or
   ``crop``: the region alone) and, with ``rewrite``, asks the sub-question about the named
   object (the visual pointer prompt: "What color is it?" about a ``circle`` -> "What color
   is the circle in the box?"). Batched greedy answers, written as they come
   (``<variant>/teacher.jsonl``: resumable, a kill -9 loses at most the batch in flight).
3. ``sft``: each usable answer becomes a chat record for the student in the format
   ``vpd rationalize`` writes, on exactly what the tool will show and ask it at run time
   (the region as the tool views it, the tool's question), with the answer as the op's
   result reads it (yes/no, the option, a short answer): ``<variant>/sft.jsonl``.
4. ``tune``: ``vpd tune`` trains the student (``student``: the tools' VLM, ``tiny`` by
   default) on it: ``<variant>/student/final``.
5. ``eval``: the held-out programs (``eval_samples`` on ``eval_questions``) are executed and
   verified (``vpd execute`` / ``vpd verify``) with the tools' VLM before distillation
   (``before``), with the student (``after``), and with the teacher as the tool (``teacher``,
   a ceiling, seeing the region as the teacher step showed it); program accuracy (per
   question: the mean score of its programs) overall and per question type, paired
   bootstrap intervals of each difference, and the cross-task check (``held_out``: accuracy
   on the held-out types must not drop beyond its interval). With ``ablation`` the other
   adapter (pointer vs crop without the pointer prompt, the paper's ablation) is distilled
   and evaluated too. Everything lands in ``DIR/sdvp.json``.

Every step resumes: the teacher and sft files follow the resume contract (StageOutput),
``vpd tune`` continues its checkpoints, ``vpd execute``/``vpd verify`` their outputs; a
rerun of a finished run does nothing new.

One module per step, each a function of the shared run (:class:`~vpd.sdvp.config.SdvpRun`)
that adds its part to the report: :mod:`~vpd.sdvp.collect`, :mod:`~vpd.sdvp.teacher` (the
adapter), :mod:`~vpd.sdvp.sft`, :mod:`~vpd.sdvp.tune`, :mod:`~vpd.sdvp.eval`;
:mod:`~vpd.sdvp.run` walks them up to ``until`` and :mod:`~vpd.sdvp.report` renders the
report. ``SdvpConfig`` and ``run_sdvp`` are what ``vpd run`` and ``vpd sdvp`` drive, and
``print_report`` the table ``vpd sdvp`` prints.
"""

from __future__ import annotations

from vpd.sdvp.config import SdvpConfig
from vpd.sdvp.report import print_report
from vpd.sdvp.run import run_sdvp

__all__ = ["SdvpConfig", "print_report", "run_sdvp"]

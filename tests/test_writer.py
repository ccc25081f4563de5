"""The program writer's expert iteration: `vpd tune-writer` and the ``writer:`` rounds.

What a user relies on: the writer trains on exactly the kept programs of training
questions (never a test question, image or answer: an error, not a filter), it learns them
(a tiny writer repeats the program it was taught), the tuned folder runs on vpd's engine
with the same samples batched and alone, and a run's rounds resume after kill -9, skip
when unchanged, and re-run only what a changed round invalidates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    REPO,
    check_summary,
    main_vpd,
    read_jsonl,
    run_vpd,
    vpd_argv,
    write_jsonl,
    write_png,
)
from tests.template_programs import viper_program
from vpd.data.synth import generate
from vpd.errors import VpdError
from vpd.records import Question, Verified, WriterExample
from vpd.runpaths import RunPaths
from vpd.sample.prompt import PromptTemplate
from vpd.stages import STAGES
from vpd.tools.backends import get_backend
from vpd.tools.namespace import run_inprocess
from vpd.tools.server import ToolServer
from vpd.view.data import run_inputs
from vpd.writer import WriterConfig, run_writer
from vpd.writer.data import build_examples
from vpd.writer.rounds import RoundConfig, run_round, run_spread
from vpd.writer.train import encode_example

COUNT = "def execute_command(image):\n    image_patch = ImagePatch(image)\n    return str(len(image_patch.find('{}')))\n"  # noqa: E501


def _q(qid: str, image: str, question: str, answer: str) -> dict:
    return {"id": qid, "image": image, "question": question, "answers": [answer]}


def _v(qid: str, k: int, program: str, kept: bool = True) -> dict:
    return {"id": f"{qid}#{k}", "qid": qid, "kept": kept, "program": program, "score": float(kept)}


@pytest.fixture
def split(tmp_path: Path) -> dict[str, Path]:
    for name in ("a", "b", "c"):
        write_png(tmp_path / "images" / f"{name}.png")
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            _q("t0", "images/a.png", "How many circles are there?", "2"),
            _q("t1", "images/a.png", "How many stars are there?", "1"),
            _q("t2", "images/b.png", "How many squares are there?", "0"),
        ],
    )
    test = write_jsonl(
        tmp_path / "test.jsonl", [_q("x0", "images/c.png", "How many circles are there?", "3")]
    )
    return {"root": tmp_path, "train": train, "test": test}


def _program(ex: WriterExample) -> str:
    turn = ex.messages[-1]["content"]
    assert ex.messages[-1]["role"] == "assistant"
    return turn.removeprefix("```python\n").removesuffix("\n```")


def test_the_data_is_exactly_the_kept_programs_of_train_questions(split) -> None:
    a, b, c, d, e = (COUNT.format(s) for s in ("circle", "star", "square", "shape", "round"))
    round0 = write_jsonl(
        split["root"] / "v0.jsonl",
        [
            _v("t0", 0, a),
            _v("t0", 1, a.replace("    return", "    return ")),  # the same program
            _v("t0", 2, d, kept=False),
            _v("t1", 0, b),
            _v("t2", 0, c, kept=False),
        ],
    )
    round1 = write_jsonl(
        split["root"] / "v1.jsonl", [_v("t0", 0, e), _v("t0", 1, d), _v("t2", 0, c)]
    )
    data = build_examples([round0, round1], split["train"], [split["test"]], "viper/writer", 0, 2)
    got = [(ex.qid, _program(ex)) for ex in data.examples]
    # t0: a, then e (the second distinct kept program); d is past the cap of 2.
    assert got == [("t0", a), ("t1", b), ("t0", e), ("t2", c)]
    assert (data.verified, data.kept, data.duplicates, data.over_cap) == (8, 6, 1, 1)
    assert data.questions == 3
    template = PromptTemplate("viper/writer")
    for ex in data.examples:
        question = {"t0": "circles", "t1": "stars", "t2": "squares"}[ex.qid]
        prompt = template.messages(f"How many {question} are there?", 0)
        assert ex.messages[:-1] == prompt
        assert ex.messages[-1]["content"] == template.assistant_turn(_program(ex))
    # With shots, the prompt is the sampler's: the retrieved examples come first.
    shot = build_examples([round0], split["train"], [], "viper/v1", 2, 1).examples[0]
    assert shot.messages[:-1] == PromptTemplate("viper/v1").messages(
        "How many circles are there?", 2
    )


def test_a_test_question_or_image_never_reaches_the_writer(split) -> None:
    root, train, test = split["root"], split["train"], split["test"]
    leak = write_jsonl(root / "leak.jsonl", [_v("t0", 0, COUNT), _v("x0", 0, COUNT)])
    with pytest.raises(VpdError, match="x0, a question of an excluded split"):
        build_examples([leak], train, [test], "viper/writer", 0, 4)
    # A test question unknown to --exclude is still not a training question.
    with pytest.raises(VpdError, match="not a question of"):
        build_examples([leak], train, [], "viper/writer", 0, 4)
    # Not kept is no excuse: a verified test record means the inputs are mixed up.
    unkept = write_jsonl(root / "unkept.jsonl", [_v("x0", 0, COUNT, kept=False)])
    with pytest.raises(VpdError, match="excluded split"):
        build_examples([unkept], train, [test], "viper/writer", 0, 4)
    # A training question on a test image (the splits overlap).
    mixed = write_jsonl(
        root / "mixed.jsonl", [_q("t9", str(root / "images" / "c.png"), "Color?", "red")]
    )
    with pytest.raises(VpdError, match="an image of an excluded split"):
        build_examples([leak], mixed, [test], "viper/writer", 0, 4)
    # Through the CLI: one line, exit 2, nothing trained.
    out = root / "w"
    code, err = main_vpd(
        "tune-writer", str(leak), "--questions", str(train), "--exclude", str(test),
        "--out", str(out),
    )  # fmt: skip
    assert code == 2 and "excluded split" in err and len(err.strip().splitlines()) == 1
    assert not (out / "final").exists()


@pytest.fixture(scope="module")
def tiny_writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: a writer folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from vpd.llm.local import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-writer")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_the_prompt_is_masked_and_tokenized_as_the_sampler_does(tiny_writer: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_writer))
    msgs = [*PromptTemplate("viper/writer").messages("How many stars?", 0)]
    msgs.append({"role": "assistant", "content": "```python\nx\n```"})
    ids, labels = encode_example(tok, msgs)
    text = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]  # as LocalLLM.prompt_ids
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert tok.decode(labels[len(prompt) :]) == "```python\nx\n```<|im_end|>"


def test_the_tuned_writer_learns_its_programs_and_runs_on_the_engine(
    split, tiny_writer: Path
) -> None:
    from vpd.llm.base import GenParams
    from vpd.llm.config import LLMConfig
    from vpd.llm.local import LocalLLM

    program = COUNT.format("circle")
    verified = write_jsonl(split["root"] / "v.jsonl", [_v("t0", 0, program)])
    cfg = WriterConfig(
        verified=[verified], questions=split["train"], exclude=[split["test"]],
        out=split["root"] / "writer", init=str(tiny_writer), lora=False, lr=1e-2, epochs=60,
        batch_size=1, dtype="float32", save_steps=1000, progress=False,
    )  # fmt: skip
    summary = run_writer(cfg)
    check_summary(run_writer, summary)
    assert summary["examples"] == 1 and summary["steps"] == 60
    assert summary["final_loss"] < 0.05, summary
    again = run_writer(cfg)  # finished: nothing to do
    assert again["skipped"] is True
    llm = LocalLLM(LLMConfig(model=summary["final"], dtype="float32", batch_size=4))
    assert llm.engine is not None  # vpd's engine, not the generate fallback
    template = PromptTemplate("viper/writer")
    convs = [template.messages(q, 0) for q in ("How many circles are there?", "Any stars?")]
    greedy = GenParams(n=1, temperature=0.0, max_tokens=64, stop=["\n```"], seed=0)
    taught = llm.generate(convs[:1], greedy)[0][0].text
    assert taught.strip() == "```python\n" + program.strip()
    sampled = GenParams(n=3, temperature=1.0, max_tokens=24, stop=["\n```"], seed=5)
    together = [[c.text for c in cs] for cs in llm.generate(convs, sampled)]
    alone = [[c.text for c in llm.generate([conv], sampled)[0]] for conv in convs]
    assert together == alone


@pytest.mark.slow
def test_two_process_zero2_tunes_the_writer(split, tiny_writer: Path, free_port: int) -> None:
    """The writer trains through vpd tune's DeepSpeed path: 2 CPU processes, ZeRO-2."""
    import sys

    from vpd.llm.config import LLMConfig
    from vpd.llm.local import LocalLLM

    verified = write_jsonl(split["root"] / "v.jsonl", [_v("t0", 0, COUNT.format("circle"))])
    out = split["root"] / "zero2"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port), "-m", "vpd.cli", "tune-writer", str(verified),
        "--questions", str(split["train"]), "--out", str(out), "--init", str(tiny_writer),
        "--deepspeed", "zero2", "--max-steps", "2", "--batch-size", "1", "--dtype", "float32",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["deepspeed"], summary["steps"]) == (2, "zero2", 2)
    llm = LocalLLM(LLMConfig(model=str(out / "final"), dtype="float32", batch_size=2))
    assert llm.engine is not None


# ----------------------------------------------------------------------------- vpd run


def _run_recipe(root: Path, tiny_writer: Path, rounds: int, epochs: int = 2, **writer) -> Path:
    recipe = {
        "data": {"source": "synth", "n": 40, "seed": 0, "val_frac": 0.2},
        "sample": {
            "k": 2, "limit": 6, "max_tokens": 48, "shots": 1,
            "llm": {"model": str(tiny_writer), "dtype": "float32", "batch_size": 8},
        },
        "execute": {"backend": "synthetic", "timeout": 10},
        "verify": {"policy": "all"},
        "writer": {
            "rounds": rounds, "init": str(tiny_writer), "epochs": epochs, "batch_size": 2,
            "dtype": "float32", **writer,
        },
        "rationalize": {"mode": "template", "add_labelled": True},
    }  # fmt: skip
    path = root / f"recipe-{rounds}-{epochs}-{len(writer)}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _round0(run: Path) -> None:
    """The untuned writer's kept programs, written by hand (a random tiny writer keeps
    none): one per sampled training question."""
    questions = read_jsonl(run / "data" / "train.jsonl")[:6]
    write_jsonl(run / "verified.jsonl", [_v(q["id"], 0, COUNT.format("shape")) for q in questions])


def _fingerprints(run: Path) -> dict[str, tuple[str, float]]:
    out = {}
    for marker in sorted((run / "writer").glob("round*/round.json")):
        out[marker.parent.name] = (
            json.loads(marker.read_text())["fingerprint"],
            marker.stat().st_mtime,
        )
    return out


@pytest.mark.slow
def test_writer_rounds_resume_skip_and_rerun_only_what_changed(
    tmp_path: Path, tiny_writer: Path
) -> None:
    run = tmp_path / "run"
    one = _run_recipe(tmp_path, tiny_writer, 1)
    res = run_vpd("run", str(one), "--run-dir", str(run), "--only", "data")
    assert res.returncode == 0, res.stderr
    _round0(run)
    # Killed with -9 while round 1 samples, then the same command: it resumes.
    proc = subprocess.Popen(
        vpd_argv("run", str(one), "--run-dir", str(run), "--only", "writer"),
        cwd=REPO, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    samples = run / "writer" / "round1" / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "round 1 ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    summary = run / "writer" / "round1" / "model" / "summary.json"
    trained_at = summary.stat().st_mtime
    res = run_vpd("run", str(one), "--run-dir", str(run), "--only", "writer")
    assert res.returncode == 0, res.stderr
    assert summary.stat().st_mtime == trained_at  # the tuned writer was kept, not retrained
    assert len(read_jsonl(samples)) == 12  # 6 questions x k=2, none twice
    assert len(read_jsonl(run / "writer" / "round1" / "verified.jsonl")) == 12
    # The writer's data: the hand-made round-0 programs, training questions only.
    data = read_jsonl(run / "writer" / "round1" / "model" / "data.jsonl")
    train = {q["id"]: q for q in read_jsonl(run / "data" / "train.jsonl")}
    held_out = read_jsonl(run / "data" / "test.jsonl") + read_jsonl(run / "data" / "val.jsonl")
    assert {d["qid"] for d in data} == set(list(train)[:6])
    assert not {q["image"] for q in held_out} & {train[d["qid"]]["image"] for d in data}
    first = _fingerprints(run)

    # Two rounds: round 1 is skipped as it is, round 2 runs on rounds 0 and 1.
    two = _run_recipe(tmp_path, tiny_writer, 2)
    res = run_vpd("run", str(two), "--run-dir", str(run), "--only", "writer")
    assert res.returncode == 0, res.stderr
    second = _fingerprints(run)
    assert second["round1"] == first["round1"] and "round2" in second
    sources = {d["source"] for d in read_jsonl(run / "writer" / "round2" / "model" / "data.jsonl")}
    assert str(run / "verified.jsonl") in sources
    marker = json.loads((run / "writer" / "round2" / "round.json").read_text())
    check_summary(run_round, marker["summary"])
    assert marker["summary"]["questions"] == 6
    # `vpd view` shows the programs rationalize distils: the last round's.
    shown = run_inputs(run)
    assert shown.verified == run / "writer" / "round2" / "verified.jsonl"

    # The same rounds written another way (an option spelled out at its default): the
    # rounds are skipped, and a stage that reads them does not run again.
    res = run_vpd(
        "run", str(two), "--run-dir", str(run), "--only", "writer", "--only", "rationalize"
    )
    assert res.returncode == 0, res.stderr
    sft_made = (run / "sft.jsonl").stat().st_mtime
    spelled = _run_recipe(tmp_path, tiny_writer, 2, per_question=4)
    args = ("--run-dir", str(run), "--only", "writer", "--only", "rationalize")
    res = run_vpd("run", str(spelled), *args)
    assert res.returncode == 0, res.stderr
    assert "rationalize: done (skipped)" in res.stderr, res.stderr
    assert (run / "sft.jsonl").stat().st_mtime == sft_made
    assert _fingerprints(run) == second

    # Round 1 changed: an error without --force; with it, round 1 is set aside and both run.
    changed = _run_recipe(tmp_path, tiny_writer, 2, epochs=1)
    res = run_vpd("run", str(changed), "--run-dir", str(run), "--only", "writer")
    assert res.returncode == 2 and "writer round 1" in res.stderr, res.stderr
    res = run_vpd("run", str(changed), "--run-dir", str(run), "--only", "writer", "--force")
    assert res.returncode == 0, res.stderr
    third = _fingerprints(run)
    assert third["round1"][0] != first["round1"][0]
    assert third["round2"][0] != second["round2"][0]
    assert list((run / "writer").glob("round1.*.bak")) and list(
        (run / "writer").glob("round2.*.bak")
    )


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        ({"rounds": 0}, "writer.rounds must be an integer >= 1"),
        ({"rounds": "two"}, "writer.rounds must be an integer"),
        ({"lr": -1}, "recipe option writer: lr: Input should be greater than 0"),
        ({"nosuch": 3}, "recipe option writer: nosuch: Extra inputs are not permitted"),
        ({"limit": 0}, "recipe option writer: limit: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_writer_section_fails_before_any_stage_runs(tmp_path: Path, writer, message) -> None:
    recipe = tmp_path / "r.yaml"
    body = {"data": {"n": 40}, "sample": {}, "execute": {}, "verify": {}, "writer": writer}
    recipe.write_text(yaml.safe_dump(body))
    code, err = main_vpd("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and message in err, err
    assert not (tmp_path / "run" / "data").exists()


def test_the_final_writer_feeds_rationalize_the_programs_arm_and_sdvp(tmp_path: Path) -> None:
    from vpd.runpaths import RunPaths
    from vpd.stages import STAGES

    p = RunPaths(tmp_path / "run")
    recipe = {
        "data": {"n": 40, "val_frac": 0.2},
        "sample": {"k": 3, "shots": 3, "limit": 10, "llm": {"batch_size": 16}},
        "execute": {}, "verify": {}, "rationalize": {}, "tune": {},
        "writer": {"rounds": 2, "epochs": 3, "limit": 20},
        "programs": {"rounds": True, "limit": 5},
        "sdvp": {},
    }  # fmt: skip
    rounds = STAGES["writer"].jobs(recipe, p)
    assert [j.fields["round"] for j in rounds] == [1, 2]
    r2 = rounds[1].config("writer")
    assert r2.verified == [p.verified, p.writer_round(1) / "verified.jsonl"]
    assert r2.exclude == [p.test, p.val] and r2.questions == p.train
    wcfg = r2.writer_config()
    assert wcfg.epochs == 3 and wcfg.out == p.writer_round(2) / "model"
    scfg = r2.sample_config()
    assert (scfg.limit, scfg.k, scfg.shots, scfg.prompt) == (20, 3, 0, "viper/writer")
    assert scfg.llm.model == str(p.writer_round(2) / "model" / "final")
    assert scfg.llm.batch_size == 16
    (rat,) = STAGES["rationalize"].jobs(recipe, p)
    assert rat.fields["verified"] == p.writer_round(2) / "verified.jsonl"
    progs = STAGES["programs"].jobs(recipe, p)
    assert [j.fields["out"] for j in progs] == [
        p.writer_round(0) / "programs", p.writer_round(1) / "programs", p.programs,
    ]  # fmt: skip
    assert "model" not in (progs[0].fields["sample"].get("llm") or {})  # round 0: untuned
    assert progs[2].fields["sample"]["llm"]["model"] == scfg.llm.model
    assert progs[2].fields["sample"]["shots"] == 0
    sdvp = STAGES["sdvp"].jobs(recipe, p)
    assert sdvp[-1].fields["executions"] == p.writer_round(2) / "executions.jsonl"
    assert sdvp[0].fields["llm"]["model"] == scfg.llm.model  # its test programs
    # Without a writer section nothing changes: round 0 is the run's own.
    plain = {k: v for k, v in recipe.items() if k != "writer"}
    assert STAGES["writer"].jobs(plain, p) == []
    assert [j.fields["out"] for j in STAGES["programs"].jobs(plain, p)] == [p.programs]
    assert STAGES["rationalize"].jobs(plain, p)[0].fields["verified"] == p.verified


def test_spread_programs_join_the_writer_data_of_their_round(tmp_path: Path) -> None:
    """``writer.spread``: before a round tunes, kept programs of templates with few solved
    questions are run on other training questions of the template (the real sandbox and
    tools), and those answered right join the writer's data as programs of those
    questions; the round's fingerprint holds the option only when it is on."""
    data = tmp_path / "data"
    generate(data, n=1200, seed=3, test_frac=0.2)
    train = [Question(**q) for q in read_jsonl(data / "train.jsonl")]
    counts = [q for q in train if q.meta["qtype"] == "count"][:3]
    verified = write_jsonl(
        tmp_path / "verified.jsonl",
        [_v(q.id, 0, viper_program(q.model_dump())) for q in counts]
        + [_v(train[0].id, 1, "def execute_command(image):\n    return 'no'\n", kept=False)],
    )
    base = {
        "round": 1, "out": tmp_path / "round1", "verified": [verified],
        "questions": data / "train.jsonl", "exclude": [data / "test.jsonl"],
        "writer": {"prompt": "viper/writer"}, "execute": {"backend": "synthetic"},
        "verify": {"transfer": 3}, "progress": False,
    }  # fmt: skip
    plain, spread = RoundConfig(**base), RoundConfig(**base, spread=4)
    assert plain.writer_config().verified == [verified]
    assert spread.writer_config().verified == [verified, tmp_path / "round1" / "spread.jsonl"]
    assert plain.fingerprint() != spread.fingerprint()

    (tmp_path / "round1").mkdir()
    n = run_spread(spread)
    got = [Verified(**r) for r in read_jsonl(tmp_path / "round1" / "spread.jsonl")]
    assert len(got) == n >= 6
    by_id = {q.id: q for q in train}
    sources = {f"{q.id}#0": q for q in counts}
    server = ToolServer(get_backend("synthetic"))
    for rec in got:
        q, src = by_id[rec.qid], sources[rec.source]
        assert rec.kept and q.meta["template"] == src.meta["template"] and q.id not in sources
        answer, _ = run_inprocess(rec.program, data / q.image, server)
        assert answer == rec.answer == q.answers[0]
    examples = build_examples(
        spread.writer_config().verified, data / "train.jsonl", [data / "test.jsonl"],
        "viper/writer", 0, 4,
    ).examples  # fmt: skip
    assert {e.qid for e in examples} == {q.id for q in counts} | {r.qid for r in got}


def test_the_recipe_spread_option_is_the_rounds_not_the_tunings(tmp_path: Path) -> None:
    p = RunPaths(tmp_path / "run")
    recipe = {"sample": {}, "execute": {}, "verify": {}, "writer": {"rounds": 2, "epochs": 3}}
    jobs = STAGES["writer"].jobs(recipe, p)
    assert all("spread" not in j.fields for j in jobs)
    recipe["writer"]["spread"] = 8
    jobs = STAGES["writer"].jobs(recipe, p)
    assert [j.fields["spread"] for j in jobs] == [8, 8]
    assert all(j.fields["writer"] == {"epochs": 3} for j in jobs)

"""Prompt files: text, JSON lines, CSV, Parquet (a named column), a hub dataset file, the shipped set."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shortft
from shortft.config import ConfigError
from shortft.data import read_prompts
from tests.hub_layout import hub_cache

PROMPTS = ["a photo of a cat", "an anime fox", "concept art of a tower"]


def _write(path, column="prompt"):
    if path.suffix == ".txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({column: p, "category": "x"}) + "\n" for p in PROMPTS))
    elif path.suffix == ".csv":
        path.write_text(f"category,{column}\n" + "".join(f'x,"{p}"\n' for p in PROMPTS))
    else:
        pq.write_table(pa.table({"category": ["x"] * 3, column: PROMPTS}), path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_reads_the_prompts(tmp_path, suffix):
    assert read_prompts(str(_write(tmp_path / f"p{suffix}"))) == PROMPTS
    if suffix != ".txt":
        assert read_prompts(str(_write(tmp_path / f"c{suffix}", "caption")), column="caption") == PROMPTS


def test_a_missing_column_or_an_empty_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"data.prompts='.*c.parquet': no column 'prompt' \(it has category, caption\); "
                                          "set data.prompt_column"):
        read_prompts(str(_write(tmp_path / "c.parquet", "caption")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="the file holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match=r"data.eval_prompts='nope.csv': no such file"):
        shortft.load_config("tiny", ["data.eval_prompts=nope.csv"])


def test_a_bad_evaluation_file_is_refused_with_the_config_not_after_the_last_step(tmp_path, make_cfg, monkeypatch):
    """The evaluation file was first read by the first evaluation: in the sd15/sdxl configs (evaluation
    at the end only) after the last step, before the LoRA was saved, and a malformed one gave pyarrow's
    traceback."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{not json\n')
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "text.parquet").write_text("a cat\n")
    for name, reason in [("bad.jsonl", "not a readable .jsonl file (JSON parse error"),
                         ("cols.csv", "no column 'prompt' (it has a, b); set data.prompt_column"),
                         ("empty.txt", "the file holds no prompts"),
                         ("text.parquet", "not a readable .parquet file (")]:
        with pytest.raises(ConfigError) as e:
            shortft.load_config("tiny", [f"data.eval_prompts={tmp_path / name}"])
        assert str(e.value).startswith(f"data.eval_prompts='{tmp_path / name}': {reason}"), str(e.value)
    # a hub dataset's file is fetched before the models load
    import huggingface_hub

    from shortft import loop

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(loop, "load_models", lambda cfg: pytest.fail("the models loaded first"))
    with pytest.raises(ConfigError, match=r"data.eval_prompts='hf://datasets/org/p/eval.csv': could not get the file "
                                          r"\(We couldn't connect to 'https://huggingface.co'\)"):
        loop.train(make_cfg("data.eval_prompts=hf://datasets/org/p/eval.csv"))


def test_a_hub_dataset_file_is_read_through_the_hub_cache(tmp_path):
    hub_cache(tmp_path / "cache", "someone/prompts", {"data/train.parquet": _write(tmp_path / "train.parquet")},
              repo_type="dataset")
    code = ("from shortft.data import read_prompts; "
            "print(read_prompts('hf://datasets/someone/prompts/data/train.parquet'))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(PROMPTS), r.stderr[-2000:]


def test_the_shipped_prompt_set_has_four_categories_and_a_held_out_split():
    cfg = shortft.load_config("sd15")
    train, held_out = read_prompts(cfg.data.prompts), read_prompts(cfg.data.eval_prompts)
    assert (len(train), len(held_out)) == (100, 40) and not set(train) & set(held_out)
    for prompts, per in ((train, 25), (held_out, 10)):
        for start in ("a photo", "an anime", "concept art", "painting"):
            assert sum(start in p for p in prompts) == per, start


def test_a_byte_order_mark_an_overlap_and_a_prompt_too_long_are_caught(tmp_path, make_cfg, capsys):
    """A .txt saved with a byte-order mark kept it at the start of its first prompt (three unknown tokens to
    the toy tokenizer; a .csv dropped it); evaluation prompts that are training prompts were read as held
    out without a word; a prompt longer than the text encoder takes was cut there silently."""
    from shortft.data import run_prompts
    from shortft.models import warn_truncated

    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\na blue square\n".encode("utf-8"))
    assert list(read_prompts(str(tmp_path / "bom.txt"))) == ["a red circle", "a blue square"]
    (tmp_path / "eval.txt").write_text("A Red Circle\na green cross\n")
    cfg = make_cfg(f"data.prompts={tmp_path / 'bom.txt'}", f"data.eval_prompts={tmp_path / 'eval.txt'}")
    capsys.readouterr()
    run_prompts(cfg)
    assert ("1 of the 2 evaluation prompts are training prompts too (e.g. 'a red circle'): the evaluation is not held "
            "out") in capsys.readouterr().err
    tokenizer = shortft.builtin.build_clip_tokenizer(shortft.builtin.TINY_WORDS, max_length=8)
    seen = set()
    warn_truncated(tokenizer, ["a red circle", "a red circle on a blue square above a green cross"], seen)
    assert "1 prompt(s) longer than the text encoder's 8 tokens are cut there" in capsys.readouterr().err
    warn_truncated(tokenizer, ["a red circle on a blue square above a green cross"], seen)
    assert capsys.readouterr().err == ""  # once per prompt, not every step


def test_a_non_finite_evaluation_value_is_said_with_its_term(make_cfg, capsys):
    """One NaN sample made eval/objective, its standard error and every paired gain NaN without a line."""
    import torch

    from shortft.evaluate import evaluate
    from shortft.models import load_models
    from shortft.rewards import Rewards, register

    @register("test_eval_nan")
    def _nan():
        return lambda images, prompts: torch.where(torch.arange(len(images)) == 0, float("nan"), 1.0)

    cfg = make_cfg("eval.objective=test_eval_nan", "eval.terms=[]", "eval.samples_per_prompt=1", "chain.steps=4")
    evaluate(load_models(cfg, with_loras=False), cfg, Rewards({}, {}, ["test_eval_nan"]))
    assert "evaluation: non-finite values in test_eval_nan (1 of " in capsys.readouterr().err

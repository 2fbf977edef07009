import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shortft import load_config
from shortft.config import ConfigError, builtin_configs, describe, parse_overrides


def test_overrides_nest_and_parse_yaml_values():
    assert parse_overrides(["chain.steps=20", "reward.weights.symmetry=0.5", "lora.targets=[to_q, to_v]"]) == {
        "chain": {"steps": 20}, "reward": {"weights": {"symmetry": 0.5}}, "lora": {"targets": ["to_q", "to_v"]}}


def test_an_override_a_later_one_replaces_is_named_on_the_command_line(tmp_path):
    """`train.steps=5 ... train.steps=10` kept the last, and a section after a key inside it
    (`reward.weights.symmetry=1 reward.weights={pickscore: 1}`) dropped the key, both unsaid. The later one
    is still used (a command run again with `--resume train.steps=800` added at its end means it)."""
    from shortft.config import replaced

    assert parse_overrides(["train.steps=5", "chain.steps=3", " train.steps =10"]) == {"train": {"steps": 10},
                                                                                      "chain": {"steps": 3}}
    assert replaced(["train.steps=5", "chain.steps=3", " train.steps =10"]) == [
        "train.steps=5 is replaced by the later  train.steps =10"]
    assert replaced(["reward.weights.symmetry=1", "reward.weights={pickscore: 1}"]) == [
        "reward.weights.symmetry=1 is replaced by the later reward.weights={pickscore: 1}"]
    assert replaced(["reward.weights={pickscore: 1}", "reward.weights.symmetry=1"]) == []  # merged: nothing lost
    assert replaced(["train.steps=5", "train.steps_per_eval=2", "train.step=1"]) == []  # merely starts alike
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "config", "--config", "tiny", "train.steps=5",
                        "train.steps=10"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and "\n  steps: 10\n" in p.stdout, p.stderr
    assert p.stderr == "shortft: note: train.steps=5 is replaced by the later train.steps=10\n"
    # in the order written, though --resume took the first (argparse hands it over apart from the rest)
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "--dry-run", "--resume",
                        "train.steps=800", "train.steps=400"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "\n  steps: 400\n" in p.stdout and "note: train.steps=800 is replaced by the later train.steps=400" in p.stderr


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """PyYAML reads YAML 1.1, where a float needs a dot: `1e-3` was the string '1e-3', so
    `train.lr=1e-3` (and `lr: 1e-4` in a config file, `loguniform: [1e-4, 1e-2]` in a space) stopped
    with "train.lr='1e-3': expected a number". YAML 1.2 and JSON read it as a number, and so do we."""
    from shortft.space import load_space

    assert load_config("tiny", ["train.lr=1e-3"]).train.lr == 1e-3
    assert parse_overrides(["a=3E-4", "b=+2.5e3", "c=.5e-1", "d=1e", "e=1_000", "f=e5"]) == {
        "a": 3e-4, "b": 2500.0, "c": 0.05, "d": "1e", "e": 1000, "f": "e5"}
    from importlib import resources

    tiny = resources.files("shortft.configs").joinpath("tiny.yaml").read_text()
    assert "  lr: 0.003\n" in tiny and "    symmetry: 1.0\n" in tiny
    (tmp_path / "c.yaml").write_text(tiny.replace("  lr: 0.003\n", "  lr: 1e-4\n").replace("symmetry: 1.0", "symmetry: 5e-1"))
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.train.lr == 1e-4 and cfg.reward.weights["symmetry"] == 0.5
    (tmp_path / "s.yaml").write_text("base: tiny\nsearch:\n  train.lr: {loguniform: [1e-4, 1e-2]}\n")
    assert load_space(str(tmp_path / "s.yaml")).search["train.lr"].args == [1e-4, 1e-2]
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "train.lr=1e-3", "--dry-run"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)  # no run in ./runs/tiny there
    assert p.returncode == 0, p.stderr


def test_a_toy_dir_variable_that_names_no_build_is_what_the_line_names(tmp_path, monkeypatch, capsys):
    """It said "no toy assets at <dir>; run `shortft toy build` (or set SHORTFT_TOY_DIR)": set already."""
    from shortft.cli import main

    monkeypatch.setenv("SHORTFT_TOY_DIR", str(tmp_path))
    assert main(["plan", "--config", "toy"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"shortft: error: model.pretrained=builtin:toy: $SHORTFT_TOY_DIR={tmp_path} holds no toy assets (no "
        "model_index.json); point it at a `shortft toy build --out` folder, or unset it for the package's own")


def test_toy_check_names_a_toy_dir_variable_without_a_build(tmp_path, monkeypatch, capsys):
    """It said `model.pretrained='<dir>': could not load a diffusers pipeline (We couldn't connect to
    'https://huggingface.co' ...)`, a key `toy check` has not."""
    from shortft.cli import main

    monkeypatch.setenv("SHORTFT_TOY_DIR", str(tmp_path / "none"))
    assert main(["toy", "check"]) == 2
    assert capsys.readouterr().err.strip() == (f"shortft: error: $SHORTFT_TOY_DIR {tmp_path / 'none'}: no such folder; "
                                               "give a toy build's folder (shortft toy build --out DIR writes one)")


def test_a_key_given_twice_in_a_space_is_refused_and_a_merge_may_still_be_overridden(tmp_path):
    """A space with two `search:` blocks searched the second only, without a word."""
    from shortft.config import load_yaml
    from shortft.space import load_space

    (tmp_path / "s.yaml").write_text("base: tiny\nsearch:\n  train.lr: {loguniform: [1e-4, 1e-2]}\n"
                                     "search:\n  lora.rank: {choice: [4, 8]}\n")
    with pytest.raises(ConfigError, match=r"key 'search' given twice, first on line 2: keep one, line 4, column 1"):
        load_space(str(tmp_path / "s.yaml"))
    assert load_yaml("a: &x {steps: 1, lr: 2}\ntrain:\n  <<: *x\n  steps: 3\n")["train"] == {"steps": 3, "lr": 2}
    with pytest.raises(yaml.YAMLError, match="key 'steps' given twice"):  # in a flow mapping too
        load_yaml("{steps: 1, steps: 2}")
    nested = "anchors:\n  b: &B {x: 1, y: 1}\n  a: &A\n    <<: *B\n    x: 2\ntrain:\n  <<: *A\n"  # merged twice
    assert load_yaml(nested) == yaml.safe_load(nested)  # as PyYAML reads it, not refused


def test_the_dry_run_says_which_progressive_stages_fewer_steps_never_run(capsys):
    """With fewer steps than stages a run skips some (2 steps of 4 stages run stages 1 and 3), silently."""
    from shortft.cli import main

    assert main(["train", "--config", "tiny", "--dry-run", "train.steps=2", "chain.segments=4", "chain.steps=8"]) == 0
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage ")]
    assert [("never run: train.steps=2 < 4 stages" in line) for line in stages] == [False, True, False, True], stages
    # a budget splits the stages too, and one of fewer steps than stages skips some the list shows as run
    assert main(["train", "--config", "tiny", "--dry-run", "train.call_budget=12", "chain.steps=8"]) == 0
    assert "with a budget they split it too, whichever is further along: a budget of fewer steps than there are " \
           "stages skips some" in capsys.readouterr().out


@pytest.mark.parametrize("name", builtin_configs())
def test_every_builtin_config_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.chain.segments <= cfg.chain.steps


def test_every_key_has_help():
    rows = describe()
    assert len(rows) > 30 and all(help for _, _, help in rows)


def test_overrides_from_python_may_be_a_dict_of_dotted_keys_and_a_string_is_refused():
    """`load_config("tiny", {"train.steps": 3})` (the keys `trainable_for(fixed=...)` takes) said "unknown key
    'train.steps'"; `load_config("tiny", "train.steps=3")` read each letter as an override ("override 't'")."""
    cfg = load_config("tiny", {"train.steps": 3, "train": {"lr": 0.5}, "reward.weights.brightness": 0.5})
    assert (cfg.train.steps, cfg.train.lr, cfg.reward.weights) == (3, 0.5, {"symmetry": 1.0, "brightness": 0.5})
    with pytest.raises(ConfigError, match=re.escape("overrides 'train.steps=3': give a list of key=value strings, "
                                                    "e.g. ['train.steps=3'], or a dict")):
        load_config("tiny", "train.steps=3")


def test_a_config_of_ones_own_without_prompts_is_told_where_to_start(tmp_path):
    """A YAML of a few keys (or `load_config(None)`) got "data.prompts: expected a non-empty list": the
    defaults have none, and nothing said a config is best started from a built-in one."""
    (tmp_path / "my.yaml").write_text("chain:\n  steps: 10\n")
    for config in (str(tmp_path / "my.yaml"), None):
        with pytest.raises(ConfigError, match=re.escape("(a config needs its prompts: start from a built-in one, "
                                                        "e.g. shortft config --config toy > my.yaml")):
            load_config(config)


def test_override_changes_value_and_weights_merge():
    cfg = load_config("tiny", ["reward.weights.brightness=0.5", "chain.truncate_at=0.25"])
    assert cfg.reward.weights == {"symmetry": 1.0, "brightness": 0.5}
    assert cfg.chain.truncate_at == 0.25


def test_a_zero_weight_takes_a_term_out_so_its_model_is_never_built():
    """Overrides merge into a config's weights, so 0 is how a term comes out (sd15 on PickScore alone)."""
    from shortft.rewards import Rewards

    cfg = load_config("sd15", ["reward.weights.hps_v2=0", "reward.weights.aesthetic=0"])
    assert cfg.reward.trained() == {"pickscore": 10.0}  # the 0s stay in the config (a sweep logs them as drawn)
    assert cfg.reward.weights == {"pickscore": 10.0, "hps_v2": 0, "aesthetic": 0}
    cfg = load_config("tiny", ["reward.weights.brightness=0.5", "reward.weights.symmetry=0", "eval.objective=saturation"])
    assert list(Rewards(cfg.reward.weights, {}, [cfg.eval.objective]).fns) == ["brightness", "saturation"]
    with pytest.raises(ConfigError, match=r"reward\.weights: every weight is 0"):
        load_config("tiny", ["reward.weights.symmetry=0"])


BAD = [
    (["chain.stepz=3"], "chain.stepz"),
    (["chain.method=dpo"], "chain.method"),
    (["reward.weights.beauty=1"], "beauty"),
    (["chain.truncate_at=1.0"], "chain.truncate_at"),
    (["chain.truncate_at=-0.1"], "chain.truncate_at"),
    (["lora.rank=0"], "lora.rank"),
    (["chain.segments=30", "chain.steps=20"], "chain.segments"),
    (["model.pretrained=/no/such/model"], "model.pretrained"),
    (["reward.weights.symmetry=.nan"], "reward.weights.symmetry"),
    (["reward.weights.symmetry=.inf"], "reward.weights.symmetry"),
    (["train.steps=ten"], "train.steps"),
    (["chain.method=refl", "chain.truncate_at=0.9"], "chain.truncate_at"),  # was ignored: refl trained before the cut
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_value_raises_config_error_naming_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


@pytest.mark.parametrize("overrides,key", BAD[:9])
def test_cli_bad_input_one_line_exit_2_no_traceback(overrides, key):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", *overrides],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert key in lines[0] and "Traceback" not in p.stderr
    assert time.time() - t0 < 30


def test_cli_unknown_config_name():
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "nope" in p.stderr and "tiny" in p.stderr and "Traceback" not in p.stderr


def test_config_command_prints_resolved_yaml():
    p = subprocess.run([sys.executable, "-m", "shortft.cli", "config", "--config", "tiny", "chain.steps=7"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert yaml.safe_load(p.stdout)["chain"]["steps"] == 7


def test_relative_local_paths_are_made_absolute_and_hub_ids_and_built_ins_are_not(tmp_path, monkeypatch):
    """Ray runs trials and workers in other folders: a relative path the driver found must travel absolute."""
    from shortft.config import pin_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "shortcuts").mkdir()
    (tmp_path / "pick").mkdir()
    given = {"data": {"prompts": "p.txt", "eval_prompts": "builtin:toy/eval_prompts.txt"},
             "model": {"pretrained": "org/name", "shortcut": "lora:shortcuts/k{segments}"},
             "reward": {"options": {"pickscore": {"path": "pick", "processor": "laion/clip"}}},
             "train": {"output_dir": "runs/x"}, "chain.method": "p.txt"}
    assert pin_paths(given) == {
        "data": {"prompts": str(tmp_path / "p.txt"), "eval_prompts": "builtin:toy/eval_prompts.txt"},
        "model": {"pretrained": "org/name", "shortcut": f"lora:{tmp_path}/shortcuts/k{{segments}}"},
        "reward": {"options": {"pickscore": {"path": str(tmp_path / "pick"), "processor": "laion/clip"}}},
        "train": {"output_dir": "runs/x"}, "chain.method": "p.txt"}
    assert pin_paths({"data.prompts": "p.txt"}) == {"data.prompts": str(tmp_path / "p.txt")}  # a space's fixed keys
    assert load_config("toy", ["data.prompts=p.txt"]).data.prompts == str(tmp_path / "p.txt")


def test_a_config_named_from_the_project_instead_of_the_heads_home_folder_is_pointed_there(tmp_path, monkeypatch):
    """`ray submit` runs the sweep in the head's home folder; the cluster files copy the project to ~/shortft."""
    (tmp_path / "shortft").mkdir()
    (tmp_path / "shortft" / "my_sd15.yaml").write_text("base: sd15\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no such file or built-in \(built-in: .*\); did you mean "
                                          r"shortft/my_sd15.yaml \(the project's copy\)\?$"):
        load_config("my_sd15.yaml")


@pytest.mark.parametrize("args,line", [
    (["train", "--workers", "-1"], "argument --workers: -1: must be >= 0"),  # trained in this process
    (["rewards", "--cost", "--batch", "0"], "argument --batch: 0: must be >= 1"),  # ZeroDivisionError
    (["rewards", "--cost", "--repeats", "0"], "argument --repeats: 0: must be >= 1"),  # StatisticsError
    (["sample", "--lora", "x", "--steps", "-5"], "argument --steps: -5: must be >= 1"),  # sampled noise, status 0
    (["bench", "--counts-from", "{tmp}/none.json"], "--counts-from {tmp}/none.json: No such file or directory"),
    (["bench", "--counts-from", "{tmp}/bad.json"], "--counts-from {tmp}/bad.json: not JSON (Expecting value"),
    # rows not of arms: KeyError/AttributeError tracebacks; another config's counts: reused without a word
    (["bench", "--counts-from", "{tmp}/rowless.json"], "--counts-from {tmp}/rowless.json: not a `shortft bench --json` "
                                                        "result (no rows of arms)"),
    (["bench", "--config", "toy", "--count-only", "--random-weights", "--counts-from", "{tmp}/tiny.json"],
     "--counts-from: its counts are of builtin:tiny at N=20, this bench's of builtin:toy at N=50"),
    (["bench", "--config", "toy", "--segments", "2,3", "--count-only"],
     "model.shortcut='lora:builtin:toy/shortcut-k{{segments}}': "),  # found after the first arms had run
    (["toy", "check", "--dir", "{tmp}/none"], "--dir {tmp}/none: no such folder"),  # said as model.pretrained
    (["toy", "build", "--from-base", "{tmp}/none"], "--from-base {tmp}/none: no such folder"),
    (["toy", "check", "--dir", "{tmp}/empty"], "--dir {tmp}/empty: no toy build in that folder"),  # said as above
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--out", "{tmp}/bad.json"],
     "--out {tmp}/bad.json: a file; give a folder"),  # FileExistsError after sampling
    # each of the rest was a traceback, or was found only after the work it would have saved
    (["plan", "--config", "{tmp}/latin1.yaml"], "--config '{tmp}/latin1.yaml': not a UTF-8 text file (byte 10)"),
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--seeds", ","],
     "--seeds ',': give at least one integer"),  # torch.cat(): expected a non-empty list
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--seeds", "99999999999999999999999"],
     "--seeds 99999999999999999999999: must be >= 0 and < 18446744073709551616"),  # Overflow when unpacking long
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--seeds", "-1"],
     "--seeds -1: must be >= 0"),  # its image was named ...-seed-1.png; train.seed is >= 0
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--seeds", "0,1,0"],
     "--seeds '0,1,0': 0 is given twice; give each once"),  # the same image drawn twice
    (["bench", "--config", "toy", "--count-only", "--segments", "4,4"], "--segments '4,4': 4 is given twice"),
    # a blank between commas was dropped unsaid (`0,,1` drew seeds 0 and 1; a value meant there was lost)
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--seeds", "0,,1"],
     "--seeds '0,,1': item 2 of 3 is empty; give one value between each two commas"),
    (["bench", "--config", "toy", "--count-only", "--segments", "2,4,"], "--segments '2,4,': item 3 of 3 is empty"),
    (["bench", "--config", "toy", "--count-only", "--methods", "shortft,,draft"], "--methods 'shortft,,draft': item 2"),
    (["bench", "--config", "toy", "--count-only", "--checkpointing", ",true"], "--checkpointing ',true': item 1 of 2"),
    (["rewards", "--config", "toy", "--cost", "--names", "symmetry, ,"], "--names 'symmetry, ,': item 2 of 3 is empty"),
    (["sample", "--lora", "x", "--guidance", "nan"], "argument --guidance: nan: must be a finite number"),  # status 0
    (["sample", "--config", "toy", "--lora", "{tmp}/lora", "--prompt", "a"],
     "LoRA plan {tmp}/lora/shortft_lora.json: unreadable (JSONDecodeError"),
    (["sample", "--config", "toy", "--lora", "{tmp}/none", "--prompt", "a"], "--lora {tmp}/none: no such folder"),
    (["eval", "--config", "toy", "--grid", "{tmp}/grid"], "--grid {tmp}/grid: give a file ending in .png"),  # PIL, after
    (["eval", "--config", "toy", "--grid", "{tmp}"], "--grid {tmp}: a folder; give a file path"),  # the evaluation
    (["bench", "--config", "toy", "--count-only", "--json", "{tmp}"], "--json {tmp}: a folder; give a file path"),
    (["bench", "--config", "toy", "--count-only", "--methods", ","], "--methods ',': name at least one"),  # only full
    (["bench", "--config", "toy", "--count-only", "--tracking-uri", "bogus://x"], "tracking URI 'bogus://x': use"),
    (["train", "--config", "toy", "--no-mlflow", "train.output_dir={tmp}/bad.json"],
     "train.output_dir {tmp}/bad.json: a file; give a folder"),  # FileExistsError
    (["train", "--tracking-uri", "sqlite:///x.db", "--no-mlflow"], "argument --no-mlflow: not allowed with"),
    (["train", "--config", "toy", "--dry-run", "model.resolution=65"],
     "model.resolution=65: not a multiple of this model's VAE factor 4; use 64 or 68"),  # status 0; the run refused it
    (["plan", "--config", "toy", "model.shortcut=lora:"], "model.shortcut='lora:': nothing after the colon"),  # a dict
    (["sample", "--config", "toy", "--lora", "{tmp}/empty", "--prompt", "a"],
     "LoRA {tmp}/empty/segment_1: no pytorch_lora_weights.safetensors there"),  # once the models had loaded
    (["plan", "--config", "toy", "name=../x"], "name='../x': a name is one folder's name"),  # runs/../x
    (["plan", "--config", "toy", "data.prompts=[a, ' ']"], "data.prompts: prompt 2 is blank"),  # trained on
    (["plan", "--config", "toy", "eval.terms=[jpeg_size]", "reward.options={{jpeg_size: {{quality: x}}}}"],
     "reward.options.jpeg_size.quality='x': an integer from 0 to 100"),  # PIL's error at the first evaluation
    # KeyError from str.format, as the run made its folder
    (["plan", "--config", "toy", "train.output_dir=runs/{{name}}-{{date}}"],
     "train.output_dir='runs/{{name}}-{{date}}': its one placeholder is {{name}}"),
    (["plan", "--config", "toy", "train.seed=-1"], "train.seed=-1: a seed is an integer in [0, 2**32)"),  # numpy, step 1
    (["plan", "--config", "toy", "eval.seed=18446744073709551616"], "eval.seed=18446744073709551616: a seed is"),
    (["plan", "--config", "toy", "model.shortcut_guidance_scale=.nan"],
     "model.shortcut_guidance_scale=nan: must be a finite number or null"),  # NaN images
    (["plan", "--config", "toy", "model.device=cuda:x"], "model.device='cuda:x': not one of auto, cpu, cuda, cuda:N"),
    (["train", "--config", "toy", "--dry-run", "data.prompts={tmp}/p.json"],
     "data.prompts='{tmp}/p.json': a .json file is not read; give a .txt"),  # trained on the lines `[` and `"a",`
    # `toy build` replaces its --out folder whole, at the end of up to two hours
    (["toy", "build", "--quick", "--out", "{tmp}"], "toy build --out {tmp}: this folder holds files and is not a toy "
                                                    "build (no build.json)"),
    (["toy", "build", "--quick", "--out", "{tmp}/bad.json"], "toy build --out {tmp}/bad.json: a file is there"),
    (["toy", "build", "--seed", "-1"], "argument --seed: -1: must be >= 0"),  # numpy, after the first stage
    # MLflow retried for 100 s, then a traceback
    (["train", "--config", "toy", "--tracking-uri", "sqlite:///{tmp}/lora", f"train.output_dir={{tmp}}/run"],
     "tracking URI sqlite:///{tmp}/lora: {tmp}/lora is a folder; pass another --tracking-uri: sqlite:///<a new or SQLite file>"),
    (["train", "--config", "toy", "--tracking-uri", "sqlite:///{tmp}/latin1.yaml", f"train.output_dir={{tmp}}/run"],
     "tracking URI sqlite:///{tmp}/latin1.yaml: {tmp}/latin1.yaml is not an SQLite database"),
    (["toy", "build", "--quick", "--out", "{tmp}/new", "--set", "batch=0"], "--set batch=0: expected integers >= 1"),
    # a traceback from diffusers' scheduler (plan, train, sample --steps)
    (["toy", "build", "--quick", "--out", "/proc/toy"],  # at the first save, after the VAE stage had trained
     "toy build --out /proc/toy: /proc/toy.partial cannot be made (No such file or directory)"),
    # a folder or file where the other was asked for: "no such file"
    (["plan", "--config", "{tmp}"], "--config '{tmp}': a folder; give a YAML file or a built-in name"),
    (["plan", "--config", "toy", "data.prompts={tmp}"], "data.prompts='{tmp}': a folder; give a list"),
    (["sample", "--config", "toy", "--lora", "{tmp}/bad.json", "--prompt", "a"], "--lora {tmp}/bad.json: a file; give"),
    (["plan", "--config", "toy", "chain.steps=5000"], "chain.steps=5000: at most 1000, this model's training timesteps"),
    (["train", "--config", "toy", "--dry-run", "lora.targets=[nosuch]"],  # peft's error, in a traceback; the run said it
     "lora.targets: ['nosuch'] match no UNet module; e.g. to_q, to_k, to_v, to_out.0"),
    (["plan", "--config", "toy", "train.output_dir="], "train.output_dir='': give a folder"),  # the run went into ./
    (["sample", "--config", "toy", "--lora", "x", "--prompt", " "], "--prompt ' ': blank; give text"),  # drawn
    (["sample", "--config", "toy", "--lora", "x", "--prompt", "a", "--prompt", "a"],
     "--prompt 'a': given twice; give each once"),  # the same images twice
    (["plan", "--config", "toy", "train.lr=1e999"], "train.lr=inf: must be a finite number > 0"),  # was "must be > 0"
    (["plan", "--config", "{tmp}/bad.yaml"],
     "not valid YAML (mapping values are not allowed here, line 2, column 5)"),  # no place named
    (["rewards", "--config", "toy", "--cost", "--names", ""],  # timed the config's rewards, as with no flag
     "--names '': name at least one reward"),
    (["train", "--config", "toy", "--dry-run", "model.shortcut=unet:{tmp}/vae"],  # found once the base had loaded
     "model.shortcut='unet:{tmp}/vae': {tmp}/vae holds AutoencoderKL (its config.json), not a UNet; give a diffusers"),
    (["train", "--config", "toy", "--dry-run", "model.shortcut=unet:{tmp}/empty"],
     "model.shortcut='unet:{tmp}/empty': {tmp}/empty has no config.json; give a diffusers UNet folder"),
    (["plan", "--config", "{tmp}/twice.yaml"],  # the second `train:` block silently replaced the first
     "not valid YAML (key 'train' given twice, first on line 1: keep one, line 3, column 1)"),
    (["toy", "build", "--quick", "--out", "{tmp}/new", "--set", "shortcut_lr=-1.0"],
     "--set shortcut_lr=-1.0: expected a finite number > 0"),
    # tracebacks: PyYAML's ValueError (an int it cannot make) and a RecursionError (an alias in its own anchor)
    (["plan", "--config", "toy", "train.steps=0x_"], "train.steps='0x_': expected an integer"),
    (["plan", "--config", "toy", "model.resolution=1000000000000"],  # torch's "Storage size calculation overflowed"
     "model.resolution=1000000000000: must be a positive number of pixels, at most 16384"),
    (["plan", "--config", "toy", "lora.rank=!!int abc"], "lora.rank='!!int abc': expected an integer"),
    (["plan", "--config", "{tmp}/alias.yaml"],
     "not valid YAML (a value that contains itself (an alias *x inside its own anchor &x))"),
    # argparse's line named the overrides and values after an unknown flag too, and the top command's --help
    (["train", "--config", "toy", "--dry-run", "--out", "{tmp}/r", "train.steps=2"],
     "shortft train: error: no flag --out (the config key: train.output_dir=...) (see shortft train --help)"),
    (["train", "--config", "toy", "--dry-run", "--steps=2"],
     "no flag --steps (the config keys: chain.steps=2 or train.steps=2)"),
    (["train", "--config", "toy", "--dry-run", "--quite"], "no flag --quite (did you mean --quiet?)"),
    (["eval", "--config", "toy", "--out", "x"], "shortft eval: error: no flag --out (see shortft eval --help)"),
    (["toy", "build", "--outt", "{tmp}/x"], "shortft toy build: error: no flag --outt (did you mean --out?)"),
    (["plan", "--config", "{tmp}/tab.yaml"],  # PyYAML's context line named no tab
     "not valid YAML (while scanning for the next token; found character '\\t' that cannot start any token, line 2, "
     "column 1)"),
])
def test_bad_flag_values_are_one_line_with_status_2(tmp_path, capsys, args, line):
    from shortft.cli import main

    (tmp_path / "bad.json").write_text("")
    (tmp_path / "rowless.json").write_text('{"rows": [{}]}')
    (tmp_path / "tiny.json").write_text(json.dumps({"pretrained": "builtin:tiny", "steps": 20, "rows": [
        {"method": "full", "segments": None, "batch": 1, "flops": 1.0}]}))
    (tmp_path / "bad.yaml").write_text("name: x\nb: c: d\n")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "twice.yaml").write_text("train:\n  steps: 5\ntrain:\n  lr: 0.1\n")
    (tmp_path / "alias.yaml").write_text("reward:\n  weights: &x {a: *x}\n")
    (tmp_path / "tab.yaml").write_text("train:\n\tsteps: 3\n")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "shortft_lora.json").write_text("{oops")
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.json").write_text('["a red circle", "a blue square"]\n')
    (tmp_path / "empty" / "shortft_lora.json").write_text(json.dumps(
        {"method": "shortft", "segments": 1, "adapters": ["segment_1"], "timesteps": [1], "step_adapters": [[]]}))
    args = [a.format(tmp=tmp_path) for a in args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.format(tmp=tmp_path) in err[-1] and "Traceback" not in "\n".join(err), err


def test_output_to_a_reader_that_has_gone_ends_without_a_traceback():
    """`shortft config --keys | head`: the first print after head exited was a BrokenPipeError traceback."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "shortft.cli", "config", "--config", "toy", "--keys"], cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # gone before the first line: Python takes a second to import
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("argv", [["-m", "shortft.cli", "sample", "--steps", "0"], ["-m", "shortft.cli", "bogus"],
                                  ["tune/sweep.py", "--num-samples", "abc"], ["tune/compare.py", "--seeds", "x"],
                                  ["tune/sweep.py", "--trials", "2"]])
def test_an_argument_error_is_one_line(argv):
    """argparse printed its usage block (4-10 lines) before the error."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=root)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and ": error: " in lines[0] and lines[0].endswith("--help)"), p.stderr


def test_the_dry_run_refuses_a_run_that_cannot_fit_this_machine_and_notes_it_when_planning_for_a_gpu(capsys, tiny_dir):
    """`train --dry-run lora.rank=100000000` printed a 7439 GiB estimate and exited 0; the run then failed as it
    loaded. Where the run would be on this machine's CPU (or a GPU here), the dry run stops with the line; with
    model.device=auto and no GPU here it may plan a GPU run elsewhere: a note. (`tiny_dir`: built before, so
    that its build's progress bar is not among the lines; alone, this test failed.)"""
    import torch

    from shortft.cli import main

    huge = ["train", "--config", "tiny", "--dry-run", "lora.rank=100000000"]
    assert main([*huge, "model.device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"shortft: error: the run needs 7438.66 GiB before activations \(above\); this machine has "
                        r"[\d.]+ GiB of CPU memory \(model.device=cpu\); lower lora.rank or take a larger machine", err), err
    if not torch.cuda.is_available():
        assert main([*huge, "model.device=auto"]) == 0
        assert "(model.device=auto, no GPU here)" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--dry-run", "model.device=cpu"]) == 0
    assert "shortft: note:" not in capsys.readouterr().err


def test_the_dry_run_notes_flags_that_apply_with_workers_only_as_the_run_does(capsys):
    from shortft.cli import main

    assert main(["train", "--config", "toy", "--dry-run", "--gpu", "--storage-path", "s3://b/p"]) == 0
    assert "shortft: note: --storage-path and --gpu apply with --workers N only" in capsys.readouterr().err


def test_an_override_after_resume_is_an_override_and_the_dry_run_says_where_the_resume_starts(tmp_path, capsys,
                                                                                             tiny_dir, monkeypatch):
    """`train --resume train.steps=400` took `train.steps=400` for the checkpoint path to resume from."""
    import shortft
    from shortft.cli import main

    run = [f"model.pretrained={tiny_dir}", f"train.output_dir={tmp_path}/run", "chain.steps=4", "chain.segments=2"]
    assert main(["train", "--config", "tiny", "--dry-run", "--resume", *run]) == 0
    assert capsys.readouterr().out.strip().endswith(f"resume: no checkpoint under {tmp_path}/run/checkpoints; the run "
                                                    "would start from step 0")
    shortft.train(shortft.load_config("tiny", [*run, "train.steps=2", "train.log_every=100"]))
    assert main(["train", "--config", "tiny", "--dry-run", *run, "--resume", "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "\n  steps: 6\n" in out and out.strip().endswith(
        f"resume: from {tmp_path}/run/checkpoints/step_000002 at step 2"), out[-2000:]
    # without --resume the dry run stops as the run would: that folder holds a run
    assert main(["train", "--config", "tiny", "--dry-run", *run]) == 2
    out, err = capsys.readouterr()
    assert "resume:" not in out and err.strip() == (
        f"shortft: error: train.output_dir {tmp_path}/run holds a finished run (checkpoints to step 2); pass --resume "
        "to train it on to step 30 (train.steps), or set train.output_dir=<another folder> to start another (this "
        "config's train.output_dir "
        "names the folder itself, without {name}: name= does not move it)")
    # the resume's settings against the checkpoint's: the dry run said "resume: from ..." where the run, once its
    # models had loaded, refused them (another chain.segments) or said what changed (train.lr)
    assert main(["train", "--config", "tiny", "--dry-run", *run, "--resume", "train.lr=0.5"]) == 0
    assert capsys.readouterr().out.strip().endswith("at step 2; settings changed since the checkpoint: train.lr 0.003 "
                                                    "-> 0.5")
    # a resume without the train.steps= the run started with ends at --config's own: shorter is named
    assert main(["train", "--config", "tiny", "--dry-run", *run, "--resume", "train.steps=1"]) == 0
    assert capsys.readouterr().out.strip().endswith("at step 2; settings changed since the checkpoint: train.steps 2 -> "
                                                    "1 (the run was started with train.steps=2; pass it again to keep "
                                                    "that length)")
    for dry in (["--dry-run"], []):
        monkeypatch.setattr("shortft.loop.load_models", None)  # refused before the models load
        assert main(["train", "--config", "tiny", *dry, *run, "chain.segments=4", "--resume", "--no-mlflow"]) == 2
        assert "written with chain.segments=2; this run has chain.segments=4" in capsys.readouterr().err


def test_output_dir_expands_the_home_folder_and_the_cache_a_file_is_one_line(tmp_path, monkeypatch):
    """`train.output_dir=~/runs/x` wrote into a folder named `~` in the working folder (no shell expands a
    key=value); `$SHORTFT_CACHE` naming a file or a folder not writable was a traceback as the models loaded."""
    from shortft import builtin

    assert load_config("toy", ["train.output_dir=~/runs/{name}"]).output_dir == Path.home() / "runs" / "toy"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SHORTFT_CACHE", str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=rf"builtin:tiny is built into {tmp_path}/file \(\$SHORTFT_CACHE, else "
                                          r"~/.cache/shortft\), which cannot be written here \(File exists\); set \$SHORTFT_CACHE to a folder"):
        builtin.resolve("builtin:tiny")


def test_a_prompt_tables_suffix_is_read_in_any_case(tmp_path):
    from shortft.data import read_prompts

    (tmp_path / "p.CSV").write_text("prompt,n\na red circle,1\n")
    assert read_prompts(str(tmp_path / "p.CSV"), "prompt", "data.prompts") == ["a red circle"]


def test_a_name_longer_than_the_file_system_takes_is_one_line(tmp_path, capsys):
    """`Path.is_file()` raises on a name over 255 bytes: `--config`, `data.prompts`, `--out` and a run's name
    ended in an OSError traceback."""
    from shortft.cli import main
    from shortft.sweep.cli import main as sweep_main

    long = "x" * 300
    for argv, line in ((["config", "--config", f"{long}.yaml"], f"{long[:60]}...: a file or folder name of 305 bytes"),
                       (["config", "--config", "tiny", f"data.prompts={tmp_path}/{long}.txt"], "of 304 bytes, longer than"),
                       (["sample", "--config", "tiny", "--lora", "x", "--prompt", "a", "--out", f"{tmp_path}/{long}"],
                        "a file or folder name of 300 bytes"),
                       (["config", "--config", "tiny", f"name={long}"], "300 bytes; a name is at most 200 (it names "
                                                                         "folders and an MLflow run)"),
                       (["config", "--config", "a/" * 2100 + "x.yaml"], "a path of 4206 bytes, longer than")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and line in err[0], (argv, err)
    # a sweep's name leaves room for its trials' (`<name>-t001`): one the driver took failed every trial
    assert sweep_main(["--name", "x" * 190, "--storage-path", str(tmp_path / "s")]) == 2
    assert "--name=" + "x" * 40 + "...: 190 bytes; a name is at most 184 (a run's 200, less the 16 its trials' names " \
        "add)" in capsys.readouterr().err
    space = tmp_path / f"{'s' * 180}.yaml"  # the default name, the space's and the time's, too
    space.write_text("base: toy\nsearch:\n  lora.rank: {randint: [4, 8]}\n")
    assert sweep_main(["--space", str(space), "--storage-path", str(tmp_path / "s")]) == 2
    assert "the sweep's name (its space's file name and the time; pass --name)=sss" in capsys.readouterr().err


def test_a_date_is_text():
    """`model.revision=2024-01-05` (a hub tag) was refused as `datetime.date(2024, 1, 5): expected a string`, and
    `name=2020-02-30` ended in PyYAML's ValueError traceback, on the command line and in a file."""
    from shortft.config import load_yaml

    cfg = load_config("tiny", ["model.revision=2024-01-05", "name=2020-02-30"])
    assert (cfg.model.revision, cfg.name) == ("2024-01-05", "2020-02-30")
    assert load_yaml("name: 2020-02-30\nat: 2024-01-05T25:00:00\n") == {"name": "2020-02-30", "at": "2024-01-05T25:00:00"}
    with pytest.raises(ConfigError, match=r"train.steps='2024-01-05': expected an integer"):
        load_config("tiny", ["train.steps=2024-01-05"])
    # the check for an alias inside itself walks each value once: aliases of aliases took 10x per level (17 min)
    levels = ", ".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12))
    t0 = time.time()
    assert len(load_yaml(f"lol: {{a0: &a0 [x], {levels}}}")["lol"]) == 12 and time.time() - t0 < 1


def test_a_string_key_given_digits_on_the_command_line_keeps_them_as_typed():
    """`model.revision=0123456` (a short commit hash) was read as YAML 1.1 octal and became '42798', and
    `12e4567` became '1.2e+4571'... as a float: another commit, or none. A number keeps its text for a string
    key, and is a plain number everywhere else (the run's config.yaml writes it)."""
    import yaml as pyyaml

    from shortft.config import to_dict

    cfg = load_config("toy", ["model.revision=0123456", "name=1e3", "reward.weights.saturation=1e0", "train.lr=3e-4"])
    assert (cfg.model.revision, cfg.name, cfg.train.lr) == ("0123456", "1e3", 3e-4)
    assert type(cfg.reward.weights["saturation"]) is float and type(cfg.train.lr) is float
    assert load_config("toy", ["model.revision=12e4567"]).model.revision == "12e4567"
    pyyaml.safe_dump(to_dict(cfg))  # plain numbers only


def test_config_keys_shows_the_given_configs_values_beside_the_defaults(capsys):
    """`shortft config --config toy --keys` listed the code's defaults only (train.steps 100): neither the
    toy's 200 nor the default --config tiny's 30, with nothing saying --config was not read."""
    from shortft.cli import main

    assert main(["config", "--config", "toy", "--keys", "train.lr=0.01"]) == 0
    lines = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["train.steps"] == ["100", "200"] and lines["train.lr"][1] == "0.01"
    # a dict's value (flattened into reward.weights.toy_alignment, the key read as unset)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reward.weights ")] if main(
        ["config", "--config", "toy", "--keys"]) == 0 else []
    assert out and '{"toy_alignment": 1.0}' in out[0].split(None, 2)[2], out

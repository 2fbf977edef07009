"""The README's two set-up commands stay true: CI runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)[:2]


def test_ci_runs_the_readme_test_command():
    main, tests = _readme_commands()
    ci = (ROOT / ".ci/run").read_text()
    assert tests.strip() in ci
    assert "pytest" in tests and "pytest" not in main


def test_every_config_key_in_readme_exists():
    from shortft.config import describe

    keys = {k for k, _, _ in describe()}
    mentioned = set(re.findall(r"`((?:model|chain|lora|train|reward|eval|data)\.[a-z_]+)", (ROOT / "README.md").read_text()))
    mentioned = {k for k in mentioned if not k.startswith(("reward.weights", "reward.options")) and not k.endswith(".py")}
    assert mentioned and mentioned <= keys, mentioned - keys


def test_readme_python_sweep_example_names_real_things():
    import ast

    from shortft import space, sweep, tracking

    text = (ROOT / "README.md").read_text()
    block = re.search(r"### From Python\n\n```python\n(.+?)\n```", text, re.S).group(1)
    tree = ast.parse(block)  # it is valid Python
    modules = {"sweep": sweep, "tracking": tracking}
    used = {(n.value.id, n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules}
    assert used and all(hasattr(modules[m], a) for m, a in used), [u for u in used if not hasattr(modules[u[0]], u[1])]
    assert hasattr(space, "load_space")


def _quoted_commands():
    """(file, argv) of every command line in the ```bash blocks of README.md and docs/*.md."""
    import shlex

    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.+?)\n```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line and not line.startswith("#") and "&&" not in line:  # the set-up lines: tested above
                    yield path.name, shlex.split(line, comments=True)


def test_every_quoted_command_parses():
    import importlib.util

    import click
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    from shortft.cli_parser import parser as _parser
    from shortft.sweep.cli import parser as sweep_parser

    spec = importlib.util.spec_from_file_location("overhead", ROOT / "tune" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    from shortft.sweep.compare import parser as compare_parser

    scripts = {"tune/sweep.py": sweep_parser(), "tune/overhead.py": overhead.parser(), "tune/compare.py": compare_parser()}
    seen = 0
    for where, argv in _quoted_commands():
        program, *args = argv
        if program == "shortft":
            _parser().parse_args(args)
        elif program in ("python", "python3") and args and args[0] in scripts:
            scripts[args[0]].parse_args(args[1:])
        elif program in ("ray", "mlflow"):  # click: parse the options without running the command
            group = ray_cli if program == "ray" else mlflow_cli
            command = group.get_command(click.Context(group), args[0])
            assert command is not None, (where, argv)
            command.make_context(args[0], list(args[1:]))
            given = args[1:args.index("--")] if "--" in args else args[1:]
            positional = [a for a in given if not a.startswith("--")]  # after flags such as --tmux
            if program == "ray" and args[0] != "get-auth-token":
                assert (ROOT / positional[0]).is_file(), (where, argv)  # the cluster file
            if args[0] == "submit":
                script, rest = positional[1], args[args.index("--") + 1:] if "--" in args else []
                scripts[script].parse_args(rest)
        elif program in ("kubectl", "export", "hf"):  # hf (huggingface_hub's CLI): `hf download <repo> [files] --include ...`
            continue
        else:
            raise AssertionError(f"{where}: no check for {argv}")
        seen += 1
    assert seen > 20


def test_readme_pipeline_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "in any diffusers pipeline" block, run from another folder on a 2-step toy run's LoRAs:
    it once loaded "runs/toy-model-dir-or-hub-id" and left its imports out."""
    import shortft

    block = re.search(r"From Python, in any diffusers pipeline.*?```python\n(.+?)\n```", (ROOT / "README.md").read_text(),
                      re.S).group(1)
    out = tmp_path / "runs" / "toy"
    shortft.train(shortft.load_config("toy", ["train.steps=2", "train.batch_size=1", "eval.samples_per_prompt=1",
                                              "data.eval_prompts=[a red circle on a blue background]",
                                              "chain.steps=10", f"train.output_dir={out}"]))
    monkeypatch.chdir(tmp_path)  # not the checkout: "shortft/toy/assets" it loaded was found from there only
    scope: dict = {}
    exec(compile(block.replace("num_inference_steps=50", "num_inference_steps=10"), "README.md", "exec"), scope)
    assert len(scope["images"]) == 1 and scope["images"][0].size == (32, 32)

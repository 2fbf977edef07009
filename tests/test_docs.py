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

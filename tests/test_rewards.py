import pytest
import torch

from shortft import rewards


def test_hand_written_rewards_shape_and_gradient():
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    for name in ("symmetry", "brightness", "saturation", "compressibility"):
        r = rewards.build(name)(images, ["p"] * 3)
        assert r.shape == (3,), name
        r.sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
        images.grad = None


def test_rewards_rank_the_obvious_cases():
    noise = torch.rand(1, 3, 32, 32)
    mirrored = torch.cat([noise[..., :16], noise[..., :16].flip(-1)], -1)
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert rewards.build("symmetry")(mirrored, ["p"]).item() == 0.0
    assert rewards.build("symmetry")(noise, ["p"]).item() < 0
    assert rewards.build("compressibility")(flat, ["p"]) > rewards.build("compressibility")(noise, ["p"])
    assert rewards.build("brightness")(torch.ones(1, 3, 8, 8), ["p"]).item() == pytest.approx(1.0)
    assert rewards.build("saturation")(flat, ["p"]).item() == 0.0


def test_compressibility_under_bf16_autocast_scores_and_steers_as_in_fp32():
    """The loop scores under autocast (bf16 on a GPU by default): the DCT's matmuls ran in bf16, luma
    (0..255) rounded to about a unit, and on a smooth image the gradient was another (cosine ~0.2)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([0.3 + 0.4 * x, 0.5 + 0.2 * torch.sin(6 * y), 0.2 + 0.5 * x * y])[None]
    fn = rewards.build("compressibility")

    def scored(autocast: bool):
        images = smooth.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = fn(images, ["p"])
        value.sum().backward()
        return value.detach(), images.grad.flatten()

    (v32, g32), (v16, g16) = scored(False), scored(True)
    assert torch.allclose(v16, v32, rtol=1e-4) and torch.cosine_similarity(g16, g32, dim=0) > 0.999


def test_weighted_sum_of_named_terms():
    r = rewards.Rewards({"brightness": 2.0, "saturation": -1.0}, {})
    images = torch.rand(2, 3, 8, 8)
    terms = r.terms(images, ["a", "b"])
    assert torch.allclose(r.weighted(terms), 2 * terms["brightness"] - terms["saturation"])


def test_registry_plugs_in_a_model_reward_by_name_with_options():
    @rewards.register("test_scaled_brightness")
    def factory(scale: float = 1.0):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.tensor(scale))

            def forward(self, images, prompts):
                return self.w * images.mean(dim=(1, 2, 3))

        return Net()

    fn = rewards.build("test_scaled_brightness", {"scale": 3.0})
    assert not any(p.requires_grad for p in fn.parameters())  # frozen
    assert fn(torch.ones(1, 3, 4, 4), ["p"]).item() == pytest.approx(3.0)
    with pytest.raises(rewards.ConfigError, match="reward.options.test_scaled_brightness"):
        rewards.build("test_scaled_brightness", {"nope": 1})


def _module(tmp_path, name: str, body: str | None = None):
    path = tmp_path / f"{name}.py"
    path.write_text(body if body is not None else (
        "from shortft.rewards import register\n\n\n"
        f"@register({name!r})\n"
        "def factory(scale: float = 1.0):\n"
        "    return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))\n"))
    return path


def test_reward_modules_register_the_users_terms_for_configs_and_spaces(tmp_path, monkeypatch):
    """A term of one's own could be used only from Python after `import my_rewards` (and then not in Ray's
    processes): the CLI and a sweep space that searched its weight stopped at "unknown reward"."""
    from shortft import load_config
    from shortft.space import load_space

    _module(tmp_path, "own_term_cfg")
    _module(tmp_path, "own_term_space")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["reward.modules=[own_term_cfg.py]", "reward.weights.own_term_cfg=1"])
    assert cfg.reward.modules == [str(tmp_path / "own_term_cfg.py")] and "own_term_cfg" in rewards.names()
    (tmp_path / "space.yaml").write_text("base: tiny\nfixed: {reward.modules: [own_term_space.py]}\n"
                                         "search: {reward.weights.own_term_space: {uniform: [0.5, 1.0]}}\n")
    space = load_space(str(tmp_path / "space.yaml"))
    assert list(space.search) == ["reward.weights.own_term_space"]
    with pytest.raises(rewards.ConfigError, match=r"unknown reward 'not_there'; .*name the module that registers it "
                                                  r"in reward.modules"):
        load_config("tiny", ["reward.weights.not_there=1"])


def test_the_dry_run_builds_no_reward_of_the_users_that_might_load_weights(tmp_path, monkeypatch, capsys):
    """`train --dry-run` ("download and load nothing") built every reward to count its parameters, a factory of
    the user's without `random_weights` too: `MyScorer.from_pretrained(path)` ran, downloads and all."""
    from shortft.cli import main

    _module(tmp_path, "loads_weights", body=(
        "from pathlib import Path\n\nfrom shortft.rewards import register\n\n\n"
        "@register('loads_weights')\n"
        "def factory():\n"
        "    Path('built').write_text('a download would start here')\n"
        "    return lambda images, prompts: images.mean(dim=(1, 2, 3))\n"))
    _module(tmp_path, "random_ok", body=(
        "import torch\n\nfrom shortft.rewards import register\n\n\n"
        "@register('random_ok')\n"
        "def factory(random_weights: bool = False):\n"
        "    return torch.nn.Linear(10, 1)\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "tiny", "--dry-run", "reward.modules=[loads_weights.py, random_ok.py]",
                 "reward.weights.loads_weights=1", "reward.weights.random_ok=1"]) == 0
    assert not (tmp_path / "built").exists()
    out = capsys.readouterr().out
    assert "not counted: loads_weights, whose factory takes no random_weights" in out, out[-2000:]


@pytest.mark.parametrize("entry, body, line", [
    ("absent.py", None, "reward.modules: {tmp}/absent.py: no such file"),
    ("absent_module", None, "reward.modules: no module 'absent_module' in this process's Python path; name its file "
                            "instead (reward.modules=[path/to/absent_module.py])"),
    ("syntax.py", "x = (\n", "reward.modules: importing {tmp}/syntax.py failed: SyntaxError: '(' was never closed "
                             "({tmp}/syntax.py:1)"),
    ("raises.py", "import os\n\n\ndef f():\n    raise RuntimeError('no key')\n\n\nf()\n",
     "reward.modules: importing {tmp}/raises.py failed: RuntimeError: no key ({tmp}/raises.py:5)"),
    ("needs.py", "import not_installed_anywhere\n", "reward.modules: importing {tmp}/needs.py failed: "
                                                    "ModuleNotFoundError: No module named 'not_installed_anywhere'"),
])
def test_a_reward_module_that_cannot_be_imported_is_one_line_naming_it(tmp_path, monkeypatch, entry, body, line):
    from shortft import load_config

    if body is not None:
        _module(tmp_path, entry[:-3], body)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rewards.ConfigError) as e:
        load_config("tiny", [f"reward.modules=[{entry}]"])
    assert str(e.value).startswith(line.format(tmp=tmp_path)), str(e.value)


def test_a_reward_file_gets_a_module_name_of_its_own(tmp_path, monkeypatch):
    """Registered under its bare stem, a file named like a package imported later (rewards.py, utils.py)
    took that package's place in sys.modules."""
    import sys

    from shortft import load_config

    _module(tmp_path, "utils", _module(tmp_path, "own_term_utils").read_text())
    (tmp_path / "my-rewards.py").write_text(_module(tmp_path, "own_term_dash").read_text())
    monkeypatch.chdir(tmp_path)
    load_config("tiny", ["reward.modules=[utils.py, my-rewards.py]"])
    assert {"own_term_utils", "own_term_dash"} <= set(rewards.names())
    assert "utils" not in sys.modules and "my-rewards" not in sys.modules
    assert [n for n in sys.modules if n.startswith("shortft_reward_module_utils_")]
    with pytest.raises(rewards.ConfigError, match=r"^reward.modules: /nowhere/r.py: no such file on this machine "
                                                  r"\(on a cluster every node needs it at that path"):
        load_config("tiny", ["reward.modules=[/nowhere/r.py]"])

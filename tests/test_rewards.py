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

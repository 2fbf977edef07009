"""Plain LoRAs summed in one product and added in one op give peft's outputs and gradients in fewer ops."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear
from torch.utils._python_dispatch import TorchDispatchMode

from shortft.lora import AdapterSwitch
from shortft.stacked_lora import StackedLinear

NAMES = ("segment_1", "segment_2", "segment_3")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _model(stack: bool, alphas=(8, 8, 8), dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.SiLU(), torch.nn.Linear(16, 12)).to(dtype)
    for name, alpha in zip(NAMES, alphas):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"]), model, adapter_name=name)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape) * 0.3  # fp32 LoRAs on any base dtype, as `add_loras` keeps them
            p.requires_grad_(True)
    return model, AdapterSwitch(model, stack=stack)


def _run(stack, active, alphas=(8, 8, 8), autocast=False):
    model, switch = _model(stack, alphas, torch.bfloat16 if autocast else torch.float32)
    switch.activate(active)
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    ops = _Ops()
    with ops, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(x.to(torch.bfloat16) if autocast else x)
    out.float().square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.float(), grads, ops.n, model


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("active", [NAMES[:1], NAMES[:2], NAMES])
def test_stacked_adapters_give_peft_outputs_and_gradients(active, autocast):
    out, grads, ops, model = _run(False, active, autocast=autocast)
    out2, grads2, ops2, model2 = _run(True, active, autocast=autocast)
    assert type(model2[0]) is StackedLinear and isinstance(model2[0], Linear) and type(model[0]) is Linear
    # bf16 rounds each of peft's partial sums where the stacked product rounds once: compare by norm
    close = lambda a, b: ((a - b).norm() / a.norm()).item() < (1e-2 if autocast else 1e-6)  # noqa: E731
    assert close(out, out2)
    assert grads.keys() == grads2.keys() and {n.split(".")[-2] for n in grads} == set(active)
    for n in grads:
        assert close(grads[n], grads2[n]), n
    # peft scales and adds per adapter and layer (2 layers here), and under autocast casts the input to
    # fp32 and back; here one fused add per layer: at least 1 op fewer per layer and adapter
    assert ops2 <= ops - 2 * len(active), (ops, ops2)


def test_anything_but_plain_equal_lora_goes_through_peft():
    # Different scalings cannot share one concatenated product: peft's loop, same result.
    out, grads, ops, _ = _run(False, NAMES, alphas=(8, 4, 2))
    out2, grads2, ops2, _ = _run(True, NAMES, alphas=(8, 4, 2))
    assert ops2 == ops and torch.equal(out, out2)
    # DoRA (a peft variant) on one of them: peft's loop too.
    dora = []
    for stack in (False, True):
        model, switch = _model(stack)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True), model,
                                adapter_name="dora")
        switch.activate([*NAMES, "dora"])
        with _Ops() as ops:
            dora.append((model(torch.ones(2, 12)), ops.n))
    assert dora[0][1] == dora[1][1] and torch.equal(dora[0][0], dora[1][0])
    model, switch = _model(True)
    switch.activate(NAMES)
    x = torch.randn(2, 12)
    stacked = model(x)
    for layer in switch.layers:
        layer.merge(adapter_names=list(NAMES))
    assert torch.allclose(model(x), stacked, atol=1e-5)  # merged: peft's path, same sum


def test_stacked_layers_keep_state_dict_copy_and_unload():
    model, _ = _model(False)
    model2, _ = _model(True)
    assert model.state_dict().keys() == model2.state_dict().keys()
    twin = copy.deepcopy(model2)
    assert type(twin[0]) is StackedLinear
    x = torch.randn(2, 12)
    assert torch.equal(twin(x), model2(x))

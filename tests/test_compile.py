"""`model.compile`: every call of the chain runs a compiled graph of the UNet, and the same numbers."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

# Runs in its own process: dynamo's caches and counters are per process. Dynamo's guards and
# recompiles are the same whatever the backend; "eager" runs the traced graphs without inductor's
# code generation (minutes on this CPU, and wrong gradients: see the last test).
SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
import shortft
from shortft.bench_count import draws, make_trainable, step_inputs
from shortft.chain import original_sampler
from shortft.loop import micro_batch_loss
from shortft.compiling import compile_graphs
from shortft.models import load_models
from shortft.rewards import Rewards

out = {}
for compiled in (False, True):
    cfg = shortft.load_config("tiny", [f"model.compile={compiled}", "model.compile_backend=eager", *sys.argv[1:]])
    models, rewards = load_models(cfg), Rewards(cfg.reward.weights, cfg.reward.options)
    lora = make_trainable(models)
    prompts, noise = step_inputs(models, cfg.train.batch_size)
    losses, graphs = [], []
    for _ in range(2):
        for p in lora:
            p.grad = None
        loss, _, _ = micro_batch_loss(models, rewards, cfg, prompts, noise, 1, draws())
        loss.backward()
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    calls = models.plan.inference_calls(models.denoiser.timesteps(cfg.chain.steps))
    with torch.no_grad():  # evaluation: the original sampler, without gradient, at another batch size
        one = models.condition(prompts[:1], cfg.chain.guidance_scale, cfg.chain.guidance_scale)
        image = original_sampler(models.denoiser, noise[:1], one, calls)
    out[str(compiled)] = {"losses": losses, "graphs": graphs, "sampled_graphs": counters["stats"]["unique_graphs"],
                          "grad": torch.cat([p.grad.flatten() for p in lora]).norm().item(),
                          "image": image.double().sum().item(), "limit": compile_graphs(models.plan),
                          "unets_compiled": [getattr(u, "_compiled_call_impl", None) is not None
                                             for u in (models.unet, models.denoiser.shortcut_unet) if u is not None]}
out["frames"] = dict(counters["frames"])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_compiled_unet_runs_every_call_of_a_checkpointed_timestep_aware_step_compiled(tiny_dir):
    # Timestep-aware ShortFT, k=4, per-call and UNet block checkpointing: with the base model's own jump,
    # 12 graphs for one training step (5 LoRA sets without grad in the checkpointed forwards, 6 with
    # grad), more than torch's default limit of 8; past it dynamo ran 4 kinds of call eagerly in every
    # step. Here the jump is a `unet:` shortcut, a second compiled UNet (the same model, for the test): the
    # training UNet still needs more than 8 graphs (with the limit at 8: dynamo's recompile_limit line,
    # 1 frame of 11 eager), and the shortcut left uncompiled fails too. The base model's own jump as well
    # took 2 more minutes of CI and failed on nothing this does not.
    p = subprocess.run([sys.executable, "-c", SCRIPT, f"model.pretrained={tiny_dir}", "chain.segments=4",
                        "lora.timestep_aware=true", "chain.checkpointing=true", "model.gradient_checkpointing=true",
                        f"model.shortcut=unet:{tiny_dir}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "recompile_limit" not in p.stderr, p.stderr[-3000:]  # dynamo's line when it gives up compiling
    out = json.loads(p.stdout.splitlines()[-1])
    eager, compiled = out["False"], out["True"]
    assert eager["graphs"] == [0, 0] and not any(eager["unets_compiled"])
    assert compiled["unets_compiled"] == [True, True]
    assert out["frames"]["ok"] == out["frames"]["total"]  # no frame fell back to running eagerly
    first, second = compiled["graphs"]
    assert first > 8 and second == first  # the second step compiles nothing new
    assert compiled["sampled_graphs"] <= compiled["limit"]
    # A compiled graph reused for the wrong LoRAs would change the numbers.
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert compiled["grad"] == pytest.approx(eager["grad"], rel=1e-4)
    assert compiled["image"] == pytest.approx(eager["image"], rel=1e-5)


def test_inductor_on_a_cpu_is_refused_in_one_line_before_the_run_is_made(tiny_dir, tmp_path):
    # Refused as the model loaded, it left ./runs/tiny (locked, with its record) and a FAILED MLflow run.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for bad, said in ((["model.compile=true", "model.device=cpu"], "model.compile=true on a CPU"),
                      (["model.compile=true", "model.compile_backend=nope"], "model.compile_backend='nope'"),
                      *([] if torch.cuda.is_available() else [(["model.device=cuda"], "CUDA is not available")]),
                      # its dry run said nothing of it (status 0)
                      (["model.compile=true", "model.device=cpu", "--dry-run"], "model.compile=true on a CPU")):
        p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "--tracking-uri", uri,
                            f"model.pretrained={tiny_dir}", *bad], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and said in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "runs").exists(), bad
    if (tmp_path / "mlflow.db").exists():
        assert not sqlite3.connect(tmp_path / "mlflow.db").execute("select name from runs").fetchall()
    if not torch.cuda.is_available():  # model.device=auto without a GPU here: a dry run may plan a GPU run elsewhere
        p = subprocess.run([sys.executable, "-m", "shortft.cli", "train", "--config", "tiny", "--dry-run",
                            f"model.pretrained={tiny_dir}", "model.compile=true"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="torch 2.13's inductor on a CPU: wrong UNet gradients (why the library "
                                        "refuses it); passing means torch fixed it: drop the refusal")
def test_inductor_on_a_cpu_gives_a_diffusers_unet_the_eager_gradients():
    import torch
    from diffusers import UNet2DConditionModel

    # Two levels of plain ResNet blocks: one level alone is right. Narrowed on 2026-12-03: without the time
    # embedding in the ResNet blocks the input gradient is right (1.2e-6), without their GroupNorms still
    # wrong (0.085); a plain-PyTorch copy of these blocks, time embedding included, is right (3e-7).
    # Of inductor's options only max_fusion_size=1 makes it right (2 is already wrong: 0.43); SIMD off,
    # one thread, no split reductions, pattern matcher, epilogue fusion or loop reordering: still 0.45-0.60.
    # Why, minified: the next test.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=16, norm_num_groups=8)
    x, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)

    def input_grad(net):
        x_in = x.clone().requires_grad_(True)
        out = net(x_in, torch.tensor(500), encoder_hidden_states=states).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), x_in.grad

    (out, grad), (out_c, grad_c) = input_grad(unet), input_grad(torch.compile(unet, backend="inductor"))
    assert (out_c - out).norm() / out.norm() < 1e-5  # the forward is right
    assert (grad_c - grad).norm() / grad.norm() < 1e-4  # measured: 0.48 (torch 2.13.0, this CPU)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="torch 2.13's inductor on a CPU reads a "
                                                              "scatter-add's buffer before the scatter")
def test_inductor_on_a_cpu_reads_the_upsampling_gradient_after_its_scatter_add():
    import torch
    from torch._inductor.compile_fx import compile_fx_inner
    from torch.fx.experimental.proxy_tensor import make_fx

    # The UNet's error above, minified: torch's accuracy minifier (TORCHDYNAMO_REPRO_AFTER=aot,
    # TORCHDYNAMO_REPRO_LEVEL=4) took the backward graph from 1242 nodes to 41 (where a time limit stopped
    # it) with one wrong output, the weight gradient of the up block's 1x1 shortcut conv; by hand, to
    # these 6 ops. The gradient of a 2x nearest upsampling is a scatter-add into zeros (index_put,
    # accumulate); inductor fuses the div that reads its result with the channels-last copy the conv's
    # backward asks for, and that kernel runs before the mm and the scatter, so the conv gets zeros
    # (relative error 1.0). Right with a contiguous conv input or with max_fusion_size=1 (as the UNet).
    # The UNet's own backward code (TORCH_LOGS=output_code) runs its one scatter-add last, after the
    # kernel that reads that buffer and copies it on to the backward of the two convs it feeds.
    # The cause, in torch/_inductor/scheduler.py: to fuse nodes of different loop shapes (here the div's
    # 512 and the copy's 2x16x16) the CPU backend, alone, calls SchedulerNode.recompute_size_and_body,
    # which recomputes the node's reads from its loop body and applies the scheduler's mutation renames
    # only when the node has WeakDep/StarDep reads. So the div's read of the scatter's result (buf2,
    # ir_pre_fusion.txt with config.trace.enabled) becomes a read of the zero fill (buf1,
    # ir_post_fusion.txt), with nothing ordering it after the scatter. Renaming always (one line) makes
    # this graph right and the UNet's input gradient too (9.2e-7, caches off); CUDA does not take that path.
    # make_fx keeps the zero fill an op of the graph (symbolic_trace would fold it into a constant). The
    # same ops through torch.compile are right: there the scatter fuses with the zero fill, the div and
    # the copy into one kernel after the mm. The UNet above is the user-level repro; a plain-PyTorch
    # one is still open.
    aten = torch.ops.aten
    idx = torch.arange(8) // 2  # nearest 4 -> 8

    def graph(a, b, rows, cols, x, w):
        up_grad = aten.view.default(aten.mm.default(a, b), [2, 16, 8, 8])
        zeros = aten.full.default([2, 16, 4, 4], 0.0, dtype=torch.float32, layout=torch.strided,
                                  device=torch.device("cpu"), pin_memory=False)
        grad = aten.div.Tensor(aten.index_put.default(zeros, [None, None, rows, cols], up_grad, True), 1.0)
        return [aten.convolution_backward.default(grad, x, w, [16], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                  [True, True, True])[1]]

    torch.manual_seed(0)
    args = [torch.randn(32, 16), torch.randn(16, 64), idx[:, None], idx,
            torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(16, 32, 1, 1)]
    with torch.no_grad():
        (ref,), (out,) = graph(*args), compile_fx_inner(make_fx(graph)(*args), args)(list(args))
    assert (out - ref).norm() / ref.norm() < 1e-5  # measured: 1.0 (torch 2.13.0, this CPU)

#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in one script: SD 1.5 at 512² (batch 1 with and without per-call
# checkpointing, batch 2) and SDXL at 1024² (batch 1), random weights of the published architectures
# (nothing downloaded), bf16, for shortft (k=4), full (checkpointed), draft and alignprop; each step
# once more under the CUDA profiler (the GPU's busy share). `compile` adds ShortFT with the UNet
# compiled (model.compile=true), timed with the same step.
#
#   bash docs/bench-gpu.sh OUT [sd15-b1] [sd15-b2] [sdxl] [compile]     (default: the first three)
#
# Each part writes OUT/<part>.json and OUT/<part>.log and the script goes on when one fails.
# SD15, SDXL, DEVICE and EXTRA (overrides) exist to try the script on a CPU with the tiny models:
#   SD15=tiny SDXL=tiny DEVICE=cpu EXTRA=chain.steps=10 bash docs/bench-gpu.sh /tmp/out
# (the compile part there: EXTRA="chain.steps=10 model.compile_backend=aot_eager"; inductor is refused on a CPU)
set -uo pipefail
out=${1:?usage: bash docs/bench-gpu.sh OUT [sd15-b1] [sd15-b2] [sdxl] [compile]}
shift
parts=${*:-sd15-b1 sd15-b2 sdxl}
sd15=${SD15:-sd15} sdxl=${SDXL:-sdxl} device=${DEVICE:-cuda} extra=${EXTRA:-}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, diffusers, peft, transformers as t; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', t.__version__)"
} | tee "$out/versions.txt"

bench() {  # bench PART ARGS...: one `shortft bench` run, its JSON and log under OUT
    local part=$1; shift
    echo "== $part" >&2
    local t0=$SECONDS
    python3 -m shortft.cli bench --random-weights --steps 2 --profile --methods shortft,full,draft,alignprop \
        --json "$out/$part.json" "$@" "model.device=$device" $extra 2>&1 | tee "$out/$part.log" \
        || echo "== $part failed" >&2
    echo "== $part: $((SECONDS - t0)) s" >&2
}

for part in $parts; do
    case $part in
        sd15-b1) bench sd15-b1 --config "$sd15" --batch 1 --checkpointing false,true ;;
        sd15-b2) bench sd15-b2 --config "$sd15" --batch 2 ;;
        sdxl) bench sdxl --config "$sdxl" --batch 1 ;;
        compile)
            echo "== compile" >&2
            t0=$SECONDS
            # First whether inductor's gradients are right on this device: on a CPU, torch 2.13's are not
            # (tests/test_compile.py, the same two-level UNet); the library refuses inductor there.
            python3 - "$device" <<'EOF' 2>&1 | tee "$out/compile-grad.log" || echo "== compile-grad failed" >&2
import json, sys, torch
from diffusers import UNet2DConditionModel
device = sys.argv[1]
torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions in both runs: only the compiler differs
torch.manual_seed(0)
unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                            down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, mid_block_type=None,
                            cross_attention_dim=16, norm_num_groups=8).to(device)
x, states = torch.randn(2, 4, 8, 8).to(device), torch.randn(2, 77, 16).to(device)
def input_grad(net):
    x_in = x.clone().requires_grad_(True)
    out = net(x_in, torch.tensor(500, device=device), encoder_hidden_states=states).sample
    (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
    return out.detach(), x_in.grad
(out, grad), (out_c, grad_c) = input_grad(unet), input_grad(torch.compile(unet, backend="inductor"))
print(json.dumps({"device": device, "forward_rel_error": ((out_c - out).norm() / out.norm()).item(),
                  "input_grad_rel_error": ((grad_c - grad).norm() / grad.norm()).item()}))
EOF
            python3 - "$sd15" "$device" $extra <<'EOF' 2>&1 | tee "$out/compile.log" || echo "== compile failed" >&2
import json, sys, time
import shortft
from shortft.bench import Arm, arm_config, time_steps
name, device, *extra = sys.argv[1:]
cfg = arm_config(shortft.load_config(name, ["model.shortcut=none", "model.compile=true", f"model.device={device}", *extra]),
                 Arm("shortft", 4, 1))
t0 = time.perf_counter()
row = time_steps(cfg, True, steps=2, warmup=2, profile=True)  # the two warm-up steps compile
print(json.dumps({"method": "shortft", "segments": 4, "batch": 1, "compile": True, "seconds_total": time.perf_counter() - t0, **row}))
EOF
            echo "== compile: $((SECONDS - t0)) s" >&2 ;;
        *) echo "unknown part $part: use sd15-b1, sd15-b2, sdxl or compile" >&2; exit 2 ;;
    esac
done

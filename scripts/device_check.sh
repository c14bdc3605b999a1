#!/usr/bin/env bash
# The GPU checks of issue 10, in one run on a lent GPU machine (the workplace's `device` tool):
# the CUDA path of train/keygen/embed/extract/verify (bf16 and fp16 autocast, nccl through
# torch.distributed.run, --nproc refused beyond the GPUs present), onnxruntime's CUDA provider
# (where an onnxruntime-gpu build is found first on PYTHONPATH), `scripts/bench.py gpu`, an
# image-folder embed through loader processes, a profile of embedding steps, and the test suite
# with CUDA visible. Each step's log goes to $OUT (8 files at most come back); a step that fails
# does not stop the others. Not part of CI: it needs a GPU.
#
#   OUT=/tmp/out bash scripts/device_check.sh [REPEATS]
#
# (DEVICE=cpu runs the same steps on the CPU in fp32: a rehearsal of the script itself.)
#
# Wheels missing there (cryptography, skl2onnx, ...) may be put in .whl/; onnxruntime-gpu may
# come in pieces (.ort/prov.xz.* : its CUDA provider library, xz'd; .ort/rest.tar.xz: the rest
# of the wheel), which the caller may have left in /tmp/ort by earlier runs.
set -u
export PYTHONUNBUFFERED=1 DEEPSIGNS_PASSPHRASE=device-check-passphrase
O=${OUT:-/tmp/out}
REPEATS=${1:-5}
DEADLINE=${DEADLINE:-470}  # seconds for the whole run: the test suite gets what is left
export DEVICE=${DEVICE:-cuda} HALF=fp16 BF16=bf16
[ "$DEVICE" = cuda ] || HALF=fp32 BF16=fp32
mkdir -p "$O"
T0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: its output in $O/NAME.log, its exit status and time here
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout -k 5 "$limit" bash -c '"$@"' step "$@" >>"$O/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s (at $(($(date +%s) - T0)) s)"
}

# 1. packages: carried wheels, onnxruntime-gpu if its pieces came, a `deepsigns` script beside python3
setup() {
    nvidia-smi
    python3 -c 'import sys, torch, onnxruntime; print(sys.executable, torch.__version__, torch.cuda.is_available(),
          onnxruntime.__version__, onnxruntime.get_available_providers())'
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || return 1
    fi
    mkdir -p /tmp/ort && cp .ort/* /tmp/ort/ 2>/dev/null
    if [ -f /tmp/ort/rest.tar.xz ] && [ "$(ls /tmp/ort/prov.xz.* 2>/dev/null | wc -l)" -ge 4 ]; then
        rm -rf /tmp/ortsite && mkdir -p /tmp/ortsite
        tar -C /tmp/ortsite -xJf /tmp/ort/rest.tar.xz || return 1
        cat /tmp/ort/prov.xz.? | xz -d >/tmp/ortsite/onnxruntime/capi/libonnxruntime_providers_cuda.so || return 1
    fi
    local exe
    exe=$(python3 -c 'import sys; print(sys.executable)')
    if [ ! -e "$(dirname "$exe")/deepsigns" ]; then
        printf '#!%s\nfrom deepsigns_cli.cli.main import main\nmain()\n' "$exe" >"$(dirname "$exe")/deepsigns"
        chmod +x "$(dirname "$exe")/deepsigns"
    fi
    ls -la /tmp/ortsite/onnxruntime/capi 2>/dev/null | head -20
}
export -f setup
step setup 120 setup
export PYTHONPATH=/tmp/ortsite:/tmp/site:$PWD
PATH=$(dirname "$(python3 -c 'import sys; print(sys.executable)')"):$PATH
python3 -c 'import onnxruntime, cryptography; print(onnxruntime.__file__, onnxruntime.__version__,
      onnxruntime.get_available_providers())' >>"$O/setup.log" 2>&1

# 2. the CUDA path of the CLI, command by command (each one's exit status in the log)
export S=/tmp/smoke
ds() { echo "+ deepsigns $*"; deepsigns "$@"; echo "rc=$?"; }
smoke() {
    rm -rf "$S" && mkdir -p "$S"
    ds train --arch cnn --data digits --epochs 10 --device $DEVICE --seed 0 --out $S/base.safetensors --json
    ds keygen --model $S/base.safetensors --data digits --scheme hidden,output --seed 0 --out $S/k.dskey
    ds keygen --model $S/base.safetensors --data digits --scheme hidden --seed 1 --out $S/k0.dskey
    ds embed --model $S/base.safetensors --data digits --keys $S/k.dskey --out $S/m.safetensors --onnx $S/m.onnx \
        --device $DEVICE --precision $BF16 --json
    ds extract --model $S/m.safetensors --keys $S/k.dskey --json
    ds verify --model $S/m.onnx --keys $S/k.dskey --provider cuda --json
    ds verify --model $S/m.onnx --keys $S/k.dskey --provider cpu --json
    ds extract --model $S/m.onnx --keys $S/k.dskey --provider cuda --json
    ds export $S/base.safetensors --out $S/base.onnx
    echo "(the unmarked model: exit 1 expected)"
    ds verify --model $S/base.onnx --keys $S/k.dskey --provider auto
    ds keygen --model $S/base.safetensors --data digits --scheme gradsigns --seed 0 --out $S/g.dskey
    ds embed --model $S/base.safetensors --data digits --keys $S/g.dskey --out $S/g.safetensors --device $DEVICE \
        --precision $HALF --json
    ds extract --model $S/g.safetensors --keys $S/g.dskey --json
    echo "(--nproc 2 on one GPU: exit 2 expected)"
    ds embed --nproc 2 --model $S/base.safetensors --data digits --keys $S/k0.dskey --out $S/n.safetensors \
        --device $DEVICE
    echo "+ torch.distributed.run --nproc-per-node 1 -m deepsigns_cli embed (nccl)"
    python3 -m torch.distributed.run --nproc-per-node 1 -m deepsigns_cli embed --model $S/base.safetensors \
        --data digits --keys $S/k0.dskey --out $S/t.safetensors --device $DEVICE --json
    echo "rc=$?"
    ds extract --model $S/t.safetensors --keys $S/k0.dskey
}
export -f ds smoke
step smoke 180 smoke

# 3. onnxruntime on the GPU, next to the CPU, on the marked model
step ort 60 python3 - <<'EOF'
import time
import numpy as np
import onnxruntime as ort
from deepsigns_cli import runtime
print(ort.__file__, ort.__version__, ort.get_available_providers())
print("usable:", runtime._cuda_usable(), "auto ->", runtime.resolve_provider("auto"))
x = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
out = {}
for providers in (["CPUExecutionProvider"], runtime.resolve_provider("auto")):
    s = ort.InferenceSession("/tmp/smoke/m.onnx", providers=providers)
    name = s.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 4096 for d in s.get_inputs()[0].shape]
    xi = x.reshape(shape) if int(np.prod(shape)) == x.size else np.resize(x, shape)
    s.run(None, {name: xi})
    t = time.perf_counter()
    for _ in range(20):
        y = s.run(None, {name: xi})[0]
    print(s.get_providers(), f"{(time.perf_counter() - t) / 20 * 1e3:.2f} ms per 4096 rows")
    out[providers[0]] = y
ys = list(out.values())
print("largest difference, CUDA vs CPU:", float(np.abs(ys[0] - ys[-1]).max()))
EOF

# 4. samples per second on the GPU: plain, embedding, port style (scripts/bench.py gpu)
step bench 180 python3 scripts/bench.py gpu --repeats "$REPEATS" --device "$DEVICE" --out /tmp/bench

# 5. the ResNet on the generated image folder through the CLI: loader processes, pinned memory
folder() {
    local b=/tmp/bench i=/tmp/bench/images-2000-32
    export DEEPSIGNS_PASSPHRASE=bench-passphrase  # (bench.py's)
    for run in "fp32 --epochs 3" "$BF16"; do  # (the second until the mark reads back)
        cp $b/overhead-resnet.dskey /tmp/r.dskey
        ds embed --model $b/overhead-resnet-base.safetensors --data $i --keys /tmp/r.dskey --out /tmp/r.safetensors \
            --device $DEVICE --precision $run --workers 6 --batch-size 256 --force --json
    done
    ds extract --model /tmp/r.safetensors --keys /tmp/r.dskey
}
export -f folder
step folder 120 folder

# 6. where an embedding step's time goes on the GPU (torch.profiler, the ResNet at 256, bf16)
step profile 60 python3 - <<'EOF'
import os
import sys
sys.path.insert(0, "scripts")
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from deepsigns_cli import api
from deepsigns_cli.bundle import open_bundle
from deepsigns_cli.checkpoint import load_checkpoint
from deepsigns_cli.registry import load_scheme
from deepsigns_cli.training import TrainConfig, fit
base = "/tmp/bench/overhead-resnet-base.safetensors"
model, info = load_checkpoint(base, arch=None)
data = api.load_dataset("/tmp/bench/images-2000-32", base)
x, y = np.asarray(data.x_train), data.y_train
scheme = load_scheme("hidden")
keys = scheme.check(open_bundle("/tmp/bench/overhead-resnet.dskey", "bench-passphrase").schemes["hidden"])
for kind in ("plain", "embed"):
    objectives = [] if kind == "plain" else [scheme.objective(model, info, data, keys)]
    cfg = TrainConfig(epochs=1, batch_size=256, lr=info.lr, device=os.environ["DEVICE"],
                      precision=os.environ["BF16"])
    fit(model, x, y, cfg, objectives)  # warm
    objectives = [] if kind == "plain" else [scheme.objective(model, info, data, keys)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fit(model, x, y, cfg, objectives)
    print(f"==== {kind}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
EOF

# 7. the test suite with CUDA visible (what finished in the time given, with each failure's name)
left=$((DEADLINE - ($(date +%s) - T0)))
step pytest "$((left > 30 ? left : 30))" python3 -m pytest -q -n 14 --dist loadfile -p no:cacheprovider -rfE --tb=short
grep -E "passed|failed|error" "$O/pytest.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$O/pytest.log" | head -n 30
echo "== all done after $(($(date +%s) - T0)) s"

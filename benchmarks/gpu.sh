#!/usr/bin/env bash
# One command for a GPU machine: install, export ViT-B/32 and ViT-L/14 (random weights: speed does not depend
# on the values) with fp16, and print `clipworks bench`'s table for CUDA and TensorRT, model only and end to
# end from JPEG files. About 6-8 minutes on one data-centre GPU; never part of CI.
#
#   bash benchmarks/gpu.sh            # from the repository root
#   GPU_BENCH_OUT=/tmp/gpu bash ...   # where bundles, photos and the JSON reports go (default .bench/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_BENCH_OUT:-.bench/gpu}
mkdir -p "$OUT"

if [ ! -x "$OUT/venv/bin/python" ]; then
  python3 -m venv "$OUT/venv"
fi
PY="$OUT/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
# The export extra brings torch and open_clip; onnxruntime-gpu replaces the CPU wheel (CUDA + TensorRT EPs).
"$PY" -m pip install -q -e '.[export]'
# Its [cuda,cudnn] extras bring CUDA's and cuDNN's libraries as wheels (clipworks preloads them through
# onnxruntime.preload_dlls), so no system CUDA is needed; TensorRT's wheel is optional.
"$PY" -m pip uninstall -q -y onnxruntime || true
"$PY" -m pip install -q 'onnxruntime-gpu[cuda,cudnn]'
"$PY" -m pip install -q tensorrt || echo "gpu.sh: no tensorrt wheel for this machine: CUDA only"
# ONNX Runtime's TensorRT provider loads libnvinfer by name: put the wheel's library folder on the path.
trt_libs=$("$PY" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)
[ -n "$trt_libs" ] && export LD_LIBRARY_PATH="$trt_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# What clipworks' backends see: a provider that is listed but does not start says which library it missed.
"$PY" - <<'EOF'
import onnxruntime as ort
from clipworks.runtime.sessions import provider_start_failure
print("onnxruntime", ort.__version__, ort.get_available_providers())
for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
    print(f"{provider}: {provider_start_failure(provider) or 'starts'}")
EOF

# Phone-sized JPEGs made from the sample photos shipped with clipworks, so decoding costs what it would.
"$PY" - "$OUT/photos" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
import clipworks
src = sorted((Path(clipworks.__file__).parent / "data" / "check_images").glob("*.jpg"))
dest = Path(sys.argv[1]); dest.mkdir(parents=True, exist_ok=True)
for i in range(256):
    path = dest / f"{i:04d}.jpg"
    if not path.exists():
        Image.open(src[i % len(src)]).convert("RGB").resize((1600, 1200), Image.BICUBIC).save(path, quality=90)
EOF

# The providers that start here, not just those this build lists.
providers=$("$PY" -c "from clipworks.runtime.sessions import provider_start_failure as f
print(' '.join(p for p in ('CUDAExecutionProvider', 'TensorrtExecutionProvider') if f(p) is None))")
[ -n "$providers" ] || { echo "gpu.sh: neither CUDA nor TensorRT starts here (see above)" >&2; exit 1; }
for arch in ViT-B-32 ViT-L-14; do
  bundle="$OUT/${arch}__random"
  [ -f "$bundle/clipworks.json" ] || "$PY" -m clipworks.cli.main export "$arch" --pretrained random \
      --precision fp32,fp16 -o "$bundle"
  for device in cuda tensorrt; do
    case "$device" in
      cuda) [[ "$providers" == *CUDAExecutionProvider* ]] || continue ;;
      tensorrt) [[ "$providers" == *TensorrtExecutionProvider* ]] || continue ;;
    esac
    echo
    echo "=== $arch fp16 on $device ==="
    "$PY" -m clipworks.cli.main bench -m "$bundle" --device "$device" --precision fp16 \
        --batch-sizes 1,8,32,128 --seconds 3 --images 512 --photos "$OUT/photos" \
        | tee "$OUT/${arch}-${device}.txt"
    "$PY" -m clipworks.cli.main bench -m "$bundle" --device "$device" --precision fp16 \
        --batch-sizes 1,8,32,128 --seconds 1 --images 256 --photos "$OUT/photos" --json \
        > "$OUT/${arch}-${device}.json"
  done
done
echo
echo "reports in $OUT/*.txt and *.json"

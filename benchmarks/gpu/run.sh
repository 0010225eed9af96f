#!/bin/bash
# GPU checks for vitkit on the lent H200: bench vs timm (fp32/bf16, ToMe) and the CNN-vs-ViT study.
export PYTHONPATH=$PWD:$PWD/.gpu/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a $OUT/gpu.txt
vk() { python3 -c 'import sys; from vitkit.cli.main import main; sys.argv[0]="vitkit"; sys.exit(main())' "$@"; }
{
  echo '{"vit_small": '; vk bench vit_small_patch16_224 --batch 1,256 --precision fp32,bf16 --vs timm --json
  echo ', "vit_small_tome8": '; vk bench vit_small_patch16_224 --batch 256 --precision bf16 --tome 8 --json
  echo ', "vit_small_tome13": '; vk bench vit_small_patch16_224 --batch 256 --precision bf16 --tome 13 --json
  echo ', "swin_tiny": '; vk bench swin_tiny_patch4_window7_224 --batch 256 --precision fp32,bf16 --vs timm --json
  echo '}'
} > $OUT/gpu_bench.json 2> $OUT/bench.err
tail -5 $OUT/bench.err
timeout ${STUDY_S:-470} python3 benchmarks/cnn_vs_vit.py --data .gpu/cifar10-jpg.tar.gz --budget ${BUDGET:-50s} \
  --device cuda --workers 12 --work /tmp/cvv --out $OUT/cnn_vs_vit.json 2>&1 | grep -v "step .*/~" | tail -40

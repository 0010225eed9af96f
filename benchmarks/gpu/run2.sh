export PYTHONPATH=$PWD:$PWD/.gpu/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
vk() { python3 -c 'import sys; from vitkit.cli.main import main; sys.argv[0]="vitkit"; sys.exit(main())' "$@"; }
vk bench swin_tiny_patch4_window7_224 --batch 1,256 --precision fp32,bf16 --vs timm --json > $OUT/gpu_bench_swin.json 2> $OUT/bench.err; tail -3 $OUT/bench.err
python3 benchmarks/gpu/tome_probe.py 2>&1 | tee $OUT/tome_probe.txt | tail -30
python3 benchmarks/gpu/distill_probe.py 2>&1 | grep -v "step .*/~" | tail -12

#!/usr/bin/env bash
# One lent-GPU session in one command (about 9 minutes): the MAML speed and memory benchmarks on
# the GPU, then RL² trained on the GPU for the settings the 2-core CPU could not reach, one
# process per setting side by side on the one GPU.
#
#   OUT=/tmp/gpu_out RL2_MINUTES=6 bash benchmarks/gpu_session.sh
#
# Results land in $OUT: maml_speed_cuda.json, maml_memory_cuda.json, rl2_gpu.json (merged from
# the per-setting runs) and log.txt. Python packages the machine lacks can be carried as wheels
# in .whl/ (installed into /tmp/site first).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
RL2_MINUTES=${RL2_MINUTES:-6}
mkdir -p "$OUT" /tmp/rl2runs
exec > >(tee -a "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
nvidia-smi -L
python3 -c "import torch, metafit; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

echo "== RL2 smoke on the GPU"
python3 benchmarks/rl2.py --settings bandit-n10-k5 --quick --device cuda --out /tmp/rl2runs/smoke.json || exit 1

echo "== MAML speed on the GPU"
python3 benchmarks/maml_speed.py --device cuda --rounds 9 --out "$OUT/maml_speed_cuda.json"

echo "== RL2 on the GPU, $RL2_MINUTES training minutes per setting, side by side"
BIG="--set meta_batch_size=2000 --set ppo_minibatches=8"
pids=()
# conservative PPO steps (stop an update's epochs at approximate KL 0.01) for the n=100 bandits:
# the best 8-minute CPU score in docs/benchmarks.md section 11
for s in bandit-n100-k5 bandit-n100-k10 bandit-n100-k50 mdp-n10 mdp-n25; do
    extra=""
    case $s in bandit-n100-*) extra="--set target_kl=0.01" ;; esac
    python3 benchmarks/rl2.py --settings $s --device cuda --minutes "$RL2_MINUTES" $BIG --set hidden_size=128 $extra \
        --out /tmp/rl2runs/$s.json > /tmp/rl2runs/$s.log 2>&1 &
    pids+=($!)
done
python3 benchmarks/rl2.py --settings bandit-n10-k50 --device cuda --minutes "$RL2_MINUTES" $BIG \
    --out /tmp/rl2runs/bandit-n10-k50.json > /tmp/rl2runs/bandit-n10-k50.log 2>&1 &
pids+=($!)

echo "== MAML memory on the GPU (beside the RL2 runs: per-process allocator counters)"
python3 benchmarks/maml_memory.py --device cuda --out "$OUT/maml_memory_cuda.json"

wait "${pids[@]}"
tail -n 3 /tmp/rl2runs/*.log
python3 - "$OUT/rl2_gpu.json" /tmp/rl2runs/bandit-*.json /tmp/rl2runs/mdp-*.json <<'EOF'
import json, sys
merged = None
for path in sys.argv[2:]:
    try:
        r = json.load(open(path))
    except (OSError, json.JSONDecodeError) as err:
        print("missing", path, err)
        continue
    if merged is None:
        merged = r
    else:
        merged["settings"].update(r["settings"])
if merged:
    json.dump(merged, open(sys.argv[1], "w"), indent=1)
    for k, v in merged["settings"].items():
        print(f"{k}: {v['eval']['mean']:.2f} +/- {v['eval']['ci95']:.2f} (paper {v['paper_rl2']}) "
              f"{v['iterations']} updates, {v['train_minutes']:.1f} min")
EOF

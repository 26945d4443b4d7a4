#!/usr/bin/env bash
# One lent-GPU session in one command: RL² jobs trained side by side on the one GPU (one process
# per job), packed at a deadline so that a lease never ends with nothing; with MAML=1 the MAML speed
# and memory benchmarks run first.
#
#   OUT=/tmp/gpu_out RL2_MINUTES=6.5 DEADLINE_S=540 bash benchmarks/gpu_session.sh [JOBS_FILE]
#
# JOBS_FILE (default benchmarks/gpu_rl2_jobs.txt): one job per line, "NAME SETTING [rl2.py flags]";
# '#' starts a comment. Weights a job starts from (--init-weights PATH) must travel with the tree
# (an ignored folder named in the device call's carry). Results in $OUT: rl2_gpu_jobs.json (each
# job's rl2.py result under its NAME, with the job line), runs.tar.gz (per-job logs, JSON and the
# kept weights, NAME.safetensors), log.txt, and with MAML=1 maml_speed_cuda.json and
# maml_memory_cuda.json. Python packages the machine lacks can be carried as wheels in .whl/
# (installed into /tmp/site first).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
RL2_MINUTES=${RL2_MINUTES:-6}
DEADLINE_S=${DEADLINE_S:-540}
JOBS=${1:-benchmarks/gpu_rl2_jobs.txt}
RUNS=${RUNS:-$(mktemp -d /tmp/rl2runs.XXXXXX)}  # per-job logs, JSON and weights (a fresh folder)
START=$SECONDS
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/log.txt") 2>&1
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then  # WHEELS=0: use what is installed
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
nvidia-smi -L
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries the script on a machine without a GPU
python3 -c "import torch, metafit; print('torch', torch.__version__, torch.cuda.get_device_name() if '$DEVICE' != 'cpu' else 'cpu')" \
    || exit 1

if [ "${MAML:-0}" = 1 ]; then
    echo "== MAML speed and memory on the GPU"
    python3 benchmarks/maml_speed.py --device cuda --rounds 9 --out "$OUT/maml_speed_cuda.json"
    python3 benchmarks/maml_memory.py --device cuda --out "$OUT/maml_memory_cuda.json"
fi

echo "== RL2 on the GPU: $RL2_MINUTES training minutes per job, side by side ($JOBS)"
pids=()
names=()
while read -r name setting flags; do
    case "$name" in ''|'#'*) continue ;; esac
    # shellcheck disable=SC2086  # the flags are meant to split into words
    python3 benchmarks/rl2.py --settings "$setting" --device "$DEVICE" --minutes "$RL2_MINUTES" $flags \
        --save-weights "$RUNS/$name.safetensors" --out "$RUNS/$name.json" > "$RUNS/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
    echo "$name $setting $flags" > "$RUNS/$name.job"
done < "$JOBS"
echo "started ${#pids[@]} jobs: ${names[*]}"
# wait for all, but pack what exists at the deadline (a job still running then is stopped)
while [ $((SECONDS - START)) -lt "$DEADLINE_S" ]; do
    running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
    [ "$running" = 0 ] && break
    sleep 5
done
for p in "${pids[@]}"; do kill "$p" 2>/dev/null && echo "stopped job pid $p at the deadline"; done
for n in "${names[@]}"; do echo "-- $n"; tail -n 3 "$RUNS/$n.log"; done
python3 - "$OUT/rl2_gpu_jobs.json" "$RUNS" "${names[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, runs, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
merged = {"jobs": {}}
for name in names:
    try:
        r = json.loads((runs / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        print("no result for", name, err)
        continue
    (setting, result), = r["settings"].items()
    result["job"] = (runs / f"{name}.job").read_text().strip()
    merged["jobs"][name] = result
    merged.update({k: r[k] for k in ("date", "machine", "protocol") if k in r})
    print(f"{name}: {setting} {result['eval']['mean']:.2f} +/- {result['eval']['ci95']:.2f} "
          f"(paper {result['paper_rl2']}), best validation {result['best_val_return']:.2f} "
          f"({result['best_weights']}, update {result['best_iteration']}), {result['iterations']} updates, "
          f"{result['train_minutes']:.1f} min")
json.dump(merged, open(out, "w"), indent=1)
EOF
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" .
echo "done in $((SECONDS - START)) s"

#!/bin/bash
# One GPU session: the train/evaluate stages (what `dvc repro` runs) for three presets on kangaroo, then the
# stock peer. Selective search ran on the CPU beforehand (gpu/proposals): the device has no cv2.ximgproc.
# usage: bash gpu/run.sh OUT_DIR BUDGET_SECONDS
set -u
OUT=$1; BUDGET=${2:-540}
START=$(date +%s)
W=/tmp/gpu-out; mkdir -p $W
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
pack() { tar -czf $OUT/results.tgz -C $W . ; }
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu/whl/*.whl > $W/pip.log 2>&1 || { cat $W/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch,torchvision,cv2,numpy;print('torch',torch.__version__,'tv',torchvision.__version__,'cv2',cv2.__version__,'np',numpy.__version__,'cuda',torch.cuda.is_available())"; } > $W/env.txt 2>&1
cat $W/env.txt
mkdir -p data && rm -rf data/voc && cp -r gpu/voc data/voc

run_preset() {  # NAME MIN_SECONDS_LEFT
  local P=$1 stages s t0 t1 rc
  [ $(left) -lt $2 ] && { echo "skip $P: $(left) s left" | tee -a $W/skipped.txt; return; }
  rm -rf data/proposals data/regions data/features data/model data/detections data/train-resume metrics dvclive
  cp gpu/params-$P.yaml params.yaml
  mkdir -p $W/$P
  if [ $P = faster-rcnn ]; then stages="proposals regions features train evaluate"
  else cp -r gpu/proposals data/proposals; stages="regions features train evaluate"; fi
  for s in $stages; do
    t0=$(date +%s%N)
    timeout $(left) python3 stages/$s.py > $W/$P/$s.log 2>&1; rc=$?
    t1=$(date +%s%N)
    echo "$s rc=$rc seconds=$(( (t1 - t0) / 1000000 ))e-3" | tee -a $W/$P/seconds.txt
    [ $rc -ne 0 ] && { tail -20 $W/$P/$s.log; pack; return; }
  done
  cp -r metrics/. $W/$P/; cp -r dvclive $W/$P/ 2>/dev/null
  pack
}

run_peer() {  # SEED MIN_SECONDS_LEFT
  [ $(left) -lt $2 ] && { echo "skip peer $1: $(left) s left" | tee -a $W/skipped.txt; return; }
  local t0=$(date +%s%N)
  timeout $(left) python3 bench/families.py gpu/voc --classes ${CLASSES:-kangaroo} --split test \
    --weights gpu/mobilenet_v2-imagenet-features.pth --presets --seeds 1 --set seed=$1 ${PEER_SET:-} \
    --out $W/peer-seed$1 > $W/peer-seed$1.log 2>&1
  echo "peer seed $1 rc=$? seconds=$(( ($(date +%s%N) - t0) / 1000000 ))e-3" | tee -a $W/peer-seconds.txt
  tail -5 $W/peer-seed$1.log
  pack
}

run_preset faster-rcnn 60
run_preset fast-rcnn 60
[ -n "${NO_PEER:-}" ] || run_peer 0 60
run_preset rcnn-best 150
[ -n "${NO_PEER:-}" ] || run_peer 1 100
[ -n "${NO_PEER:-}" ] || run_peer 2 100
echo "done, $(left) s left"
pack

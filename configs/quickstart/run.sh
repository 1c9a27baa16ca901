#!/usr/bin/env bash
# The quickstart: a real, small continual pre-training run on 2 CPU cores, offline, in a few minutes.
#   bash configs/quickstart/run.sh
# 1. a byte-level BPE tokenizer trained on both corpora;
# 2. two prepared datasets from built-in offline sources: Python's standard library (upstream,
#    standing in for the Pile) and the King James Bible (downstream, standing in for SlimPajama);
# 3. phase 1: pre-train a tiny GPT-NeoX on the code;
# 4. phase 2: re-warm and re-decay the LR on the Bible (5% code replay), evaluating both sets;
# 5. figures of both phases' schedules and held-out losses, and a table of forgetting and gain.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/quickstart}
[ -f "$DATA/tokenizer/tokenizer.json" ] || cpt tokenizer train --source python-stdlib --source kjv --vocab-size 4096 --out "$DATA/tokenizer"
[ -f "$DATA/code/manifest.json" ] || cpt prepare --source python-stdlib --tokenizer "$DATA/tokenizer" --out "$DATA/code"
[ -f "$DATA/bible/manifest.json" ] || cpt prepare --source kjv --tokenizer "$DATA/tokenizer" --out "$DATA/bible" --val-fraction 0.05
cpt train --config configs/quickstart/pretrain.yaml "$@"
cpt train --config configs/quickstart/rewarm.yaml "$@"
cpt schedule plot --config configs/quickstart/pretrain.yaml --config configs/quickstart/rewarm.yaml \
    --label "phase 1: pre-train on code" --label "phase 2: re-warm on the Bible" --out runs/quickstart-schedules.png
cpt plot runs/quickstart-pretrain runs/quickstart-rewarm --out runs/quickstart-loss
cpt report runs/quickstart-pretrain runs/quickstart-rewarm --upstream code --downstream bible --out runs/quickstart-report.md
cat runs/quickstart-report.md
echo "done: runs/quickstart-pretrain and runs/quickstart-rewarm (metrics.jsonl, tensorboard/, checkpoints/)," \
     "runs/quickstart-schedules.png, runs/quickstart-loss.png, runs/quickstart-report.md"

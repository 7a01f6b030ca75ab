#!/usr/bin/env bash
# The main job, end to end on real data that ships with scikit-learn (no downloads):
#   1. train EfficientNetV2-B0 on handwritten digits (python -m train, its default run);
#   2. export the weights to a PyTorch checkpoint in the layout of WZMIAOMIAO's model.py;
#   3. classify the held-out test digits with that PyTorch model;
#   4. convert it back to Flax with --verify (PyTorch vs Flax logits);
#   5. classify the held-out test digits with the converted Flax weights;
#   6. predict three of them with python -m effnetv2_jax.predict (the trained file's labels and
#      eval transform).
# About 5 minutes on 2 CPU cores once .venv is set up. Usage: bash scripts/tour.sh [WORKDIR]
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${1:-runs/tour}"

section "1/6  python -m train --workdir $WORK   (digits, B0, progressive 26 -> 32 px)"
"$PY" -m train --workdir "$WORK"

section "2/6  python -m convert --to-torch $WORK/model.msgpack --layout wzmiaomiao"
"$PY" -m convert --to-torch "$WORK/model.msgpack" --layout wzmiaomiao -o "$WORK/model_torch.pth"

section "3/6  PyTorch (WZMIAOMIAO's model.py architecture) on the held-out test digits"
"$PY" scripts/classify_torch.py "$WORK/model_torch.pth" "$WORK/model.msgpack" "$WORK/digits/test"

section "4/6  python -m convert $WORK/model_torch.pth --verify   (back to Flax)"
"$PY" -m convert "$WORK/model_torch.pth" -o "$WORK/converted.msgpack" --verify --verify-size 32

# A .pth carries no eval transform: the converted file has the layout's (B0: 224 px), so the
# digits' 32 px is given here.
section "5/6  python -m train --eval-only --init converted.msgpack on the held-out test digits"
"$PY" -m train --eval-only --init "$WORK/converted.msgpack" --data-dir "$WORK/digits/test" \
    --eval-image-size 32

section "6/6  python -m effnetv2_jax.predict on three test digits (the folder names the true class)"
mapfile -t DIGITS < <(find "$WORK/digits/test" -name '*.png' | sort | awk 'NR % 90 == 1')
"$PY" -m effnetv2_jax.predict "${DIGITS[@]}" --weights "$WORK/model.msgpack" --top-k 2

printf '\ntour done in %d s; curves: %s/curves.png\n' $((SECONDS - START)) "$WORK"

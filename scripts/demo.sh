#!/usr/bin/env bash
# Conversion demo on randomly initialised weights (no downloads): builds PyTorch EfficientNetV2
# checkpoints in the three layouts (WZMIAOMIAO's model.py, torchvision, timm), converts each to Flax with
# --verify, exports one back to PyTorch, and runs jitted Flax inference on a photo.
# About 1.5 minutes on 2 CPU cores once .venv is set up.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

section "1/4  PyTorch checkpoints with random weights (WZMIAOMIAO model.py, torchvision, timm)"
"$PY" - "$WORK" <<'PYEOF'
import sys
import timm
import torch
import torchvision
from convert import torch_reference
from convert.torch_reference import randomize_


work = sys.argv[1]
models = {
    'wzmiaomiao_s.pth': torch_reference.create('s'),               # WZMIAOMIAO's model.py layout
    'torchvision_s.pth': torchvision.models.efficientnet_v2_s(),
    'timm_b0.pth': timm.create_model('tf_efficientnetv2_b0', pretrained=False),
}
for seed, (name, model) in enumerate(models.items()):
    randomize_(model, seed)
    torch.save(model.state_dict(), f'{work}/{name}')
    n = sum(p.numel() for p in model.parameters())
    print(f'{name:18s} {type(model).__module__}.{type(model).__name__}: {n:,} parameters')
PYEOF

section "2/4  PyTorch -> Flax: python -m convert X.pth --verify"
for ckpt in wzmiaomiao_s torchvision_s timm_b0; do
    printf '\n$ python -m convert %s.pth --verify\n' "$ckpt"
    "$PY" -m convert "$WORK/$ckpt.pth" --verify
done

section "3/4  Flax -> PyTorch: python -m convert --to-torch timm_b0.msgpack --layout timm -o back.pth"
"$PY" -m convert --to-torch "$WORK/timm_b0.msgpack" --layout timm -o "$WORK/back.pth"
"$PY" - "$WORK" <<'PYEOF'
import sys
import torch

work = sys.argv[1]
original = torch.load(f'{work}/timm_b0.pth', weights_only=True)
back = torch.load(f'{work}/back.pth', weights_only=True)
keys = [k for k in original if not k.endswith('num_batches_tracked')]
assert set(keys) <= set(back), 'keys lost in the round trip'
differ = [k for k in keys if not torch.equal(original[k], back[k])]
print(f'round trip timm -> Flax -> timm: {len(keys) - len(differ)} of {len(keys)} tensors '
      'bit-identical')
sys.exit(1 if differ else 0)
PYEOF

section "4/4  Jitted Flax inference: EfficientNetV2-S (converted wzmiaomiao weights) on skimage's chelsea"
"$PY" - "$WORK" <<'PYEOF'
import sys
import time

import jax
import numpy as np
from PIL import Image
from skimage import data

import effnetv2_jax

work = sys.argv[1]
model, variables = effnetv2_jax.load(f'{work}/wzmiaomiao_s.msgpack')
size = model.variant.eval_size  # 384 for S

# WZMIAOMIAO's eval transform (its predict.py): short side to `size`, center crop, mean = std = 0.5.
image = Image.fromarray(data.chelsea())
scale = size / min(image.size)
image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
left, top = (image.width - size) // 2, (image.height - size) // 2
image = image.crop((left, top, left + size, top + size))
x = (np.asarray(image, np.float32)[None] / 255.0 - 0.5) / 0.5  # (1, H, W, 3) NHWC

predict = jax.jit(model.apply)
for call in ('first (compiles)', 'second'):
    start = time.perf_counter()
    logits = jax.block_until_ready(predict(variables, x))
    print(f'{call:17s} call: {time.perf_counter() - start:6.2f} s')
probs = jax.nn.softmax(logits[0])
top5 = np.argsort(-np.asarray(probs))[:5]
print(f'input {x.shape} float32 on {jax.devices()[0].platform}, logits {logits.shape}')
print('top-5 classes:', ', '.join(f'{i} ({probs[i]:.4f})' for i in top5),
      '(random weights: the classes mean nothing)')
PYEOF

section "done in $((SECONDS - START)) s"

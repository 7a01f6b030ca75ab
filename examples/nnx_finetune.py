"""Fine-tune EfficientNetV2 on scikit-learn's handwritten digits with Flax NNX.

    python examples/nnx_finetune.py                  # B0 from random weights, 300 steps
    python examples/nnx_finetune.py --weights hf-hub:timm/tf_efficientnetv2_b0.in1k  # pretrained

With `--weights` (a weights file or a pretrained name) the network keeps its weights and gets a
new 10-class head; the images are normalised as those weights expect. Needs scikit-learn (the
`train` extra). The NNX model's BatchNorm follows PyTorch in training mode: batch statistics,
running statistics updated in place (momentum 0.1, unbiased variance).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from effnetv2_jax import nnx as effnet_nnx

NUM_CLASSES = 10


def digits(image_size: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as normalised float32 [N, size, size, 3] (8x8 upscaled) and int labels."""
    data = load_digits()
    images = jax.image.resize(jnp.asarray(data.images / 16.0, jnp.float32),
                              (len(data.images), image_size, image_size), 'bicubic')
    images = jnp.repeat(images[..., None], 3, axis=-1)
    return np.asarray((images - jnp.asarray(mean)) / jnp.asarray(std)), data.target


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, images):
    return model(images).argmax(-1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--weights', help='weights file or pretrained name (default: random B0)')
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--learning-rate', type=float, default=1e-3)
    args = p.parse_args(argv)

    rngs = nnx.Rngs(0)
    if args.weights:
        model = effnet_nnx.load(args.weights, num_classes=NUM_CLASSES, rngs=rngs)
        spec = model.metadata['preprocessing']
        mean, std = spec['mean'], spec['std']
    else:
        model = effnet_nnx.create_model('b0', NUM_CLASSES, rngs=rngs)
        mean, std = [0.5] * 3, [0.5] * 3
    images, labels = digits(args.image_size, mean, std)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:300], order[300:]

    optimizer = nnx.Optimizer(model, optax.adamw(args.learning_rate), wrt=nnx.Param)
    model.train()  # batch statistics, running statistics updated, dropout and drop path on
    batches = np.random.default_rng(1).integers(0, len(train), (args.steps, args.batch_size))
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(train[batches], 1):
        losses.append(float(train_step(model, optimizer, images[batch], labels[batch])))
        if step % 50 == 0 or step == args.steps:
            print(f'step {step}: loss {np.mean(losses[-50:]):.3f} '
                  f'({step / (time.perf_counter() - start):.1f} steps/s)')

    model.eval()  # running statistics, no dropout
    accuracy = float(np.mean(np.asarray(predict(model, images[test])) == labels[test]))
    print(f'test accuracy: {100 * accuracy:.1f} % of {len(test)} digits')
    return {'losses': losses, 'accuracy': accuracy}


if __name__ == '__main__':
    main()

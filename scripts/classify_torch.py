"""Top-1 accuracy of a PyTorch checkpoint in the wzmiaomiao layout on an image folder: the PyTorch
side of scripts/tour.sh. Usage: classify_torch.py MODEL.pth WEIGHTS.msgpack FOLDER, where
WEIGHTS.msgpack is the file the .pth was exported from (for the variant, classes and the eval
transform)."""
import sys

import numpy as np
import torch
from PIL import Image

from convert.torch_reference import create
from effnetv2_jax.checkpoint import read
from effnetv2_jax.transforms import eval_transform, normalize
from train.input_pipeline import scan_image_folder


def main(torch_path: str, weights_path: str, folder_path: str) -> None:
    _, metadata = read(weights_path)
    model = create(metadata['variant'], metadata['num_classes'])
    model.load_state_dict(torch.load(torch_path, weights_only=True))
    model.eval()
    folder = scan_image_folder(folder_path)
    spec = metadata['preprocessing']
    names = metadata['class_names']
    correct = 0
    for start in range(0, len(folder), 64):
        paths = folder.paths[start:start + 64]
        images = np.stack([eval_transform(Image.open(p), spec) for p in paths])
        with torch.no_grad():
            logits = model(torch.from_numpy(normalize(images, spec).transpose(0, 3, 1, 2).copy()))
        predicted = [names[i] for i in logits.argmax(-1).tolist()]
        truth = [folder.class_names[i] for i in folder.labels[start:start + 64]]
        correct += sum(p == t for p, t in zip(predicted, truth))
    print(f'PyTorch ({type(model).__module__}): top-1 {correct / len(folder):.2%} on '
          f'{len(folder)} images of {folder_path}')


if __name__ == '__main__':
    main(*sys.argv[1:])

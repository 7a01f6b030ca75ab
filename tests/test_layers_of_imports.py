"""Specification of the packages' layers: `effnetv2_jax` (the model, its weights files and the
torch-free PyTorch key tables) imports neither `convert` (the PyTorch side) nor `train`, and
those two do not import each other. Every import counts, the lazy ones inside functions too. The
model package imports without torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import of the others.
ALLOWED = {'effnetv2_jax': set(), 'convert': {'effnetv2_jax'}, 'train': {'effnetv2_jax'}}


def imported_packages(path: Path) -> dict[str, int]:
    """{package of ours: the first line importing it} of one module."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            package = name.split('.')[0]
            if package in ALLOWED:
                found.setdefault(package, node.lineno)
    return found


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_no_import_goes_up_the_layers(package):
    upward = [f'{path.relative_to(ROOT)}:{line} imports {other}'
              for path in sorted((ROOT / package).glob('*.py'))
              for other, line in imported_packages(path).items()
              if other != package and other not in ALLOWED[package]]
    assert upward == []


def test_the_model_package_and_its_pytorch_tables_import_without_torch():
    modules = ('effnetv2_jax', 'effnetv2_jax.layouts', 'effnetv2_jax.converter',
               'effnetv2_jax.hub', 'effnetv2_jax.pretrained', 'effnetv2_jax.export',
               'effnetv2_jax.nnx', 'effnetv2_jax.predict')
    code = (f'import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n'
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'timm', 'torchvision', 'convert', 'train')))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


def test_the_moved_modules_keep_their_old_names():
    import convert.converter
    import convert.hub
    import convert.layouts
    import convert.pretrained
    from effnetv2_jax import converter, hub, layouts, pretrained
    assert (convert.layouts, convert.converter, convert.hub, convert.pretrained) == (
        layouts, converter, hub, pretrained)

"""examples/inference.ipynb runs end to end offline (random weights) and shows what it claims."""
from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / 'examples' / 'inference.ipynb'

# Run in the kernel after the notebook: what it computed, as one JSON line.
REPORT = """
import json
print(json.dumps({
    'relative_diff': float(diff / np.abs(torch_logits).max()),
    'logit_std': float(torch_logits.std()),
    'same_top1': bool(logits.argmax() == torch_logits.argmax()),
    'top5': [p.label for p in top5],
    'num_stages': len(features),
    'loss': float(loss), 'loss_after': float(loss_after),
}))
"""


def outputs(cell, output_type):
    return [o for o in cell.get('outputs', []) if o['output_type'] == output_type]


def test_inference_notebook_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('EFFNETV2_JAX_CACHE_DIR', str(tmp_path / 'xla'))
    monkeypatch.delenv('MPLBACKEND', raising=False)  # so the kernel's inline backend makes PNGs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert not any(c.outputs or c.execution_count for c in code), 'stored with outputs'

    # papermill's convention: parameters override in a cell right after the tagged one.
    tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        'PRETRAINED = False', metadata={'tags': ['injected-parameters']}))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == 'code']
    assert not [o for c in code for o in outputs(c, 'error')]
    stdout = {i: ''.join(o['text'] for o in outputs(c, 'stream') if o['name'] == 'stdout')
              for i, c in enumerate(code)}
    convert_cell = next(i for i, c in enumerate(code) if '-m convert' in c.source)
    assert '-> OK' in stdout[convert_cell], stdout[convert_cell]  # --verify passed, file written
    assert (tmp_path / 'efficientnet_v2_s.msgpack').is_file()

    pngs = [c for c in code if any('image/png' in o.get('data', {})
                                   for o in outputs(c, 'display_data'))]
    assert len(pngs) == 2  # photo + top-5 bars; stage feature maps
    assert '.predict(' in pngs[0].source and 'features_only' in pngs[1].source

    report = json.loads(stdout[len(code) - 1])
    assert report['relative_diff'] <= 1e-5, report  # the tests' tolerance for S at 384
    assert report['logit_std'] > 0.1, report  # random weights, yet logits far from constant
    assert report['same_top1'], report
    assert len(report['top5']) == 5 and all(report['top5']), report
    assert report['num_stages'] == 6, report
    assert report['loss_after'] < report['loss'], report  # the head's step went downhill

"""The benchmark entry point runs end to end and writes what the README shows (tiny settings: the
numbers themselves are measured by hand, never asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_writes_json_and_markdown_for_every_framework(tmp_path):
    output = tmp_path / 'result'
    subprocess.run([sys.executable, '-m', 'benchmarks.throughput', '--variant', 'b0',
                    '--image-size', '32', '--batch-size', '2', '--modes', 'infer',
                    '--frameworks', 'jax', 'seed-cl', '--repeats', '2', '--steps', '1',
                    '--output', str(output)], cwd=REPO, check=True, capture_output=True)
    report = json.loads(output.with_suffix('.json').read_text())
    assert [r['framework'] for r in report['results']] == ['jax', 'seed-cl']
    for result in report['results']:
        assert len(result['img_per_s_rounds']) == 2 and result['img_per_s'] > 0
        assert result['first_result_s'] > 0 and result['peak_memory_bytes'] > 0
    table = output.with_suffix('.md').read_text()
    assert '| infer | jax |' in table and '| infer | seed-cl |' in table


def test_scaling_benchmark_measures_only_the_batches_a_device_count_divides(tmp_path):
    output = tmp_path / 'scaling'
    subprocess.run([sys.executable, '-m', 'benchmarks.scaling', '--variant', 'b0',
                    '--image-size', '32', '--batch-sizes', '2', '3', '--devices', '2',
                    '--repeats', '2', '--steps', '1', '--output', str(output)],
                   cwd=REPO, check=True, capture_output=True)
    report = json.loads(Path(f'{output}.json').read_text())
    [cell] = report['results']  # 3 images cannot be split over 2 devices
    assert (cell['devices'], cell['batch_size']) == (2, 2)
    assert len(cell['img_per_s_rounds']) == 2 and cell['img_per_s'] > 0
    assert cell['first_step_s'] > 0 and report['workers'][0]['peak_rss_bytes'] > 0
    table = Path(f'{output}.md').read_text()
    assert '| 2 | ' in table and '| 3 | - |' in table

"""The benchmark entry points run end to end and write what docs/performance.md shows (tiny
settings: the numbers themselves are measured by hand, never asserted)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_writes_json_and_markdown_for_every_framework(tmp_path):
    output = tmp_path / 'result'
    subprocess.run([sys.executable, '-m', 'benchmarks.throughput', '--variant', 'b0',
                    '--image-size', '32', '--batch-size', '2', '--modes', 'infer',
                    '--frameworks', 'jax', 'wzmiaomiao-cl', '--repeats', '2', '--steps', '1',
                    '--output', str(output)], cwd=REPO, check=True, capture_output=True)
    report = json.loads(output.with_suffix('.json').read_text())
    assert [r['framework'] for r in report['results']] == ['jax', 'wzmiaomiao-cl']
    for result in report['results']:
        assert len(result['img_per_s_rounds']) == 2 and result['img_per_s'] > 0
        assert result['first_result_s'] > 0 and result['peak_memory_bytes'] > 0
    table = output.with_suffix('.md').read_text()
    assert '| infer | jax |' in table and '| infer | wzmiaomiao-cl |' in table


def test_throughput_command_shows_the_settings_that_change_the_figures(monkeypatch):
    from benchmarks.throughput import TUNING_VARIABLES, command_line
    for name in TUNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=1')
    monkeypatch.setenv('UNRELATED_VARIABLE', '1')
    assert command_line(['--variant', 's']) == (
        'GLIBC_TUNABLES=glibc.malloc.arena_max=1 python -m benchmarks.throughput --variant s')


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


def test_input_pipeline_benchmark_times_ours_timm_and_the_decode_on_one_core(tmp_path):
    output = tmp_path / 'input'
    subprocess.run([sys.executable, '-m', 'benchmarks.input_pipeline', '--cases', '64:5',
                    '--rounds', '2', '--passes', '1', '--output', str(output)],
                   cwd=REPO, check=True, capture_output=True)
    report = json.loads(Path(f'{output}.json').read_text())
    assert [(r['transform'], r['size']) for r in report['results']] == [
        ('decode', 0), ('ours', 64), ('timm', 64)]
    assert all(len(r['img_per_s_rounds']) == 2 and r['img_per_s'] > 0
               for r in report['results'])
    assert '| 64 | 2 x 5 |' in Path(f'{output}.md').read_text()


def run_memory_benchmark(*args):
    return subprocess.run([sys.executable, '-m', 'benchmarks.memory', '--cases', 'b0:32:1', *args],
                          cwd=REPO, capture_output=True, text=True)


def test_memory_benchmark_plans_the_train_step_with_and_without_remat(tmp_path):
    result = run_memory_benchmark('--output', str(tmp_path / 'memory'))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith('| B0 | 32 | 1 |')]
    assert [row.split(' | ')[3] for row in rows] == ['no', 'yes']
    report = json.loads((tmp_path / 'memory.json').read_text())
    assert [r['remat'] for r in report['results']] == [False, True]
    assert all(r['temp'] > 0 and r['total'] > r['state'] > 0 for r in report['results'])
    assert rows == (tmp_path / 'memory.md').read_text().splitlines()[4:6]


def test_memory_benchmark_for_an_h200_plans_with_the_cuda_plugin_or_says_how_to_get_it():
    result = run_memory_benchmark('--target', 'h200')
    if importlib.util.find_spec('jax_cuda12_plugin') is None:
        assert result.returncode != 0
        assert result.stderr.strip() == (
            f'error: --target h200 needs the CUDA plugin of jax {jax.__version__}: '
            f'pip install "jax[cuda12]=={jax.__version__}"')
        assert '| B0 |' not in result.stdout
    else:
        assert result.returncode == 0, result.stderr
        assert 'NVIDIA H200 (compile only)' in result.stdout
        assert '| B0 | 32 | 1 | yes |' in result.stdout


def test_nnx_benchmark_times_linen_and_both_nnx_styles_against_linen():
    from benchmarks import nnx as nnx_benchmark
    rows = nnx_benchmark.measure('b0', 32, 2, ['linen', 'nnx', 'nnx-split'], ['infer'],
                                 rounds=1, calls=1)
    assert [row[2] for row in rows] == ['linen', 'nnx', 'nnx-split']
    assert rows[0][6] == 1.0 and all(row[3] > 0 and row[7] > 0 for row in rows)


def test_tpu_targets_are_googles_accelerator_types_as_libtpu_topologies():
    from benchmarks.memory import tpu_target
    # v5e counts chips (one TensorCore each); v4 and v5p count TensorCores, two a chip.
    assert tpu_target('tpu-v5e-8')[1:] == ('v5e:2x4', 'default', 8, 16)
    assert tpu_target('tpu-v5e-256')[1:] == ('v5e:16x16', 'default', 256, 16)
    assert tpu_target('tpu-v4-32')[1:] == ('v4:2x2x4', 'megacore', 16, 32)
    assert tpu_target('tpu-v5p-8')[1:] == ('v5:2x2x1', 'megacore', 4, 95)


def test_memory_benchmark_refuses_a_tpu_slice_google_does_not_offer():
    result = run_memory_benchmark('--target', 'tpu-v5e-12')
    assert result.returncode == 2
    assert assert_one_line_error(result.stderr).startswith(
            "error: argument --target: tpu-v5e slices here: 1, 4, 8, 16, 32, 64, 128, 256; got "
            "'tpu-v5e-12'")


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None,
                    reason='with libtpu the TPU plan compiles for minutes (docs/performance.md)')
def test_memory_benchmark_for_a_tpu_without_libtpu_says_how_to_get_it():
    result = subprocess.run([sys.executable, '-m', 'benchmarks.memory', '--target', 'tpu-v5e-8'],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert assert_one_line_error(result.stderr).startswith(
            f'error: --target tpu-v5e-8 needs libtpu (pip install "jax[tpu]=={jax.__version__}"): ')
    assert '| S |' not in result.stdout

"""`python -m train`: the command line (exit status 2 and one line for a configuration or data
error, 143 when preempted); see `python -m train --help` and docs/training.md."""
from __future__ import annotations

import json
import os
import sys

from effnetv2_jax import cli


def _cluster_detected() -> bool:
    """Environments where `jax.distributed.initialize()` finds its peers by itself."""
    env = os.environ
    return (int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
            or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
            or 'MEGASCALE_COORDINATOR_ADDRESS' in env)


def init_distributed(config):
    """Joins the processes of a multi-host run before any other JAX call."""
    import jax
    manual = config.coordinator_address is not None
    if not (manual or config.distributed == 'on'
            or (config.distributed == 'auto' and _cluster_detected())):
        return
    try:  # CPU collectives across processes (GPUs and TPUs bring their own)
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    except AttributeError:  # a JAX that no longer has the option has a default that works
        pass
    if manual:
        jax.distributed.initialize(config.coordinator_address, config.num_processes,
                                   config.process_id)
    else:
        jax.distributed.initialize()


EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run is not finished; schedulers may requeue it


@cli.entry_point
def main(argv=None) -> int:
    from effnetv2_jax import enable_compilation_cache
    from train.config import ConfigError, parse_args
    try:
        config = parse_args(argv)
    except ConfigError as e:
        return cli.fail(str(e))
    init_distributed(config)
    enable_compilation_cache()
    from effnetv2_jax.files import OutputError
    from train import loop
    from train.input_pipeline import DataError
    from train.report import data_wait_warning
    try:
        if config.eval_only:
            result = loop.evaluate_weights(config)
            print(f'{config.init}: top-1 {result["top1"]:.2%}, top-5 {result["top5"]:.2%}, '
                  f'loss {result["loss"]:.4f} on {result["images"]} images'
                  + (f' ({result["skipped_images"]} unreadable images skipped)'
                     if result['skipped_images'] else ''))
            print(json.dumps(result))
            return cli.EXIT_OK
        summary = loop.train_and_evaluate(config)
    except (ConfigError, DataError, OutputError) as e:
        return cli.fail(str(e))
    except loop.Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    import jax
    if jax.process_index() == 0:
        rate = summary['images_per_second']
        final = (f'val top-1 {summary["final_top1"]:.2%} ({summary["saved_weights"]} weights; '
                 f'best {summary["best_top1"]:.2%} at step {summary["best_step"]})'
                 if summary['final'] else 'no validation set')
        print(f'done: {summary["steps"]} steps in {summary["seconds"]:.0f} s, {final}'
              + (f', {rate:.0f} img/s' if rate else '')
              + (f', {summary["skipped_images"]} unreadable images skipped (each file once '
                 'per epoch that drew it)' if summary['skipped_images'] else '')
              + f'; weights {summary["weights"]}, curves {summary["plot"]}')
        warning = data_wait_warning(summary['data_wait'], config.num_workers)
        if warning:
            print(warning, file=sys.stderr)
    return cli.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())

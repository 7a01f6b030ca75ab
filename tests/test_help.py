"""Specification of `--help`: every flag of every command says what it does; `python -m train
--help` opens with what it does and an example, gives each flag its values and default in a named
group, and describes every preset."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from convert.__main__ import main as convert_main
from effnetv2_jax import cli
from effnetv2_jax.export import main as export_main
from effnetv2_jax.predict import main as predict_main
from train.config import PRESET_PURPOSES, PRESETS, TrainConfig, build_parser, flag
from train.pack import main as pack_main


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser `main` builds, caught as it starts parsing (nothing is read or run)."""
    def caught(self, *args, **kwargs):
        raise _Built(self)
    monkeypatch.setattr(cli._Parser, 'parse_args', caught)
    with pytest.raises(_Built) as built:
        main([])
    return built.value.parser


COMMANDS = {'convert': convert_main, 'effnetv2_jax.predict': predict_main,
            'effnetv2_jax.export': export_main, 'train.pack': pack_main}


@pytest.mark.parametrize('command', [*COMMANDS, 'train'])
def test_every_flag_of_every_command_has_help(command, monkeypatch):
    parser = build_parser() if command == 'train' else parser_of(COMMANDS[command], monkeypatch)
    assert parser.prog == f'python -m {command}'
    silent = [action.dest for action in parser._actions if not action.help]
    assert silent == []


def test_every_train_flag_says_its_default_in_a_named_group():
    parser = build_parser()
    for group in parser._action_groups:
        for action in group._group_actions:
            if action.dest != 'help':
                assert group.title != 'options', action.dest
                assert 'default: ' in action.help, action.dest


def test_every_train_flag_with_a_range_names_it():
    helps = {action.dest: action.help for action in build_parser()._actions}
    assert 'one of rmsprop, sgd, adamw; default: adamw' in helps['optimizer']
    assert '>= 1; default: 64' in helps['batch_size']
    assert 'in [0, 1); default: 0.99' in helps['ema_decay']
    assert len(helps) == len(dataclasses.fields(TrainConfig)) + 2  # --help, --preset


def test_train_help_opens_with_what_it_does_and_an_example():
    text = build_parser().format_help()
    first_flag = text.index('--help ')
    assert text.index('Train or fine-tune EfficientNetV2') < first_flag
    assert text.index('  python -m train --preset finetune') < first_flag


def test_every_train_preset_is_described_in_help():
    text = ' '.join(build_parser().format_help().split())
    assert set(PRESET_PURPOSES) == set(PRESETS)
    for name, purpose in PRESET_PURPOSES.items():
        assert f'{name}: {purpose} ({flag("variant")} ' in text

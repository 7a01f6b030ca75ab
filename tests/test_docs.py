"""Specification of the documentation and of what every file of the repository keeps to: a short
README that opens with the two commands, links that resolve inside the repository, no reference
to files outside it, no checkpoint loaded in a way that could run pickled code, and
docs/equivalence.md generated from a test run by scripts/equivalence_report.py."""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
MARKDOWN = [README, *sorted((ROOT / 'docs').glob('*.md'))]
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
# Spelled in two parts so that this file does not match itself.
OUTSIDE_REFERENCES = ('REFERENCE' + '.md', '..' + '/shared')
# Any weights_only but True: the unpickler could then run code from a checkpoint.
UNSAFE_LOAD = re.compile(r'weights_only\s*=\s*(?!True\b)')
TORCH_LOAD = re.compile(r'torch\.load\(([^()]|\([^()]*\))*\)')  # one level of nested parentheses


def repository_files(*suffixes: str) -> list[Path]:
    """Tracked and new (not ignored) files of the working tree with one of `suffixes`."""
    names = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / n for n in names.splitlines() if n.endswith(suffixes) and (ROOT / n).is_file()]


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of the headings of `markdown`."""
    text = re.sub(r'```.*?```', '', markdown.read_text('utf-8'), flags=re.DOTALL)
    headings = re.findall(r'^#+ (.+)$', text, re.MULTILINE)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def load_report_script():
    path = ROOT / 'scripts' / 'equivalence_report.py'
    spec = importlib.util.spec_from_file_location('equivalence_report', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_200_lines():
    assert len(README.read_text('utf-8').splitlines()) <= 200


def test_readme_opens_with_the_tour_and_the_tests():
    text = README.read_text('utf-8')
    first_block = re.search(r'```bash\n(.*?)```', text, re.DOTALL)
    assert first_block.start() < text.index('\n## '), 'the commands come before any section'
    commands = first_block.group(1).splitlines()
    assert commands[0].startswith('bash scripts/tour.sh')
    assert commands[1].startswith('bash scripts/test.sh')


@pytest.mark.parametrize('markdown', MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file_in_the_repository(markdown):
    for target in LINK.findall(markdown.read_text('utf-8')):
        if re.match(r'[a-z]+:', target):
            continue  # https:, mailto:
        path, _, anchor = target.partition('#')
        resolved = (markdown.parent / path).resolve() if path else markdown
        assert resolved.is_relative_to(ROOT), f'{target} leaves the repository'
        assert resolved.exists(), f'{target}: no such file'
        if anchor:
            assert anchor in anchors(resolved), f'{target}: no such heading'


def test_no_file_refers_to_files_outside_the_repository():
    offenders = [f'{path.relative_to(ROOT)}: {reference}'
                 for path in repository_files('.py', '.md', '.sh', '.ipynb', '.toml')
                 for reference in OUTSIDE_REFERENCES if reference in path.read_text('utf-8')]
    assert not offenders


def test_every_torch_load_refuses_pickled_code():
    offenders = []
    for path in repository_files('.py', '.md', '.sh', '.ipynb'):
        text = path.read_text('utf-8')
        unsafe = [match.group(0) for match in UNSAFE_LOAD.finditer(text)]
        unsafe += [call.group(0) for call in TORCH_LOAD.finditer(text)
                   if 'weights_only=True' not in call.group(0)]
        offenders += [f'{path.relative_to(ROOT)}: {text}' for text in unsafe]
    assert not offenders


JUNIT_XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="0" tests="8">
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[timm-rw_s-97]">
  <properties><property name="logit_error" value="1.7e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[timm-s-96]">
  <properties><property name="logit_error" value="1.6e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[timm-tf-b0-97]">
  <properties><property name="logit_error" value="1.4e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[wzmiaomiao-b0-96]">
  <properties><property name="logit_error" value="1.53e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[wzmiaomiao-s-97]">
  <properties><property name="logit_error" value="1.5e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence" name="test_eval_logits_match_pytorch[torchvision-l-96]">
  <properties><property name="logit_error" value="2.4e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence_photos"
  name="test_predictor_matches_pytorch_with_its_own_transform_on_real_photos[timm-tf-b0]">
  <properties><property name="logit_error" value="1.1e-06"/></properties></testcase>
<testcase classname="tests.test_equivalence"
  name="test_eval_logits_match_pytorch_with_xla_convolutions[96-wzmiaomiao-b0]"/>
</testsuite></testsuites>
"""

EXPECTED_TABLE = """\
| source | variant | size | input | max abs Δ logit / max abs logit |
|---|---|---|---|---|
| WZMIAOMIAO `model.py` (our PyTorch reference) | S | 97 | noise | 1.5e-06 |
| WZMIAOMIAO `model.py` (our PyTorch reference) | B0 | 96 | noise | 1.5e-06 |
| torchvision | L | 96 | noise | 2.4e-06 |
| timm `tf_efficientnetv2_*` (same padding) | B0 | 97 | noise | 1.4e-06 |
| timm `tf_efficientnetv2_*` (same padding) | B0 | 224 | 4 photos, end to end | 1.1e-06 |
| timm `efficientnetv2_*` (eps 1e-5) | S | 96 | noise | 1.6e-06 |
| timm `efficientnetv2_*` (eps 1e-5) | RW_S | 97 | noise | 1.7e-06 |
"""


def test_equivalence_report_turns_junit_xml_into_the_table(tmp_path):
    (tmp_path / 'r.xml').write_text(JUNIT_XML)
    output = tmp_path / 'equivalence.md'
    assert load_report_script().main([str(tmp_path / 'r.xml'), '-o', str(output)]) == 0
    report = output.read_text('utf-8')
    assert report.startswith('# Measured equivalence\n')
    assert 'bash scripts/test.sh tests/test_equivalence.py' in report
    assert report.endswith(EXPECTED_TABLE)


def test_equivalence_report_refuses_a_run_with_failed_tests(tmp_path, capsys):
    failed = JUNIT_XML.replace('[96-wzmiaomiao-b0]"/>', '[96-wzmiaomiao-b0]"><failure message="x"/></testcase>')
    (tmp_path / 'r.xml').write_text(failed)
    output = tmp_path / 'equivalence.md'
    assert load_report_script().main([str(tmp_path / 'r.xml'), '-o', str(output)]) == 2
    assert capsys.readouterr().err.startswith('error: 1 failed test(s)')
    assert not output.exists()


def test_equivalence_report_refuses_an_unknown_test_id(tmp_path, capsys):
    (tmp_path / 'r.xml').write_text(JUNIT_XML.replace('[timm-s-96]', '[caffe-s-96]'))
    output = tmp_path / 'equivalence.md'
    assert load_report_script().main([str(tmp_path / 'r.xml'), '-o', str(output)]) == 2
    assert "unknown equivalence test id 'test_eval_logits_match_pytorch[caffe-s-96]'" in (
        capsys.readouterr().err)
    assert not output.exists()

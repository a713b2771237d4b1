"""What the command line does with an exception: a ``UserError`` (bad input) is one ``error:`` line and its exit
code, whatever depth it comes from; anything else, a ``ValueError`` included, is a bug and keeps its traceback.
In process (conftest.run_main): the failures are injected before any data is read."""
import errno

import pytest

from conftest import run_main
from dizoo_imgcls import config
from dizoo_imgcls.checkpoint import CheckpointError, DiskWriteError
from dizoo_imgcls.config import ConfigError, build_config
from dizoo_imgcls.data.check import UnreadableSplitError
from dizoo_imgcls.data.folder import DataLayoutError
from dizoo_imgcls.data.layouts import LabelFileError
from dizoo_imgcls.data.resized_copy import ResizedCopyError
from dizoo_imgcls.errors import SettingError, UserError, report_user_errors
from dizoo_imgcls.export import ExportError, OverwritesInputError
from dizoo_imgcls.runtime import ExperimentInUse

MAIN = 'imagenet_res18_main'


def disk_full(path: str) -> DiskWriteError:
    return DiskWriteError(path, OSError(errno.ENOSPC, 'No space left on device'))


def raising(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


def run_training_failing_with(error, capsys, monkeypatch, tmp_path):
    """The training entry with ``error`` raised inside ``train`` (where the run checks its settings, before any
    data is read or folder made)."""
    monkeypatch.setattr(config, 'check_exp_name', raising(error))
    return run_main(capsys, MAIN, '--data-root', tmp_path / 'data', '--set', f'output_dir={tmp_path / "runs"}')


def error_lines(err: str):
    return [line for line in err.splitlines() if line.strip()]


def test_a_user_error_from_inside_the_run_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_main(capsys, MAIN, '--data-root', tmp_path / 'data', '--exp-name', '../elsewhere',
                            '--set', f'output_dir={tmp_path / "runs"}')
    assert code == 2 and 'Traceback' not in err
    assert error_lines(err) == [error_lines(err)[0]] and error_lines(err)[0].startswith(
        "error: exp_name must name a folder inside output_dir"), err
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('error', [ValueError('bug'), RuntimeError('bug'), KeyError('bug')])
def test_any_other_exception_from_inside_the_run_keeps_its_traceback(error, tmp_path, capsys, monkeypatch):
    """Not turned into a line: it leaves main, and Python prints its traceback and exits 1."""
    with pytest.raises(type(error), match='bug'):
        run_training_failing_with(error, capsys, monkeypatch, tmp_path)
    assert 'error:' not in capsys.readouterr().err


def test_a_full_disk_during_the_run_exits_74_with_the_resume_line(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / 'runs' / 'x' / 'ckpt' / 'iter_5.pth.tar')
    code, _, err = run_training_failing_with(disk_full(path), capsys, monkeypatch, tmp_path)
    lines = error_lines(err)
    assert code == 74 and len(lines) == 2 and 'Traceback' not in err, err
    assert lines[0].startswith(f'error: cannot write {path}: No space left on device (')
    assert lines[1].endswith('once there is space') and 'resume' in lines[1]


def test_the_data_layout_error_of_a_run_keeps_its_hint(tmp_path, capsys, monkeypatch):
    code, _, err = run_training_failing_with(DataLayoutError('no folder at X'), capsys, monkeypatch, tmp_path)
    assert code == 2 and error_lines(err) == [
        'error: no folder at X. Pass --data-root DIR, or run with --demo to train on bundled digits']


def test_demo_and_config_together_is_a_usage_error(capsys):
    code, _, err = run_main(capsys, MAIN, '--demo', '--config', 'config/imagenette_res18_config.py')
    assert code == 2 and error_lines(err) == ['error: --demo and --config exclude each other']


@pytest.mark.parametrize('error, code', [
    (SettingError('bad value'), 2),
    (ConfigError('bad key'), 2),
    (CheckpointError('bad checkpoint'), 2),
    (ExperimentInUse('in use'), 2),
    (disk_full('/nowhere/ckpt/x.pth.tar'), 74),
    (ExportError('differs from PyTorch'), 1),
])
def test_report_user_errors_prints_one_line_and_the_exit_code_of_the_class(error, code, capsys):
    assert report_user_errors(raising(error), None) == code
    assert capsys.readouterr().err == f'error: {error}\n'


def test_report_user_errors_passes_everything_else_through(capsys):
    assert report_user_errors(lambda args: args + 1, 4) == 5
    for error in (ValueError('bug'), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            report_user_errors(raising(error), None)
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('cls, also', [
    (ConfigError, ValueError), (SettingError, ValueError), (OverwritesInputError, ValueError),
    (ExperimentInUse, ValueError), (UnreadableSplitError, ValueError), (LabelFileError, ValueError),
    (ExportError, ValueError), (CheckpointError, Exception), (DiskWriteError, Exception),
    (DataLayoutError, Exception), (ResizedCopyError, Exception),
])
def test_our_input_errors_are_user_errors_and_keep_their_old_base(cls, also):
    assert issubclass(cls, UserError) and issubclass(cls, also)


def test_policy_multi_gpu_is_refused_naming_the_key_the_run_uses(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"policy\.multi_gpu=True is DI-engine's own .*torchrun .*"
                                          r"policy\.learn\.multi_gpu"):
        build_config({'policy': {'multi_gpu': True}})
    code, _, err = run_main(capsys, MAIN, '--data-root', tmp_path, '--set', 'policy.multi_gpu=True')
    assert code == 2 and len(error_lines(err)) == 1 and 'policy.learn.multi_gpu' in err
    # The run's own record (a compiled config of a DDP run says policy.learn.multi_gpu=True) loads again.
    assert build_config({'policy': {'learn': {'multi_gpu': True}}}).policy.multi_gpu is False

import importlib.util
import os
import shutil
import socket

import pytest

# pytest.ini runs three xdist workers on (typically) 2 cores: each worker, the runs it makes in process and the
# processes it starts get one thread. Workers with two OpenMP threads each wait on each other's cores: the
# training tests ran several times slower (a 3-epoch demo 133 s instead of ~30).
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
    os.environ['OMP_NUM_THREADS'] = '1'

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it when it is imported)

if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
    torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_IMAGENETTE = os.path.join(REPO, '..', 'shared', 'data', 'imagenette2-224')


def load_entry(name: str):
    """The module of entry/<name>.py (entry scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f'_entry_{name}', os.path.join(REPO, 'entry', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_main(capsys, name: str, *argv):
    """``(exit code, stdout, stderr)`` of entry/<name>.py's ``main`` in this process: for what a command refuses
    before it trains (a process start costs ~5 s of CPU in imports). An exception it should have turned into a
    message fails the test with its traceback. The process-level contracts keep their real-process tests."""
    capsys.readouterr()
    try:
        code = load_entry(name).main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors exit from inside main
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A test may call torch.set_num_threads (tiny models train faster on one thread); the next test in the same
    process gets the count back. Left changed, an in-process run computes with another thread count than a run
    in a subprocess, and fp32 results differ in the last digits (the SIGKILL resume test compares exactly)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def imagenette_root():
    """The shared Imagenette folder: skipped outside CI when absent, a failure in CI (CI=true)."""
    if not os.path.isdir(os.path.join(SHARED_IMAGENETTE, 'train')):
        message = f'shared Imagenette not found at {os.path.abspath(SHARED_IMAGENETTE)}'
        if os.environ.get('CI') == 'true':
            pytest.fail(message)
        pytest.skip(message)
    return os.path.abspath(SHARED_IMAGENETTE)


def make_subset(src_root: str, dst_root: str, classes, per_class: dict) -> str:
    """Symlink the first N images of each chosen class into a new ImageNet-layout folder (no copies)."""
    for split, count in per_class.items():
        for cls in classes:
            src = os.path.join(src_root, split, cls)
            dst = os.path.join(dst_root, split, cls)
            os.makedirs(dst, exist_ok=True)
            for name in sorted(os.listdir(src))[:count]:
                os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return dst_root


@pytest.fixture
def tiny_image_folder(tmp_path):
    """A 3-class ImageNet-layout folder of small generated images (colour = class), incl. a grayscale one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {'a_red': (200, 30, 30), 'b_green': (30, 200, 30), 'c_blue': (30, 30, 200)}
    for split, count in (('train', 12), ('val', 5)):
        for cls, colour in colours.items():
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.jpg')
    Image.fromarray(np.full((40, 48), 128, np.uint8), mode='L').save(tmp_path / 'train' / 'a_red' / 'gray.png')
    yield str(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
    """Files with the long runs first (those on the shared Imagenette, then by their count of slow tests), each
    file's tests kept together and in order: xdist hands out whole files (--dist loadfile) in this order, and a
    long file started last kept one worker busy minutes after the other had finished."""
    def weight(item):
        return 1000 * ('imagenette_root' in getattr(item, 'fixturenames', ())) + (item.get_closest_marker('slow')
                                                                                   is not None)

    files = {}
    for index, item in enumerate(items):
        files.setdefault(item.path, []).append(item)
    order = sorted(files.values(), key=lambda group: -sum(weight(item) for item in group))
    items[:] = [item for group in order for item in group]

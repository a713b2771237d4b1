"""What a user sees: a real ``tensorboard --logdir`` server over the experiments folder, read over its HTTP API."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import REPO
from dizoo_imgcls.tb_visuals import IMAGE_TAGS
from test_entry import run_tiny

SERVER_WAIT_S = 90  # the server starts and loads the event files in the background


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tensorboard_command(logdir: str, port: int):
    script = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
    program = [script] if os.path.exists(script) else [sys.executable, '-m', 'tensorboard.main']
    return program + ['--logdir', logdir, '--host', '127.0.0.1', '--port', str(port)]


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=10) as response:
        return response.read()


def wait_for_tags(port: int, plugin: str, run: str, wanted: set, server: subprocess.Popen) -> dict:
    """Poll ``/data/plugin/<plugin>/tags`` until ``run`` has every wanted tag (bounded by SERVER_WAIT_S)."""
    deadline, seen = time.monotonic() + SERVER_WAIT_S, {}
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f'tensorboard exited with {server.returncode}: {server.stderr.read()[-2000:]}')
        try:
            seen = json.loads(get(port, f'/data/plugin/{plugin}/tags'))
            if wanted <= set(seen.get(run, {})):
                return seen[run]
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f'{plugin} tags of run {run!r} after {SERVER_WAIT_S}s: {seen}; wanted {sorted(wanted)}')


@pytest.mark.slow  # > ~10 s on 2 cores
def test_tensorboard_serves_the_scalars_and_images_of_a_run(tiny_image_folder, tmp_path):
    run_tiny(tiny_image_folder, tmp_path, 'served')
    summary = json.loads((tmp_path / 'served' / 'summary.json').read_text())
    port = free_port()
    server = subprocess.Popen(tensorboard_command(str(tmp_path), port), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        run = 'served/tb'
        scalars = wait_for_tags(port, 'scalars', run, {'train/loss', 'train/data_wait_share', 'train/peak_rss_mb',
                                                       'eval/acc1', 'eval_per_class/b_green'}, server)
        assert 'eval_per_class/a_red' in scalars
        query = urllib.parse.urlencode({'run': run, 'tag': 'eval/acc1'})
        points = json.loads(get(port, f'/data/plugin/scalars/scalars?{query}'))  # [[wall_time, step, value]]
        assert len(points) == 2 and points[-1][2] == pytest.approx(summary['acc1'], abs=1e-4)
        wait_for_tags(port, 'images', run, {IMAGE_TAGS['train_grid'], IMAGE_TAGS['confusion']}, server)
        query = urllib.parse.urlencode({'run': run, 'tag': IMAGE_TAGS['confusion']})
        samples = json.loads(get(port, f'/data/plugin/images/images?{query}'))
        assert len(samples) == 2  # one confusion matrix per evaluation
        png = get(port, f'/data/plugin/images/individualImage?{samples[-1]["query"]}')
        assert png[:8] == b'\x89PNG\r\n\x1a\n'
        assert 'hparam/acc1' in wait_for_tags(port, 'scalars', 'served/tb/hparams', {'hparam/acc1'}, server)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

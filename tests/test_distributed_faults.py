"""torchrun faults (issue 23): two machines simulated by two torchrun agents on localhost, each its own node; a
node lost mid-run; SIGTERM to the agent (what Slurm and Kubernetes send before they kill). gloo on CPU."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, free_port
from dizoo_imgcls.checkpoint import load_checkpoint, step_checkpoints
from test_distributed import TORCHRUN, _wait_for, entry_args

pytestmark = pytest.mark.slow


def node_agent(port: int, args, log_path, node: int):
    """One machine: a torchrun agent with one worker, joining the 2-node job at 127.0.0.1:port. Node 0 hosts the
    rendezvous store, as the machine named in --rdzv-endpoint does on a cluster (on one host both agents would
    race to host it, and which of them lost decided how the other failed)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc-per-node=1',
               '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=two_nodes',
               f'--rdzv-conf=is_host={int(node == 0)}'] + args
    log = open(log_path, 'w')
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))


def kill_node(agent: subprocess.Popen) -> None:
    """A machine lost: its agent and its worker die at once (SIGKILL), without a word to the other node."""
    try:
        processes = [psutil.Process(agent.pid)] + psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # ended already
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_two_nodes_train_evaluate_each_val_image_once_with_one_writer(tiny_image_folder, tmp_path):
    port = free_port()
    args = entry_args(tiny_image_folder, tmp_path / 'out', 'nodes', 2)
    agents = [node_agent(port, args, tmp_path / f'node{i}.log', i) for i in range(2)]
    try:
        codes = [agent.wait(timeout=400) for agent in agents]
    finally:
        for agent in agents:
            kill_node(agent)
    logs = [(tmp_path / f'node{i}.log').read_text() for i in range(2)]
    assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
    exp = tmp_path / 'out' / 'nodes'
    summary = json.loads((exp / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['epochs'] == 2
    assert summary['eval_samples'] == 15  # every val image once: 15 over 2 nodes, not padded to 16
    assert summary['train_images'] == 2 * (12 * 3 + 1)
    assert sorted(os.listdir(tmp_path / 'out')) == ['nodes']  # one folder, no second node's copy
    assert sorted(os.listdir(exp / 'ckpt')) == ['ckpt_best.pth.tar', 'epoch_1_iter_3.pth.tar', 'epoch_2_iter_6.pth.tar']
    assert len(load_checkpoint(str(exp / 'ckpt' / 'epoch_2_iter_6.pth.tar'))['rng_per_rank']) == 2
    assert len([n for n in os.listdir(exp / 'tb') if n.startswith('events.out.tfevents')]) == 1  # one writer
    events = EventAccumulator(str(exp / 'tb'))
    events.Reload()
    assert [e.step for e in events.Scalars('eval/acc1')] == [3, 6]
    assert sum(log.count('eval epoch 2:') for log in logs) == 1  # rank 0 alone reports


def test_losing_a_node_makes_the_other_exit_non_zero_within_60s_naming_the_failure(tiny_image_folder, tmp_path):
    port = free_port()
    args = entry_args(tiny_image_folder, tmp_path / 'out', 'lost', 200)
    agents = [node_agent(port, args, tmp_path / f'node{i}.log', i) for i in range(2)]
    try:
        _wait_for(tmp_path / 'out' / 'lost' / 'ckpt' / 'epoch_1_iter_3.pth.tar', time.time() + 300)
        kill_node(agents[1])  # a worker machine; node 0 keeps the rendezvous store
        lost_at = time.time()
        code = agents[0].wait(timeout=120)
        survived_for = time.time() - lost_at
    finally:
        for agent in agents:
            kill_node(agent)
    log = (tmp_path / 'node0.log').read_text()
    assert code != 0 and survived_for < 60, log[-3000:]
    # torchrun's failure report names the failed rank and the error (the peer's connection closed)
    assert re.search(r'rank\s*:\s*\d', log) and 'ChildFailedError' in log, log[-3000:]
    assert re.search(r'Connection closed by peer|Connection reset|Broken pipe|timed out', log, re.I), log[-3000:]


def test_sigterm_to_torchrun_writes_one_checkpoint_after_all_ranks_agree(tiny_image_folder, tmp_path):
    args = TORCHRUN + entry_args(tiny_image_folder, tmp_path, 'term', 200, 'checkpoint.keep_last=0')
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        _wait_for(tmp_path / 'term' / 'ckpt' / 'epoch_1_iter_3.pth.tar', time.time() + 240)
        launcher.send_signal(signal.SIGTERM)  # the agent passes it on to both ranks
        signalled = time.time()
        output, _ = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert time.time() - signalled < 30, output[-3000:]
    match = re.search(r'terminated \(SIGTERM\) at iteration (\d+); saved (\S+)\. Continue with: --resume (\S+)',
                      output)
    assert match and match.group(2) == match.group(3), output[-3000:]
    assert output.count('terminated (SIGTERM)') == 1  # rank 0 says it, once
    state = load_checkpoint(match.group(2))  # complete, with both ranks' generators
    assert state['last_iter'] == int(match.group(1)) and len(state['rng_per_rank']) == 2
    assert state['last_iter'] == 3 * state['position']['epoch'] + state['position']['batch']
    assert step_checkpoints(str(tmp_path / 'term' / 'ckpt'))[-1] == match.group(2)
    assert 'Traceback' not in output.split('terminated (SIGTERM)')[0]  # no rank failed before the checkpoint

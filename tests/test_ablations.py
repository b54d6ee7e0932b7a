"""ablations.py's tables and Fig. 3 plot from a results record (the runs themselves are pretrain.py and
finetune.py, tested elsewhere)."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

import ablations


def test_tables_show_every_row_and_the_paired_differences(tmp_path):
    knn = [{'epoch': 0.0, 'knn_image': 0.4, 'knn_audio': 0.8, 'knn_fusion': 0.7, 'knn_all': 0.75},
           {'epoch': 2.0, 'knn_image': 0.5, 'knn_audio': 0.8, 'knn_fusion': 0.8, 'knn_all': 0.85}]
    run = {'dir': 'x', 'clips_per_s': 40.0, 'seconds': 300.0, 'peak_mib': 1200.0, 'knn': knn}
    nn = {'nn_image': 0.6, 'nn_audio': 0.9, 'nn_fusion': 0.7, 'nn_all': 0.8}
    results = {'pre': {'early': [{**run, 'seed': 0}, {**run, 'clips_per_s': 44.0, 'seed': 1}],
                       'none': [{**run, 'seed': 1}],  # 'none' without a knn run: its pre-training's last k-NN
                       'late': [run, run]},  # a results.json from before seeds were recorded: two runs all the same
               'linprobe_pre': {'early': [{'top1': 0.3, 'seed': 0}, {'top1': 0.4, 'seed': 1}],
                                'none': [{'top1': 0.25, 'seed': 1}]},
               'knn_pre': {'early': [{**nn, 'seed': 0}, {**nn, 'nn_image': 0.8, 'seed': 1}]},
               'linprobe_scratch': {'early': [{'top1': 0.2, 'seed': 0}, {'top1': 0.2, 'seed': 1}]},
               'localize_pre': {'early': [{'cIoU': 0.2, 'pointing': 0.5, 'seed': 0}]},
               'localize_lavish': {'early': [{'cIoU': 0.4, 'pointing': 0.7, 'seed': 0}]},
               'retrieval_pre': {'early': [{'v2a_R@1': 0.01, 'a2v_R@1': 0.02, 'seed': 0},
                                           {'v2a_R@1': 0.03, 'a2v_R@1': 0.02, 'seed': 1}]}}
    args = argparse.Namespace(seeds=[0, 1], epochs=10, split='val', localize_data='')
    text = ablations.tables(results, args)
    rows = {line.split(' | ')[0][2:]: line.split(' | ')[1:]  # the first table's cells by row
            for line in text.split('Paired')[0].splitlines() if line.startswith('| ')}
    early = rows['factorized, every layer (early)']
    assert early[:7] == ['0.350 +- 0.071', '', '0.700 +- 0.141', '0.900 +- 0.000', '0.700 +- 0.000',
                         '0.800 +- 0.000', '0.020 +- 0.014']
    assert early[10:12] == ['0.500 (1 seed)', '0.200 (1 seed)']  # one seed: no spread, and it says so
    assert early[-2:] == ['42.0 +- 2.8', '1200 +- 0 |']
    unfused = rows['no fusion']
    assert unfused[2:6] == ['0.500 (1 seed)', '0.800 (1 seed)', '-', '0.850 (1 seed)']  # no fusion feature
    assert rows["LAVISH adapters on row early's frozen encoder"][:3] == ['-', '', '-']  # its frozen encoder is early's
    assert rows["LAVISH adapters on row early's frozen encoder"][10] == '0.700 (1 seed)'
    assert rows['untrained encoder (no pre-training)'][0] == '0.200 +- 0.000'
    assert rows['factorized, layer 3 (late: the last layer)'][2] == '0.500 +- 0.000'  # both runs, not the last one
    assert 'token, every layer' not in rows  # rows without runs are left out
    # Paired by seed: the untrained probe is 0.1 and 0.2 below early's; 'none' shares only seed 1 (0.25 - 0.4).
    paired = text.split('Paired differences')[1]
    assert '| untrained encoder (no pre-training) | -0.150 +- 0.071 |' in paired
    assert '| no fusion | -0.150 (1 seed) |  | -0.300 (1 seed) |' in paired
    assert '| LAVISH adapters on row early\'s frozen encoder | - |  | - | 0.200 (1 seed) |' in paired
    ablations.plot_knn(results, tmp_path / 'knn.png')
    assert (tmp_path / 'knn.png').stat().st_size > 1000


def test_collect_gathers_finished_runs_and_runs_nothing(tmp_path):
    def finished(name, **files):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'run.json').write_text(json.dumps({'seconds': 60.0, 'peak_mib': 900.0}))
        for file, text in files.items():
            (tmp_path / name / file.replace('_', '.')).write_text(text)

    log = [{'step': 10, 'loss': 1.0, 'clips_per_s': 50.0},
           {'step': 31, 'epoch': 1.0, 'knn_image': 0.5, 'knn_audio': 0.7, 'knn_fusion': 0.6, 'knn_all': 0.8}]
    finished('pre_early_s0', log_jsonl='\n'.join(json.dumps(r) for r in log))
    finished('linprobe_pre_early_s0', metrics_json=json.dumps({'top1': 0.3}))
    (tmp_path / 'pre_early_s1').mkdir()  # started, not finished: left out, not rerun
    results = ablations.main(['--data', str(tmp_path / 'no_such_data'), '--out', str(tmp_path), '--seeds', '0,1',
                              '--tasks', 'linprobe', '--collect'])
    assert [r['clips_per_s'] for r in results['pre']['early']] == [50.0]
    assert results['linprobe_pre'] == {'early': [{'top1': 0.3, 'peak_mib': 900.0, 'clips_per_s': None, 'seed': 0}]}
    assert results['linprobe_scratch'] == {}
    assert '| factorized, every layer (early) | 0.300 (1 seed) |' in (tmp_path / 'ablations.md').read_text()
    assert not (tmp_path / 'pre_mid_s0').exists()  # nothing was started


def test_a_finished_run_of_another_command_is_refused_and_lavish_needs_its_encoder(tmp_path):
    args = argparse.Namespace(out=tmp_path / 'sweep', data=tmp_path / 'data', collect=False, localize_data='')
    (tmp_path / 'run.json').write_text(json.dumps({'seconds': 1.0, 'peak_mib': 1.0,
                                                   'cmd': ['finetune.py', '--a', '{data}/x.csv']}))
    cmd = ['finetune.py', '--a', str(tmp_path / 'data' / 'x.csv')]
    assert ablations.run(cmd, tmp_path, tmp_path / 'log', args)['seconds'] == 1.0  # the same: reused
    with pytest.raises(SystemExit, match='finished another command'):  # a changed recipe is not the finished run
        ablations.run(['finetune.py', '--b', str(tmp_path / 'data' / 'x.csv')], tmp_path, tmp_path / 'log', args)
    with pytest.raises(SystemExit, match='finished another command'):  # nor the same recipe on other data
        ablations.run(['finetune.py', '--a', str(tmp_path / 'other' / 'x.csv')], tmp_path, tmp_path / 'log', args)
    with pytest.raises(SystemExit):
        ablations.main(['--data', str(tmp_path), '--out', str(tmp_path), '--rows', 'lavish', '--collect'])


def test_a_run_a_stopped_sweep_left_unfinished_is_resumed_and_recorded_as_its_command(tmp_path, monkeypatch):
    started = []

    class Script:
        def __init__(self, cmd, stdout, **_):
            started.append(cmd[1:])
            stdout.write('second part\n')
            self.pid = 1

    monkeypatch.setattr(ablations.subprocess, 'Popen', Script)
    monkeypatch.setattr(ablations.os, 'wait4', lambda pid, _: (pid, 0, argparse.Namespace(ru_maxrss=2048)))
    args = argparse.Namespace(out=tmp_path, data=tmp_path / 'data', collect=False, localize_data='')
    (tmp_path / 'checkpoint.pt').write_bytes(b'weights of an interrupted run')
    (tmp_path / 'log').write_text('first part\n')
    cmd = ['finetune.py', '--task', 'localize', '--data', str(tmp_path / 'data' / 'x.csv')]
    ablations.run(cmd, tmp_path, tmp_path / 'log', args)
    assert started == [cmd + ['--resume', 'auto']]  # training.py continues it from its checkpoint (or starts anew)
    assert json.loads((tmp_path / 'run.json').read_text())['cmd'] == \
        ['finetune.py', '--task', 'localize', '--data', '{data}/x.csv']  # the run's command, not the session's
    assert (tmp_path / 'log').read_text() == 'first part\nsecond part\n'
    ablations.run(cmd, tmp_path, tmp_path / 'log', args)
    assert len(started) == 1  # finished: not run again
    (tmp_path / 'run.json').unlink()  # unfinished again, and the sweep's recipe changed meanwhile
    with pytest.raises(SystemExit, match='unfinished run of another command'):  # it would keep the old flags
        ablations.run(cmd + ['--lr', '1'], tmp_path, tmp_path / 'log', args)
    assert len(started) == 1


def test_an_archived_sweep_is_collected_where_it_lies_and_continues_where_it_stopped(tmp_path, monkeypatch):
    # The scripts are stood in for: each "run" writes what the real one writes (checkpoint, metrics, log).
    started = []

    class Script:
        def __init__(self, cmd, **_):
            out = Path(cmd[cmd.index('--output_dir') + 1])
            started.append(out.name)
            if 'pretrain.py' in cmd[1]:
                (out / 'checkpoint.pt').write_bytes(b'weights')
                speed = 40.0 + len(started)  # a run again logs the same losses at another speed
                (out / 'log.jsonl').write_text(json.dumps({'step': 10, 'loss': 1.0, 'clips_per_s': speed}))
            else:
                assert (Path(cmd[cmd.index('--init') + 1]) / 'checkpoint.pt').exists(), 'reads a missing encoder'
                (out / 'metrics.json').write_text(json.dumps({'top1': 0.5 if 'linprobe' in cmd else 0.9}))
            self.pid = len(started)

    monkeypatch.setattr(ablations.subprocess, 'Popen', Script)
    monkeypatch.setattr(ablations.os, 'wait4', lambda pid, _: (pid, 0, argparse.Namespace(ru_maxrss=2048)))
    sweep = ['--data', str(tmp_path / 'data'), '--rows', 'early', '--seeds', '0']
    ablations.main([*sweep, '--out', str(tmp_path / 'a'), '--tasks', 'linprobe', '--archive', str(tmp_path / 'kept')])
    assert started == ['pre_early_s0', 'linprobe_pre_early_s0']
    assert sorted(p.name for p in (tmp_path / 'kept' / 'pre_early_s0').iterdir()) == ['log.jsonl', 'run.json']
    table = (tmp_path / 'a' / 'ablations.md').read_text()
    ablations.main([*sweep, '--out', str(tmp_path / 'kept'), '--tasks', 'linprobe', '--collect'])
    assert (tmp_path / 'kept' / 'ablations.md').read_text() == table  # the archive alone gives the same tables
    assert started == ['pre_early_s0', 'linprobe_pre_early_s0']

    shutil.copytree(tmp_path / 'kept', tmp_path / 'b')  # a later session: the archive, no checkpoints
    ablations.main([*sweep, '--out', str(tmp_path / 'b'), '--tasks', 'linprobe'])
    assert started[2:] == []  # everything it asks for finished: nothing reruns
    kept_log = (tmp_path / 'kept' / 'pre_early_s0' / 'log.jsonl').read_text()
    ablations.main([*sweep, '--out', str(tmp_path / 'b'), '--tasks', 'linprobe,finetune', '--archive',
                    str(tmp_path / 'kept')])
    assert started[2:] == ['pre_early_s0', 'finetune_pre_early_s0']  # the encoder again for the new column only
    assert (tmp_path / 'kept' / 'pre_early_s0' / 'log.jsonl').read_text() == kept_log  # the first record stays
    assert (tmp_path / 'kept' / 'finetune_pre_early_s0' / 'run.json').exists()  # the new column joins it
    assert '| 0.500 (1 seed) | 0.900 (1 seed) |' in (tmp_path / 'b' / 'ablations.md').read_text()


def test_localization_reads_its_own_canvases_and_records_them_portably(tmp_path, monkeypatch):
    commands = []

    class Script:
        def __init__(self, cmd, **_):
            commands.append(cmd)
            out = Path(cmd[cmd.index('--output_dir') + 1])
            (out / ('checkpoint.pt' if 'pretrain.py' in cmd[1] else 'metrics.json')).write_text('{"pointing": 0.8}')
            self.pid = len(commands)

    monkeypatch.setattr(ablations.subprocess, 'Popen', Script)
    monkeypatch.setattr(ablations.os, 'wait4', lambda pid, _: (pid, 0, argparse.Namespace(ru_maxrss=2048)))
    loc = tmp_path / 'canvases'
    ablations.main(['--data', str(tmp_path / 'data'), '--out', str(tmp_path / 'a'), '--rows', 'early', '--seeds', '0',
                    '--tasks', 'localize', '--localize_data', str(loc), '--split', 'test'])
    pre, localize = commands
    assert f"{tmp_path / 'data'}/class_train.csv" in pre  # pre-training reads --data ...
    assert localize[localize.index('--data') + 1] == f'{loc}/localize_train.csv'  # ... localization its own canvases
    assert localize[localize.index('--val_data') + 1] == f'{loc}/localize_test.csv'
    assert localize[localize.index('--audio_seconds') + 1] == '1'
    recorded = json.loads((tmp_path / 'a' / 'localize_pre_early_s0' / 'run.json').read_text())['cmd']
    assert '{localize_data}/localize_train.csv' in recorded and str(tmp_path) not in ' '.join(recorded)

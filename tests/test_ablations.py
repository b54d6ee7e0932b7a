"""ablations.py's tables and Fig. 3 plot from a results record (the runs themselves are pretrain.py and
finetune.py, tested elsewhere)."""
import argparse
import json

import ablations


def test_tables_show_mean_and_spread_over_seeds(tmp_path):
    knn = [{'epoch': 0.0, 'knn_image': 0.4, 'knn_audio': 0.8, 'knn_fusion': 0.7, 'knn_all': 0.75},
           {'epoch': 2.0, 'knn_image': 0.5, 'knn_audio': 0.8, 'knn_fusion': 0.8, 'knn_all': 0.85}]
    run = {'dir': 'x', 'clips_per_s': 40.0, 'seconds': 300.0, 'peak_mib': 1200.0, 'knn': knn}
    results = {'pre': {'early': [run, {**run, 'clips_per_s': 44.0}]},
               'linprobe_pre': {'early': [{'top1': 0.3}, {'top1': 0.4}]},
               'linprobe_scratch': {'early': [{'top1': 0.2}, {'top1': 0.2}]},
               'localize_pre': {'early': [{'cIoU': 0.01}]}, 'localize_scratch': {'early': [{'cIoU': 0.0, 'pointing': 0.3},
                                                                                     {'cIoU': 0.0, 'pointing': 0.4}]},
               'retrieval_pre': {'early': [{'v2a_R@1': 0.01, 'a2v_R@1': 0.02, 'v2a_MR': 100.0, 'a2v_MR': 120.0},
                                           {'v2a_R@1': 0.03, 'a2v_R@1': 0.02, 'v2a_MR': 110.0, 'a2v_MR': 130.0}]},
               'separate_pre': {},
               'separate_scratch': {}}
    args = argparse.Namespace(seeds=[0, 1], epochs=10, split='val', tasks=['linprobe', 'retrieval', 'localize'])
    text = ablations.tables(results, args)
    assert '| factorized, every layer (early) | 0.350 +- 0.071 | 0.500 +- 0.000 | 0.800 +- 0.000 | 0.800 +- 0.000 ' \
           '| 0.850 +- 0.000 | 0.020 +- 0.014 / 0.020 +- 0.000 | 105.0 +- 7.1 / 125.0 +- 7.1 | 42.0 +- 2.8 | 1200 +- 0 |' \
        in text
    assert '| linprobe | top1 | 0.350 +- 0.071 | 0.200 +- 0.000 |' in text
    assert '| localize | cIoU | 0.010 (1 seed) | 0.000 +- 0.000 |' in text  # one seed: no spread, and it says so
    assert '| localize | pointing |  | 0.350 +- 0.071 |' in text  # a metric some runs lack is left blank
    assert 'no fusion' not in text and '| separate |' not in text  # rows and tasks without runs are left out
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
    assert results['linprobe_pre'] == {'early': [{'top1': 0.3}]} and results['linprobe_scratch'] == {}
    assert '| linprobe | top1 | 0.300 (1 seed) |  |' in (tmp_path / 'ablations.md').read_text()
    assert not (tmp_path / 'pre_mid_s0').exists()  # nothing was started

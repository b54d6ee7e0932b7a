"""ablations.py's tables and Fig. 3 plot from a results record (the runs themselves are pretrain.py and
finetune.py, tested elsewhere)."""
import argparse

import ablations


def test_tables_show_mean_and_spread_over_seeds(tmp_path):
    knn = [{'epoch': 0.0, 'knn_image': 0.4, 'knn_audio': 0.8, 'knn_fusion': 0.7, 'knn_all': 0.75},
           {'epoch': 2.0, 'knn_image': 0.5, 'knn_audio': 0.8, 'knn_fusion': 0.8, 'knn_all': 0.85}]
    run = {'dir': 'x', 'clips_per_s': 40.0, 'seconds': 300.0, 'peak_mib': 1200.0, 'knn': knn}
    results = {'pre': {'early': [run, {**run, 'clips_per_s': 44.0}]},
               'linprobe_pre': {'early': [{'top1': 0.3}, {'top1': 0.4}]},
               'linprobe_scratch': {'early': [{'top1': 0.2}, {'top1': 0.2}]},
               'localize_pre': {'early': [{'cIoU': 0.01}]}, 'localize_scratch': {}, 'separate_pre': {},
               'separate_scratch': {}}
    args = argparse.Namespace(seeds=[0, 1], epochs=10, split='val', tasks=['linprobe', 'localize'])
    text = ablations.tables(results, args)
    assert '| factorized, every layer (early) | 0.350 +- 0.071 | 0.500 +- 0.000 | 0.800 +- 0.000 | 0.800 +- 0.000 ' \
           '| 0.850 +- 0.000 | 42.0 +- 2.8 | 1200 +- 0 |' in text
    assert '| linprobe | top1 | 0.350 +- 0.071 | 0.200 +- 0.000 |' in text
    assert '| localize | cIoU | 0.010 (1 seed) |  |' in text  # one seed: no spread, and it says so
    assert 'no fusion' not in text and '| separate |' not in text  # rows and tasks without runs are left out
    ablations.plot_knn(results, tmp_path / 'knn.png')
    assert (tmp_path / 'knn.png').stat().st_size > 1000

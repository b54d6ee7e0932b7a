"""AV-digits preparation (prepare/avdigits.py) on tiny IDX and WAV files the tests write."""
import csv
import gzip
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data import ManifestDataset
from media import write_audio

sys.path.insert(0, str(ROOT / 'prepare'))
import avdigits  # noqa: E402

SPEAKERS = ('anna', 'bert', 'carl', 'dora')


def write_idx(path, array, magic):
    header = magic.to_bytes(4, 'big') + b''.join(n.to_bytes(4, 'big') for n in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_sources(root, pictures_per_digit=6, takes=2):
    """mnist/ with pictures whose grey level is 20 + 20 * their digit (readable back), fsdd/ with one tone per
    recording whose pitch encodes the digit; one silent recording."""
    (root / 'mnist').mkdir(parents=True)
    (root / 'fsdd').mkdir()
    labels = np.tile(np.arange(10), pictures_per_digit * 3)  # 3 splits' worth, digits interleaved
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i, d in enumerate(labels):
        images[i, 6:22, 10:18] = 20 + 20 * d
    write_idx(root / 'mnist' / 'images-idx3-ubyte.gz', images, 2051)
    write_idx(root / 'mnist' / 'labels-idx1-ubyte.gz', labels, 2049)
    t = np.arange(4000) / 8000
    for d in range(10):
        for s in SPEAKERS:
            for k in range(takes):
                write_audio(root / 'fsdd' / f'{d}_{s}_{k}.wav', 0.3 * np.sin(2 * np.pi * (200 + 100 * d) * t), 8000)
    write_audio(root / 'fsdd' / '3_anna_9.wav', np.zeros(4000), 8000)
    return root


def rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def run(tmp_path, *flags):
    src = make_sources(tmp_path / 'src') if not (tmp_path / 'src').exists() else tmp_path / 'src'
    split = [] if '--split' in flags else ['--split', 'speakers', '--test_speakers', 'dora', '--val_speakers', 'carl']
    return avdigits.main(['--src', str(src), '--out', str(tmp_path / 'out'), *split, '--workers', '0', *flags])


def test_idx_reader(tmp_path):
    write_idx(tmp_path / 'x.gz', np.arange(12).reshape(3, 2, 2), 2051)
    assert avdigits.read_idx(tmp_path / 'x.gz').tolist() == np.arange(12).reshape(3, 2, 2).tolist()
    write_idx(tmp_path / 'y.gz', np.arange(3), 2049)
    assert avdigits.read_idx(tmp_path / 'y.gz').tolist() == [0, 1, 2]
    write_idx(tmp_path / 'z.gz', np.arange(3), 1234)
    with pytest.raises(ValueError, match='z.gz: not an IDX file'):
        avdigits.read_idx(tmp_path / 'z.gz')


def test_three_tasks_split_by_speaker_and_picture(tmp_path):
    run(tmp_path)
    out = tmp_path / 'out'
    speakers, pictures = {}, {}
    for split in ('train', 'val', 'test'):
        for task in ('class', 'localize', 'separate'):
            for r in rows(out / f'{task}_{split}.csv'):
                speakers.setdefault(split, set()).add(r['audio'].split('_')[1])
                digit = int(r['label'])
                assert r['audio'].startswith(f'audio/{digit}_')  # the recording says the label's digit
                image = np.asarray(Image.open(out / r['image']).convert('L'))
                if task != 'localize':
                    assert image.max() == 20 + 20 * digit  # the picture shows the same digit
                    pictures.setdefault(split, set()).add(r['image'])
    assert speakers == {'train': {'anna', 'bert'}, 'val': {'carl'}, 'test': {'dora'}}
    assert not (pictures['train'] & pictures['val'] or pictures['train'] & pictures['test']
                or pictures['val'] & pictures['test'])  # no handwritten digit in two splits
    assert len(rows(out / 'class_train.csv')) == 2 * 10 * 2  # two speakers, ten digits, two takes (silent left out)
    report = rows(out / 'left_out.csv')
    assert [(r['key'], r['reason'].split(' (')[0]) for r in report] == [('3_anna_9', 'silent')]


def test_val_takes_hold_out_recordings_of_the_training_voices(tmp_path):
    run(tmp_path, '--tasks', 'class', '--val_takes', '1-1')
    out = tmp_path / 'out'
    train = {r['audio'] for r in rows(out / 'class_train.csv')}
    val = {r['audio'] for r in rows(out / 'class_val.csv')}
    assert {a.split('_', 1)[1] for a in train} == {'anna_0.wav', 'bert_0.wav'}  # take 0 of the training voices
    assert {a.split('_', 1)[1] for a in val} == {'anna_1.wav', 'bert_1.wav', 'carl_0.wav', 'carl_1.wav'}
    with pytest.raises(SystemExit):
        run(tmp_path, '--val_takes', '4-2')


def test_the_default_split_is_fsdds_own_no_take_or_picture_in_two_splits(tmp_path):
    """--split takes (the default): takes 0-4 of every voice test, 5-9 validate, the rest train; every voice in
    every split, and no recording (voice, digit, take) and no picture in two splits, for every task."""
    make_sources(tmp_path / 'src', pictures_per_digit=40, takes=12)
    avdigits.main(['--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'), '--workers', '0'])
    out = tmp_path / 'out'
    takes, recordings, pictures = {}, {}, {}
    for split in ('train', 'val', 'test'):
        for task in ('class', 'localize', 'separate'):
            for r in rows(out / f'{task}_{split}.csv'):
                _, speaker, take = r['audio'][len('audio/'):-len('.wav')].split('_')
                takes.setdefault(split, set()).add(int(take))
                recordings.setdefault(split, set()).add(r['audio'])
                if task != 'localize':
                    pictures.setdefault(split, set()).add(r['image'])
        assert {r['audio'].split('_')[1] for r in rows(out / f'class_{split}.csv')} == set(SPEAKERS)
    assert takes == {'test': set(range(5)), 'val': set(range(5, 10)), 'train': {10, 11}}
    for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
        assert not recordings[a] & recordings[b] and not pictures[a] & pictures[b], (a, b)
    for flags in (['--test_speakers', 'dora'], ['--split', 'speakers', '--test_takes', '0-1'],
                  ['--test_takes', '0-5', '--val_takes', '5-9']):
        with pytest.raises(SystemExit):
            avdigits.main(['--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'refused'), *flags])


def test_localize_mask_is_the_spoken_digits_cell(tmp_path):
    run(tmp_path, '--tasks', 'localize')
    out = tmp_path / 'out'
    for r in rows(out / 'localize_train.csv'):
        image = np.asarray(Image.open(out / r['image']).convert('L'))
        mask = np.asarray(Image.open(out / r['mask']))
        digit = int(r['label'])
        assert set(np.unique(mask)) == {0, digit + 1} and (mask > 0).sum() == 28 * 28  # one cell of four
        assert image[mask > 0].max() == 20 + 20 * digit  # the spoken digit is drawn in that cell
        cells = {int(image[r:r + 28, c:c + 28].max()) for r in (0, 28) for c in (0, 28)} - {0}
        assert 2 <= len(cells) <= 4  # 2 to 4 different digits, one per cell
    ds = ManifestDataset(out / 'localize_val.csv', 32, train=False, require=('mask',))
    item = ds[0]
    assert item['mask'].shape == (32, 32) and item['mask'].max() == int(rows(out / 'localize_val.csv')[0]['label']) + 1


def test_separation_pairs_and_resumption(tmp_path):
    run(tmp_path, '--tasks', 'separate', '--pairings', '2')
    out = tmp_path / 'out'
    test = {r['key']: r for r in rows(out / 'separate_test.csv')}
    assert len(test) == 2 * 10 * 2  # one speaker, ten digits, two takes, two pictures each
    pairs = rows(out / 'separate_test_pairs.csv')
    assert len(pairs) == len(test) and not (out / 'separate_train_pairs.csv').exists()
    for p in pairs:
        assert p['class_1'] != p['class_2'] and test[p['source_1']]['label'] == p['class_1']
    before = {p: p.stat().st_mtime_ns for p in (out / 'pictures').iterdir()}
    run(tmp_path, '--tasks', 'separate', '--pairings', '2')
    assert {p: p.stat().st_mtime_ns for p in (out / 'pictures').iterdir()} == before  # kept, not rewritten
    assert rows(out / 'separate_test_pairs.csv') == pairs  # the same clips and pairs from the same seed


def test_fetches_the_public_sources_when_no_src(tmp_path, monkeypatch):
    """Without --src the script downloads MNIST and FSDD; here the URLs point at local copies (file://)."""
    import zipfile
    src = make_sources(tmp_path / 'mirror')
    with zipfile.ZipFile(tmp_path / 'fsdd.zip', 'w') as z:
        for wav in sorted((src / 'fsdd').glob('*.wav')):
            z.write(wav, f'free-spoken-digit-dataset-master/recordings/{wav.name}')
    monkeypatch.setattr(avdigits, 'SOURCES', {
        'mnist/images-idx3-ubyte.gz': (src / 'mnist' / 'images-idx3-ubyte.gz').as_uri(),
        'mnist/labels-idx1-ubyte.gz': (src / 'mnist' / 'labels-idx1-ubyte.gz').as_uri(),
        'fsdd.zip': (tmp_path / 'fsdd.zip').as_uri()})
    avdigits.main(['--out', str(tmp_path / 'out'), '--tasks', 'class', '--split', 'speakers', '--test_speakers',
                   'dora', '--val_speakers', 'carl', '--workers', '0'])
    assert len(rows(tmp_path / 'out' / 'class_test.csv')) == 20
    assert len(list((tmp_path / 'out' / 'sources' / 'fsdd').glob('*.wav'))) == 81


def test_speak_each_speaks_every_digit_of_a_training_canvas(tmp_path):
    run(tmp_path, '--tasks', 'localize', '--speak_each')
    out = tmp_path / 'out'
    for split in ('train', 'val', 'test'):
        canvases = []  # runs of consecutive rows showing the same canvas
        for r in rows(out / f'localize_{split}.csv'):
            canvas = np.asarray(Image.open(out / r['image']).convert('L'))
            cells = canvas.reshape(2, 28, 2, 28).max(axis=(1, 3)).ravel()  # grey level 20 + 20 * digit, 0 empty
            mask = np.asarray(Image.open(out / r['mask'])).reshape(2, 28, 2, 28).max(axis=(1, 3)).ravel()
            digit = int(r['label'])
            assert r['audio'].startswith(f'audio/{digit}_')  # a recording of the spoken digit
            assert mask.tolist() == [digit + 1 if g == 20 + 20 * digit else 0 for g in cells]  # its cell marked
            if not canvases or canvases[-1][0] != canvas.tobytes():
                canvases.append((canvas.tobytes(), []))
            canvases[-1][1].append((digit, cells))
        for _, spoken in canvases:
            shown = sorted((int(g) - 20) // 20 for g in spoken[0][1] if g)
            # training canvases: once per digit shown, so the picture alone does not tell the cell; held out: once
            assert sorted(d for d, _ in spoken) == (shown if split == 'train' else [spoken[0][0]])


def test_a_folder_holds_one_plan(tmp_path):
    run(tmp_path, '--tasks', 'localize')
    run(tmp_path, '--tasks', 'localize')  # the same choices again: fine (and fast)
    with pytest.raises(SystemExit):  # other choices into the same folder: its pictures would not match
        run(tmp_path, '--tasks', 'localize', '--speak_each')


def test_speak_each_only_adds_rows(tmp_path):
    src = make_sources(tmp_path / 'src')
    for name, flags in (('plain', []), ('each', ['--speak_each'])):
        avdigits.main(['--src', str(src), '--out', str(tmp_path / name), '--split', 'speakers', '--test_speakers',
                       'dora', '--val_speakers', 'carl', '--workers', '0', '--tasks', 'localize', *flags])
    for split in ('val', 'test'):  # held-out canvases: the same files
        plain, each = (rows(tmp_path / name / f'localize_{split}.csv') for name in ('plain', 'each'))
        assert plain == each and all((tmp_path / 'plain' / r['image']).read_bytes() ==
                                     (tmp_path / 'each' / r['image']).read_bytes() for r in plain)
    each = iter((r['audio'], r['label']) for r in rows(tmp_path / 'each' / 'localize_train.csv'))
    assert all(pair in each for pair in ((r['audio'], r['label']) for r in rows(tmp_path / 'plain' /
                                                                               'localize_train.csv')))  # in order
    with pytest.raises(SystemExit):  # a folder from before plan.json: its plan is unknown
        (tmp_path / 'plain' / 'plan.json').unlink()
        avdigits.main(['--src', str(src), '--out', str(tmp_path / 'plain'), '--workers', '0', '--tasks', 'localize'])

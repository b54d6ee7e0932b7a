"""The video preparation scripts (prepare/vggsound.py, audioset.py, download.py) on small videos the tests write:
which file is found, what is cut (frame timing, audio rate and length, labels), what is left out and why,
resumption, and that the manifests they write train with --data."""
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data import ManifestDataset, Video
from helpers import amplitude_at, grey_at, write_video

sys.path.insert(0, str(ROOT / 'prepare'))
import audioset  # noqa: E402
import download  # noqa: E402
import vggsound  # noqa: E402

ID = ['aaaaaaaaaaa', '-bbbbbbbbbb', 'c_ccccccccc', 'ddddddddddd', 'eeeeeeeeeee', 'fffffffffff', 'ggggggggggg']


def rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def vggsound_folder(tmp_path):
    """Seven clips in the list: two good ones (in the two common naming styles), one without an audio track, one
    truncated, one of 0.5 s, one silent, one not downloaded."""
    videos = tmp_path / 'videos'
    (videos / 'sub').mkdir(parents=True)
    write_video(videos / f'{ID[0]}_000030.mp4', seconds=4.0)
    write_video(videos / 'sub' / f'{ID[1]}_12.000_22.000.mp4', seconds=5.0)
    write_video(videos / f'{ID[2]}_000000.mp4', audio=False)
    data = write_video(videos / f'{ID[3]}_000000.mp4').read_bytes()
    (videos / f'{ID[3]}_000000.mp4').write_bytes(data[:len(data) // 3])
    write_video(videos / f'{ID[4]}_000000.mp4', seconds=0.5)
    write_video(videos / f'{ID[5]}_000000.mp4', volume=0.0)
    lines = [f'{ID[0]},30,dog barking,train', f'{ID[1]},12,"playing piano, jazz",test', f'{ID[2]},0,cat,train',
             f'{ID[3]},0,cat,train', f'{ID[4]},0,cat,train', f'{ID[5]},0,cat,test', f'{ID[6]},0,cat,test']
    (tmp_path / 'vggsound.csv').write_text('\n'.join(lines) + '\n')
    return videos


def test_vggsound_cuts_clips_reports_and_resumes(tmp_path):
    videos = vggsound_folder(tmp_path)
    out = tmp_path / 'out'
    flags = ['--csv', str(tmp_path / 'vggsound.csv'), '--videos', str(videos), '--out', str(out), '--fps', '2']
    vggsound.main(flags + ['--workers', '2'])
    train, test = rows(out / 'train.csv'), rows(out / 'test.csv')
    assert [(r['key'], r['label'], r['fps']) for r in train] == [(f'{ID[0]}_000030', 'dog barking', '2')]
    assert [(r['key'], r['label']) for r in test] == [(f'{ID[1]}_000012', 'playing piano, jazz')]
    clip = out / train[0]['image']
    frames = sorted(clip.iterdir())
    assert len(frames) == 8  # 4 s at 2 frames per second, frame k taken at (k + 0.5) / 2 s
    for k, f in enumerate(frames):
        grey = np.median(np.asarray(Image.open(f).convert('L')))
        assert abs(grey - grey_at(int((k + 0.5) / 2 * 10) / 10, 4.0)) <= 3  # the frame on screen at that time
    assert min(Image.open(frames[0]).size) == 256  # short side resized
    import soundfile
    info = soundfile.info(out / train[0]['audio'])
    assert info.samplerate == 16000 and info.channels == 1 and info.frames == pytest.approx(64000, abs=800)  # AAC pads to its
    # last 1024-sample frame (743 samples at 16 kHz)
    x = soundfile.read(out / train[0]['audio'])[0]
    assert np.abs(x[:800]).max() == pytest.approx(amplitude_at(0.0, 4.0), abs=0.03)
    assert np.abs(x[-800:]).max() == pytest.approx(amplitude_at(4.0, 4.0), abs=0.03)
    report = {r['key'].split('_')[0]: r['reason'] for r in rows(out / 'left_out.csv')}
    assert {k: v.split(' (')[0] for k, v in report.items()} == {
        'c': 'unreadable', 'ddddddddddd': 'unreadable', 'eeeeeeeeeee': 'shorter than 1 s', 'fffffffffff': 'silent',
        'ggggggggggg': 'missing file'}
    assert 'no audio track' in report['c']
    # A second run skips the finished clips and picks up one downloaded since.
    stamp = os.stat(frames[0]).st_mtime_ns
    write_video(videos / f'{ID[6]}_000000.mp4', seconds=2.0)
    vggsound.main(flags + ['--workers', '0'])
    assert os.stat(frames[0]).st_mtime_ns == stamp
    assert [r['key'] for r in rows(out / 'test.csv')] == [f'{ID[1]}_000012', f'{ID[6]}_000000']
    assert len(rows(out / 'left_out.csv')) == 4
    # The manifests load, and the frame shown is inside the audio window (middle of the clip when evaluating).
    ds = ManifestDataset(out / 'train.csv', 32, train=False)
    item = ds[0]
    assert item['audio'].shape == (1, 128, 192) and item['image'].shape == (3, 32, 32)


def test_vggsound_name_pattern_and_bad_list(tmp_path):
    (tmp_path / 'v').mkdir()
    write_video(tmp_path / 'v' / f'clip-{ID[0]}-7.mp4', seconds=2.0)
    (tmp_path / 'list.csv').write_text(f'{ID[0]},7,owl,train\n')
    vggsound.main(['--csv', str(tmp_path / 'list.csv'), '--videos', str(tmp_path / 'v'), '--out',
                   str(tmp_path / 'out'), '--name_pattern', 'clip-{id}-{start}.mp4', '--workers', '0'])
    assert len(rows(tmp_path / 'out' / 'train.csv')) == 1
    (tmp_path / 'bad.csv').write_text(f'{ID[0]},7,owl,train\n{ID[1]},seven,owl,train\n')
    with pytest.raises(ValueError, match=r"bad.csv, line 2: start_seconds 'seven' is not a number"):
        vggsound.main(['--csv', str(tmp_path / 'bad.csv'), '--videos', str(tmp_path / 'v'), '--out',
                       str(tmp_path / 'out2')])


def test_pretrain_runs_on_a_prepared_manifest(tmp_path):
    import pretrain
    videos = tmp_path / 'v'
    videos.mkdir()
    lines = []
    for i in range(4):
        write_video(videos / f'{ID[i]}_000000.mp4', seconds=3.0)
        lines.append(f'{ID[i]},0,tone,train')
    (tmp_path / 'list.csv').write_text('\n'.join(lines) + '\n')
    vggsound.main(['--csv', str(tmp_path / 'list.csv'), '--videos', str(videos), '--out', str(tmp_path / 'out'),
                   '--workers', '0'])
    last = pretrain.main(['--data', str(tmp_path / 'out' / 'train.csv'), '--preset', 'tiny', '--image_size', '32',
                          '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads', '2',
                          '--decoder_dim', '16', '--decoder_depth', '1', '--decoder_num_heads', '2', '--epochs', '2',
                          '--warmup_epochs', '1', '--batch_size', '2', '--num_workers', '0',
                          '--output_dir', str(tmp_path / 'run')])
    assert last['step'] == 4 and np.isfinite(last['loss'])


LABELS = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n2,/m/0l14jd,"Choir"\n'


def test_audioset_multilabel_manifests(tmp_path):
    (tmp_path / 'v').mkdir()
    write_video(tmp_path / 'v' / f'{ID[0]}_30.000.mp4', seconds=3.0)
    write_video(tmp_path / 'v' / f'{ID[1]}_000000.mp4', seconds=3.0)
    (tmp_path / 'labels.csv').write_text(LABELS)
    (tmp_path / 'eval_segments.csv').write_text(
        '# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=3, num_segs=3\n'
        '# YTID, start_seconds, end_seconds, positive_labels\n'
        f'{ID[0]}, 30.000, 40.000, "/m/09x0r,/m/05zppz"\n{ID[1]}, 0.000, 10.000, "/m/0l14jd"\n'
        f'{ID[2]}, 5.000, 15.000, "/m/0l14jd"\n')
    out = tmp_path / 'out'
    audioset.main(['--segments', str(tmp_path / 'eval_segments.csv'), '--labels', str(tmp_path / 'labels.csv'),
                   '--videos', str(tmp_path / 'v'), '--out', str(out), '--workers', '0'])
    got = rows(out / 'eval_segments.csv')
    assert [(r['key'], r['label']) for r in got] == [(f'{ID[0]}_000030', 'Speech;Male speech, man speaking'),
                                                      (f'{ID[1]}_000000', 'Choir')]
    assert [(r['split'], r['reason']) for r in rows(out / 'left_out.csv')] == [('eval_segments', 'missing file')]
    ds = ManifestDataset(out / 'eval_segments.csv', 32, train=False)
    assert ds.multilabel and sorted(ds.classes) == ['Choir', 'Male speech, man speaking', 'Speech']
    (tmp_path / 'bad.csv').write_text(f'{ID[0]}, 30.000, 40.000, "/m/nope"\n')
    with pytest.raises(ValueError, match=r"bad.csv, line 1: label ids \['/m/nope'\] are not in the label index"):
        audioset.read_segments(tmp_path / 'bad.csv', audioset.read_labels(tmp_path / 'labels.csv'))


def test_download_trims_records_unavailable_and_resumes(tmp_path, monkeypatch):
    source = write_video(tmp_path / 'source.mp4', seconds=8.0)
    calls = []

    def fake_download(ytid, folder, rate_limit=None):  # YouTube replaced by a local copy
        calls.append(ytid)
        if ytid == ID[1]:
            raise RuntimeError('Video unavailable. This video has been removed by the uploader')
        target = Path(folder) / f'{ytid}.mp4'
        shutil.copy(source, target)
        return target

    monkeypatch.setattr(download, 'download_video', fake_download)
    (tmp_path / 'vggsound.csv').write_text(f'{ID[0]},2,dog,train\n{ID[1]},0,cat,test\n')
    out = tmp_path / 'clips'
    flags = ['--list', str(tmp_path / 'vggsound.csv'), '--out', str(out), '--sleep', '0', '--workers', '2']
    have, unavailable = download.main(flags)
    assert have == 1 and sorted(calls) == sorted(ID[:2])
    assert rows(out / 'unavailable.csv') == [{'youtube_id': ID[1], 'start': '0', 'reason':
                                              'Video unavailable. This video has been removed by the uploader'}]
    assert sorted(p.name for p in out.iterdir()) == [f'{ID[0]}_000002.mp4', 'unavailable.csv']
    with Video(out / f'{ID[0]}_000002.mp4') as v:  # seconds 2 to 8 of the source (it ends before 12)
        assert v.duration == pytest.approx(6.0, abs=0.1)
        assert abs(np.median(np.asarray(v.frame(0.0).convert('L'))) - grey_at(2.0, 8.0)) <= 3
        x, rate = v.audio(0.0, 0.2)
        assert np.abs(x).max() == pytest.approx(amplitude_at(2.0, 8.0), abs=0.03)
    calls.clear()
    download.main(flags)
    assert calls == []  # done and unavailable clips are not fetched again
    download.main(flags + ['--retry'])
    assert calls == [ID[1]]
    # What the downloader wrote is what prepare/vggsound.py finds.
    vggsound.main(['--csv', str(tmp_path / 'vggsound.csv'), '--videos', str(out), '--out', str(tmp_path / 'prep'),
                   '--workers', '0'])
    assert [r['key'] for r in rows(tmp_path / 'prep' / 'train.csv')] == [f'{ID[0]}_000002']

"""The preparation scripts on small media the tests write. The video ones (prepare/vggsound.py, audioset.py,
download.py): which file is found, what is cut (frame timing, audio rate and length, labels), what is left out and
why, resumption, and that the manifests they write train with --data. The benchmark ones (avsbench.py, flickr.py,
music.py) on tiny copies of the official layouts: manifests, each AVSBench frame's `start`, AVSS class values from
colours, the Flickr consensus map on a hand-worked example, the evaluation pairs, what is left out and why, and a
segmentation run on what avsbench.py wrote."""
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data import CLIP_SECONDS, ManifestDataset, window_start
from media import Video, write_audio
from helpers import amplitude_at, grey_at, write_video

sys.path.insert(0, str(ROOT / 'prepare'))
import audioset  # noqa: E402
import avsbench  # noqa: E402
import download  # noqa: E402
import flickr  # noqa: E402
import music  # noqa: E402
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


# ---------------------------------------------------------------- AVSBench, Flickr-SoundNet, MUSIC (issue 10)

FRAME = (32, 24)  # width, height of the tiny frames and masks


def tone(path, seconds, rate=16000):
    """A WAV of `seconds` of a quiet tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    write_audio(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def picture(path, grey=100):
    """A uniform grey frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', FRAME, (grey, grey, grey)).save(path)


def square_mask(path, mode='L', on=255):
    """A mask with the top-left 8 x 8 pixels set (value `on`), the rest 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(FRAME[::-1], np.uint8)
    m[:8, :8] = on
    image = Image.fromarray(m, 'L')
    if mode == 'P':  # a palette mask of indices 0 / 1, as MS3's are read
        image = Image.fromarray((m > 0).astype(np.uint8), 'P')
        image.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    image.save(path)


def s4_layout(root):
    """S4 (v1): a training clip (first mask only), two test clips, one of them without audio, one val clip whose
    fourth mask is missing."""
    lines = ['name,start,category,split', 'trainclip,0,dog_barking,train', 'testclip,0,dog_barking,test',
             'noaudio,0,dog_barking,test', 'valclip,0,lawn_mowing,val']
    root.mkdir(parents=True)
    (root / 's4_meta_data.csv').write_text('\n'.join(lines) + '\n')
    for line in lines[1:]:
        name, _, category, split = line.split(',')
        for i in range(1, 6):
            picture(root / f's4_data/visual_frames/{split}/{category}/{name}/{name}_{i}.png', 20 * i)
            if (split != 'train' or i == 1) and not (name == 'valclip' and i == 4):
                square_mask(root / f's4_data/gt_masks/{split}/{category}/{name}/{name}_{i}.png')
        if name != 'noaudio':
            tone(root / f's4_data/audio_wav/{split}/{category}/{name}.wav', 5.0)


def test_avsbench_s4_frames_masks_and_centred_windows(tmp_path):
    s4_layout(tmp_path / 'S4')
    out = tmp_path / 'out'
    flags = ['--layout', 's4', '--root', str(tmp_path / 'S4'), '--out', str(out), '--workers', '0']
    avsbench.main(flags)
    train, test, val = rows(out / 'train.csv'), rows(out / 'test.csv'), rows(out / 'val.csv')
    assert [(r['key'], r['start'], r['category']) for r in train] == [('trainclip_0', '0', 'dog_barking')]
    assert [r['key'] for r in test] == [f'testclip_{k}' for k in range(5)]
    # Frame k is shown at k + 0.5 s: its window starts 1.5 s before, kept inside the 5 s clip: frames 0 and 1 get
    # [0, 3] (centred on frame 1), frame 2 [1, 4], frames 3 and 4 [2, 5] (centred on frame 3), so only the first
    # and last frames' windows are off centre, by 1 s. data.window_start leaves the written start where it is.
    starts = [float(r['start']) for r in test]
    assert starts == [0, 0, 1, 2, 2]
    assert all(window_start(5.0, start=s) == s for s in starts)
    assert [k + 0.5 - s == CLIP_SECONDS / 2 for k, s in enumerate(starts)] == [False, True, True, True, False]
    assert avsbench.frame_start(9, 10.0) == 7 and avsbench.frame_start(5, 10.0) == 4  # a 10 s (AVSS v2) clip
    assert test[2]['image'].endswith('visual_frames/test/dog_barking/testclip/testclip_3.png')  # 1-based files
    mask = np.asarray(Image.open(out / test[0]['mask']))
    assert mask.dtype == np.uint8 and mask.shape == FRAME[::-1] and mask.sum() == 64 and mask[0, 0] == 1
    assert [r['key'] for r in val] == ['valclip_0', 'valclip_1', 'valclip_2', 'valclip_4']
    report = [(r['key'], r['reason']) for r in rows(out / 'left_out.csv')]
    assert report == [(f'noaudio_{k}', 'missing file (audio)') for k in range(5)] + \
        [('valclip_3', 'missing file (mask)')]
    assert rows(out / 'left_out.csv')[-1]['file'].endswith('gt_masks/val/lawn_mowing/valclip/valclip_4.png')
    # The manifests load for --task segment; a second run keeps the masks.
    ds = ManifestDataset(out / 'test.csv', 32, train=False, require=('mask',))
    assert ds[0]['mask'].shape == (32, 32) and int(ds[0]['mask'].max()) == 1
    stamp = os.stat(out / test[0]['mask']).st_mtime_ns
    avsbench.main(flags)
    assert os.stat(out / test[0]['mask']).st_mtime_ns == stamp
    (tmp_path / 'S4' / 's4_meta_data.csv').write_text('name,start,split\nclip,0,train\n')
    with pytest.raises(ValueError, match=r"s4_meta_data.csv: no column\(s\) \['category'\]"):
        avsbench.main(flags)


def test_avsbench_ms3_palette_masks(tmp_path):
    root = tmp_path / 'MS3'
    root.mkdir()
    (root / 'ms3_meta_data.csv').write_text('video_id,split\nmulti,val\n')
    for i in range(1, 6):
        picture(root / 'ms3_data/visual_frames/multi' / f'multi.mp4_{i}.png')
        square_mask(root / 'ms3_data/gt_masks/val/multi' / f'multi_{i}.png', mode='P')
    tone(root / 'ms3_data/audio_wav/val/multi.wav', 5.0)
    avsbench.main(['--layout', 'ms3', '--root', str(root), '--out', str(tmp_path / 'out'), '--workers', '0'])
    val = rows(tmp_path / 'out' / 'val.csv')
    assert [r['start'] for r in val] == ['0', '0', '1', '2', '2']
    assert np.asarray(Image.open(tmp_path / 'out' / val[4]['mask'])).sum() == 64  # palette index 1 -> value 1


def test_avss_palette_and_class_values(tmp_path):
    # The palette by hand: value 1 = 0b001 -> R's top bit; 3 = 0b011 -> R and G; 8 = 0b001000 -> R's second bit;
    # 70 = 0b1000110 -> G and B top bits, then (8 >> 3 = 1) R's third bit: (32, 128, 128).
    palette = avsbench.avss_palette()
    assert palette.shape == (71, 3) and palette[0].tolist() == [0, 0, 0]
    assert [palette[v].tolist() for v in (1, 2, 3, 8, 70)] == [[128, 0, 0], [0, 128, 0], [128, 128, 0],
                                                               [64, 0, 0], [32, 128, 128]]
    root = tmp_path / 'AVSS'
    root.mkdir()
    (root / 'metadata.csv').write_text('vid,uid,s_min,s_sec,a_obj,split,label\n'
                                       'aaa,aaa_1,0,0,dog,train,v1s\nbbb,bbb_2,0,0,man_dog,train,v1m\n'
                                       'ccc,ccc_3,0,0,guitar,val,v2\n')
    (root / 'label2idx.json').write_text(json.dumps({n: i + 1 for i, n in enumerate(
        ['background', 'accordion', 'airplane', 'axe', 'baby', 'bassoon', 'bell', 'bird', 'boat'])}))
    colours = {(0, 0): 1, (0, 1): 3, (1, 0): 8, (1, 1): 70}  # 2 x 2 blocks of 16 x 12 pixels
    for label, uid, n in (('v1s', 'aaa_1', 5), ('v1m', 'bbb_2', 5), ('v2', 'ccc_3', 10)):
        clip = root / label / uid
        tone(clip / 'audio.wav', n)
        for k in range(n):
            picture(clip / 'frames' / f'{k}.jpg')
            rgb = np.zeros(FRAME[::-1] + (3,), np.uint8)
            for (by, bx), v in colours.items():
                rgb[by * 12:(by + 1) * 12, bx * 16:(bx + 1) * 16] = palette[v]
            if uid == 'ccc_3' and k == 9:
                rgb[0, 0] = (1, 2, 3)  # not an AVSS colour
            (clip / 'labels_rgb').mkdir(exist_ok=True)
            Image.fromarray(rgb).save(clip / 'labels_rgb' / f'{k}.png')
    out = tmp_path / 'out'
    avsbench.main(['--layout', 'avss', '--root', str(root), '--out', str(out), '--workers', '0'])
    train, val = rows(out / 'train.csv'), rows(out / 'val.csv')
    assert [r['key'] for r in train] == ['v1s_aaa_1_0'] + [f'v1m_bbb_2_{k}' for k in range(5)]
    assert [r['subset'] for r in train] == ['v1s'] + ['v1m'] * 5
    assert [float(r['start']) for r in val] == [0, 0, 1, 2, 3, 4, 5, 6, 7]  # frame 9 left out
    values = np.asarray(Image.open(out / val[0]['mask']))
    assert [values[by * 12 + 5, bx * 16 + 5] for by, bx in colours] == list(colours.values())
    assert [(r['key'], r['reason']) for r in rows(out / 'left_out.csv')] == [
        ('v2_ccc_3_9', 'bad mask (1 colour(s) not in the AVSS palette: (1, 2, 3))')]
    assert rows(out / 'classes.csv')[8] == {'value': '8', 'name': 'boat'}
    # labels_semantic holds the values themselves (DeepAVFusion's loader reads them); --subsets picks v1s (S4).
    clip = root / 'v1s' / 'aaa_1'
    (clip / 'labels_semantic').mkdir()
    Image.fromarray(np.full(FRAME[::-1], 5, np.uint8)).save(clip / 'labels_semantic' / '0.png')
    avsbench.main(['--layout', 'avss', '--root', str(root), '--out', str(tmp_path / 's4'), '--workers', '0',
                   '--labels', 'semantic', '--subsets', 'v1s'])
    assert [r['key'] for r in rows(tmp_path / 's4' / 'train.csv')] == ['v1s_aaa_1_0']
    assert np.asarray(Image.open(tmp_path / 's4' / 'masks/v1s_aaa_1/0.png')).max() == 5
    # finetune.py's segment task trains and evaluates on what was prepared (70 classes, the values above).
    import finetune
    m = finetune.main(['--task', 'segment', '--seg_classes', '70', '--data', str(out / 'train.csv'),
                       '--val_data', str(out / 'val.csv'), '--output_dir', str(tmp_path / 'run'),
                       '--max_steps', '1', '--batch_size', '2', '--epochs', '1', '--num_workers', '0',
                       '--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2',
                       '--fusion_num_heads', '2', '--preset', 'tiny'])
    assert 0 <= m['mIoU'] <= 1


def flickr_xml(path, boxes):
    """An annotation file as the official parsers read it: root > field > bbox > (first child, xmin, ymin, xmax,
    ymax), one bbox per annotator."""
    fields = ''.join(f'<object><bbox><label>x</label><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>'
                     f'<ymax>{d}</ymax></bbox></object>' for a, b, c, d in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<annotation><filename>f.jpg</filename>{fields}</annotation>')


def test_flickr_consensus_map_hand_worked():
    # Two annotators: A = (0, 0, 128, 128) and B = (64, 64, 256, 256) on the 256 frame become, x * 224 // 256,
    # A = [0, 112) x [0, 112) and B = [56, 224) x [56, 224): both cover [56, 112)^2 (1), one of them covers
    # the rest of A and B (0.5), nothing covers the top-right and bottom-left corners (0).
    m = flickr.consensus_map([(0, 0, 128, 128), (64, 64, 256, 256)])
    assert m.shape == (224, 224)
    assert (m[0, 0], m[60, 60], m[111, 111], m[112, 112], m[200, 200], m[0, 200], m[200, 0]) == \
           (0.5, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0)
    assert [(m == v).sum() for v in (1.0, 0.5, 0.0)] == [56 * 56, 112 ** 2 + 168 ** 2 - 2 * 56 * 56,
                                                        224 ** 2 - (112 ** 2 + 168 ** 2 - 56 * 56)]
    # Scaling floors: 130 -> 113.75 -> 113, 10 -> 8.75 -> 8; three boxes still count 1.
    m = flickr.consensus_map([(0, 0, 130, 10)] * 3)
    assert (m == 1).sum() == 113 * 8 and m[7, 112] == 1 and m[8, 0] == 0 and m[0, 113] == 0
    png = flickr.consensus_png([(0, 0, 128, 128), (64, 64, 256, 256)])
    assert sorted(np.unique(png).tolist()) == [0, 128, 255]
    # What finetune.py --loc_gt consensus reads back from the PNG is the map.
    back = (png.astype(float) * 2 / 255).round().clip(max=2) / 2
    assert np.array_equal(back, flickr.consensus_map([(0, 0, 128, 128), (64, 64, 256, 256)]))


def test_flickr_prepares_the_test_manifest(tmp_path):
    root = tmp_path / 'Flickr'
    for vid in ('111', '222', '333', '444'):
        picture(root / 'frames' / f'{vid}.jpg')
        if vid != '222':
            tone(root / 'audio' / f'{vid}.wav', 4.0)
    flickr_xml(root / 'Annotations' / '111.xml', [(0, 0, 128, 128), (64, 64, 256, 256)])
    flickr_xml(root / 'Annotations' / '222.xml', [(0, 0, 10, 10)])
    flickr_xml(root / 'Annotations' / '333.xml', [(0, 0, 'ten', 10)])
    flickr_xml(root / 'Annotations' / '444.xml', [])
    (tmp_path / 'list.csv').write_text('111,202\n222,0\n333,5\n444,0\n')
    out = tmp_path / 'out'
    flickr.main(['--root', str(root), '--out', str(out), '--list', str(tmp_path / 'list.csv'), '--workers', '0'])
    test = rows(out / 'test.csv')
    assert [(r['key'], r['image'], r['mask']) for r in test] == [('111', 'frames/111.png', 'masks/111.png')]
    assert Image.open(out / 'frames/111.png').size == (224, 224)  # squashed to the map's square
    assert np.array_equal(np.asarray(Image.open(out / 'masks/111.png')),
                          flickr.consensus_png([(0, 0, 128, 128), (64, 64, 256, 256)]))
    report = {r['key']: r['reason'] for r in rows(out / 'left_out.csv')}
    assert report == {'222': 'missing file', '444': 'no boxes',
                      '333': "unreadable (box 1: coordinates ['0', '0', 'ten', '10'] are not integers)"}
    ds = ManifestDataset(out / 'test.csv', 32, train=False, require=('mask',))
    assert sorted(np.unique(ds[0]['mask'].numpy()).tolist()) == [0, 128, 255]
    (tmp_path / 'bad.xml').write_text('<annotation><object><bbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax>'
                                      '<ymax>4</ymax></bbox></object></annotation>')  # no first child
    with pytest.raises(ValueError, match=r"bad.xml, box 1: expected a first child then xmin, ymin, xmax, ymax"):
        flickr.read_boxes(tmp_path / 'bad.xml')
    (tmp_path / 'badlist.csv').write_text('111,0\nnot an id,0\n')
    with pytest.raises(ValueError, match=r"badlist.csv, line 2: 'not an id' is not a clip id"):
        flickr.read_list(tmp_path / 'badlist.csv')


MUSIC_IDS = ['mmmmmmmmmm1', 'mmmmmmmmmm2', 'mmmmmmmmmm3', 'mmmmmmmmmm4', 'mmmmmmmmmm5', 'mmmmmmmmmm6']


def test_vggsound_music_manifests_and_pairs(tmp_path):
    videos = tmp_path / 'clips'
    (videos / 'playing_cello').mkdir(parents=True)
    for ytid, start in ((ID[0], 30), (ID[1], 0), (ID[2], 12), (ID[3], 4)):  # DeepAVFusion's file names
        write_video(videos / 'playing_cello' / f'{ytid}_{start:06d}_{start + 10:06d}.mp4', seconds=2.0)
    (tmp_path / 'train.txt').write_text(f'{ID[0]}_000030,cello\n{ID[1]}_000000,violin\n')
    (tmp_path / 'pairs.csv').write_text(
        'source_1,source_2,class_1,class_2,sep_type\n'
        f'{ID[2]}_000012,{ID[3]}_000004,"violin,_fiddle",cello,Easy\n'
        f'{ID[3]}_000004,{ID[4]}_000007,cello,cello,Hard\n'
        f'{ID[3]}_000004,{ID[2]}_000012,cello,"violin,_fiddle",Easy\n')
    out = tmp_path / 'out'
    music.main(['--dataset', 'vggsound_music', '--train_list', str(tmp_path / 'train.txt'), '--pairs',
                str(tmp_path / 'pairs.csv'), '--videos', str(videos), '--out', str(out), '--workers', '0'])
    assert [(r['key'], r['label']) for r in rows(out / 'train.csv')] == [(f'{ID[0]}_000030', 'cello'),
                                                                         (f'{ID[1]}_000000', 'violin')]
    assert [(r['key'], r['label']) for r in rows(out / 'test.csv')] == [(f'{ID[2]}_000012', 'violin'),
                                                                        (f'{ID[3]}_000004', 'cello')]
    pairs = rows(out / 'test_pairs.csv')
    assert [(r['source_1'], r['source_2'], r['class_1'], r['sep_type']) for r in pairs] == [
        (f'{ID[2]}_000012', f'{ID[3]}_000004', 'violin,_fiddle', 'Easy'),
        (f'{ID[3]}_000004', f'{ID[2]}_000012', 'cello', 'Easy')]
    report = [(r['key'], r['reason']) for r in rows(out / 'left_out.csv')]
    assert report == [(f'{ID[4]}_000007', 'missing file'),
                      ('pair line 3', f'clip left out ({ID[4]}_000007: missing file)')]
    # finetune.py finds test_pairs.csv beside test.csv and matches every pair by `key`.
    import finetune
    from types import SimpleNamespace
    val = ManifestDataset(out / 'test.csv', 32, train=False)
    got, source = finetune.separation_pairs(val, SimpleNamespace(sep_pairs='', val_data=str(out / 'test.csv')))
    assert got == [(0, 1), (1, 0)] and source.endswith('test_pairs.csv')
    (tmp_path / 'bad.csv').write_text('source_1,source_2\nabc,def\n')
    with pytest.raises(ValueError, match=r"bad.csv, line 2, source_1: 'abc' is not a clip name"):
        music.read_pairs(tmp_path / 'bad.csv')


def test_music_solo_official_split_and_drawn_pairs(tmp_path):
    videos = tmp_path / 'videos'
    for n, vid in enumerate(MUSIC_IDS[:5]):  # the sixth is not downloaded
        (videos / ('cello' if n % 2 else 'flute')).mkdir(parents=True, exist_ok=True)
        write_video(videos / ('cello' if n % 2 else 'flute') / f'{vid}.mp4', seconds=1.5)
    (tmp_path / 'solo.json').write_text(json.dumps({'videos': {'flute': MUSIC_IDS[0:5:2] + [MUSIC_IDS[5]],
                                                               'cello': MUSIC_IDS[1:5:2]}}))
    out = tmp_path / 'out'
    music.main(['--dataset', 'music', '--solo', str(tmp_path / 'solo.json'), '--videos', str(videos), '--out',
                str(out), '--held_out', '2', '--workers', '0'])
    # 5 videos found, every (5 // 2)-th of the sorted ids held out: 1, 3, 5.
    test = rows(out / 'test.csv')
    assert [(r['key'], r['label']) for r in test] == [(MUSIC_IDS[0], 'flute'), (MUSIC_IDS[2], 'flute'),
                                                      (MUSIC_IDS[4], 'flute')]
    assert [r['key'] for r in rows(out / 'train.csv')] == [MUSIC_IDS[1], MUSIC_IDS[3]]
    assert [(r['key'], r['split'], r['reason']) for r in rows(out / 'left_out.csv')] == [
        (MUSIC_IDS[5], '', 'missing file')]
    pairs = rows(out / 'test_pairs.csv')
    assert [r['source_1'] for r in pairs] == [r['key'] for r in test]
    assert all(r['source_2'] != r['source_1'] and r['sep_type'] == 'Hard' for r in pairs)
    with pytest.raises(SystemExit):
        music.main(['--dataset', 'music', '--videos', str(videos), '--out', str(out)])

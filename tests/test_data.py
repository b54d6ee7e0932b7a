"""Data: WAV reading, the front-ends, the manifest checks and errors, the synthetic dataset."""
import csv

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from PIL import Image

from data import (AudioFrontEnd, ImageFrontEnd, ManifestDataset, SyntheticAVDataset, build_dataset, collate,
                  denormalize, finish_on_device)
from media import audio_info, read_audio, write_audio


# ---------------------------------------------------------------- audio files

def test_audio_roundtrip_16bit_wav(tmp_path):
    x = np.sin(np.linspace(0, 20, 800)).astype(np.float32) * 0.5
    write_audio(tmp_path / 'a.wav', x, 8000)
    assert soundfile.info(str(tmp_path / 'a.wav')).subtype == 'PCM_16'
    y, rate = read_audio(tmp_path / 'a.wav')
    assert rate == 8000 and y.shape == (1, 800) and y.dtype == np.float32
    assert np.abs(y[0] - x).max() < 1e-4


@pytest.mark.parametrize('name,subtype', [('a.flac', 'PCM_24'), ('a.ogg', 'VORBIS'), ('a.mp3', 'MPEG_LAYER_III'),
                                          ('a.wav', 'FLOAT'), ('a.wav', 'PCM_U8'), ('stereo.wav', 'PCM_16')])
def test_audio_formats_datasets_ship_in(tmp_path, name, subtype):
    t = np.arange(16000) / 16000
    x = 0.4 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([x, -x], 1) if name.startswith('stereo') else x
    soundfile.write(str(tmp_path / name), data, 16000, subtype=subtype)
    rate, frames, channels = audio_info(tmp_path / name)
    y, rate2 = read_audio(tmp_path / name)
    assert rate == rate2 == 16000 and y.shape[0] == channels == (2 if name.startswith('stereo') else 1)
    n = min(len(x), y.shape[1])
    if subtype in ('VORBIS', 'MPEG_LAYER_III'):  # lossy, with a codec delay: compare the pitch
        spec = np.abs(np.fft.rfft(y[0]))
        assert abs(spec.argmax() * 16000 / y.shape[1] - 440) < 5
    else:
        assert np.abs(y[0, :n] - x[:n]).max() < 1e-2
    if channels == 2:
        assert np.abs(y[1, :n] + x[:n]).max() < 1e-2


def test_audio_errors_name_the_file(tmp_path):
    (tmp_path / 'a.mp3').write_bytes(b'ID3\x04' + bytes(100))
    with pytest.raises(ValueError, match=r'a.mp3: not a readable audio file'):
        audio_info(tmp_path / 'a.mp3')
    with pytest.raises(ValueError, match=r'a.mp3: could not decode audio'):
        read_audio(tmp_path / 'a.mp3')
    write_audio(tmp_path / 'full.wav', np.zeros(1000), 8000)
    data = (tmp_path / 'full.wav').read_bytes()
    (tmp_path / 'short.wav').write_bytes(data[:500])
    with pytest.raises(ValueError, match=r'short.wav: truncated audio file'):
        audio_info(tmp_path / 'short.wav')
    soundfile.write(str(tmp_path / 'empty.wav'), np.zeros((0, 1)), 8000)
    with pytest.raises(ValueError, match=r'empty.wav: no audio samples'):
        audio_info(tmp_path / 'empty.wav')


# ---------------------------------------------------------------- front-ends

def test_audio_front_end_shape_padding_and_window():
    fe = AudioFrontEnd(train=False)
    x = torch.arange(1, 4001, dtype=torch.float32) / 4000  # 0.25 s at 16 kHz
    w = fe.window(x, 16000)
    assert w.shape == (48000,)
    assert torch.equal(w[:4000], x) and torch.equal(w[4000:8000], x.flip(0))  # mirrored repetition
    long = torch.arange(5 * 16000, dtype=torch.float32)
    assert fe.window(long, 16000)[0] == 16000  # centred: (80000 - 48000) / 2
    assert fe.window(long, 16000, start=0.5)[0] == 8000
    assert fe.spectrogram(w).shape == (1, 128, 192)
    assert torch.allclose(fe.spectrogram(torch.zeros(48000)), torch.tensor(-7.0))  # log10(0 + 1e-7)


def test_audio_front_end_resamples_and_mixes_down():
    fe = AudioFrontEnd(train=False)
    t = np.arange(8000 * 3) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)
    spec = fe.spectrogram(fe.window(stereo, 8000))[0]
    # the 1 kHz tone falls in the mel band whose centre is nearest 1 kHz (HTK mel scale, 0 - 8 kHz)
    fb = torchaudio.functional.melscale_fbanks(401, 0.0, 8000.0, 128, 16000)
    centres = fb.argmax(0).float() * 8000 / 400
    assert abs(centres[spec.mean(1).argmax()] - 1000) < 40


def test_audio_gain_is_random_when_training_only():
    from data import clip_generator
    fe = AudioFrontEnd(train=True)
    gains = [fe.gain(clip_generator(0, 0, i)) for i in range(200)]
    assert 10 ** (-6 / 20) <= min(gains) < 0.6 and 1.8 < max(gains) <= 10 ** (6 / 20)
    assert fe.gain(clip_generator(0, 0, 5)) == fe.gain(clip_generator(0, 0, 5))
    assert AudioFrontEnd(train=False).gain() == 1.0


def test_image_front_end_eval_centre_crop():
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :25] = 255  # left quarter white: cut off by the centre crop of a 50 x 50 view
    x, _ = ImageFrontEnd(50, train=False)(Image.fromarray(img))
    assert x.shape == (3, 50, 50)
    assert denormalize(x).max() < 5


def test_image_front_end_moves_mask_with_image():
    rng = np.random.default_rng(0)
    mask = np.zeros((80, 120), np.uint8)
    mask[10:40, 20:90] = 3
    img = rng.integers(0, 100, (80, 120, 3)).astype(np.uint8)
    img[mask > 0, 0] = 255
    from data import clip_generator
    for i in range(5):
        x, m = ImageFrontEnd(48, train=True)(Image.fromarray(img), Image.fromarray(mask), clip_generator(0, 0, i))
        red = denormalize(x)[..., 0] > 200
        assert m.shape == (48, 48) and set(m.unique().tolist()) <= {0, 3}
        assert (red == (m > 0).numpy()).mean() > 0.95  # nearest vs bilinear differ only on edges


def test_training_images_without_augmentation_are_the_held_out_ones():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3)).astype(np.uint8))
    from data import clip_generator
    held_out = ImageFrontEnd(48, train=False, crop_ratio=1.0)(img)[0]
    plain = ImageFrontEnd(48, train=True, crop_ratio=1.0)
    plain.augment = False
    augmented = ImageFrontEnd(48, train=True)
    outs = [(plain(img, g=clip_generator(0, 0, i))[0], augmented(img, g=clip_generator(0, 0, i))[0]) for i in range(4)]
    assert all(torch.equal(p, held_out) for p, _ in outs)
    assert not any(torch.equal(a, held_out) for _, a in outs)  # the default crops at random and flips


# ---------------------------------------------------------------- the fast paths equal the plain ones

@pytest.mark.parametrize('rate,channels,ext', [(16000, 1, 'wav'), (16000, 2, 'wav'), (44100, 2, 'flac'),
                                               (8000, 1, 'wav')])
@pytest.mark.usefixtures('one_thread')
def test_audio_read_by_window_equals_the_slice_of_the_whole(tmp_path, rate, channels, ext):
    """AudioFrontEnd.read reads (and resamples) only the window's samples: the same as `window` on the whole
    file, for windows at the start, inside, at the end of the clip, and a clip shorter than the window."""
    rng = np.random.default_rng(0)
    fe = AudioFrontEnd(train=True)
    for seconds in (7.3, 2.2):
        path = tmp_path / f'a{seconds}.{ext}'
        soundfile.write(str(path), rng.uniform(-0.5, 0.5, (int(seconds * rate), channels)), rate)
        whole, _ = read_audio(path)
        for start in (0.0, 0.013, 1.7, 4.3, 9.0):
            with soundfile.SoundFile(str(path)) as f:
                x, x_rate, x_start = fe.read(f, start)
            assert x_rate == 16000 and x_start == 0.0 and x.numel() == min(48000, round(seconds * 16000))
            fast, plain = fe.window(x, x_rate, start=x_start), fe.window(whole, rate, start=start)
            if rate == 16000:
                assert torch.equal(fast, plain)
            else:  # the same filter over the same samples; only the convolution's summation order may differ
                torch.testing.assert_close(fast, plain, rtol=0, atol=2e-6)


@pytest.mark.usefixtures('one_thread')
def test_audio_read_needs_the_whole_clip_for_speed_perturbation_and_mp3(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 5 * 16000)
    soundfile.write(str(tmp_path / 'a.wav'), x, 16000)
    soundfile.write(str(tmp_path / 'a.mp3'), x, 16000)
    with soundfile.SoundFile(str(tmp_path / 'a.wav')) as f:
        assert AudioFrontEnd(train=True, speed_perturb=0.2).read(f, 1.0)[0].shape == (1, 5 * 16000)
    with soundfile.SoundFile(str(tmp_path / 'a.mp3')) as f:  # MP3 seeks only approximately
        y, rate, start = AudioFrontEnd(train=True).read(f, 1.0)
        assert y.shape[0] == 1 and y.shape[1] >= 5 * 16000 and start == 1.0


@pytest.mark.usefixtures('one_thread')
def test_spectrogram_and_resampler_equal_torchaudio():
    fe = AudioFrontEnd(train=False)
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (2, 48000)).astype(np.float32))
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=800, hop_length=250, n_mels=128)
    reference = torch.log10(mel(x) + 1e-7)[..., :-1].unsqueeze(-3)
    torch.testing.assert_close(fe.spectrogram(x), reference, rtol=0, atol=1e-5)  # batched
    torch.testing.assert_close(fe.spectrogram(x[1]), reference[1], rtol=0, atol=1e-5)
    for rate in (44100, 8000):
        assert torch.equal(fe.resample(x[0], rate), torchaudio.functional.resample(x[0], rate, 16000))


@pytest.mark.usefixtures('one_thread')
def test_image_from_its_file_is_the_decoded_image_through_the_front_end(tmp_path):
    """A training crop of whole pixels is resized by torch (PIL's filter, within 3 grey levels of PIL)."""
    from data import clip_generator
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:340]
    picture = np.stack([128 + 100 * np.sin(x / (9 + 4 * c) + y / 23) for c in range(3)], -1)
    picture = np.clip(picture + rng.normal(0, 10, picture.shape), 0, 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / 'a.jpg', quality=90)
    decoded = Image.open(tmp_path / 'a.jpg').convert('RGB')
    fe = ImageFrontEnd(224, train=True)
    for i in range(8):
        from_file, _ = fe(tmp_path / 'a.jpg', None, clip_generator(0, 0, i))  # no reduced decode at this size
        from_image, _ = fe(decoded, None, clip_generator(0, 0, i))
        assert torch.equal(from_file, from_image)
        box, flip = fe.crop(340, 256, clip_generator(0, 0, i))
        pil = np.asarray(decoded.resize((224, 224), Image.BILINEAR, box=box), dtype=np.int64)
        pil = pil[:, ::-1] if flip else pil
        diff = np.abs(denormalize(from_file).astype(np.int64) - pil)
        assert diff.max() <= 3 and diff.mean() < 0.1


@pytest.mark.usefixtures('one_thread')
def test_reduced_jpeg_decode_keeps_the_crops_resolution(tmp_path):
    """Draft mode decodes a large JPEG at 1/2, 1/4 or 1/8 scale only while the crop keeps at least the output's
    pixels; the crops and flips are those of a full decode, and the pixels close to them."""
    from data import clip_generator, decode_for_crop
    y, x = np.mgrid[0:960, 0:1280]
    picture = np.stack([128 + 100 * np.sin(x / (15 + 6 * c)) * np.cos(y / 31) for c in range(3)], -1)
    Image.fromarray(picture.astype(np.uint8)).save(tmp_path / 'big.jpg', quality=95)
    decoded = Image.open(tmp_path / 'big.jpg').convert('RGB')
    with Image.open(tmp_path / 'big.jpg') as im:
        image, scale = decode_for_crop(im, (0, 0, 1280, 960), (224, 224))
        assert scale == 4 and image.size == (320, 240)  # 1/8 would leave 160 x 120 < 224
    with Image.open(tmp_path / 'big.jpg') as im:
        assert decode_for_crop(im, (100, 100, 400, 400), (224, 224))[1] == 1  # 300 px: no room to reduce
    for train in (True, False):
        fe = ImageFrontEnd(224, train=train)
        for i in range(6):
            box, _ = fe.crop(1280, 960, clip_generator(0, 0, i))
            with Image.open(tmp_path / 'big.jpg') as im:
                scale = decode_for_crop(im, box, (224, 224))[1]
            assert min(box[2] - box[0], box[3] - box[1]) / scale >= 224  # never fewer pixels than the output
            fast, _ = fe(tmp_path / 'big.jpg', None, clip_generator(0, 0, i))
            plain, _ = fe(decoded, None, clip_generator(0, 0, i))
            assert fast.shape == plain.shape == (3, 224, 224)
            diff = np.abs(denormalize(fast).astype(np.int64) - denormalize(plain).astype(np.int64))
            assert diff.mean() < 1 and diff.max() <= 8, (train, i, scale, diff.mean())  # grey levels


# ---------------------------------------------------------------- manifests

def make_clips(tmp_path, n=4, label=True, mask=False):
    rows = []
    for i in range(n):
        Image.fromarray(np.full((40, 60, 3), 15 * i, np.uint8)).save(tmp_path / f'img{i}.png')
        write_audio(tmp_path / f'snd{i}.wav', np.sin(np.arange(8000) * 0.05 * (i + 1)) * 0.3, 8000)
        row = {'image': f'img{i}.png', 'audio': f'snd{i}.wav'}
        if label:
            row['label'] = ['cat', 'dog'][i % 2]
        if mask:
            Image.fromarray(np.full((40, 60), i % 2, np.uint8)).save(tmp_path / f'mask{i}.png')
            row['mask'] = f'mask{i}.png'
        rows.append(row)
    return rows


def write_manifest(path, rows, header=None):
    header = header or list(rows[0])
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, header, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
    return path


def test_manifest_loads_clips(tmp_path):
    rows = make_clips(tmp_path, mask=True)
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, train=False, require=('label', 'mask'))
    item = ds[1]
    assert item['image'].shape == (3, 32, 32) and item['audio'].shape == (1, 128, 192)
    assert ds.classes == ['cat', 'dog'] and item['label'] == 1 and item['mask'].shape == (32, 32)
    assert item['mask'].max() == 1


def test_a_batch_equals_its_clips_one_by_one_and_finished_on_the_device(tmp_path):
    """The loader's batches (`__getitems__`: each clip alone, the spectrograms in chunks) equal the clips made one at
    a time; with device_frontend the loader's 8-bit crops and waveforms, finished by finish_on_device, give the
    same batch again."""
    rows = make_clips(tmp_path, n=11)  # more clips than a spectrogram chunk
    path = write_manifest(tmp_path / 'm.csv', rows)
    keys = [(3, i) for i in range(11)]
    ds = ManifestDataset(path, 32, train=True, speed_perturb=0.1)
    one_by_one, batch = collate([ds[k] for k in keys]), collate(ds.__getitems__(keys))
    assert torch.equal(batch['image'], one_by_one['image']) and torch.equal(batch['index'], one_by_one['index'])
    torch.testing.assert_close(batch['audio'], one_by_one['audio'], rtol=0, atol=1e-5)
    assert batch['audio'].shape == (11, 1, 128, 192) and batch['audio'].std() > 0.1
    raw = ManifestDataset(path, 32, train=True, speed_perturb=0.1, device_frontend=True)
    loaded = collate(raw.__getitems__(keys))
    assert loaded['image'].dtype == torch.uint8 and loaded['wave'].shape == (11, 48000) and 'audio' not in loaded
    finished = finish_on_device(loaded)
    torch.testing.assert_close(finished['image'], batch['image'], rtol=0, atol=1e-6)
    torch.testing.assert_close(finished['audio'], batch['audio'], rtol=0, atol=1e-5)
    assert 'wave' not in finished


def test_front_ends_follow_the_batch_to_its_device():
    """Off the CPU the front-ends use their own copies of the window, filterbank and constants, made once (a
    'meta' device checks every tensor is on the batch's device), and the dense filterbank used there gives the
    CPU's sparse one's spectrogram."""
    audio, image = AudioFrontEnd(False), ImageFrontEnd(32, False)
    meta = torch.device('meta')
    assert audio.spectrogram(torch.zeros(2, 48000, device=meta)).shape == (2, 1, 128, 192)
    assert image.normalise(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=meta)).dtype == torch.float32
    assert audio.tensors(meta) is audio.tensors(meta) and meta in image.on_device
    w = torch.randn(3, 48000) * 0.1
    sparse = audio.spectrogram(w)
    audio.on_device[torch.device('cpu')] = (audio.hann, audio.mel_fb.to_dense())  # as made for other devices
    torch.testing.assert_close(audio.spectrogram(w), sparse, rtol=0, atol=1e-5)


def test_manifest_multilabel(tmp_path):
    rows = make_clips(tmp_path)
    rows[0]['label'] = 'cat;dog'
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, train=False)
    assert ds.multilabel and ds[0]['label'].tolist() == [1.0, 1.0] and ds[1]['label'].tolist() == [0.0, 1.0]


def test_manifest_missing_column(tmp_path):
    rows = make_clips(tmp_path)
    with pytest.raises(ValueError, match=r"m.csv: no 'audio' column, which every manifest needs"):
        ManifestDataset(write_manifest(tmp_path / 'm.csv', rows, ['image', 'label']), 32)
    with pytest.raises(ValueError, match=r"m.csv: no 'mask' column, which task 'segment' needs"):
        ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, require=('label', 'mask'), task='segment')


def test_manifest_lists_every_bad_row(tmp_path):
    rows = make_clips(tmp_path, n=16)
    for i in (2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14):
        rows[i]['audio'] = f'missing{i}.wav'
    rows[3]['image'] = 'nowhere.png'
    with pytest.raises(ValueError) as e:
        ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32)
    msg = str(e.value)
    assert '12 problem(s)' in msg and "row 4: audio 'missing2.wav' not found" in msg
    assert "row 5: image 'nowhere.png' not found" in msg and '... and 2 more' in msg


def test_manifest_unreadable_audio_and_truncated_image(tmp_path):
    rows = make_clips(tmp_path)
    (tmp_path / 'song.mp3').write_bytes(b'ID3\x04' + bytes(64))
    rows[0]['audio'] = 'song.mp3'
    data = (tmp_path / 'img1.png').read_bytes()
    (tmp_path / 'img1.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e:
        ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32)
    msg = str(e.value)
    assert "row 2: audio 'song.mp3' unreadable (not a readable audio file" in msg
    assert "row 3: image 'img1.png' unreadable" in msg


def test_manifest_reads_flac_and_mp3(tmp_path):
    rows = make_clips(tmp_path, n=2)
    t = np.arange(8000) / 8000
    soundfile.write(str(tmp_path / 'a.flac'), 0.3 * np.sin(2 * np.pi * 500 * t), 8000)
    soundfile.write(str(tmp_path / 'b.mp3'), 0.3 * np.sin(2 * np.pi * 2000 * t), 8000)
    rows[0]['audio'], rows[1]['audio'] = 'a.flac', 'b.mp3'
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, train=False)
    low, high = (ds[i]['audio'][0].mean(1).argmax() for i in (0, 1))
    assert low < high  # 500 Hz sits in a lower mel band than 2 kHz


def test_decode_failure_names_the_file(tmp_path):
    rows = make_clips(tmp_path)
    # A JPEG cut short passes the header check and fails only when decoded.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'x.jpg')
    data = (tmp_path / 'x.jpg').read_bytes()
    (tmp_path / 'x.jpg').write_bytes(data[:len(data) // 2])
    rows[2]['image'] = 'x.jpg'
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, train=False)
    with pytest.raises(RuntimeError, match=r"m.csv, row 4 \(image 'x.jpg', audio 'snd2.wav'\): could not decode"):
        ds[2]


def test_frame_folder_and_start(tmp_path):
    rows = make_clips(tmp_path, n=2)
    (tmp_path / 'frames').mkdir()
    for k in range(3):
        Image.fromarray(np.full((20, 20, 3), 100 * k, np.uint8)).save(tmp_path / 'frames' / f'{k:03d}.png')
    rows[0]['image'] = 'frames'
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 16, train=False)
    assert abs(denormalize(ds[0]['image']).mean() - 100) < 2  # the middle frame when evaluating


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic_and_consistent():
    ds = SyntheticAVDataset(16, num_classes=6, image_size=64, train=False, seed=3, return_waveform=True)
    a, b = ds[5], ds[5]
    assert all(torch.equal(a[k], b[k]) for k in ('image', 'audio', 'mask', 'sources', 'labels'))
    assert not torch.equal(ds[4]['image'], a['image'])
    for i in range(16):
        it = ds[i]
        present = set(it['mask'].unique().tolist()) - {0}
        assert present <= {c + 1 for c in torch.nonzero(it['labels']).flatten().tolist()}
        assert it['labels'][it['label']] == 1  # the first object always sounds
        assert torch.allclose(it['sources'].sum(0), it['waveform'], atol=0.03)  # the rest is background noise


def test_synthetic_train_augments_per_epoch():
    ds = SyntheticAVDataset(8, image_size=64, train=True)
    first = ds[0]['image']
    assert torch.equal(first, ds[0]['image'])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]['image'])
    assert not torch.equal(ds[0]['image'], build_dataset('synthetic', 64, True, split='val')[0]['image'])


def test_a_shorter_audio_window_is_the_start_of_the_3_s_one():
    """build_dataset(audio_seconds=1) (finetune's --audio_seconds): 64 frames, those of the 3 s spectrogram but for
    the last, whose 50 ms window would reach past the first second."""
    full, short = (build_dataset('synthetic', 32, False, split='val', synthetic_clips=64, **kw)[3]
                   for kw in ({}, {'audio_seconds': 1.0}))
    assert full['audio'].shape == (1, 128, 192) and short['audio'].shape == (1, 128, 64)
    assert torch.allclose(short['audio'][..., :63], full['audio'][..., :63], atol=1e-5)
    assert not torch.allclose(short['audio'][..., 63], full['audio'][..., 63], atol=1e-3)
    assert torch.equal(short['image'], full['image'])


def test_synthetic_class_sets_pitch():
    ds = SyntheticAVDataset(64, num_classes=8, image_size=32, train=False)
    peaks = {}
    for i in range(64):
        it = ds[i]
        if it['labels'].sum() == 1:
            peaks.setdefault(int(it['label']), []).append(int(it['audio'][0].mean(1).argmax()))
    low, high = min(peaks), max(peaks)
    assert np.median(peaks[low]) < np.median(peaks[high])  # a higher class sounds higher


# ---------------------------------------------------------------- videos

from data import CLIP_SECONDS, clip_generator, frame_time, window_start  # noqa: E402
from media import Video  # noqa: E402
from helpers import amplitude_at, grey_at, write_video  # noqa: E402


def seen_time(item, seconds):
    """The time a video frame was taken at, read back from its grey level (see helpers.write_video)."""
    grey = np.median(denormalize(item['image']))
    return (grey - 30) / 180 * seconds


def test_window_and_frame_time_rules():
    assert window_start(10.0) == 3.5 and window_start(2.0) == 0.0  # centred; a short clip starts at 0
    assert window_start(10.0, start=8.0) == 7.0 and window_start(10.0, start=-1) == 0.0  # kept inside the clip
    for i in range(100):
        g = clip_generator(0, 0, i)
        s = window_start(10.0, g, train=True)
        t = frame_time(s, 10.0, g, train=True)
        assert 0 <= s <= 7.0 and s <= t < s + CLIP_SECONDS  # the picture comes from inside the audio window
    assert frame_time(3.5, 10.0) == 5.0 and frame_time(0.0, 1.0) == 0.5  # the window's middle when evaluating


def test_video_reader(tmp_path):
    with Video(write_video(tmp_path / 'a.mp4', seconds=4.0)) as v:
        assert v.duration == pytest.approx(4.0, abs=0.05) and v.rate == 22050
        for t in (0.0, 1.05, 2.5, 3.95):
            assert abs(np.median(np.asarray(v.frame(t))) - grey_at(int(t * 10) / 10, 4.0)) <= 2
        x, rate = v.audio(1.0, 2.0)
        assert x.shape == (1, 44100) and rate == 22050
        assert np.abs(x[0, :1000]).max() == pytest.approx(amplitude_at(1.0, 4.0), abs=0.02)
        assert np.abs(x[0, -1000:]).max() == pytest.approx(amplitude_at(3.0, 4.0), abs=0.02)


def test_video_frame_skipping_unreferenced_frames_is_exact(tmp_path, monkeypatch):
    """Frames decoded with the unreferenced frames before t skipped are those of a full decode, also when the
    frame shown at t is itself one the decoder skipped (SKIP_BEFORE < 0 skips them all: t is decoded again)."""
    path = write_video(tmp_path / 'a.mp4', seconds=4.0, fps=25)  # libx264's default B-frames
    times = (0.0, 0.5, 1.3, 2.02, 3.1, 3.99, 5.0)
    with Video(path) as v:
        start = v._decode_to(0.0, skip=False)[0].pts  # stream time at t = 0
        full = [np.asarray(v._decode_to(t + start * v.vstream.time_base, skip=False)[0].to_image()) for t in times]
        assert all(np.array_equal(np.asarray(v.frame(t)), f) for t, f in zip(times, full))
        monkeypatch.setattr(Video, 'SKIP_BEFORE', -10.0)
        assert v._decode_to(2.02 + start * v.vstream.time_base, skip=True)[1] is not None  # frames were skipped
        assert all(np.array_equal(np.asarray(v.frame(t)), f) for t, f in zip(times, full))


def test_bad_videos_are_named(tmp_path):
    with pytest.raises(ValueError, match=r'silent.mp4: no audio track'):
        Video(write_video(tmp_path / 'silent.mp4', audio=False))
    data = write_video(tmp_path / 'full.mp4').read_bytes()
    (tmp_path / 'cut.mp4').write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match=r'cut.mp4: not a readable video'):
        Video(tmp_path / 'cut.mp4')


def video_manifest(tmp_path, rows):
    return write_manifest(tmp_path / 'videos.csv', rows, ['video', 'label', 'start'])


@pytest.mark.parametrize('ext,codecs', [('mp4', {}), ('mkv', dict(video_codec='ffv1', audio_codec='pcm_s16le'))])
def test_video_rows_take_the_frame_inside_the_audio_window(tmp_path, ext, codecs):
    write_video(tmp_path / f'v.{ext}', seconds=6.0, **codecs)
    rows = [{'video': f'v.{ext}', 'label': 'tone'}] * 24
    evaluation = ManifestDataset(video_manifest(tmp_path, rows), 32, train=False, return_waveform=True)
    item = evaluation[0]
    assert item['audio'].shape == (1, 128, 192) and item['waveform'].shape == (48000,) and item['label'] == 0
    assert seen_time(item, 6.0) == pytest.approx(3.0, abs=0.15)  # window 1.5-4.5 s, its middle
    env = item['waveform'].abs().unfold(0, 400, 400).max(1).values  # the tone's amplitude every 25 ms
    assert env[0] == pytest.approx(amplitude_at(1.5, 6.0), abs=0.03)
    assert env[-1] == pytest.approx(amplitude_at(4.5, 6.0), abs=0.03)
    training = ManifestDataset(video_manifest(tmp_path, rows), 32, train=True, seed=5)
    for i in range(len(rows)):  # the dataset's choices, drawn again from the clip's generator
        g = clip_generator(5, 0, i)
        start = window_start(6.0, g, True)
        t = frame_time(start, 6.0, g, True)
        assert start <= t < start + CLIP_SECONDS
        assert seen_time(training[i], 6.0) == pytest.approx(int(t * 10) / 10, abs=0.15)


def test_frame_folder_with_a_frame_rate(tmp_path):
    (tmp_path / 'frames').mkdir()
    for k in range(8):  # 2 frames per second over 4 s: frame k covers [k / 2, (k + 1) / 2)
        Image.fromarray(np.full((20, 20, 3), grey_at(k / 2, 4.0), np.uint8)).save(tmp_path / 'frames' / f'{k:03d}.jpg')
    write_audio(tmp_path / 'a.wav', np.zeros(16000 * 4), 16000)
    rows = [{'image': 'frames', 'audio': 'a.wav', 'fps': '2'}] * 16
    header = ['image', 'audio', 'fps']
    item = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows, header), 16, train=False)[0]
    assert seen_time(item, 4.0) == pytest.approx(2.0, abs=0.05)  # window 0.5-3.5 s, middle 2.0: frame 4
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows, header), 16, train=True, seed=1)
    for i in range(16):
        g = clip_generator(1, 0, i)
        start = window_start(4.0, g, True)
        t = frame_time(start, 4.0, g, True)
        assert seen_time(ds[i], 4.0) == pytest.approx(int(t * 2) / 2, abs=0.05)


def test_short_video_is_padded(tmp_path):
    write_video(tmp_path / 'short.mp4', seconds=0.5)
    rows = [{'video': 'short.mp4', 'label': 'x'}]
    item = ManifestDataset(video_manifest(tmp_path, rows), 32, train=True, return_waveform=True)[0]
    assert item['waveform'].shape == (48000,) and item['waveform'].abs().max() > 0.05


def test_skip_bad_leaves_out_and_lists_rows(tmp_path):
    write_video(tmp_path / 'good.mp4')
    write_video(tmp_path / 'silent.mp4', audio=False)
    data = (tmp_path / 'good.mp4').read_bytes()
    (tmp_path / 'cut.mp4').write_bytes(data[:len(data) // 3])
    rows = [{'video': v, 'label': 'x'} for v in ('good.mp4', 'silent.mp4', 'missing.mp4', 'cut.mp4', 'good.mp4')]
    path = video_manifest(tmp_path, rows)
    with pytest.raises(ValueError) as e:
        ManifestDataset(path, 32)
    msg = str(e.value)
    assert "row 3: video 'silent.mp4' no audio track" in msg and "row 4: video 'missing.mp4' not found" in msg
    assert "row 5: video 'cut.mp4' not a readable video" in msg and '--skip_bad leaves them out' in msg
    with pytest.warns(UserWarning, match='left out 3 of 5 rows'):
        ds = ManifestDataset(path, 32, skip_bad=True)
    assert len(ds) == 2 and ds.row_numbers == [2, 6]
    assert [(r['row'], r['clip']) for r in ds.left_out] == [(3, "video 'silent.mp4'"), (4, "video 'missing.mp4'"),
                                                            (5, "video 'cut.mp4'")]


def test_a_clip_that_fails_to_decode_is_left_out_of_its_batch(tmp_path):
    rows = make_clips(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'x.jpg')
    data = (tmp_path / 'x.jpg').read_bytes()
    (tmp_path / 'x.jpg').write_bytes(data[:len(data) // 2])  # passes the header check, fails to decode
    rows[2]['image'] = 'x.jpg'
    ds = ManifestDataset(write_manifest(tmp_path / 'm.csv', rows), 32, train=False, skip_bad=True)
    with pytest.warns(UserWarning, match=r"row 4 \(image 'x.jpg', audio 'snd2.wav'\): could not decode"):
        batch = collate([ds[i] for i in range(4)])
    assert batch['index'].tolist() == [0, 1, 3] and batch['image'].shape[0] == 3  # never replaced
    assert batch['skipped'][0]['row'] == 4 and 'could not decode' in batch['skipped'][0]['reason']
    with pytest.warns(UserWarning, match="row 4"):  # the same, as a DataLoader asks for a batch
        together = collate(ds.__getitems__(range(4)))
    assert together['index'].tolist() == [0, 1, 3] and together['skipped'] == batch['skipped']
    torch.testing.assert_close(together['audio'], batch['audio'], rtol=0, atol=1e-5)

"""Data (paper Sec. 4.1): the timing rule, the audio and image front-ends, the datasets and synthetic data."""
# The datasets: a CSV manifest or one's own videos, read through media.py.
# A clip's random choices come from (seed, epoch, clip index) (`clip_generator`), whatever the processes and loader
# workers, so a resumed run sees the same data. Each fast path gives what the plain reading gives (tested).
import colorsys
import csv
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from torch.utils.data import Dataset, default_collate

from media import AUDIO_ERRORS, Video, audio_info, frames, is_videos, list_videos, seeks_exactly

SAMPLE_RATE, CLIP_SECONDS = 16000, 3.0
DENSE_SPAN = 10.0  # seconds that evaluation windows spread over (official DenseVideoDataset: dense_span=10)
N_MELS, N_FFT, HOP = 128, 800, 250  # 50 ms windows, 64 frames per second -> 192 frames in 3 s
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def clip_generator(seed, epoch, index, stream=0):
    """A torch.Generator for one clip's random choices, seeded by (seed, epoch, index, stream)."""
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def uniform(g, low=0.0, high=1.0):
    """One float drawn uniformly in [low, high) from generator g."""
    return low + (high - low) * torch.rand(1, generator=g).item()


# ---------------------------------------------------------------------------------------------------- timing

def window_start(duration, g=None, train=False, start=None, window=None):
    """Where the 3 s audio window starts in a clip of `duration` s: at `start` (kept inside), anywhere when training,
    the middle when evaluating, or the k-th of `window` (k, n) spread over the middle DENSE_SPAN s (official)."""
    excess = max(duration - CLIP_SECONDS, 0.0)
    if start is not None:
        return min(max(start, 0.0), excess)
    if window is not None and not train:
        k, n = window
        first = max((duration - DENSE_SPAN) / 2, 0.0)
        last = max(min(first + DENSE_SPAN, duration) - CLIP_SECONDS, first)
        return first + (last - first) * k / max(n - 1, 1)
    return uniform(g, 0.0, excess) if train else excess / 2


def frame_time(start, duration, g=None, train=False):
    """When the picture is taken (s): inside the audio window from `start`, random when training, else its middle."""
    span = min(CLIP_SECONDS, duration - start)
    return start + (uniform(g, 0.0, span) if train else span / 2)


# ---------------------------------------------------------------------------------------------------- audio

class AudioFrontEnd:
    """Waveform -> 3 s window at 16 kHz -> log-mel spectrogram (1, 128, 192), as the paper (or its first `samples`)."""
    # `speed_perturb` s > 0 plays training clips at a random speed in [1 - s, 1 + s] (Ko et al. 2015, for speech;
    # off in the paper).

    def __init__(self, train, speed_perturb=0.0):
        self.train, self.speed_perturb = train, speed_perturb
        self.samples, self.hann = int(CLIP_SECONDS * SAMPLE_RATE), torch.hann_window(N_FFT)
        # (mels, frequencies): torchaudio's MelSpectrogram filterbank (HTK mel scale, 0 - 8 kHz, no normalisation).
        # Each frequency falls in at most two bands: stored sparse, the product skips the zeros.
        fb = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "sparse CSR support is in beta": the product used here is stable
            self.mel_fb = fb.T.to_sparse_csr()
        self.resamplers, self.on_device = {}, {torch.device('cpu'): (self.hann, self.mel_fb)}

    def resampler(self, rate):
        """The resampler from `rate` to 16 kHz, made once: bitwise torchaudio.functional.resample's output."""
        if rate not in self.resamplers:
            self.resamplers[rate] = torchaudio.transforms.Resample(rate, SAMPLE_RATE, dtype=torch.float32)
        return self.resamplers[rate]

    def resample(self, x, rate):
        """(samples,) at `rate` -> 16 kHz."""
        return x if rate == SAMPLE_RATE else self.resampler(rate)(x)

    def window(self, waveform, rate, g=None, start=None):
        """Mono, 16 kHz, exactly 3 s (samples,), from `start` s or `window_start`; short clips padded mirrored."""
        x = torch.as_tensor(waveform, dtype=torch.float32)
        x = self.resample(mono(x) if x.ndim == 2 else x, rate)
        if x.numel() == 0:
            raise ValueError("empty waveform")
        if self.train and self.speed_perturb:  # linear interpolation: cheap, and its slight blur is harmless here
            speed = uniform(g, 1 - self.speed_perturb, 1 + self.speed_perturb)
            x = F.interpolate(x[None, None], size=max(round(x.numel() / speed), 1), mode='linear',
                              align_corners=False)[0, 0]
            start = None if start is None else start / speed
        if start is None:
            start = window_start(x.numel() / SAMPLE_RATE, g, self.train)
        offset = min(max(int(round(start * SAMPLE_RATE)), 0), max(x.numel() - self.samples, 0))
        x = x[offset:offset + self.samples]
        while x.numel() < self.samples:
            x = torch.cat([x, x.flip(0)])
        return x[:self.samples]

    def gain(self, g=None):
        """Random gain factor of +-6 dB when training (paper Sec. 4.1), 1 when evaluating."""
        return 10 ** (uniform(g, -6, 6) / 20) if self.train else 1.0

    def spectrogram(self, waveform):
        """(..., 48000) -> (..., 1, 128, 192): log10(mel power + 1e-7), the last frame dropped."""
        # torchaudio's MelSpectrogram to float rounding, written out without torch.stft for speed (docs/speed.md).
        hann, mel_fb = self.tensors(waveform.device)
        x, half = waveform.reshape(-1, waveform.shape[-1]), N_FFT // 2
        if x.shape[-1] <= half:
            raise ValueError(f"a spectrogram needs more than {half} samples, got {x.shape[-1]}")
        # Centred frames: the signal reflected by half a window at both ends (stft's center=True).
        x = torch.cat([x[:, 1:half + 1].flip(-1), x, x[:, -half - 1:-1].flip(-1)], 1)
        t = waveform.shape[-1] // HOP  # frames kept: stft makes one more, which the paper's input drops
        frames = x.unfold(-1, N_FFT, HOP)[:, :t] * hann  # (clips, frames, N_FFT)
        spec = torch.view_as_real(torch.fft.rfft(frames)).square_()  # (clips, frames, frequencies, 2)
        power = spec[..., 0] + spec[..., 1]  # |X|^2, without abs()'s square root
        n, f = power.shape[0], power.shape[2]
        mel = (mel_fb @ power.reshape(n * t, f).T).reshape(N_MELS, n, t).transpose(0, 1)
        return mel.add_(1e-7).log10_().reshape(*waveform.shape[:-1], 1, N_MELS, t)

    def read(self, f, start):
        """(waveform, rate, start in it) for `window`, read from an open soundfile for the 3 s from `start` s: only
        the samples the window depends on where the format seeks exactly (and no speed perturbation), else all."""
        rate, frames = f.samplerate, f.frames
        if not seeks_exactly(f) or (self.train and self.speed_perturb):
            return f.read(dtype='float32', always_2d=True).T, rate, start
        # Resampling by o / m in lowest terms turns each block k of o input samples into m output samples, and
        # block k reads the input [k o - width, (k + 1) o + width): read whole blocks with that margin.
        d = math.gcd(rate, SAMPLE_RATE)
        o, m = rate // d, SAMPLE_RATE // d
        width = self.resampler(rate).width if rate != SAMPLE_RATE else 0
        total = math.ceil(frames * m / o)  # samples of the whole clip at 16 kHz
        n = min(self.samples, total)
        offset = min(max(int(round(start * SAMPLE_RATE)), 0), total - n)  # as `window` places it
        first = max(offset // m - math.ceil(width / o), 0)  # the first block read
        last = (offset + n - 1) // m + 1  # one past the last block needed
        f.seek(first * o)
        x = f.read(min(last * o + width, frames) - first * o, dtype='float32', always_2d=True)
        x = self.resample(mono(torch.from_numpy(x.T)), rate)
        return x[offset - first * m:offset - first * m + n], SAMPLE_RATE, 0.0

    def tensors(self, device):
        """(Hann window, mel filterbank) on `device`, copied once; off the CPU dense, which every device supports."""
        if device not in self.on_device:
            self.on_device[device] = self.hann.to(device), self.mel_fb.to_dense().to(device)
        return self.on_device[device]


def mono(x):
    """(channels, samples) -> (samples,): the mean of the channels (a single channel as it is, without a pass)."""
    return x[0] if x.shape[0] == 1 else x.mean(0)


# ---------------------------------------------------------------------------------------------------- images

def random_resized_crop_box(width, height, g, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop: a crop (left, top, w, h) of random area `scale` and aspect `ratio`."""
    area = width * height
    for _ in range(10):
        target, aspect = area * uniform(g, *scale), math.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=g))
            left = int(torch.randint(width - w + 1, (1,), generator=g))
            return left, top, w, h
    w, h = width, height  # fall back to a centred crop with the aspect clamped into range
    if w / h < ratio[0]:
        h = round(w / ratio[0])
    elif w / h > ratio[1]:
        w = round(h * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


class ImageFrontEnd:
    """PIL image or image file (and optional PIL mask, transformed alike) -> normalised (3, H, W) tensor (and (H, W)
    mask). A file's crop is chosen from its header, so a large JPEG is decoded at reduced scale (`decode_for_crop`)."""

    def __init__(self, size, train, crop_ratio=0.875):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.train, self.crop_ratio, self.augment = train, crop_ratio, True  # augment: random crop and flip
        # (x / 255 - mean) / std as one multiply and one subtract
        self.scale = torch.from_numpy(1 / (255 * IMAGENET_STD)).view(3, 1, 1)
        self.shift = torch.from_numpy(IMAGENET_MEAN / IMAGENET_STD).view(3, 1, 1)
        self.on_device = {torch.device('cpu'): (self.scale, self.shift)}

    def crop(self, W, H, g=None):
        """(box (left, top, right, bottom), flip) of a W x H image: random when augmenting, else the scaled centre."""
        h_out, w_out = self.size
        if self.train and self.augment:
            left, top, w, h = random_resized_crop_box(W, H, g)
            return (left, top, left + w, top + h), uniform(g) < 0.5
        s = max(h_out / H, w_out / W) / self.crop_ratio
        w, h = w_out / s, h_out / s
        return ((W - w) / 2, (H - h) / 2, (W + w) / 2, (H + h) / 2), False

    def normalise(self, x):
        """8-bit (..., 3, H, W) pixels -> float32 normalised by ImageNet mean and std, on x's device."""
        if x.device not in self.on_device:
            self.on_device[x.device] = self.scale.to(x.device), self.shift.to(x.device)
        scale, shift = self.on_device[x.device]
        return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(shift)

    def __call__(self, image, mask=None, g=None, normalise=True):
        """(image tensor, mask tensor or None) of a PIL image or image file and a same-size PIL mask or None."""
        scale = 1.0
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                W, H = im.size  # from the header: nothing is decoded yet
                box, flip = self.crop(W, H, g)
                image, scale = decode_for_crop(im, box, self.size)
        else:
            W, H = image.size
            box, flip = self.crop(W, H, g)
        h_out, w_out = self.size
        left, top, right, bottom = (c / scale for c in box)
        if all(float(c).is_integer() for c in (left, top, right, bottom)):  # training crops: whole pixels
            # Cut (PIL's crop: only the box is copied out), then torch's antialiased bilinear resize of
            # 8-bit pixels: PIL's filter (within 3 grey levels, 0.02 on average), at half its time.
            cut = image.crop((int(left), int(top), int(right), int(bottom)))
            x = torch.from_numpy(np.array(cut)).permute(2, 0, 1)[None]
            x = F.interpolate(x, (h_out, w_out), mode='bilinear', antialias=True, align_corners=False)[0]
        else:  # a box between pixels (the evaluation's centre crop, a reduced decode): PIL resamples it
            x = torch.from_numpy(np.array(image.resize((w_out, h_out), Image.BILINEAR,
                                                       box=(left, top, right, bottom)))).permute(2, 0, 1)
        x = x.flip(-1) if flip else x
        x = self.normalise(x) if normalise else x.contiguous()
        if mask is not None:
            if mask.size != (W, H):
                raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, its image {W}x{H}")
            mask = torch.from_numpy(np.asarray(mask.resize((w_out, h_out), Image.NEAREST, box=box), dtype=np.int64))
            mask = mask.flip(-1) if flip else mask
        return x, mask


def decode_for_crop(im, box, size):
    """(RGB image, scale) of an opened image file for the crop `box` resized to `size` (h, w)."""
    # A JPEG is decoded at the smallest 1/8, 1/4 or 1/2 scale (PIL's draft) that keeps `size` pixels in the crop,
    # now at `box` / scale.
    w_crop, h_crop = box[2] - box[0], box[3] - box[1]
    s = next(s for s in (8, 4, 2, 1) if s == 1 or (w_crop / s >= size[1] and h_crop / s >= size[0]))
    scale = 1.0
    if s > 1 and im.format == 'JPEG':
        # libjpeg picks the largest scale at which the image keeps at least the size asked: at most 1 / s.
        W = im.width
        drafted = im.draft('RGB', (math.ceil(W / s), math.ceil(im.height / s)))
        scale = W / drafted[1][2] if drafted else 1.0  # draft's box: the whole image in reduced pixels
    im.load()
    return (im if im.mode == 'RGB' else im.convert('RGB')), scale


def denormalize(x):
    """Normalised (3, H, W) image tensor -> uint8 (H, W, 3) array, for pictures."""
    x = x.detach().float().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- datasets

SPECTROGRAM_CHUNK = 8  # clips per spectrogram call: fewer pays per-call costs, more falls out of the CPU's caches


class AVDataset(Dataset):
    """Common part of the datasets: a subclass's raw clip (`load(index, g)`) through the front-ends, as dicts of
    'image' (3, H, W), 'audio' (1, 128, 192), 'index' and, where known, 'label', 'mask', 'waveform'."""

    def __init__(self, image_size, train, seed=0, return_waveform=False, speed_perturb=0.0, device_frontend=False):
        self.image_fe, self.audio_fe = ImageFrontEnd(image_size, train), AudioFrontEnd(train, speed_perturb)
        self.train, self.seed, self.epoch = train, seed, 0
        # device_frontend leaves the image's normalisation and the spectrogram to the training device
        # (`finish_on_device`): the items carry 8-bit 'image' pixels and the 3 s 'wave' instead of 'audio'.
        self.return_waveform, self.device_frontend = return_waveform, device_frontend
        self.window = None  # evaluating: (k, n) takes the k-th of n windows of each clip (window_start)

    def set_epoch(self, epoch):
        """Augmentations change with the epoch when training (evaluation has none)."""
        self.epoch = epoch

    def split_key(self, key):
        """dataset[i] uses the epoch of `set_epoch`; dataset[(epoch, i)] (the training sampler's) names it."""
        return key if isinstance(key, tuple) else (self.epoch, key)

    def prepare(self, index, epoch=0):
        """Clip `index` as tensors but for the spectrogram (its 3 s 'wave'), from `load`'s 'image' (PIL or a path),
        'waveform' (channels, samples), 'rate', optional 'mask' and 'start' (s), and tensors passed through."""
        g = clip_generator(self.seed, epoch if self.train else 0, index)
        raw = self.load(index, g)
        image, mask = self.image_fe(raw.pop('image'), raw.pop('mask', None), g, normalise=not self.device_frontend)
        wave = self.audio_fe.window(raw.pop('waveform'), raw.pop('rate'), g, raw.pop('start', None))
        gain = self.audio_fe.gain(g)
        item = {'image': image, 'wave': (wave * gain).clamp_(-1, 1), 'index': index, **raw}
        if 'sources' in item:
            item['sources'] = item['sources'] * gain
        if mask is not None:
            item['mask'] = mask
        return item

    def spectrograms(self, items):
        """Prepared items' 'wave' -> log-mel 'audio', a few clips per call; items left out (--skip_bad) unchanged."""
        if self.device_frontend:
            return items
        good = [it for it in items if 'wave' in it]
        for c in range(0, len(good), SPECTROGRAM_CHUNK):
            chunk = good[c:c + SPECTROGRAM_CHUNK]
            specs = self.audio_fe.spectrogram(torch.stack([it['wave'] for it in chunk]))
            for it, spec in zip(chunk, specs):
                it['audio'], wave = spec, it.pop('wave')
                if self.return_waveform:
                    it['waveform'] = wave
        return items

    def prepare_key(self, key):
        """`prepare` for a dataset key (an index, or (epoch, index))."""
        epoch, index = self.split_key(key)
        return self.prepare(index, epoch)

    def __getitem__(self, key):
        return self.spectrograms([self.prepare_key(key)])[0]

    def __getitems__(self, keys):
        """A batch, as torch's DataLoader asks for it: clips prepared one by one, spectrograms together."""
        return self.spectrograms([self.prepare_key(key) for key in keys])


class ManifestDataset(AVDataset):
    """Clips listed in a CSV manifest (README, "Your data") or given as `rows` (`video_rows`)."""
    # Every row is checked when the dataset is built: failing rows raise one error listing them, or with `skip_bad`
    # are left out and listed in `left_out`; a clip that fails to decode later is left out of its batch (`collate`),
    # never replaced.

    def __init__(self, manifest, image_size=224, train=True, seed=0, require=(), classes=None, skip_bad=False,
                 return_waveform=False, task=None, rows=None, root=None, speed_perturb=0.0, device_frontend=False):
        super().__init__(image_size, train, seed, return_waveform, speed_perturb, device_frontend)
        self.path, self.skip_bad = Path(manifest), skip_bad
        if rows is None:
            header, rows = read_manifest(self.path)
            self.root = self.path.parent
        else:
            header, self.root = list(rows[0]) if rows else [], Path(root or '.')
        media = ('video',) if 'video' in header else ('image', 'audio')
        for col in (*media, *require):
            if col not in header:
                who = f"task {task!r} needs" if task and col in require else "every manifest needs ('video' " \
                                                                              "instead of both also does)"
                raise ValueError(f"manifest {self.path}: no {col!r} column, which {who} "
                                 f"(its header is: {', '.join(header) or 'empty'})")
        if not rows:
            raise ValueError(f"manifest {self.path}: no rows")
        self.has_mask = 'mask' in require
        with ThreadPoolExecutor(8) as pool:  # opening files is I/O: threads check a large manifest faster
            problems = list(pool.map(self.check_row, rows))
        bad = [(i, p) for i, p in enumerate(problems) if p]
        if bad and not skip_bad:
            lines = [f"row {i + 2}: {q}" for i, p in bad for q in p]
            more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ''
            raise ValueError(f"manifest {self.path}: {len(lines)} problem(s) in {len(bad)} row(s) (rows count the "
                             f"header as 1; --skip_bad leaves them out):\n  " + '\n  '.join(lines[:10]) + more)
        self.left_out = [self.record(i + 2, rows[i], '; '.join(p)) for i, p in bad]
        self.row_numbers = [i + 2 for i, p in enumerate(problems) if not p]
        self.rows = [r for r, p in zip(rows, problems) if not p]
        if not self.rows:
            raise ValueError(f"manifest {self.path}: every row was left out ({self.left_out[0]['reason']}, ...)")
        if self.left_out:
            first = self.left_out[0]
            warnings.warn(f"manifest {self.path}: left out {len(self.left_out)} of {len(rows)} rows that fail the "
                          f"checks (--skip_bad), e.g. row {first['row']}: {first['reason']}")
        self.skipped = []  # clips that failed to decode during an evaluation (training.predict fills it)
        self.frame_lists = {}  # frame folder -> its frames, filled as clips are read
        self.read_labels(header, classes, require)

    def read_labels(self, header, classes, require):
        """Class names from the `label` column (several joined by ';' make the data multi-label)."""
        self.classes, self.multilabel = None, False
        if 'label' in header and all(r.get('label') for r in self.rows):
            names = [r['label'].split(';') for r in self.rows]
            self.multilabel = any(len(n) > 1 for n in names)
            self.classes = list(classes) if classes is not None else sorted({c for n in names for c in n})
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted({c for n in names for c in n if c not in index})
            if unknown:
                raise ValueError(f"manifest {self.path}: labels not among the training classes: {unknown[:5]}")
            self.targets = [[index[c] for c in n] for n in names]
        elif 'label' in require:
            empty = [str(n) for n, r in zip(self.row_numbers, self.rows) if not r.get('label')]
            raise ValueError(f"manifest {self.path}: empty 'label' in rows {', '.join(empty[:10])}")

    def __len__(self):
        return len(self.rows)

    def resolve(self, name):
        return self.root / name

    def check_row(self, row):
        """Problems with one row's files, found by opening them (headers, not a full decode)."""
        problems = self.check_video(row) if row.get('video') else self.check_image(row) + self.check_audio(row)
        if self.has_mask and (not row.get('mask') or not self.resolve(row['mask']).is_file()):
            problems.append(f"mask {row.get('mask')!r} not found")
        for col, what in (('start', 'time in seconds'), ('fps', 'frame rate')):
            if row.get(col):
                try:
                    assert float(row[col]) >= 0 and (col == 'start' or float(row[col]) > 0)
                except (ValueError, AssertionError):
                    problems.append(f"{col} {row[col]!r} is not a {what}")
        return problems

    def check_video(self, row):
        """Problems with a row's video file, found by opening it."""
        path = self.resolve(row['video'])
        if not path.is_file():
            return [f"video {row['video']!r} not found"]
        try:
            Video(path).close()
        except ValueError as e:
            return [f"video {row['video']!r} {str(e).replace(str(path) + ': ', '')}"]
        return []

    def check_image(self, row):
        image = self.resolve(row['image'])
        if not row['image'] or not image.exists():
            return [f"image {row['image']!r} not found"]
        try:
            with Image.open(frames(image)[0] if image.is_dir() else image) as im:
                im.verify()
        except Exception as e:
            return [f"image {row['image']!r} unreadable ({type(e).__name__}: {e})"]
        return []

    def check_audio(self, row):
        audio = self.resolve(row['audio'])
        if not row['audio'] or not audio.is_file():
            return [f"audio {row['audio']!r} not found"]
        try:
            audio_info(audio)
        except ValueError as e:
            return [f"audio {row['audio']!r} unreadable ({str(e).replace(str(audio) + ': ', '')})"]
        return []

    def load(self, index, g):
        row = self.rows[index]
        start = float(row['start']) if row.get('start') else None
        if row.get('video'):  # decode only the 3 s window and the one frame inside it
            with Video(self.resolve(row['video'])) as video:
                start = window_start(video.duration, g, self.train, start, self.window)
                waveform, rate = video.audio(start, CLIP_SECONDS)
                image = video.frame(frame_time(start, video.duration, g, self.train))
            wave_start = 0.0  # the waveform is the window itself
        else:
            path = self.resolve(row['audio'])
            try:
                with soundfile.SoundFile(str(path)) as f:  # the header gives the duration: read only the window
                    duration = f.frames / f.samplerate
                    start = window_start(duration, g, self.train, start, self.window)
                    waveform, rate, wave_start = self.audio_fe.read(f, start)
            except AUDIO_ERRORS as e:
                raise ValueError(f"{path}: could not decode audio ({str(e).splitlines()[0]})") from None
            image = self.read_image(row, start, duration, g)
        raw = {'image': image, 'waveform': waveform, 'rate': rate, 'start': wave_start}
        if self.has_mask:
            with Image.open(self.resolve(row['mask'])) as m:
                # Values are class indices: keep single-channel modes as they are, read RGB from its first channel.
                raw['mask'] = m.copy() if m.mode in ('L', 'P', 'I', 'I;16') else m.convert('RGB').getchannel(0)
        if self.classes is not None:
            raw['label'] = self.label_tensor(index)
        return raw

    def read_image(self, row, start, duration, g):
        """The path of the row's picture; in a frame folder, the one at `frame_time` (given `fps`) or random/middle."""
        path = self.resolve(row['image'])
        if path in self.frame_lists or path.is_dir():
            if path not in self.frame_lists:  # listed once per folder (and loader worker), not once per clip
                self.frame_lists[path] = frames(path)
            files = self.frame_lists[path]
            if row.get('fps'):
                t = frame_time(start, duration, g, self.train)
                path = files[min(int(t * float(row['fps'])), len(files) - 1)]
            else:
                path = files[int(torch.randint(len(files), (1,), generator=g)) if self.train else len(files) // 2]
        return path

    def label_tensor(self, index):
        """Class index (single-label) or multi-hot float vector (multi-label)."""
        if not self.multilabel:
            return torch.tensor(self.targets[index][0])
        y = torch.zeros(len(self.classes))
        y[self.targets[index]] = 1
        return y

    def prepare_key(self, key):
        """`prepare` for a dataset key; a clip that fails to decode is named, or with --skip_bad marked 'skipped'."""
        epoch, index = self.split_key(key)
        try:
            return self.prepare(index, epoch)
        except Exception as e:
            reason = f"could not decode: {type(e).__name__}: {e}"
            skipped = self.record(self.row_numbers[index], self.rows[index], reason)
            message = f"manifest {self.path}, row {skipped['row']} ({skipped['clip']}): {skipped['reason']}"
            if not self.skip_bad:
                raise RuntimeError(message + " (--skip_bad leaves such clips out)") from e
            warnings.warn(message + '; left out')
            return {'index': index, 'skipped': skipped}

    def record(self, number, row, reason):
        """A clip left out, as a row of the --skip_bad report (left_out.csv)."""
        return {'manifest': str(self.path), 'row': number, 'clip': describe_row(row), 'reason': reason}


def read_manifest(path):
    """(header, rows as dicts) of a CSV manifest, cells stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or '').strip() for k, v in r.items() if k is not None} for r in reader]
    return header, rows


def describe_row(row):
    """A row's media files, for messages."""
    if row.get('video'):
        return f"video {row['video']!r}" + (f" at {row['start']} s" if row.get('start') else '')
    return f"image {row.get('image')!r}, audio {row.get('audio')!r}"


def video_rows(path, windows=False):
    """Manifest rows for a video file or folder of videos: one per video, or with `windows` one per 3 s window."""
    if not windows:
        return [{'video': str(file)} for file in list_videos(path)]
    rows = []
    for file in list_videos(path):
        with Video(file) as video:
            n = max(int(video.duration // CLIP_SECONDS), 1)
        rows += [{'video': str(file), 'start': f"{k * CLIP_SECONDS:g}"} for k in range(n)]
    return rows


def collate(items):
    """A batch of dataset items, clips that failed to decode (--skip_bad) left out and listed under 'skipped'."""
    good, skipped = [it for it in items if 'skipped' not in it], [it['skipped'] for it in items if 'skipped' in it]
    if not good:
        raise RuntimeError(f"every clip of a batch failed to decode, e.g. row {skipped[0]['row']} of "
                           f"{skipped[0]['manifest']}: {skipped[0]['reason']}")
    batch = default_collate(good)
    if skipped:
        batch['skipped'] = skipped
    return batch


class Oversampled(Dataset):
    """A training set whose every epoch visits each clip `times` times (the official AVSBench sets: S4 10x, AVSS 5x)."""
    # Each visit has its own augmentations: visit c of epoch e draws them as epoch e * times + c.

    def __init__(self, dataset, times):
        self.dataset, self.times = dataset, times

    def __len__(self):
        return len(self.dataset) * self.times

    def key(self, key):
        """The wrapped dataset's key for this one's key."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        visit, index = divmod(index, len(self.dataset))
        return epoch * self.times + visit, index

    def __getitem__(self, key):
        return self.dataset[self.key(key)]

    def __getitems__(self, keys):
        """A batch of the wrapped dataset's (its spectrograms together)."""
        return self.dataset.__getitems__([self.key(k) for k in keys])


_DEVICE_FRONTENDS = []  # (image, audio) front-ends of finish_on_device, made on first use


def finish_on_device(batch):
    """What a `device_frontend` loader leaves undone (normalising, 'wave' -> 'audio'), in float32 on the device."""
    if not _DEVICE_FRONTENDS:
        _DEVICE_FRONTENDS.extend([ImageFrontEnd(1, train=False), AudioFrontEnd(train=False)])
    image_fe, audio_fe = _DEVICE_FRONTENDS
    with torch.autocast(batch['image'].device.type, enabled=False):
        batch['image'] = image_fe.normalise(batch['image'])
        batch['audio'] = audio_fe.spectrogram(batch.pop('wave'))
    return batch


# ---------------------------------------------------------------------------------------------------- synthetic

SHAPES = ('disc', 'square', 'triangle', 'diamond', 'ring', 'cross')


class SyntheticAVDataset(AVDataset):
    """Clips of 1 to `max_objects` objects of distinct classes (shape, colour, pitch, timbre), the first sounding, each
    other with probability 1/2; items add 'label', 'labels' (sounding), 'mask' and 'sources' (each one's sound)."""

    def __init__(self, num_clips=2048, num_classes=8, image_size=224, train=True, seed=0, split='train',
                 max_objects=3, return_waveform=False, speed_perturb=0.0, device_frontend=False):
        super().__init__(image_size, train, seed, return_waveform, speed_perturb, device_frontend)
        if not 1 <= num_classes <= 4 * len(SHAPES) or not 1 <= max_objects <= num_classes:
            raise ValueError(f"synthetic data: need 1 <= num_classes <= {4 * len(SHAPES)} and "
                             f"1 <= max_objects <= num_classes, got {num_classes} and {max_objects}")
        self.num_clips, self.num_classes, self.max_objects = num_clips, num_classes, max_objects
        self.split = {'train': 0, 'val': 1, 'test': 2}[split]
        self.size = self.image_fe.size
        self.classes, self.multilabel = [f"{SHAPES[k % len(SHAPES)]}{k}" for k in range(num_classes)], False
        hsv = [(h, 0.85 - 0.3 * (k % 2), 0.95) for k, h in enumerate(np.arange(num_classes) / num_classes)]
        self.colours = np.array([colorsys.hsv_to_rgb(*c) for c in hsv], dtype=np.float32)

    def __len__(self):
        return self.num_clips

    def objects(self, index):
        """(generator, classes, sounding) of clip `index`: drawn first from the clip's generator (seed, split)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7919 + self.split, index]))
        n = int(rng.integers(1, self.max_objects + 1))
        classes = rng.choice(self.num_classes, size=n, replace=False)
        return rng, classes, np.r_[True, rng.random(n - 1) < 0.5]

    def clip_classes(self, index, multilabel=False):
        """The classes of clip `index`'s 'label' (or, multi-label, 'labels'), without drawing the clip."""
        _, classes, sounding = self.objects(index)
        return [int(k) for k in classes[sounding]] if multilabel else [int(classes[0])]

    def load(self, index, g):
        rng, classes, sounding = self.objects(index)
        H, W = self.size
        # Picture: a smooth random background with noise, then the objects, later ones in front.
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        c0, c1 = rng.uniform(0.2, 0.6, 3), rng.uniform(0.2, 0.6, 3)
        t = (xx / W * rng.uniform(-1, 1) + yy / H * rng.uniform(-1, 1))[..., None]
        picture = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6) + rng.normal(0, 0.06, (H, W, 3))
        mask = np.zeros((H, W), dtype=np.uint8)
        for k, snd in zip(classes, sounding):
            r = rng.uniform(0.13, 0.22) * min(H, W)
            cy, cx = rng.uniform(r, H - r), rng.uniform(r, W - r)
            inside = shape_mask(SHAPES[k % len(SHAPES)], (yy - cy) / r, (xx - cx) / r)
            picture[inside] = self.colours[k] + rng.normal(0, 0.03, (inside.sum(), 3))
            mask[inside] = k + 1 if snd else 0
        image = Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8))
        # Sound: the sounding objects' tones, plus background noise.
        samples = int(CLIP_SECONDS * SAMPLE_RATE)
        sources = np.zeros((self.max_objects, samples), dtype=np.float32)
        for j in np.flatnonzero(sounding):
            sources[j] = class_sound(classes[j], rng, samples)
        waveform = sources.sum(0) + rng.normal(0, 0.005, samples).astype(np.float32)
        labels = torch.zeros(self.num_classes)
        labels[classes[sounding]] = 1
        return {'image': image, 'mask': Image.fromarray(mask), 'waveform': waveform[None], 'rate': SAMPLE_RATE,
                'label': torch.tensor(int(classes[0])), 'labels': labels, 'sources': torch.from_numpy(sources)}


def shape_mask(shape, y, x):
    """Pixels inside a unit-size shape, given coordinates relative to its centre in units of its radius."""
    if shape == 'disc':
        return x ** 2 + y ** 2 <= 1
    if shape == 'square':
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if shape == 'triangle':
        return (y <= 0.7) & (y >= 2 * np.abs(x) - 1.0)
    if shape == 'diamond':
        return np.abs(x) + np.abs(y) <= 1
    if shape == 'ring':
        return (x ** 2 + y ** 2 <= 1) & (x ** 2 + y ** 2 >= 0.35)
    return ((np.abs(x) <= 0.3) & (np.abs(y) <= 1)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1))  # cross


def class_sound(k, rng, samples):
    """One object's sound, read from a one-period wavetable (cheap): class k fixes pitch, roll-off and tremolo."""
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
    f0 = 180.0 * 2 ** (k / 2) * rng.uniform(0.97, 1.03)
    rolloff = 1.0 + 0.8 * (k % 3)
    x = np.arange(1024) / 1024
    harmonics = [h for h in range(1, 7) if h * f0 < SAMPLE_RATE / 2]
    table = sum(h ** -rolloff * np.sin(2 * np.pi * h * x + rng.uniform(0, 2 * np.pi)) for h in harmonics)
    tone = table[(f0 * 1024 / SAMPLE_RATE * np.arange(samples)).astype(np.int64) % 1024].astype(np.float32)
    tone *= 1 + 0.5 * np.sin(2 * np.pi * (2 + 3 * (k % 4)) * t)
    onset = rng.uniform(0, 1.5)
    end = rng.uniform(onset + 1.0, CLIP_SECONDS)
    envelope = np.clip(np.minimum(t - onset, end - t) / 0.02, 0, 1)  # 20 ms fades
    return (rng.uniform(0.15, 0.35) * envelope * tone / np.abs(table).max()).astype(np.float32)


def build_dataset(data, image_size, train, seed=0, split='train', require=(), classes=None, skip_bad=False,
                  return_waveform=False, synthetic_clips=1536, synthetic_classes=8, task=None, windows=False,
                  speed_perturb=0.0, device_frontend=False, audio_seconds=CLIP_SECONDS):
    """The scripts' dataset: 'synthetic', a manifest CSV, or a video file or folder (a row per video or 3 s window),
    its audio the first `audio_seconds` of each 3 s window (finetune's --audio_seconds)."""
    if data == 'synthetic':
        n = synthetic_clips if split == 'train' else max(synthetic_clips // 4, 64)
        ds = SyntheticAVDataset(n, synthetic_classes, image_size, train, seed, split, return_waveform=return_waveform,
                                speed_perturb=speed_perturb, device_frontend=device_frontend)
    elif is_videos(data) and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: not found")
    else:
        ds = ManifestDataset(data, image_size, train, seed, require, classes, skip_bad, return_waveform, task,
                             rows=video_rows(data, windows) if is_videos(data) else None, speed_perturb=speed_perturb,
                             device_frontend=device_frontend)
    ds.audio_fe.samples = round(audio_seconds * SAMPLE_RATE)
    return ds

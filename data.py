"""Data: audio and image front-ends, the manifest dataset, and a synthetic audio-visual dataset (paper Sec. 4.1).

Front-ends (Sec. 4.1 and the official code): 3 s of audio at 16 kHz (shorter clips padded by repeating them mirrored),
+-6 dB random gain when training, log10 of a 128-band mel spectrogram (n_fft 800, hop 250) plus 1e-7, last frame
dropped: 128 x 192. Images: random resized crop (scale 0.5-1) and flip when training; when evaluating, the short side
resized to size / 0.875 and the centre crop taken (as the official evaluation); ImageNet mean and std.

Every random choice for a clip comes from a generator seeded by (seed, epoch, clip index) (`clip_generator`), so
what a clip looks like does not depend on the number of processes or loader workers, and a resumed run sees the
same data. Datasets yield dicts: 'image' (3, H, W), 'audio' (1, 128, 192), 'index', and where known 'label',
'mask', 'waveform', and for the synthetic data 'labels', 'sources'.
"""
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image, ImageFile
from torch.utils.data import Dataset

SAMPLE_RATE = 16000
CLIP_SECONDS = 3.0
N_MELS, N_FFT, HOP = 128, 800, 250  # 50 ms windows, 64 frames per second -> 192 frames in 3 s
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def clip_generator(seed, epoch, index, stream=0):
    """A torch.Generator for one clip's random choices, seeded by (seed, epoch, index, stream)."""
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def uniform(g, low=0.0, high=1.0):
    """One float drawn uniformly in [low, high) from generator g."""
    return low + (high - low) * torch.rand(1, generator=g).item()


# ---------------------------------------------------------------------------------------------------- audio files

def audio_info(path):
    """Check an audio file without decoding it (soundfile / libsndfile: WAV, FLAC, OGG, MP3, AIFF, ...): returns
    (sample rate, frames, channels); raises ValueError naming the file if it is unreadable, empty or shorter
    than its header says (a download cut short)."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable audio file ({str(e).splitlines()[0]})") from None
    if info.frames <= 0 or info.channels < 1:
        raise ValueError(f"{path}: no audio samples")
    if '(should be' in info.extra_info:  # libsndfile notes chunk sizes that run past the end of the file
        raise ValueError(f"{path}: truncated audio file (its header promises more data than the file holds)")
    return info.samplerate, info.frames, info.channels


def read_audio(path):
    """An audio file as (float32 array (channels, samples) in [-1, 1], sample rate)."""
    try:
        x, rate = soundfile.read(str(path), dtype='float32', always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: could not decode audio ({str(e).splitlines()[0]})") from None
    return np.ascontiguousarray(x.T), rate


def write_audio(path, waveform, rate=SAMPLE_RATE):
    """Write a mono waveform (samples,) in [-1, 1]; the format follows the extension (16-bit PCM for .wav)."""
    x = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1, 1)
    subtype = 'PCM_16' if str(path).lower().endswith('.wav') else None
    soundfile.write(str(path), x, rate, subtype=subtype)


# ---------------------------------------------------------------------------------------------------- audio

class AudioFrontEnd:
    """Waveform -> 3 s window at 16 kHz -> log-mel spectrogram (1, 128, 192), as the paper and official code."""

    def __init__(self, train):
        self.train = train
        self.samples = int(CLIP_SECONDS * SAMPLE_RATE)
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)

    def window(self, waveform, rate, g=None, start=None):
        """Mono, 16 kHz, exactly 3 s (samples,): from `start` seconds if given, else a random window when
        training and the centred one when evaluating; a short clip is padded by repeating it mirrored."""
        x = torch.as_tensor(waveform, dtype=torch.float32)
        x = x.mean(0) if x.ndim == 2 else x
        if rate != SAMPLE_RATE:
            x = torchaudio.functional.resample(x, rate, SAMPLE_RATE)
        if x.numel() == 0:
            raise ValueError("empty waveform")
        excess = x.numel() - self.samples
        if excess > 0:
            if start is not None:
                offset = min(max(int(round(start * SAMPLE_RATE)), 0), excess)
            elif self.train:
                offset = int(torch.randint(excess + 1, (1,), generator=g))
            else:
                offset = excess // 2
            x = x[offset:offset + self.samples]
        while x.numel() < self.samples:
            x = torch.cat([x, x.flip(0)])
        return x[:self.samples]

    def gain(self, g=None):
        """Random gain factor of +-6 dB when training (paper Sec. 4.1), 1 when evaluating."""
        return 10 ** (uniform(g, -6, 6) / 20) if self.train else 1.0

    def spectrogram(self, waveform):
        """(..., 48000) -> (..., 1, 128, 192): log10(mel power + 1e-7), the last frame dropped."""
        return torch.log10(self.mel(waveform) + 1e-7)[..., :-1].unsqueeze(-3)


# ---------------------------------------------------------------------------------------------------- images

def random_resized_crop_box(width, height, g, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop (left, top, w, h) covering a random fraction `scale` of the area with a random aspect `ratio`,
    torchvision's RandomResizedCrop procedure, drawn from generator g."""
    area = width * height
    for _ in range(10):
        target = area * uniform(g, *scale)
        aspect = math.exp(uniform(g, math.log(ratio[0]), math.log(ratio[1])))
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
    """PIL image (and optional PIL mask, transformed alike) -> normalised (3, H, W) tensor (and (H, W) mask)."""

    def __init__(self, size, train, crop_ratio=0.875):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.train, self.crop_ratio = train, crop_ratio

    def __call__(self, image, mask=None, g=None):
        W, H = image.size
        h_out, w_out = self.size
        flip = False
        if self.train:
            left, top, w, h = random_resized_crop_box(W, H, g)
            flip = uniform(g) < 0.5
        else:  # scale so the image covers the output / crop_ratio, then take the centre
            s = max(h_out / H, w_out / W) / self.crop_ratio
            w, h = w_out / s, h_out / s
            left, top = (W - w) / 2, (H - h) / 2
        box = (left, top, left + w, top + h)
        image = image.resize((w_out, h_out), Image.BILINEAR, box=box)
        x = (np.asarray(image, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        x = torch.from_numpy(x.transpose(2, 0, 1).copy())
        if mask is not None:
            if mask.size != (W, H):
                raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, its image {W}x{H}")
            mask = torch.from_numpy(np.asarray(mask.resize((w_out, h_out), Image.NEAREST, box=box), dtype=np.int64))
        if flip:
            x = x.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return x, mask


def denormalize(x):
    """Normalised (3, H, W) image tensor -> uint8 (H, W, 3) array, for pictures."""
    x = x.detach().float().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- datasets

class AVDataset(Dataset):
    """Common part of the datasets: a subclass's raw clip (`load`) through the front-ends, with the clip's
    random choices drawn from (seed, epoch, index). Call `set_epoch` before each epoch."""

    def __init__(self, image_size, train, seed=0, return_waveform=False):
        self.image_fe, self.audio_fe = ImageFrontEnd(image_size, train), AudioFrontEnd(train)
        self.train, self.seed, self.epoch = train, seed, 0
        self.return_waveform = return_waveform

    def set_epoch(self, epoch):
        """Augmentations change with the epoch when training (evaluation has none)."""
        self.epoch = epoch

    def split_key(self, key):
        """dataset[i] uses the epoch of `set_epoch`; dataset[(epoch, i)] names it. The training loop's sampler
        tags every index with its epoch, so loader workers that live for the whole run need no `set_epoch`."""
        return key if isinstance(key, tuple) else (self.epoch, key)

    def make_item(self, index, epoch=0):
        """The clip `index` as tensors. Subclasses provide `load(index, g)`, the raw clip: a dict with 'image'
        (PIL RGB), 'waveform' (channels, samples), 'rate', optional 'mask' (PIL) and 'start' (seconds), and any
        extra tensors to pass through (labels, sources)."""
        g = clip_generator(self.seed, epoch if self.train else 0, index)
        raw = self.load(index, g)
        image, mask = self.image_fe(raw.pop('image'), raw.pop('mask', None), g)
        wave = self.audio_fe.window(raw.pop('waveform'), raw.pop('rate'), g, raw.pop('start', None))
        gain = self.audio_fe.gain(g)
        wave = (wave * gain).clamp(-1, 1)
        item = {'image': image, 'audio': self.audio_fe.spectrogram(wave), 'index': index, **raw}
        if 'sources' in item:
            item['sources'] = item['sources'] * gain
        if mask is not None:
            item['mask'] = mask
        if self.return_waveform:
            item['waveform'] = wave
        return item

    def __getitem__(self, key):
        epoch, index = self.split_key(key)
        return self.make_item(index, epoch)


class ManifestDataset(AVDataset):
    """Clips listed in a CSV manifest (README, "Data"): columns image, audio, and optionally label, mask,
    start; paths relative to the CSV's folder. Checked when built: a missing column, or missing or unreadable
    files, give one error listing the offending rows. `require` names the extra columns a task needs."""

    def __init__(self, manifest, image_size=224, train=True, seed=0, require=(), classes=None, skip_bad=False,
                 return_waveform=False, task=None):
        super().__init__(image_size, train, seed, return_waveform)
        self.path, self.root, self.skip_bad = Path(manifest), Path(manifest).parent, skip_bad
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} not found")
        with open(self.path, newline='') as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or '').strip() for k, v in r.items() if k is not None} for r in reader]
        for col in ('image', 'audio', *require):
            if col not in header:
                who = f"task {task!r} needs" if task and col in require else "every manifest needs"
                raise ValueError(f"manifest {self.path}: no {col!r} column, which {who} "
                                 f"(its header is: {', '.join(header) or 'empty'})")
        if not rows:
            raise ValueError(f"manifest {self.path}: no rows")
        self.rows, self.has_mask = rows, 'mask' in require
        problems = [f"row {i + 2}: {p}" for i, r in enumerate(rows) for p in self.check_row(r)]
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ''
            raise ValueError(f"manifest {self.path}: {len(problems)} problem(s) (rows count the header as 1):\n  "
                             + '\n  '.join(problems[:10]) + more)
        self.bad_clips = 0
        self.classes, self.multilabel = None, False
        if 'label' in header and all(r['label'] for r in rows):
            names = [r['label'].split(';') for r in rows]
            self.multilabel = any(len(n) > 1 for n in names)
            self.classes = list(classes) if classes is not None else sorted({c for n in names for c in n})
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted({c for n in names for c in n if c not in index})
            if unknown:
                raise ValueError(f"manifest {self.path}: labels not among the training classes: {unknown[:5]}")
            self.targets = [[index[c] for c in n] for n in names]
        elif 'label' in require:
            empty = [str(i + 2) for i, r in enumerate(rows) if not r['label']]
            raise ValueError(f"manifest {self.path}: empty 'label' in rows {', '.join(empty[:10])}")

    def __len__(self):
        return len(self.rows)

    def resolve(self, name):
        return self.root / name

    def check_row(self, row):
        """Problems with one row's files, found without decoding them fully."""
        problems = []
        image = self.resolve(row['image'])
        if not row['image'] or not image.exists():
            problems.append(f"image {row['image']!r} not found")
        else:
            try:
                first = frames(image)[0] if image.is_dir() else image
                with Image.open(first) as im:
                    im.verify()
            except Exception as e:
                problems.append(f"image {row['image']!r} unreadable ({type(e).__name__}: {e})")
        audio = self.resolve(row['audio'])
        if not row['audio'] or not audio.is_file():
            problems.append(f"audio {row['audio']!r} not found")
        else:
            try:
                audio_info(audio)
            except ValueError as e:
                problems.append(f"audio {row['audio']!r} unreadable ({str(e).replace(str(audio) + ': ', '')})")
        if self.has_mask and (not row.get('mask') or not self.resolve(row['mask']).is_file()):
            problems.append(f"mask {row.get('mask')!r} not found")
        if row.get('start'):
            try:
                float(row['start'])
            except ValueError:
                problems.append(f"start {row['start']!r} is not a number of seconds")
        return problems

    def load(self, index, g):
        row = self.rows[index]
        path = self.resolve(row['image'])
        if path.is_dir():  # a folder of frames: a random one when training, the middle one when evaluating
            files = frames(path)
            path = files[int(torch.randint(len(files), (1,), generator=g))] if self.train else files[len(files) // 2]
        with Image.open(path) as im:
            image = im.convert('RGB')
        waveform, rate = read_audio(self.resolve(row['audio']))
        raw = {'image': image, 'waveform': waveform, 'rate': rate,
               'start': float(row['start']) if row.get('start') else None}
        if self.has_mask:
            with Image.open(self.resolve(row['mask'])) as m:
                # Values are class indices: keep single-channel modes as they are, read RGB from its first channel.
                raw['mask'] = m.copy() if m.mode in ('L', 'P', 'I', 'I;16') else m.convert('RGB').getchannel(0)
        if self.classes is not None:
            raw['label'] = self.label_tensor(index)
        return raw

    def label_tensor(self, index):
        """Class index (single-label) or multi-hot float vector (multi-label)."""
        if not self.multilabel:
            return torch.tensor(self.targets[index][0])
        y = torch.zeros(len(self.classes))
        y[self.targets[index]] = 1
        return y

    def __getitem__(self, key):
        epoch, index = self.split_key(key)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                item = self.make_item(i, epoch)
                item['bad'] = attempt  # how many bad clips this item replaced
                return item
            except Exception as e:
                row = self.rows[i]
                message = f"manifest {self.path}, row {i + 2} (image {row['image']!r}, audio {row['audio']!r}): " \
                          f"could not decode: {type(e).__name__}: {e}"
                if not self.skip_bad:
                    raise RuntimeError(message + " (pass --skip_bad to skip such clips)") from e
                self.bad_clips += 1
                warnings.warn(message + '; skipped, replaced by the next clip')
        raise RuntimeError(f"manifest {self.path}: no clip could be decoded")


def frames(folder):
    """Image files of a frame folder, sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no frames ({', '.join(IMAGE_EXTENSIONS)})")
    return files


# A truncated image must raise, never decode silently into grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# ---------------------------------------------------------------------------------------------------- synthetic

SHAPES = ('disc', 'square', 'triangle', 'diamond', 'ring', 'cross')


class SyntheticAVDataset(AVDataset):
    """Audio-visual clips that need no files. A clip is a picture of 1 to `max_objects` objects of distinct
    classes among `num_classes` (class-specific shape and colour, random position and size, noisy background)
    and the sum of the sounds of the objects that sound (class-specific pitch and timbre, random onset and gain,
    background noise); the first object always sounds, each other one with probability one half. Content is
    deterministic from (seed, split, index); augmentations from (seed, epoch, index) when training.

    Items add 'label' (class of the first object), 'labels' (multi-hot classes of the sounding objects), 'mask'
    (class + 1 on the pixels of sounding objects, 0 elsewhere) and 'sources' (max_objects, 48000): each object's
    own waveform, zero for silent or absent ones.
    """

    def __init__(self, num_clips=2048, num_classes=8, image_size=224, train=True, seed=0, split='train',
                 max_objects=3, return_waveform=False):
        super().__init__(image_size, train, seed, return_waveform)
        if not 1 <= num_classes <= 4 * len(SHAPES) or not 1 <= max_objects <= num_classes:
            raise ValueError(f"synthetic data: need 1 <= num_classes <= {4 * len(SHAPES)} and "
                             f"1 <= max_objects <= num_classes, got {num_classes} and {max_objects}")
        self.num_clips, self.num_classes, self.max_objects = num_clips, num_classes, max_objects
        self.split = {'train': 0, 'val': 1, 'test': 2}[split]
        self.size = self.image_fe.size
        self.classes = [f"{SHAPES[k % len(SHAPES)]}{k}" for k in range(num_classes)]
        self.multilabel = False
        hues = np.arange(num_classes) / num_classes
        self.colours = np.stack([hsv_to_rgb(h, 0.85 - 0.3 * (k % 2), 0.95) for k, h in enumerate(hues)])

    def __len__(self):
        return self.num_clips

    def load(self, index, g):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7919 + self.split, index]))
        H, W = self.size
        n = int(rng.integers(1, self.max_objects + 1))
        classes = rng.choice(self.num_classes, size=n, replace=False)
        sounding = np.r_[True, rng.random(n - 1) < 0.5]
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
        for j, (k, snd) in enumerate(zip(classes, sounding)):
            if snd:
                sources[j] = class_sound(k, rng, samples)
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
    """One object's sound: class k fixes the pitch (half an octave apart), the harmonic roll-off and the
    tremolo rate; onset, length, gain, phases and a slight detune are random. Read from a one-period wavetable
    (cheap: a clip costs milliseconds, so data loading keeps up with training on a CPU)."""
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


def hsv_to_rgb(h, s, v):
    """One HSV colour (components in [0, 1]) as an RGB array."""
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def build_dataset(data, image_size, train, seed=0, split='train', require=(), classes=None, skip_bad=False,
                  return_waveform=False, synthetic_clips=1536, synthetic_classes=8, task=None):
    """'synthetic' or a manifest path -> dataset; the one entry point the scripts use."""
    if data == 'synthetic':
        n = synthetic_clips if split == 'train' else max(synthetic_clips // 4, 64)
        return SyntheticAVDataset(n, synthetic_classes, image_size, train, seed, split,
                                  return_waveform=return_waveform)
    return ManifestDataset(data, image_size, train, seed, require, classes, skip_bad, return_waveform, task)

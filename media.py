"""Reading and writing media: audio files (soundfile), videos (PyAV, its own FFmpeg) and folders of frames."""
# Every reader raises a ValueError naming the file, so a bad clip is reported, never decoded into silence or grey
# pixels.
import itertools
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import ImageFile

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v', '.flv', '.mpg', '.mpeg')

# What soundfile raises on a file it cannot read, across its versions.
AUDIO_ERRORS = (soundfile.LibsndfileError, RuntimeError, TypeError)

# A truncated image must raise, never decode silently into grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# ---------------------------------------------------------------------------------------------------- audio files

def audio_info(path):
    """(sample rate, frames, channels) of an audio file, checked without decoding it (else a ValueError)."""
    # Refused: unreadable, empty, or shorter than its header says (a download cut short).
    try:
        info = soundfile.info(str(path))
    except AUDIO_ERRORS as e:
        raise ValueError(f"{path}: not a readable audio file ({str(e).splitlines()[0]})") from None
    if info.frames <= 0 or info.channels < 1:
        raise ValueError(f"{path}: no audio samples")
    if '(should be' in info.extra_info:  # libsndfile notes chunk sizes that run past the end of the file
        raise ValueError(f"{path}: truncated audio file (its header promises more data than the file holds)")
    return info.samplerate, info.frames, info.channels


def seeks_exactly(f):
    """Whether libsndfile seeks this open file to the exact sample: PCM (WAV, AIFF, FLAC), not MP3, OGG or ADPCM."""
    return f.subtype.startswith(('PCM_', 'FLOAT', 'DOUBLE', 'ULAW', 'ALAW'))


def read_audio(path):
    """An audio file as (float32 array (channels, samples) in [-1, 1], sample rate)."""
    try:
        x, rate = soundfile.read(str(path), dtype='float32', always_2d=True)
    except AUDIO_ERRORS as e:
        raise ValueError(f"{path}: could not decode audio ({str(e).splitlines()[0]})") from None
    return np.ascontiguousarray(x.T), rate


def write_audio(path, waveform, rate=16000):
    """Write a mono waveform (samples,) in [-1, 1]; the format follows the extension (16-bit PCM for .wav)."""
    x = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1, 1)
    subtype = 'PCM_16' if str(path).lower().endswith('.wav') else None
    soundfile.write(str(path), x, rate, subtype=subtype)


# ---------------------------------------------------------------------------------------------------- videos

class Video:
    """A video file with an audio track (a context manager): its duration, the audio of a time span and the frame
    shown at a time. Raises ValueError if it is unreadable or lacks a video track, an audio track or a duration."""

    def __init__(self, path):
        self.path = path
        try:
            self.container = av.open(str(path))
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
        try:
            for kind in ('video', 'audio'):
                if not getattr(self.container.streams, kind):
                    raise ValueError(f"{path}: no {kind} track")
            self.vstream, self.astream = self.container.streams.video[0], self.container.streams.audio[0]
            self.rate = self.astream.codec_context.sample_rate or self.astream.rate
            # from the stream's own header, else the container's
            self.duration = (float(self.astream.duration * self.astream.time_base) if self.astream.duration is not None
                             else self.container.duration / av.time_base if self.container.duration else None)
            if not self.duration or self.duration <= 0 or not self.rate:
                raise ValueError(f"{path}: its audio track has no duration or rate")
        except Exception:
            self.close()
            raise

    def audio(self, start=0.0, seconds=None):
        """(float32 (channels, samples), rate): the audio track from `start` for `seconds` (to its end if None)."""
        first = max(float(self.astream.start_time * self.astream.time_base), 0.0) if self.astream.start_time else 0.0
        self.container.seek(int(max(start + first, 0) / self.astream.time_base), stream=self.astream)
        chunks, t0 = [], None
        stop = None if seconds is None else start + first + seconds
        for frame in self.container.decode(self.astream):
            t = float(frame.pts * frame.time_base) if frame.pts is not None else (t0 or 0.0)
            if stop is not None and t >= stop:
                break
            x = frame.to_ndarray()
            if frame.format.is_packed:  # interleaved samples: (1, samples * channels) -> (channels, samples)
                x = x.reshape(-1, len(frame.layout.channels)).T
            if np.issubdtype(x.dtype, np.integer):
                x = x / float(np.iinfo(x.dtype).max)
            chunks.append(x.astype(np.float32))
            t0 = t if t0 is None else t0
        if not chunks:
            raise ValueError(f"{self.path}: no audio samples from {start:.2f} s")
        skip = max(int(round((start + first - t0) * self.rate)), 0)  # decoding starts at a frame boundary
        x = np.concatenate(chunks, axis=1)[:, skip:]
        return (x if seconds is None else x[:, :int(round(seconds * self.rate))]), self.rate

    def frame(self, t):
        """The frame shown at time t (seconds from the start) as a PIL RGB image, the last one past the end."""
        # Up to SKIP_BEFORE s before t the decoder skips frames nothing refers to (NONREF), which leaves frame t exact.
        first = max(float(self.vstream.start_time * self.vstream.time_base), 0.0) if self.vstream.start_time else 0.0
        shown, skipped = self._decode_to(t + first, skip=True)
        if skipped is not None and (shown is None or shown.pts is None or skipped > shown.pts):  # t was skipped
            shown, _ = self._decode_to(t + first, skip=False)
        if shown is None:
            raise ValueError(f"{self.path}: no video frame at {t:.2f} s")
        return shown.to_image()

    SKIP_BEFORE = 0.5

    def _decode_to(self, target, skip):
        """Decode from the key frame before `target` (seconds, stream time) to the last frame at or before it.
        Returns (that frame or None, the latest pts sent to the decoder while it skipped, or None)."""
        stream = self.vstream
        self.container.seek(int(max(target, 0) / stream.time_base), stream=stream)
        context, shown, skipped = stream.codec_context, None, None
        context.skip_frame = 'NONREF' if skip else 'DEFAULT'
        try:
            for packet in self.container.demux(stream):
                if context.skip_frame != 'DEFAULT':
                    if packet.pts is None or packet.pts * stream.time_base >= target - self.SKIP_BEFORE:
                        context.skip_frame = 'DEFAULT'  # from here on every frame is decoded
                    else:
                        skipped = packet.pts if skipped is None else max(skipped, packet.pts)
                for frame in packet.decode():
                    if shown is not None and frame.pts is not None and frame.pts * frame.time_base > target:
                        return shown, skipped
                    shown = frame
        finally:
            context.skip_frame = 'DEFAULT'
        return shown, skipped

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path, frames, fps, audio=None, audio_rate=44100, video_codec='libx264', audio_codec='aac',
                options=None):
    """Write (H, W, 3) uint8 `frames` shown 1 / fps apart and a float32 (channels, samples) `audio` in [-1, 1] (or
    None: silent), for tests and bench.py; `options` go to the video encoder (e.g. {'g': '250', 'bf': '2'})."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), 'w') as c:
        v = c.add_stream(video_codec, rate=fps, options=options or {})
        v.height, v.width = first.shape[:2]
        v.pix_fmt = 'yuv444p' if video_codec == 'ffv1' else 'yuv420p'
        if audio is not None:
            a = c.add_stream(audio_codec, rate=audio_rate)
            a.layout = 'mono' if len(audio) == 1 else 'stereo'
        for k, image in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='rgb24')
            frame.pts = k
            c.mux(v.encode(frame))
        c.mux(v.encode())
        if audio is None:
            return path
        planar = audio_codec == 'aac'  # AAC takes planar floats; PCM codecs interleaved 16-bit samples
        for k in range(0, audio.shape[1], 1024):
            chunk = audio[:, k:k + 1024]
            samples = chunk.astype(np.float32) if planar else (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format='fltp' if planar else 's16',
                                               layout=a.layout.name)
            frame.sample_rate, frame.pts = audio_rate, k
            c.mux(a.encode(frame))
        c.mux(a.encode())
    return path


def is_videos(path):
    """Whether `path` (a --data value) names one's own video or a folder of them, rather than a manifest."""
    return Path(path).is_dir() or Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_videos(path):
    """A video file, or the video files of a folder (sorted, recursively)."""
    path = Path(path)
    return [path] if path.is_file() else _sorted_files(path, path.rglob('*'), VIDEO_EXTENSIONS, 'video files')


def frames(folder):
    """Image files of a frame folder, sorted by name."""
    return _sorted_files(folder, Path(folder).iterdir(), IMAGE_EXTENSIONS, 'frames')


def _sorted_files(folder, paths, extensions, what):
    files = sorted(p for p in paths if p.suffix.lower() in extensions)
    if not files:
        raise ValueError(f"{folder}: no {what} ({', '.join(extensions)})")
    return files

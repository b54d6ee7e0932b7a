"""Download the clips of VGGSound or AudioSet from YouTube with yt-dlp (optional: `pip install yt-dlp`).

    python prepare/download.py --list vggsound.csv --out DIR [--workers 4] [--sleep 2] [--rate_limit 1M]
    python prepare/download.py --list eval_segments.csv --format audioset --out DIR

Each clip is saved as DIR/<youtube id>_<start, 6 digits>.mp4 (---g-f_I2yQ_000001.mp4), the name that
prepare/vggsound.py and prepare/audioset.py look for: the video is fetched at 360p or less as one file with its
sound (no system FFmpeg needed), then the clip's 10 s (or the segment's span) are cut and re-encoded with PyAV
(H.264, AAC mono). Resumable: a clip whose file exists is skipped, and so is one recorded in DIR/unavailable.csv
(youtube_id,start,reason; --retry tries those again). Videos are removed from YouTube over time, so expect a
part of any list to be unavailable; the report says which and why ("Video unavailable", "Private video", ...).
Be gentle with the site: few --workers, a --sleep between downloads, and --rate_limit.
"""
import argparse
import csv
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `python prepare/download.py`
from media import Video  # noqa: E402

import audioset  # noqa: E402  (prepare/ is on the path when this script runs)
import vggsound  # noqa: E402

UNAVAILABLE_COLUMNS = ['youtube_id', 'start', 'reason']


def read_list(path, fmt):
    """[(youtube id, start, seconds)] of a VGGSound CSV (10 s clips) or an AudioSet segment list, read by the
    dataset's own preparation script."""
    if fmt == 'vggsound':
        return [(ytid, start, 10.0) for ytid, start, _, _ in vggsound.read_list(path)]
    return [(ytid, start, end - start) for ytid, start, end, _ in audioset.read_segments(path)]


def clip_name(ytid, start):
    """The file name of a clip, as the common VGGSound downloads name it."""
    return f"{ytid}_{int(round(start)):06d}.mp4"


def download_video(ytid, folder, rate_limit=None):
    """Fetch YouTube video `ytid` into `folder` (360p or less, one file with picture and sound) with yt-dlp;
    returns its path. Raises RuntimeError with yt-dlp's reason when the video is unavailable."""
    try:
        import yt_dlp
    except ImportError:
        raise SystemExit("prepare/download.py needs yt-dlp: pip install yt-dlp") from None
    opts = {'format': 'best[height<=360][vcodec!=none][acodec!=none]/best[vcodec!=none][acodec!=none]',
            'outtmpl': str(Path(folder) / '%(id)s.%(ext)s'), 'quiet': True, 'no_warnings': True, 'noprogress': True,
            'ratelimit': rate_limit}
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            ydl.download([f'https://www.youtube.com/watch?v={ytid}'])
    except yt_dlp.utils.DownloadError as e:
        raise RuntimeError(str(e).replace('ERROR: ', '').replace(f'[youtube] {ytid}: ', '').splitlines()[0]) from None
    files = [p for p in Path(folder).iterdir() if p.name.startswith(ytid)]
    if not files:
        raise RuntimeError('yt-dlp wrote no file')
    return files[0]


def trim(src, dst, start, seconds):
    """Write [start, start + seconds) of video `src` to `dst` (mp4: H.264 at the source's size and frame rate,
    AAC mono at the source's sample rate), the span's frames re-timed from 0."""
    with Video(src) as video:
        waveform, rate = video.audio(start, seconds)
        stream = video.vstream
        fps = stream.average_rate or Fraction(25)
        first = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        with av.open(str(dst), 'w', format='mp4') as out:
            v = out.add_stream('libx264', rate=fps)
            v.width, v.height, v.pix_fmt = stream.codec_context.width, stream.codec_context.height, 'yuv420p'
            a = out.add_stream('aac', rate=rate)
            a.layout = 'mono'
            video.container.seek(int(max(start + first, 0) / stream.time_base), stream=stream)
            last = -1
            for frame in video.container.decode(stream):
                t = float(frame.pts * frame.time_base) - first - start if frame.pts is not None else 0.0
                if t >= seconds:
                    break
                pts = int(round(t * fps))
                if t < 0 or pts <= last:  # before the span (decoding starts at a key frame), or a duplicate
                    continue
                new = frame.reformat(format='yuv420p')
                new.pts, new.time_base, last = pts, 1 / Fraction(fps), pts
                out.mux(v.encode(new))
            out.mux(v.encode())
            x = np.ascontiguousarray(waveform.mean(0, keepdims=True, dtype=np.float32))
            for k in range(0, x.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, k:k + 1024]), format='fltp',
                                                   layout='mono')
                frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
                out.mux(a.encode(frame))
            out.mux(a.encode())
    if last < 0:
        raise ValueError(f"{src}: no video frames in [{start:g}, {start + seconds:g}) s")


def fetch(ytid, start, seconds, path, rate_limit=None):
    """Download clip (ytid, start, seconds) to `path`, written under a temporary name and renamed when complete.
    Tests replace download_video with a local copy; everything else here runs as it would on real downloads."""
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        source = download_video(ytid, tmp, rate_limit)
        part = Path(tmp) / 'clip.mp4'
        trim(source, part, start, seconds)
        part.rename(path)


def parse_rate(text):
    """'500K', '2M', '1.5M' or a number of bytes per second -> bytes per second (None for '')."""
    if not text:
        return None
    scale = {'K': 1e3, 'M': 1e6, 'G': 1e9}.get(text[-1].upper(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate_limit: {text!r} is not a rate like 500K or 2M") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--list', nargs='+', required=True, help="the dataset's lists: vggsound.csv, or AudioSet segment "
                                                            "lists with --format audioset")
    p.add_argument('--format', choices=['vggsound', 'audioset'], default='vggsound', help='(default: vggsound)')
    p.add_argument('--out', required=True, help='folder for the clips and unavailable.csv')
    p.add_argument('--workers', type=int, default=4, help='downloads at a time (default: 4)')
    p.add_argument('--sleep', type=float, default=1.0, help='seconds each worker waits between downloads (default: 1)')
    p.add_argument('--rate_limit', type=parse_rate, default=None, help='bytes per second per download, e.g. 2M '
                                                                       '(default: no limit)')
    p.add_argument('--retry', action='store_true', help='try the clips in unavailable.csv again')
    p.add_argument('--limit', type=int, default=0, help='at most this many clips from the lists (default: all)')
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = [c for path in args.list for c in read_list(path, args.format)]
    clips = list(dict.fromkeys(clips))[:args.limit or None]
    report = out / 'unavailable.csv'
    known = {}
    if report.exists():
        with open(report, newline='') as f:
            known = {(r['youtube_id'], round(float(r['start']))): r['reason'] for r in csv.DictReader(f)}
    todo = [c for c in clips if not (out / clip_name(c[0], c[1])).exists()
            and (args.retry or (c[0], round(c[1])) not in known)]
    if args.retry:
        known = {k: r for k, r in known.items() if k not in {(c[0], round(c[1])) for c in todo}}
    lock = threading.Lock()

    def one(clip):
        ytid, start, seconds = clip
        try:
            fetch(ytid, start, seconds, out / clip_name(ytid, start), args.rate_limit)
            reason = None
        except (RuntimeError, ValueError, OSError, av.error.FFmpegError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if reason:
            with lock:
                known[(ytid, round(start))] = reason
                write_report(report, known)  # after every failure, so that an interrupted run keeps them
        time.sleep(args.sleep)
        return reason

    print(f"{len(clips)} clips listed: {len(clips) - len(todo)} done or unavailable before, {len(todo)} to fetch")
    with ThreadPoolExecutor(max(args.workers, 1)) as pool:
        reasons = list(tqdm(pool.map(one, todo), total=len(todo), desc='download', dynamic_ncols=True))
    write_report(report, known)
    have = sum((out / clip_name(c[0], c[1])).exists() for c in clips)
    print(f"{have} of {len(clips)} clips in {out}; unavailable: {len(known)} (this run: "
          f"{sum(r is not None for r in reasons)}), listed with the reasons in {report}")
    return have, known


def write_report(path, known):
    """DIR/unavailable.csv: one row per clip that could not be fetched, with the reason."""
    tmp = Path(str(path) + '.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(UNAVAILABLE_COLUMNS)
        w.writerows([ytid, f'{start:g}', reason] for (ytid, start), reason in sorted(known.items()))
    tmp.replace(path)


if __name__ == '__main__':
    main()

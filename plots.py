"""Pictures for people to look at: training curves (matplotlib) and picture grids (PIL)."""
# The curves use matplotlib's Agg backend, no display needed. The grids (reconstructions of the masked auto-encoder,
# maps over their images) are put together pixel for pixel with PIL, so each tile is shown at the model's input
# resolution.
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from data import clip_generator, denormalize
from mae import patchify, unpatchify
from training import read_log


def plot_log(log_path, png_path, title='training'):
    """PNG of a log.jsonl: every loss against the optimizer step and, in a second panel, the k-NN accuracies
    ('knn_*', the monitor of paper Fig. 3) against the epoch. Returns the names of the curves drawn."""
    rows = read_log(log_path)
    losses = sorted({k for r in rows for k in r if k.startswith('loss')}, key=lambda k: (k != 'loss', k))
    knn = sorted({k for r in rows for k in r if k.startswith('knn_')})
    if not losses:
        return []
    fig = Figure(figsize=(11 if knn else 7, 4), layout='constrained')
    axes = fig.subplots(1, 2 if knn else 1, squeeze=False)[0]
    for k in losses:
        axes[0].plot(*zip(*[(r['step'], r[k]) for r in rows if k in r]), label=k, lw=2 if k == 'loss' else 1.2)
    axes[0].set(xlabel='optimizer step', ylabel='loss', title=f'{title}: loss')
    for k in knn:
        axes[1].plot(*zip(*[(r['epoch'], r[k]) for r in rows if k in r]), marker='o', label=k.replace('knn_', ''))
    if knn:
        axes[1].set(xlabel='epoch', ylabel='k-NN accuracy', title='k-NN accuracy on held-out clips (Fig. 3)')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(png_path, dpi=100)
    return losses + knn


def line_plot(series, path, title, xlabel, ylabel, errors=None):
    """PNG of named curves {name: (xs, ys)}, with a shaded band of +-errors[name] where given (spread over seeds)."""
    fig = Figure(figsize=(7, 4), layout='constrained')
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker='o', label=name)
        if errors and name in errors:
            lo = np.asarray(ys) - np.asarray(errors[name])
            ax.fill_between(xs, lo, lo + 2 * np.asarray(errors[name]), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def colormap(x, lo=None, hi=None, name='magma'):
    """2-D array -> uint8 RGB through a matplotlib colour map, for spectrograms and heat maps."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = x.min() if lo is None else lo, x.max() if hi is None else hi
    v = np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1)
    return (colormaps[name](v)[..., :3] * 255).round().astype(np.uint8)


def save_grid(rows, title, path):
    """PNG of picture rows under a one-line title: each row a list of (H, W, 3) uint8 tiles, framed in white."""
    h = max(t.shape[0] for row in rows for t in row)
    pad = lambda t: np.pad(t, ((2, 2 + h - t.shape[0]), (2, 2), (0, 0)), constant_values=255)
    rows = [np.concatenate([pad(t) for t in row], 1) for row in rows]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    out = Image.fromarray(np.pad(np.concatenate(rows, 0), ((18, 0), (0, 0), (0, 0)), constant_values=255))  # title
    ImageDraw.Draw(out).text((4, 3), title, fill='black')
    out.save(path)



def paste_prediction(x, pred, mask, patch_size, norm_pix_loss=True):
    """An input with its hidden patches replaced by the prediction (for pictures)."""
    # Predictions of normalised patches are mapped back with each true patch's mean and standard deviation, as
    # MAE's visualisation does.
    target = patchify(x, patch_size)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    grid = (x.shape[2] // patch_size, x.shape[3] // patch_size)
    out = torch.where(mask.unsqueeze(-1).bool(), pred.to(target.dtype), target)
    return unpatchify(out, grid, patch_size, x.shape[1])


@torch.no_grad()
def save_reconstructions(mae, dataset, path, seed, n=4):
    """PNG: for n clips, image input / masked / reconstruction and spectrogram input / masked / reconstruction."""
    # The masks are fixed per clip (stream 1 of the clip's generator), so pictures of one run are comparable.
    was_training = mae.training
    mae.eval()
    items = [it for it in (dataset[i] for i in range(min(2 * n, len(dataset)))) if 'skipped' not in it][:n]
    device = next(mae.parameters()).device
    image, audio = (torch.stack([it[m] for it in items]).to(device) for m in ('image', 'audio'))
    gens = [clip_generator(seed, 0, it['index'], stream=1) for it in items]
    noise_i = torch.stack([torch.rand(mae.encoder.image.num_patches, generator=g) for g in gens]).to(device)
    noise_a = torch.stack([torch.rand(mae.encoder.audio.num_patches, generator=g) for g in gens]).to(device)
    out = mae.forward(image, audio, noise_i, noise_a)  # eager, even when training compiled it (--compile)
    p = mae.patch_size
    rows = [[] for _ in items]  # per clip: the image triplet, a spacer, the spectrogram triplet
    for x, m in ((image, 'image'), (audio, 'audio')):
        if f'pred_{m}' not in out:  # a uni-modal MAE reconstructs one modality
            continue
        pred, mask, is_image = out[f'pred_{m}'], out[f'mask_{m}'], m == 'image'
        recon = paste_prediction(x, pred.float(), mask, p, mae.norm_pix_loss)
        grid = (x.shape[2] // p, x.shape[3] // p)
        hidden = mask.reshape(-1, *grid).repeat_interleave(p, 1).repeat_interleave(p, 2).bool().cpu().numpy()
        for j in range(len(items)):
            if is_image:
                shown = [denormalize(x[j]), denormalize(x[j]), denormalize(recon[j])]
                shown[1][hidden[j]] = 128
                shown.append(np.full((1, 4, 3), 255, np.uint8))  # a gap before the spectrograms
            else:  # low frequencies at the bottom; one colour scale per clip
                spec = x[j, 0].flip(0).cpu().numpy()
                lo, hi = spec.min(), spec.max()
                masked = np.where(hidden[j][::-1], lo, spec)
                shown = [colormap(s, lo, hi) for s in (spec, masked, recon[j, 0].flip(0).float().cpu().numpy())]
            rows[j] += shown
    save_grid(rows, "image: input | masked | reconstruction      spectrogram: input | masked | reconstruction", path)
    mae.train(was_training)


def overlay_grid(images, maps, masks, path, title):
    """PNG: each clip as image | predicted map (0..1) over the image | ground truth (where given) over it."""
    rows = []
    for k, (img, m) in enumerate(zip(images, maps)):
        rgb = denormalize(img).astype(np.float32)
        heat = colormap(np.asarray(m, np.float32), 0, 1, 'jet').astype(np.float32)
        blend = lambda over, a: (rgb * (1 - a) + over * a).astype(np.uint8)
        row = [rgb.astype(np.uint8), blend(heat, 0.5)]
        if masks is not None:
            gt = np.asarray(masks[k]).astype(bool)[..., None]
            row.append(blend(np.where(gt, np.array([40, 220, 60], np.float32), rgb), 0.5))
        rows.append(row)
    save_grid(rows, title, path)


def save_overlay(image, prob, path, title, size=384):
    """PNG of one clip, enlarged to `size` pixels: its frame, and the map (0..1) over it as a heat map."""
    rgb = Image.fromarray(denormalize(image)).resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(colormap(np.asarray(prob, np.float32), 0, 1, 'jet')).resize((size, size), Image.BILINEAR)
    save_grid([[np.asarray(rgb), np.asarray(Image.blend(rgb, heat, 0.45))]], title, path)

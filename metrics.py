"""Evaluation metrics of the downstream tasks (paper Sec. 4.2, App. A); their conventions: docs/metrics.md."""
# Classification, nearest neighbours and retrieval, localization, segmentation, separation; each tested on worked
# examples.
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Fraction of samples whose class is among the k highest scores, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == targets[:, None]
    return {k: hit[:, :k].any(1).float().mean().item() for k in ks}


def average_precision(scores, targets):
    """Average precision of one class: the mean precision at the rank of each positive (ties broken by order)."""
    order = np.argsort(-np.asarray(scores), kind='stable')
    t = np.asarray(targets)[order] > 0
    if not t.any():
        return float('nan')
    precision = np.cumsum(t) / np.arange(1, len(t) + 1)
    return float(precision[t].mean())


def roc_auc(scores, targets):
    """ROC-AUC of one class: the probability that a positive outranks a negative (ties count one half), from ranks."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    n_pos, n_neg = t.sum(), (~t).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True, equal_nan=False)  # groups of tied scores
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]  # a tie group's average rank (1-based)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_metrics(scores, targets):
    """mAP and ROC-AUC averaged over the classes that have positives (and negatives), as AudioSet is scored."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    ap = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    auc = [roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    return {'mAP': float(np.nanmean(ap)), 'AUC': float(np.nanmean(auc))}


def knn_predict(bank, bank_labels, queries, k, temperature, num_classes):
    """Weighted k-nearest-neighbour vote on cosine similarity, weights exp(sim / T) (as in DINO)."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    sim, idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), num_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
    return votes.argmax(1)


def nearest_neighbour_loo(feats, labels):
    """The official k-NN probe (Fig. 3): each clip takes the label of its nearest other clip by cosine similarity;
    {'nn_<feature>': accuracy} and 'nn_all', or 'nn_<feature>_mAP' / '_AUC' for multi-label (N, C) labels."""
    # One probe per feature of `feats` ({name: (N, D)}) and one on 'all' (their summed similarities).
    sims = {k: F.normalize(v.float(), dim=1) @ F.normalize(v.float(), dim=1).T for k, v in feats.items()}
    sims['all'] = sum(sims.values())
    out = {}
    for name, sim in sims.items():
        # The official code takes the second-best match; excluding the clip itself differs only for identical features.
        sim = sim.clone().fill_diagonal_(-float('inf'))
        score, nn = sim.max(dim=1)
        # Single-label: accuracy 'nn_<name>'; multi-label (N, C): mAP and AUC of the neighbour's labels weighted by
        # its similarity, 'nn_<name>_mAP' / '_AUC'.
        if labels.ndim == 1:
            out[f'nn_{name}'] = (labels[nn] == labels).float().mean().item()
        else:
            m = multilabel_metrics((labels[nn].float() * score[:, None]).numpy(), labels.numpy())
            out.update({f'nn_{name}_{k}': v for k, v in m.items()})
    return out


def recall_at_k(bank, bank_labels, queries, query_labels, ks=(1, 5, 10)):
    """Retrieval (Fig. 3): the fraction of queries with a clip of their class among their k nearest in the bank."""
    sim = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    hits = bank_labels[sim.topk(min(max(ks), len(bank)), dim=1).indices] == query_labels[:, None]
    return {f'R@{k}': hits[:, :k].any(1).float().mean().item() for k in ks}


def cross_modal_retrieval(sim, prefix=''):
    """CAV-MAE's retrieval (src/retrieval.py): sim[i, j] scores query i against item j, query i's match is item i."""
    # Its rank is strict, the number of items scored above the match (an item tied with the match is not above it;
    # the official count can list a tied query twice); R@k = the fraction ranked below k, MR = the median rank + 1.
    ranks = (sim > sim.diagonal()[:, None]).sum(1).cpu().numpy()
    return {**{f'{prefix}R@{k}': float((ranks < k).mean()) for k in (1, 5, 10)},
            f'{prefix}MR': float(np.median(ranks) + 1)}


def consensus_iou(region, gt):
    """cIoU of each clip (Flickr-SoundNet, LVS / EZ-VSL evaluation): the region (0/1) against the annotators'
    consensus map `gt` in [0, 1] (0.5 where half their boxes cover a pixel); with a 0/1 truth, the usual IoU."""
    region, gt = region.flatten(1).float(), gt.flatten(1).float()
    return (region * gt).sum(1) / (gt.sum(1) + (region * (gt == 0)).sum(1)).clamp_min(1e-12)


def top_half(maps):
    """The Flickr-SoundNet evaluation's region: the pixels of a map above its median value (the top half)."""
    flat = maps.flatten(1)
    return (flat > flat.median(1, keepdim=True).values).reshape(maps.shape)


def pointing_game(maps, gt):
    """The pointing game (Zhang et al., ECCV 2016): the fraction of clips whose map peaks inside the truth (gt > 0)."""
    # Needing no threshold, it tells whether a map that never reaches a region still points at the right place.
    peak = maps.flatten(1).argmax(1)
    return gt.flatten(1).gather(1, peak[:, None])[:, 0].gt(0).float().mean().item()


def localization_metrics(region, gt, iou_threshold=0.5):
    """Flickr-SoundNet protocol on regions (0/1) and truth maps: cIoU = the fraction of clips whose consensus IoU is
    >= the threshold; AUC = the area under that fraction over thresholds 0, 0.05, ..., 1; IoU = the mean."""
    iou, thresholds = consensus_iou(region, gt), torch.linspace(0, 1, 21)
    success = torch.stack([(iou >= t).float().mean() for t in thresholds])
    auc = torch.trapezoid(success, thresholds).item()
    return {'cIoU': (iou >= iou_threshold).float().mean().item(), 'AUC': auc, 'IoU': iou.mean().item()}


def f_beta(tp, predicted, actual, beta2=0.3):
    """F-score with beta^2 (0.3 in the saliency and AVSBench literature), from counts; 0 where undefined."""
    precision, recall = tp / (predicted + 1e-20), tp / (actual + 1e-20)
    return (1 + beta2) * precision * recall / (beta2 * precision + recall + 1e-20)


def binary_segmentation_metrics(prob, gt, beta2=0.3):
    """AVSBench S4 metrics of probabilities `prob` and 0/1 truth `gt` (a map per frame), as docs/metrics.md defines."""
    # Two conventions: the official one (`mIoU`, `F`: eval_avsegm.py, frames with an empty truth skipped) and
    # AVSBench's (`mIoU_fg`, `F_fg`: utility.py, which picks F's threshold per video of 5 frames, here for the
    # whole set).
    prob, gt = prob.flatten(1).float(), gt.flatten(1).bool()
    pred, empty = prob > 0.5, gt.sum(1) == 0
    out = {'mIoU_fg': torch.where(empty, (~pred).float().mean(1), iou_of(pred, gt)).mean().item()}
    prob, gt, pred = prob[~empty], gt[~empty], pred[~empty]
    if not len(gt):
        return {'mIoU': float('nan'), 'F': float('nan'), **out, 'F_fg': float('nan')}
    per_class = []
    for p, g in ((~pred, ~gt), (pred, gt)):  # background, foreground
        seen = (p | g).any(1)
        per_class.append(iou_of(p, g)[seen].sum() / seen.sum().clamp_min(1))
    out['mIoU'] = torch.stack(per_class).mean().item()

    def curve(ts):  # (thresholds, frames) F-scores
        return torch.stack([f_beta(((prob >= t) & gt).sum(1).float(), (prob >= t).sum(1).float(),
                                   gt.sum(1).float(), beta2) for t in ts])

    out['F'] = curve(torch.linspace(0, 1 - 1e-10, 256)).max(0).values.mean().item()
    out['F_fg'] = curve(torch.linspace(0, 1 - 1e-10, 255)).mean(1).max().item()
    return {k: out[k] for k in ('mIoU', 'F', 'mIoU_fg', 'F_fg')}


def iou_of(pred, gt):
    """IoU of 0/1 maps, one per row (0 where both are empty)."""
    return (pred & gt).sum(1).float() / (pred | gt).sum(1).float().clamp_min(1)


def semantic_segmentation_metrics(pred, gt, num_classes, beta2=0.3):
    """AVSS metrics of class maps (0 = background), each the mean over the classes seen (docs/metrics.md)."""
    # The official convention (`mIoU`, `F`: eval_avsegm.py): per frame and class, each class averaged over the
    # frames where it is seen, background-only frames skipped.
    keep = (gt.flatten(1) > 0).any(1)
    p, g = pred.flatten(1)[keep], gt.flatten(1)[keep]
    iou_sum, f_sum, count = torch.zeros(num_classes), torch.zeros(num_classes), torch.zeros(num_classes)
    for c in range(num_classes):
        pc, gc = p == c, g == c
        seen = (pc | gc).any(1)
        iou_sum[c] = iou_of(pc, gc)[seen].sum()
        f_sum[c] = f_beta((pc & gc).sum(1).float(), pc.sum(1).float(), gc.sum(1).float(), beta2)[seen].sum()
        count[c] = seen.sum()
    seen = count > 0
    out = {'mIoU': (iou_sum[seen] / count[seen]).mean().item() if seen.any() else float('nan'),
           'F': (f_sum[seen] / count[seen]).mean().item() if seen.any() else float('nan')}
    # Pooled (`mIoU_pooled`, `F_pooled`): one confusion matrix over every pixel.
    conf = torch.bincount(gt.flatten() * num_classes + pred.flatten(), minlength=num_classes ** 2)
    conf = conf.reshape(num_classes, num_classes).double()
    tp, fp, fn = conf.diag(), conf.sum(0) - conf.diag(), conf.sum(1) - conf.diag()
    present = (tp + fp + fn) > 0
    out['mIoU_pooled'] = (tp / (tp + fp + fn).clamp_min(1))[present].mean().item()
    out['F_pooled'] = f_beta(tp, tp + fp, tp + fn, beta2)[present].mean().item()
    return out


def separation_metrics(references, estimates):
    """BSS-eval v3's SDR, SIR and SAR of references and estimates (sources, samples), in matching order."""
    # mir_eval.separation.bss_eval_sources, 512-tap distortion filters: what the separation literature reports.
    from mir_eval.separation import bss_eval_sources
    with warnings.catch_warnings():  # mir_eval 0.8 marks it deprecated; requirements.txt keeps it below 0.9
        warnings.simplefilter('ignore', FutureWarning)
        sdr, sir, sar, _ = bss_eval_sources(np.asarray(references, np.float64),
                                            np.asarray(estimates, np.float64), compute_permutation=False)
    return {'SDR': sdr, 'SIR': sir, 'SAR': sar}

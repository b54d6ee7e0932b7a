"""Evaluation metrics of the downstream tasks (paper Sec. 4.2, App. A), each tested on worked examples.

    classification   top-k accuracy; mAP and ROC-AUC over classes (multi-label, AudioSet)
    nearest neighbours  weighted k-NN vote; the official 1-NN leave-one-out probe; retrieval recall at k (Fig. 3)
    localization     consensus IoU at a threshold and the area under the success curve (Flickr-SoundNet)
    segmentation     mIoU and F-score with beta^2 = 0.3 (AVSBench S4 and AVSS)
    separation       SDR, SIR, SAR from BSS-eval v3 (mir_eval), as the separation literature reports them
"""
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
    """Average precision of one class: the mean of the precision at the rank of each positive (scores sorted
    high to low; ties broken by order)."""
    order = np.argsort(-np.asarray(scores), kind='stable')
    t = np.asarray(targets)[order] > 0
    if not t.any():
        return float('nan')
    precision = np.cumsum(t) / np.arange(1, len(t) + 1)
    return float(precision[t].mean())


def roc_auc(scores, targets):
    """Area under the ROC curve of one class: the probability that a positive outranks a negative (ties count
    one half), the Mann-Whitney statistic from average ranks."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    n_pos, n_neg = t.sum(), (~t).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    order = np.argsort(s, kind='stable')
    ranks = np.empty(len(s))
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2  # average rank (1-based) of a tie group
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
    """The official k-NN probe (paper Fig. 3): each clip of the evaluation set takes the label of its nearest
    other clip (1-NN, leave-one-out) by cosine similarity, for each feature in `feats` ({name: (N, D)}) and for
    'all', the sum of their similarities. Single-label: accuracy ('nn_<name>'). Multi-label (labels (N, C)):
    mAP and AUC of the neighbour's labels weighted by its similarity ('nn_<name>_mAP', 'nn_<name>_AUC').

    The official code takes the second-best match, assuming the best is the clip itself; here the clip itself is
    excluded, which is the same unless two clips have identical features."""
    sims = {k: F.normalize(v.float(), dim=1) @ F.normalize(v.float(), dim=1).T for k, v in feats.items()}
    sims['all'] = sum(sims.values())
    out = {}
    for name, sim in sims.items():
        sim = sim.clone().fill_diagonal_(-float('inf'))
        score, nn = sim.max(dim=1)
        if labels.ndim == 1:
            out[f'nn_{name}'] = (labels[nn] == labels).float().mean().item()
        else:
            m = multilabel_metrics((labels[nn].float() * score[:, None]).numpy(), labels.numpy())
            out.update({f'nn_{name}_{k}': v for k, v in m.items()})
    return out


def recall_at_k(bank, bank_labels, queries, query_labels, ks=(1, 5, 10)):
    """Retrieval (Fig. 3): the fraction of queries with a clip of their class among their k nearest neighbours
    in the bank, by cosine similarity."""
    sim = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    hits = bank_labels[sim.topk(min(max(ks), len(bank)), dim=1).indices] == query_labels[:, None]
    return {f'R@{k}': hits[:, :k].any(1).float().mean().item() for k in ks}


def localization_metrics(pred, gt, iou_threshold=0.5):
    """Flickr-SoundNet protocol: per-clip IoU of the predicted region with the ground truth; cIoU = the fraction
    of clips with IoU >= threshold; AUC = area under that fraction as the threshold goes 0 -> 1 (21 points)."""
    pred, gt = pred.bool().flatten(1), gt.bool().flatten(1)
    iou = (pred & gt).sum(1).float() / (pred | gt).sum(1).clamp_min(1).float()
    thresholds = torch.linspace(0, 1, 21)
    success = torch.stack([(iou >= t).float().mean() for t in thresholds])
    auc = torch.trapezoid(success, thresholds).item()
    return {'cIoU': (iou >= iou_threshold).float().mean().item(), 'AUC': auc, 'IoU': iou.mean().item()}


def binary_segmentation_metrics(prob, gt, beta2=0.3):
    """AVSBench S4: mIoU of masks at probability 0.5 (an empty truth and empty prediction count as 1); F-score
    with beta^2 = 0.3, averaged over the images with an object at each of 255 thresholds, the best reported."""
    prob, gt = prob.flatten(1).float(), gt.flatten(1).bool()
    pred = prob > 0.5
    inter, union = (pred & gt).sum(1).float(), (pred | gt).sum(1).float()
    empty = gt.sum(1) == 0
    inter = torch.where(empty, (~pred & ~gt).sum(1).float(), inter)
    union = torch.where(empty, torch.full_like(union, gt.shape[1]), union)
    miou = (inter / (union + 1e-7)).mean().item()
    fs = []
    prob, gt = prob[~empty], gt[~empty]  # AVSBench leaves images without an object out of the F-score
    for t in torch.linspace(0, 1 - 1e-10, 255):
        p = prob >= t
        tp = (p & gt).sum(1).float()
        precision, recall = tp / (p.sum(1) + 1e-20), tp / (gt.sum(1) + 1e-20)
        fs.append(((1 + beta2) * precision * recall / (beta2 * precision + recall + 1e-20)).mean())
    return {'mIoU': miou, 'F': torch.stack(fs).max().item() if len(gt) else float('nan')}


def semantic_segmentation_metrics(pred, gt, num_classes, beta2=0.3):
    """AVSS: IoU and F-score (beta^2 = 0.3) per class from the confusion over all pixels, averaged over the
    classes present in the truth or the prediction (background included)."""
    conf = torch.bincount(gt.flatten() * num_classes + pred.flatten(), minlength=num_classes ** 2)
    conf = conf.reshape(num_classes, num_classes).double()
    tp, fp, fn = conf.diag(), conf.sum(0) - conf.diag(), conf.sum(1) - conf.diag()
    present = (tp + fp + fn) > 0
    iou = tp / (tp + fp + fn).clamp_min(1)
    precision, recall = tp / (tp + fp).clamp_min(1), tp / (tp + fn).clamp_min(1)
    f = (1 + beta2) * precision * recall / (beta2 * precision + recall).clamp_min(1e-20)
    return {'mIoU': iou[present].mean().item(), 'F': f[present].mean().item()}


def separation_metrics(references, estimates):
    """BSS-eval v3 (mir_eval.separation.bss_eval_sources, 512-tap distortion filters), the SDR, SIR and SAR the
    separation literature reports: references and estimates (sources, samples), in matching order."""
    from mir_eval.separation import bss_eval_sources
    with warnings.catch_warnings():  # mir_eval 0.8 marks it deprecated; requirements.txt keeps it below 0.9
        warnings.simplefilter('ignore', FutureWarning)
        sdr, sir, sar, _ = bss_eval_sources(np.asarray(references, np.float64),
                                            np.asarray(estimates, np.float64), compute_permutation=False)
    return {'SDR': sdr, 'SIR': sir, 'SAR': sar}

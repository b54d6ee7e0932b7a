"""CAV-MAE (Gong et al., ICLR 2023), the contrastive audio-visual masked auto-encoder DeepAVFusion is compared with
(its Table 3), in this project's front-end and downstream protocol.

    contrastive_loss   Eq. 7: InfoNCE between the pooled uni-modal streams of masked clips; also the optional
                       term on DeepAVFusion itself (pretrain.py --contrast_weight)

The official code (github.com/YuanGongND/cav-mae, src/models/cav_mae.py) computes Eq. 7 visual-to-audio (for each
image, a softmax over the batch's audios), at temperature 0.05, without a projection head, on the mean of the
visible tokens, with the other clips of the same GPU as negatives (DataParallel, no gather).
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def contrastive_loss(c_image, c_audio, tau=0.05, bidirectional=False, gather=False, group=0):
    """Eq. 7 on pooled features (B, D) of paired clips: -mean_i log softmax_j(cos(v_i, a_j) / tau)[i], visual
    anchors over audios (the official direction), or with `bidirectional` the mean of both directions. Negatives:
    the other clips of this process (the official code's, per GPU), of consecutive groups of `group` clips (the
    official contrastive batch on any number of processes, as they would share the batch out; 0: the whole
    batch), or with `gather` of every process
    (all_gather with gradients). Returns (loss, accuracy: the fraction of images whose nearest audio is theirs)."""
    # In float64: a loss near 0 is a difference of logits of 1 / tau, which float32 rounds away.
    v, a = F.normalize(c_image.double(), dim=-1), F.normalize(c_audio.double(), dim=-1)
    if gather and dist.is_initialized():
        v, a = torch.cat(dist_fn.all_gather(v)), torch.cat(dist_fn.all_gather(a))
    n = group or len(v)
    if len(v) % n:
        raise ValueError(f"contrastive negatives in groups of {n} clips: the batch of {len(v)} does not divide")
    # Clip i in group i mod (B / n): the clips torchrun's processes would share out (training.RunSampler).
    v, a = (x.view(n, -1, x.shape[-1]).transpose(0, 1) for x in (v, a))
    logits = v @ a.transpose(1, 2) / tau  # (groups, images, audios)
    target = torch.arange(n, device=v.device).expand(len(v), n)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    if bidirectional:
        loss = (loss + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.flatten())) / 2
    return loss.float(), (logits.argmax(-1) == target).float().mean()

"""A light two-branch knee CNN in the spirit of Tiulpin et al. 2018 (Sci Rep 8:1727), trainable from scratch on CPU.

The two halves of the joint (in right-knee orientation: image-left and image-right of the crop centre) go through
ONE shared small CNN; the image-right patch is mirrored first, so both patches show the tibial spines on the same
side and the shared weights see alike structures. Each branch's feature map is average-pooled and the two vectors
are concatenated (`num_features` = 2 x the last width), so the model behaves like any headless timm backbone
(`forward(x) -> (B, num_features)`) and the task heads of `MultiTaskNet` sit on top unchanged.

Grad-CAM: the branches' maps are folded back into image layout by `PatchFold` (mirrored patch un-mirrored, placed at
its rows), so hooking `model.fold` gives one map per image aligned with the input, with no reshape transform.

Compute: at 224 px with the default widths about 0.07 GMAC per image (ResNet18 at 160 px: 0.93), 0.3 M parameters;
on two AVX2 cores in fp32 it trains about 3x faster than ResNet18 at 160 px (`bench/train_throughput.py`).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class PatchFold(nn.Module):
    """(2B, C, h, w) branch maps -> (B, C, H/s, 2w) map in image layout (zeros outside the patch rows)."""

    def forward(self, feats: torch.Tensor, batch: int, row0: int, rows_total: int) -> torch.Tensor:
        left, right = feats[:batch], feats[batch:].flip(-1)
        c, h, w = left.shape[1:]
        canvas = feats.new_zeros(batch, c, rows_total, 2 * w)
        canvas[:, :, row0:row0 + h, :w] = left
        canvas[:, :, row0:row0 + h, w:] = right
        return canvas


class GeMPool(nn.Module):
    """Generalised-mean pooling over a map's rows and columns (Radenovic et al. 2018): (B, C, h, w) -> (B, C).

    With p = 1 it is the mean and as p grows it tends to the maximum; at the usual p = 3 a small bright structure (an
    osteophyte's tip) is not averaged away by the rest of the patch. `p` is fixed rather than learnt, since the
    recipe's weight decay reaches every parameter and would pull a learnt exponent towards the mean. Computed in
    float32 whatever the autocast dtype: x ** p of bfloat16 activations loses the small ones.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p).to(x.dtype)


class MeanPool(nn.Module):
    """Mean over a map's rows and columns: (B, C, h, w) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


#: How each branch's band map is pooled into its feature vector (`TwoBranchNet(pool=...)`, `cnn.backbone_args`).
POOLS: dict[str, type[nn.Module]] = {"mean": MeanPool, "gem": GeMPool}


class TwoBranchNet(nn.Module):
    """Shared-weight CNN over the lateral and medial patches of a knee crop; (B, C, S, S) -> (B, 2 * widths[-1]).

    Args:
        in_chans: input channels (1 for radiographs).
        widths: channels of the stem (a stride-2 3x3 conv and a 2x2 max-pool, as in ResNet) and of each stage
            (two 3x3 convs, then a 2x2 max-pool).
        patch_height: patch height as a share of the crop height, centred on the crop's middle row (the joint).
        drop: dropout on the concatenated features.
        pool: how each branch's map is pooled, a key of `POOLS`: "mean" (the default) or "gem" (generalised
            mean with p = 3, between the mean and the maximum).
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128), patch_height: float = 0.5,
                 drop: float = 0.2, pool: str = "mean") -> None:
        super().__init__()
        if not 0 < patch_height <= 1:
            raise ValueError(f"patch_height is the share of the crop's height the patches span, in (0, 1]; got "
                             f"{patch_height}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {sorted(POOLS)}; got {pool!r}")
        layers: list[nn.Module] = [_conv(in_chans, widths[0], stride=2), nn.MaxPool2d(2, ceil_mode=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv(c_in, c_out), _conv(c_out, c_out), nn.MaxPool2d(2, ceil_mode=True)]
        self.trunk = nn.Sequential(*layers)
        self.stride = 2 ** (len(widths) + 1)
        self.fold = PatchFold()
        self.pool = POOLS[pool]()
        self.drop = nn.Dropout(drop)
        self.patch_height = patch_height
        self.num_features = 2 * widths[-1]
        self.pretrained_cfg = {"mean": (0.5,), "std": (0.25,)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def input_rows(self, height: int) -> tuple[int, int]:
        """The rows [top, bottom) of an input `height` rows high that `forward` reads: the patch band.

        The training loaders augment only these rows (`kneeoa.transforms.augment.BatchTransform`); the others never
        reach the network.
        """
        rows = max(self.stride, round(height * self.patch_height))
        top = (height - rows) // 2
        return top, top + rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        top, bottom = self.input_rows(height)
        rows, half = bottom - top, width // 2
        lateral = x[:, :, top:top + rows, :half]
        medial = x[:, :, top:top + rows, width - half:].flip(-1)
        feats = self.trunk(torch.cat([lateral, medial]))
        h, w = feats.shape[2:]
        row0 = min(round(top / self.stride), max(0, -(-height // self.stride) - h))
        folded = self.fold(feats, b, row0, max(-(-height // self.stride), row0 + h))
        band = folded[:, :, row0:row0 + h]
        pooled = torch.cat([self.pool(band[..., :w]), self.pool(band[..., w:])], dim=1)
        return self.drop(pooled)

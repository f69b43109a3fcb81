"""Random training patches, fixed by (seed, index) so resumed runs see the same data."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


class _PatchView:
    """Indexable view: view[idx] cuts the patches with indices idx ([B] long) -> [B,C,p,p]."""

    def __init__(self, owner: "RandomPatches"):
        self.owner = owner

    def __getitem__(self, idx) -> Tensor:
        return self.owner.cut(torch.as_tensor(idx, dtype=torch.long).reshape(-1))

    def __len__(self) -> int:
        return len(self.owner)


class RandomPatches:
    """A virtual data set of `num_patches` square patches from a list of images.

    Patch k is fully determined by (seed, k): which image (chosen in proportion to its number
    of patch positions, i.e. uniform over positions), where, and which of the 8 flips/rotations
    (if `augment`). Exposes `.images` (a view cut on demand) and `.labels` (zeros) so the generic
    Trainer takes its fast batch path; nothing is pre-extracted, so memory stays small.
    images: [N,C,H,W] tensor or a list of [C,H,W] tensors (sizes may differ), values in [0,1].
    """

    def __init__(self, images: Tensor | Sequence[Tensor], patch_size: int, num_patches: int,
                 seed: int = 0, augment: bool = True):
        imgs = list(images) if not torch.is_tensor(images) else list(images.unbind(0))
        if not imgs:
            raise ValueError("RandomPatches needs at least one image")
        if patch_size < 1 or num_patches < 1:
            raise ValueError(f"patch_size and num_patches must be >= 1, got {patch_size}, {num_patches}")
        chans = {im.shape[0] for im in imgs}
        if len(chans) != 1 or any(im.dim() != 3 for im in imgs):
            raise ValueError(f"images must all be [C,H,W] with the same C, got shapes "
                             f"{sorted({tuple(im.shape) for im in imgs})[:4]}")
        small = [tuple(im.shape) for im in imgs if min(im.shape[1:]) < patch_size]
        if small:
            raise ValueError(f"patch_size {patch_size} is larger than images of shape {small[:3]}")
        self.sources = [im.float().contiguous() for im in imgs]
        self.patch_size, self.num_patches, self.augment = int(patch_size), int(num_patches), augment
        g = torch.Generator().manual_seed(int(seed))
        room = torch.tensor([(im.shape[1] - patch_size + 1) * (im.shape[2] - patch_size + 1)
                             for im in self.sources], dtype=torch.float64)
        self.which = torch.multinomial(room / room.sum(), num_patches, replacement=True, generator=g)
        u = torch.rand(num_patches, 2, generator=g, dtype=torch.float64)
        hs = torch.tensor([im.shape[1] - patch_size + 1 for im in self.sources])[self.which]
        ws = torch.tensor([im.shape[2] - patch_size + 1 for im in self.sources])[self.which]
        self.top = (u[:, 0] * hs).long().clamp_max(hs - 1)
        self.left = (u[:, 1] * ws).long().clamp_max(ws - 1)
        self.aug = (torch.randint(0, 8, (num_patches,), generator=g) if augment
                    else torch.zeros(num_patches, dtype=torch.long))
        self.labels = torch.zeros(num_patches, dtype=torch.long)
        self.images = _PatchView(self)

    def __len__(self) -> int:
        return self.num_patches

    def cut(self, idx: Tensor) -> Tensor:
        """Patches with indices idx [B] -> [B,C,p,p]."""
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_patches):
            raise IndexError(f"patch index out of range [0, {self.num_patches})")
        p = self.patch_size
        out = []
        for k in idx.tolist():
            t, left = int(self.top[k]), int(self.left[k])
            patch = self.sources[int(self.which[k])][:, t:t + p, left:left + p]
            a = int(self.aug[k])
            if a & 4:
                patch = patch.flip(-1)
            out.append(torch.rot90(patch, a & 3, dims=(-2, -1)))
        return torch.stack(out) if out else torch.empty(0, self.sources[0].shape[0], p, p)

    def __getitem__(self, k: int) -> Tuple[Tensor, Tensor]:
        return self.cut(torch.tensor([k]))[0], self.labels[k]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, p, p) of every patch."""
        return (self.sources[0].shape[0], self.patch_size, self.patch_size)

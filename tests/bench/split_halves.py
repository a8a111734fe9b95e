"""Do slcGAN's empty-cluster splits (`slcgan.split_empty`) cut a mixed cluster along its classes?

Run by hand, not by pytest, on a run directory of a labelled folder (one sub-folder per class, as
quality.py unpacks the shared sets) and one of its checkpoints:

    python tests/bench/split_halves.py RUN_DIR FOLDER [--state RUN_DIR/checkpoint/state.safetensors]

C labels a random sample of the folder the way the check does (BatchNorm in batch mode; the cached
images, centre view). For every cluster it prints its two most common classes and how much each way of
halving it tells about the class of an image: the mutual information between the half and the class, in
bits (0: the halves hold the classes as mixed as the cluster; 1 at most, for two classes one per half):
- features: 2-means of C's last-layer features (what the check does);
- pixels: 2-means of the pixels;
- discriminant: C's last layer set to the pixels' halves, with a linear discriminant of C's features
  fitted to them on every other image of the cluster, scored on the rest.
and, for the two ways the check could set C's last layer (features: along the line between the halves'
means; discriminant), how long the change to the cluster's row must be, against the row itself, to give
the split's logit margin (SPLIT_MARGIN) at the halves' means: the check caps it at 1.
The last line is the mean over the clusters whose most common class holds less than 90 % of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import mutual_info_score

from imgcluster.checkpoint import CHECKPOINT_FORMAT, read_state
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.methods.common import load_weights
from imgcluster.methods.slcgan import SPLIT_MARGIN, two_means
from imgcluster.rundir import RunDir, load_config

from split_cost import Rows


def two_groups(points: torch.Tensor) -> torch.Tensor | None:
    """slcGAN's 2-means (methods/slcgan.py) as a mask (n,) of the images nearer its first mean."""
    means = two_means(points)
    if means is None:
        return None
    m1, m2 = means
    return (points - m1).pow(2).sum(dim=1) < (points - m2).pow(2).sum(dim=1)


def discriminant(features: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """The direction (F,) that best tells the rows of `features` in `side` from the others, pointing to
    `side`: scikit-learn's linear discriminant with Ledoit-Wolf shrinkage of the shared covariance."""
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(features.double().numpy(), side.numpy())
    return torch.from_numpy(lda.coef_[0]).float()


def bits(side: np.ndarray, classes: np.ndarray) -> float:
    """Mutual information between the half an image is in and its class, in bits."""
    return mutual_info_score(classes, side) / np.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--state", type=Path, help="a training checkpoint [default: the run's own]")
    parser.add_argument("--sample", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="of the sample drawn")
    args = parser.parse_args()
    run = RunDir(args.run)
    cfg = load_config(run)
    method = METHODS["slcgan"](cfg, torch.device("cpu"), training=False)
    state, _ = read_state(args.state or run.checkpoint, CHECKPOINT_FORMAT)
    for name, net in method.networks().items():
        load_weights(net, state["networks"][name], torch.device("cpu"))
    files = scan_folder(args.folder)
    images = load_image_set(args.folder, method.cache_size(cfg), files=files)
    classes = np.array([Path(f).parent.name for f in files])
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(args.seed))[:args.sample]
    rows = Rows(torch.from_numpy(np.array(images.images)))             # in memory: the check's data
    features, labels = method._sample_features(rows, idx)
    y = classes[idx.numpy()]
    print(f"{args.run.name}, step {state['step']}: {len(idx)} images")
    method.C.fc.eval()                                                  # no power iteration on reading
    weight = method.C.fc.weight.float()                                # after spectral norm, if any
    print("| cluster | images | two most common classes | bits: features | pixels | discriminant "
          "| row change / row: features | discriminant |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    mixed = []
    for k in range(cfg.clusters):
        mask = labels == k
        names, counts = np.unique(y[mask.numpy()], return_counts=True)
        if mask.sum() < 8 or len(names) < 2:
            print(f"| {k} | {int(mask.sum())} | - | - | - | - | - | - |")
            continue
        order = counts.argsort()[::-1]
        c1, c2 = names[order[0]], names[order[1]]
        yk = y[mask.numpy()]
        row = []
        f = features[mask]
        f_side = two_groups(f)
        row.append(bits(f_side.numpy(), yk) if f_side is not None else float("nan"))
        pixels = method.eval_view(rows.get(idx[mask])).float().flatten(1)
        p_side = two_groups(pixels)
        row.append(bits(p_side.numpy(), yk) if p_side is not None else float("nan"))
        fit = torch.arange(int(mask.sum())) % 2 == 0
        if p_side is not None and min(int(p_side[fit].sum()), int((~p_side[fit]).sum())) >= 2:
            direction = discriminant(f[fit], p_side[fit])
            m1, m2 = f[fit][p_side[fit]].mean(0), f[fit][~p_side[fit]].mean(0)
            d_side = ((f[~fit] - (m1 + m2) / 2) @ direction > 0).numpy()
            row.append(bits(d_side, yk[~fit.numpy()]))
        else:
            row.append(float("nan"))
        # The row change dw that puts SPLIT_MARGIN between the two new logits at the halves' means.
        w = weight[k].norm()
        if f_side is not None:
            d = f[f_side].mean(0) - f[~f_side].mean(0)
            row.append((SPLIT_MARGIN / d.norm() / w).item())
        else:
            row.append(float("nan"))
        if p_side is not None:
            direction = discriminant(f, p_side)
            d = f[p_side].mean(0) - f[~p_side].mean(0)
            row.append((SPLIT_MARGIN / direction.dot(d) * direction.norm() / w).item())
        else:
            row.append(float("nan"))
        share1, share2 = counts[order[0]] / mask.sum().item(), counts[order[1]] / mask.sum().item()
        if share1 < 0.9:
            mixed.append(row)
        print(f"| {k} | {int(mask.sum())} | {c1} {share1:.2f}, {c2} {share2:.2f} | "
              + " | ".join(f"{v:.2f}" for v in row) + " |")
    if mixed:
        means = np.nanmean(np.array(mixed), axis=0)
        print(f"| mean of {len(mixed)} mixed | | | " + " | ".join(f"{v:.2f}" for v in means) + " |")


if __name__ == "__main__":
    main()

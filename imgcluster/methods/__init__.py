"""The registry of clustering methods. A method class provides:

    Settings                      dataclass of its hyperparameters (the YAML section named after it)
    __init__(cfg, device)         builds networks and optimisers
    networks(), optimizers()      name -> module / optimiser, for checkpoints and model files
    train_step(uint8 batch)       one training iteration, returns detached loss tensors
    recalibrate(batches)          prepare for inference after training (may do nothing)
    cache_size(cfg)               side of the cached images it trains on (static)
    eval_view(uint8 batch)        the float view inference and sheets use
    probabilities(uint8 batch)    (B, K) cluster probabilities per image, in eval mode
    assign(uint8 batch)           (cluster, confidence) per image: argmax and max of probabilities
    generate(cluster indices)     images in [-1, 1]
    clusterer                     name of the attribute holding the network that assign/recalibrate use

Optional:

    real_batches_per_step         real batches one train_step consumes (absent: 1). The loop then passes
                                  train_step a uint8 batch of batch_size * r images: the stateless batches
                                  k = (step - 1) * r + j, j = 0..r-1, concatenated in that order, so exact
                                  resume holds and r = 1 is the plain one-batch order. slcGAN: one per D step.
                                  Read from the instance, so a method may set it from its settings.
    consistency_loss              name of a logged loss whose recent mean rates a finished run against
                                  other seeds of the same command (lower is better; see selection.py).
                                  slcGAN: c_aug. Absent: no such figure.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

# name -> (module, class). A method's module is imported when the method is first looked up, so a command
# that uses one method does not pay for the other's imports (slcGAN's imports torchvision's ResNet).
_WHERE = {"c3gan": ("imgcluster.methods.c3gan", "C3GAN"), "slcgan": ("imgcluster.methods.slcgan", "SlcGAN")}


class _Registry(Mapping):
    def __getitem__(self, name: str):
        module, cls = _WHERE[name]
        return getattr(import_module(module), cls)

    def __contains__(self, name) -> bool:          # without importing anything
        return name in _WHERE

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)


METHODS = _Registry()

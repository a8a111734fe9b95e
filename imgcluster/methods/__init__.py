"""The registry of clustering methods. A method class provides:

    Settings                      dataclass of its hyperparameters (the YAML section named after it)
    __init__(cfg, device)         builds networks and optimisers
    networks(), optimizers()      name -> module / optimiser, for checkpoints and model files
    train_step(uint8 batch)       one training iteration, returns detached loss tensors
    recalibrate(batches)          prepare for inference after training (may do nothing)
    cache_size(cfg)               side of the cached images it trains on (static)
    eval_view(uint8 batch)        the float view inference and sheets use
    assign(uint8 batch)           (cluster, confidence) per image
    generate(cluster indices)     images in [-1, 1]
    clusterer                     name of the attribute holding the network that assign/recalibrate use

Optional:

    real_batches_per_step         real batches one train_step consumes (absent: 1). The loop then passes
                                  train_step a uint8 batch of batch_size * r images: the stateless batches
                                  k = (step - 1) * r + j, j = 0..r-1, concatenated in that order, so exact
                                  resume holds and r = 1 is the plain one-batch order. slcGAN: one per D step.
                                  Read from the instance, so a method may set it from its settings.
"""

from imgcluster.methods.c3gan import C3GAN
from imgcluster.methods.slcgan import SlcGAN

METHODS = {"c3gan": C3GAN, "slcgan": SlcGAN}

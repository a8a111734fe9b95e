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
"""

from imgcluster.methods.c3gan import C3GAN

METHODS = {"c3gan": C3GAN}

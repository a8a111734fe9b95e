"""imgcluster: sort a folder of unlabelled images into clusters by training a GAN on it."""

__version__ = "0.1.0"

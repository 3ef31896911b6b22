"""Architectures of the public third-party state dicts, for ``--arch examples/architectures.py:NAME``.

Each callable builds the ``nn.Module`` whose ``state_dict`` keys match the file:

* ``kw_mnist``           -> ``kw_mnist.pth`` (MNIST, raw [0,1] pixels)
* ``cifar_base_kw``      -> ``cifar_base_kw.pth`` (CIFAR-10, normalised outside: mean 0.485,0.456,0.406, std 0.225)
* ``spectral_nor_mlp_b`` -> ``spectral_NOR_MLP_B.pth`` (MNIST, normalised outside: mean 0.1307, std 0.3081)
"""

import torch.nn as nn


def kw_mnist() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10))


def cifar_base_kw() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(1024, 100), nn.ReLU(), nn.Linear(100, 10))


def spectral_nor_mlp_b() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))

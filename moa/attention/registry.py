"""The attention registry, apart from the schemes so that each can import it."""

from torch import nn

from moa.registry import Registry

ATTENTION: Registry[nn.Module] = Registry("attention")

"""One handler per ONNX op type. Importing this package registers them all."""

from . import concat, conv, elementwise, layout, linear, recurrent, shapes, spatial  # noqa: F401  (registration side effects)
from .base import (
           FOLDED_DOMAIN,
           Activation,
           ChannelRule,
           Handler,
           LinearHandler,
           Window,
           handler_for,
           register,
           registered_ops,
           sample_outputs,
)
from .elementwise import activation_chain

__all__ = ["FOLDED_DOMAIN", "Activation", "ChannelRule", "activation_chain", "Handler", "LinearHandler", "handler_for", "register", "registered_ops",
           "sample_outputs", "Window"]

"""Built-in serializers, registered through the ``sidecar`` entry-point group.

Each serializer module exposes ``NAME``, ``PRIORITY``, ``accepts``, ``encode`` and ``decode``
(see :mod:`sidecar_core._serializer`). This module must stay import-light.
"""

from sidecar_core import hookimpl
from sidecar_core._hooks import Register


@hookimpl
def sidecar_register_serializers(register: Register) -> None:
    """Register tensor, chunked_tensor, primitives and json."""
    register("tensor", "serializers.tensor", description="One torch.Tensor; safetensors header schema.")
    register(
        "chunked_tensor",
        "serializers.chunked_tensor",
        description="A list or tuple of tensors of any shapes, as one message.",
    )
    register("primitives", "serializers.primitives", description="None, bool, int, float, str, bytes.")
    register("json", "serializers.json", description="Dicts and lists of JSON values.")

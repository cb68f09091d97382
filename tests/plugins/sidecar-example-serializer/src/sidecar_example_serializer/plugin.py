"""The plugin module named by the ``sidecar`` entry point: it registers the serializer lazily."""

from sidecar_core import Register, hookimpl


@hookimpl
def sidecar_register_serializers(register: Register) -> None:
    """Register ``numpy``."""
    register(
        "numpy",
        "sidecar_example_serializer.numpy_array",
        requires=("numpy",),
        install_hint="pip install numpy",
        description="Example plugin: numpy arrays of numeric and bool dtypes, as raw bytes.",
    )

"""An example sidecar serializer plugin: ``numpy`` arrays as raw bytes plus dtype and shape."""

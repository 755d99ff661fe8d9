"""Python faces of the CUDA extension's ops (``torch.ops.depthpro_fast.*`` from ``csrc/``):
fake (meta) implementations for torch.compile, and thin wrappers the op dispatch calls.

Importing a module here loads ``depthpro_fast._C`` and fails with ImportError when it is missing.
"""

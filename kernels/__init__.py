"""Sparse weight formats and matmul kernels (imported as ``llmprune.kernels``).

``formats``   Packed24 / PackedBitmap, pack / unpack (the layout, which is also the checkpoint format)
``quantized`` QuantPacked24 / QuantPackedBitmap: the same layouts with integer codes + group scales
``naive``     pure-torch matmuls: the test oracle's sibling and the CPU fallback
``launch``    host-side launch helpers both Triton files share (interpreter, configs, split-K
              workspace, wrapper body, arguments, grid); imports triton only where it must
``tiles``     ``@triton.jit`` helpers both Triton files share (program ids, ``x^T`` tile, epilogue)
``sparse24``  Triton 2:4 matmul            (imported on first use: triton is Linux-only)
``bitmap``    Triton bitmap matmul         (imported on first use)
``dispatch``  ``sparse_matmul``: picks Triton or torch
``linear``    ``SparseLinear`` and ``sparsify_model``: packed weights in a model

Imports go one way (``a -> b``: a imports b): quantized -> formats; naive -> formats, quantized;
launch -> naive, formats; sparse24, bitmap -> launch, tiles, formats, quantized; dispatch ->
launch, naive, formats, quantized and, on the first Triton call, sparse24 / bitmap; linear ->
dispatch, formats, quantized.
"""

if __name__ != "llmprune.kernels":
    # This folder is the package ``llmprune.kernels`` (pyproject maps it). With the repository
    # root on sys.path (``python -m pytest`` or a script run from the checkout), ``import kernels``
    # finds it instead of the Hugging Face ``kernels`` library, and transformers imports
    # ``kernels`` to probe for that library. Define nothing and have no ``__file__``: the probe
    # then reads this as a namespace-package shadow, "not installed", which is the truth.
    __file__ = None
else:
    from .dispatch import BACKENDS, sparse_matmul
    from .formats import (BITMAP_SLAB_K, META_ALIGN_K, Packed24, PackedBitmap, is_24, pack_24, pack_bitmap,
                          sparsity, unpack_24, unpack_bitmap)
    from .naive import bitmap_matmul_ref, quantized_matmul_ref, sparse24_matmul_ref
    from .quantized import (QuantPacked24, QuantPackedBitmap, pack_24_quantized, pack_bitmap_quantized,
                            unpack_quantized)

    __all__ = [
        "BACKENDS",
        "BITMAP_SLAB_K",
        "META_ALIGN_K",
        "Packed24",
        "PackedBitmap",
        "QuantPacked24",
        "QuantPackedBitmap",
        "bitmap_matmul",
        "bitmap_matmul_ref",
        "is_24",
        "pack_24",
        "pack_bitmap",
        "pack_24_quantized",
        "pack_bitmap_quantized",
        "quantized_matmul_ref",
        "sparse24_matmul",
        "sparse24_matmul_ref",
        "sparse_matmul",
        "sparsity",
        "unpack_24",
        "unpack_bitmap",
        "unpack_quantized",
    ]

    def __getattr__(name: str):
        # The Triton wrappers import triton; load them only when asked for.
        if name == "sparse24_matmul":
            from .sparse24 import sparse24_matmul
            return sparse24_matmul
        if name == "bitmap_matmul":
            from .bitmap import bitmap_matmul
            return bitmap_matmul
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

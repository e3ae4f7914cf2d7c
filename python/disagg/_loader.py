"""Loads the compiled extension and explains a torch mismatch instead of an undefined symbol."""
from __future__ import annotations

import warnings

import torch


def load_extension() -> None:
    try:
        from . import _build_info
    except ImportError:  # running from a source tree without a build
        _build_info = None
    built = getattr(_build_info, "TORCH_VERSION", None)
    try:
        from . import _C  # noqa: F401  (registers torch.ops.disagg.*)
    except (ImportError, OSError) as err:
        if built is not None and built != torch.__version__:
            raise ImportError(
                f"disagg was built for torch {built}, but torch {torch.__version__} is installed; "
                "rebuild it with `pip install --no-build-isolation .` against this torch"
            ) from err
        raise ImportError(
            f"the disagg extension could not be loaded ({err}); build it with "
            "`pip install --no-build-isolation .`"
        ) from err
    if built is not None and built.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"disagg was built for torch {built} and runs with torch {torch.__version__}",
            RuntimeWarning,
            stacklevel=3,
        )


def cuda_built() -> bool:
    """True when the extension carries the CUDA kernels."""
    try:
        from . import _build_info
    except ImportError:
        return False
    return bool(_build_info.WITH_CUDA)

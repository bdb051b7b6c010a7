"""Data-scarce mode: textual inversion of a style token from a few real images per class."""

from genq_core.inversion.textual_inversion import (
    DEFAULT_CAPTIONS,
    TextualInversionCanceled,
    TextualInversionConfig,
    apply_tokens,
    class_tokens,
    learn_tokens,
    load_kshot_folder,
    load_tokens,
    save_tokens,
)

__all__ = [
    "DEFAULT_CAPTIONS",
    "TextualInversionCanceled",
    "TextualInversionConfig",
    "apply_tokens",
    "class_tokens",
    "learn_tokens",
    "load_kshot_folder",
    "load_tokens",
    "save_tokens",
]

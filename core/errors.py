"""Errors the engine raises with a message meant for the user (shown as-is in the app and CLI)."""


class SlimError(Exception):
    """Base class: the message is complete and user-facing."""


class ModelLoadError(SlimError):
    pass


class RecipeError(SlimError):
    pass


class DataError(SlimError):
    pass


class AssetError(SlimError):
    pass


class UnsupportedError(SlimError):
    """A method that cannot run on this device or with this model."""

"""Errors the runtime raises for bad input (a bundle, a request, a config)."""


class RuntimeUserError(Exception):
    """Something the user gave the runtime is wrong; the message says what and what to do."""


class BundleError(RuntimeUserError):
    """A bundle is missing, malformed, tampered with or built for another device."""


class ContextOverflowError(RuntimeUserError):
    """A conversation would exceed the model's context length."""

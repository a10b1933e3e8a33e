"""mptkit: the MPT family of ALiBi language models, end to end.

The package root stays light: it exposes the model and its config. Training, data, inference,
serving and the CLI are imported only when used.
"""

__version__ = "0.1.0"

__all__ = ["MPTConfig", "MPTForCausalLM", "__version__"]


def __getattr__(name):
    if name in ("MPTConfig", "MPTForCausalLM"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'mptkit' has no attribute {name!r}")

"""`with` support for the objects that hold an engine (a vLLM engine-core process, GPU memory)."""

from __future__ import annotations


class Closeable:
    """Mixin: `close()` releases what the object holds, and `with obj:` calls it on leaving the block."""

    def close(self) -> None:  # noqa: B027 - a hook: most subclasses hold nothing to release
        """Release held engines and memory (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

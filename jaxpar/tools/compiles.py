"""Counting XLA compilations: JAX reports each one as a backend-compile duration event, whichever program
(jit, a serving program, a small op run eagerly) it compiles."""
from __future__ import annotations

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations (JAX's backend-compile events) from the moment it is made until close() (or the
    end of a `with` block): n compilations, seconds in the backend compiler. Imports JAX only when made."""

    def __init__(self):
        import jax
        self.n, self.seconds, self.counting = 0, 0.0, True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, secs, **kw):
        if event == COMPILE_EVENT and self.counting:
            self.n += 1
            self.seconds += secs

    def close(self) -> None:
        """Stop counting (n and seconds keep their values)."""
        import jax
        if self.counting and hasattr(jax.monitoring, "unregister_event_duration_listener"):  # not in older JAX
            jax.monitoring.unregister_event_duration_listener(self._on_event)
        self.counting = False

    def __enter__(self) -> CompileCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

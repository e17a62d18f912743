"""The two status lines above the input: turn statistics and the context meter."""

from __future__ import annotations

from dataclasses import dataclass

from textual.widget import Widget
from textual.widgets import Static

from ..context import WARN_AT
from ..stats import TurnStats
from ..text import byte_size


class StatsBar(Static):
    """TTFT, prefill and decode speed, tokens this turn, peak memory."""

    def show(self, stats: TurnStats | None, *, prefix: str = "") -> None:
        if stats is None:
            self.update(prefix or "no reply yet")
            self.tooltip = None
            return
        self.update(f"{prefix}{stats.describe()}")
        self.tooltip = stats.details()


@dataclass(frozen=True)
class ContextState:
    """What the context meter shows."""

    used: int  # positions the conversation occupies (the cache's, once it holds them)
    limit: int  # model.max_context
    kv_bytes: int
    label: str = ""  # "YaRN 4x"
    thinking: str = "thinking on"
    reasoning_saved: int = 0
    kv_at_limit: int = 0  # what the KV cache needs once the context is full
    memory: int = 0  # the machine's memory for MLX

    @property
    def fraction(self) -> float:
        """How full the context is, at most 1 (a reopened chat can hold more than the
        limit: the next message drops its oldest turns)."""
        return min(1.0, self.used / self.limit) if self.limit else 0.0

    @property
    def over(self) -> bool:
        """The conversation holds more than the context: its oldest turns drop next."""
        return self.used > self.limit > 0


class ContextMeter(Widget):
    """ctx ▰▰▰▱▱▱ 153/256 60% · KV 1.2 MB · thinking on · reasoning … not resent: 40 tok

    The wording shortens to fit the width (80 columns included); the tooltip has it all.
    """

    BAR = 6

    def __init__(self, text: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)
        self.state: ContextState | None = None
        self.message = text

    def show(self, state: ContextState | None, *, message: str = "") -> None:
        self.state, self.message = state, message or self.message
        warn = state is not None and state.fraction > WARN_AT
        self.set_class(warn, "warn")
        self.tooltip = self.describe(state) if state is not None else None
        self.refresh()

    def render(self) -> str:
        return self.line(self.content_size.width or 80)

    def line(self, width: int) -> str:
        """The meter as the longest wording that fits `width` columns."""
        state = self.state
        if state is None:
            return self.message
        filled = min(self.BAR, round(state.fraction * self.BAR))
        bar = "▰" * filled + "▱" * (self.BAR - filled) + " "
        limit = f"{state.limit:,}" + (f" {state.label}" if state.label else "")
        alert = ("⚠ over: the oldest turns drop on send" if state.over
                 else "⚠ full" if state.fraction >= 1
                 else "⚠ nearly full" if state.fraction > WARN_AT else "")
        used = min(state.used, state.limit)
        saved = state.reasoning_saved
        reasoning = [f"reasoning from earlier turns not resent: {saved:,} tokens",
                     f"earlier reasoning not resent: {saved:,} tok",
                     f"not resent: {saved:,} tok"] if saved else [""]
        meters = [f"ctx {bar}{used:,}/{limit} {state.fraction:.0%}",
                  f"ctx {used:,}/{limit} {state.fraction:.0%}"]
        kv = f"KV {byte_size(state.kv_bytes)}"
        think_short = state.thinking.replace("thinking ", "think ")
        # From the fullest wording to the tersest; the first that fits is shown.
        variants = [(meters[0], alert, r, state.thinking) for r in reasoning]
        variants += [(meters[1], alert, reasoning[-1], state.thinking),
                     (meters[1], alert[:1], reasoning[-1], state.thinking),
                     (meters[1], alert[:1], reasoning[-1], think_short)]
        lines = [" · ".join(p for p in (meter, a, kv, t, r) if p)
                 for meter, a, r, t in variants]
        fits = [line for line in lines if len(line) <= width]
        return fits[0] if fits else lines[-1]

    @staticmethod
    def describe(state: ContextState) -> str:
        if state.over:
            first = (f"The chat holds {state.used:,} tokens, more than the {state.limit:,}-"
                     "token context: the next message drops the oldest turns")
        else:
            first = f"{state.used:,} of {state.limit:,} context positions used"
        lines = [first + (f" ({state.label})" if state.label else ""),
                 f"The KV cache holds {byte_size(state.kv_bytes)}."]
        if state.kv_at_limit:
            lines.append(f"At the context limit it needs {byte_size(state.kv_at_limit)}"
                         + (f" of {byte_size(state.memory)} memory" if state.memory else "")
                         + ("; the model and that do not fit: lower the max context or "
                            "quantize the KV cache in the settings" if state.memory
                            and state.kv_at_limit > state.memory else "") + ".")
        if state.fraction > WARN_AT:
            lines.append("When a message no longer fits, the oldest turns are dropped "
                         "(the system prompt stays).")
        if state.reasoning_saved:
            lines.append("Reasoning from earlier turns is not resent to the model (Qwen3's "
                         f"rule): {state.reasoning_saved:,} tokens saved.")
        return "\n".join(lines)

"""Whether a text model's short texts are tokenized inline, on the event loop, or on the
tokenizer threads: judged from how long its inline encodings take.

~0.05 ms is usual for a sentence, and inline saves the hop to a thread. But a
tokenizer.json whose normalizer expands text held the loop 5.5 s for 12 bytes, every health
probe waiting behind it (review 156): an encoding past ``LONG_S``, or ``SLOW_TIMES`` of the
last ``WINDOW`` past ``MAX_S`` beyond two of the GIL's switch intervals, moves the model's
texts to the threads. (The short bound is counted beyond the switch intervals: the
tokenizers library releases the GIL while it encodes, and the time includes getting it back
from a busy thread - beside one busy Python thread 5.8 ms median, 8.2 p99, 13.2 max where
0.4 ms was the encoding; review 166.)

Wall-clock times also grow when the host stalls the process (a pause, CFS throttling under
a CPU limit): one such stall moved a model's texts to the threads for good, every 2-word
text queued behind long ones (review helper-250: 190 of 253 answered before one 60 ms
stall, 4 of 262 after it). So the move lasts ``RETRY_S``; then inline is tried again, and
each move while the last ones still count doubles the wait (up to ``RETRY_MAX_S``): a
tokenizer that is truly slow holds the loop once per wait, a stall costs one wait.

Example:
    >>> pace = TokenizerPace()
    >>> pace.inline(now=0.0)
    True
    >>> pace.judge(0.06, chars=40, now=1.0) is not None  # past LONG_S: moved
    True
    >>> pace.inline(now=2.0), pace.inline(now=1.0 + RETRY_S)
    (False, True)
"""

from __future__ import annotations

import sys
from collections import deque

MAX_S = 0.005
LONG_S = 0.05
SLOW_TIMES = 3
WINDOW = 32  # inline encodings the short bound looks back over
RETRY_S = 30.0
RETRY_MAX_S = 960.0


class TokenizerPace:
    """One model's judgement (a runtime's: a reload starts afresh)."""

    def __init__(self) -> None:
        self.slow = False  # its texts go to the threads, until ``retry_at``
        self.retry_at = 0.0
        self._wait_s = RETRY_S  # the next move's length
        self._recent: deque[bool] = deque(maxlen=WINDOW)  # which inline encodings were slow

    def inline(self, now: float) -> bool:
        """Whether a short text is encoded on the loop now (a move that ran out: again)."""
        if self.slow and now >= self.retry_at:
            self.slow = False
            self._recent.clear()
        return not self.slow

    def judge(self, took: float, chars: int, now: float) -> str | None:
        """Count an inline encoding of ``chars`` characters that took ``took`` s; where it
        moves the texts to the threads, what to log (else None)."""
        self._recent.append(took > MAX_S + 2 * sys.getswitchinterval())
        if took <= LONG_S and sum(self._recent) < SLOW_TIMES:
            if len(self._recent) == WINDOW and not any(self._recent):
                self._wait_s = RETRY_S  # a whole window fast since: the moves are forgotten
            return None
        self.slow, self.retry_at = True, now + self._wait_s
        wait, self._wait_s = self._wait_s, min(2 * self._wait_s, RETRY_MAX_S)
        return (f"its tokenizer took {took * 1e3:.0f} ms for {chars} characters on the event "
                f"loop; its texts are tokenized on the tokenizer threads for the next {wait:.0f} "
                "s, then inline again (a normalizer in tokenizer.json that expands text, or "
                "the host stalled this process)")  # fmt: skip

"""Objects as they are generated: `generate(..., streamer=s)` hands every decoded `<vis>` to `s.on_object` when the
streamer has that method (duck-typed, so a streamer written without this package works too), right after the token
itself went through `s.put`, and before `s.end()`. Beam search takes no streamer (transformers' rule).
"""

from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass
class GroundedObject:
    """One generated object. row: its generation row (sample x num_return_sequences); index: its order among the
    row's generated `<vis>` (0-based), as in the output's `pred_boxes[row]`; position: its index into the row's
    sequence; box: (4,) normalized xyxy; score: P(`<vis>`) when it was produced; mask: (S, S) logits, or None without
    an image or when the streamer sets `stream_masks = False`."""

    row: int
    index: int
    position: int
    box: torch.Tensor
    score: torch.Tensor
    mask: torch.Tensor | None = None


class ObjectStreamer(BaseStreamer):
    """Receives each `GroundedObject` as soon as its `<vis>` is decoded: pass `on_object=callable` or override
    `on_object`. Token ids go to `token_streamer` (e.g. a `TextIteratorStreamer`) when given.

    ```python
    streamer = ObjectStreamer(on_object=lambda obj: print(obj.index, obj.box.tolist()))
    model.generate(**inputs, streamer=streamer, max_new_tokens=32)
    ```
    """

    def __init__(self, on_object=None, token_streamer: BaseStreamer | None = None, stream_masks: bool = True):
        if on_object is not None and not callable(on_object):
            raise TypeError(f"`on_object` must be callable or None, got {type(on_object).__name__}.")
        self.callback = on_object
        self.token_streamer = token_streamer
        self.stream_masks = stream_masks
        self.objects: list[GroundedObject] = []

    def put(self, value):
        if self.token_streamer is not None:
            self.token_streamer.put(value)

    def end(self):
        if self.token_streamer is not None:
            self.token_streamer.end()

    def on_object(self, obj: GroundedObject):
        self.objects.append(obj)
        if self.callback is not None:
            self.callback(obj)


class _EndDeferred(BaseStreamer):
    """Forwards tokens; holds `end()` back so that a `<vis>` generated at the last step is streamed before it."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        self.streamer.put(value)

    def end(self):
        pass


__all__ = ["GroundedObject", "ObjectStreamer"]

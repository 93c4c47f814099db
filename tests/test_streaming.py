"""Objects streamed during generate(): the same boxes, scores and masks as the returned output, in order, each right
after its `<vis>` token and before the streamer's end."""

import pytest
import torch
from conftest import VIS
from test_generation import _generate, _prompt

from perceptiongpt import GroundedObject, ObjectStreamer


class _Recorder:
    """A streamer written without the package (duck-typed `on_object`), logging every event in order."""

    def __init__(self):
        self.events, self.tokens = [], 0

    def put(self, value):
        self.tokens += value.shape[-1] if value.dim() > 1 else 1
        self.events.append(("tokens", self.tokens))

    def end(self):
        self.events.append(("end", self.tokens))

    def on_object(self, obj):
        self.events.append(("object", obj))


def _assert_streamed_equal_returned(objects, out):
    rows = out.sequences.shape[0]
    per_row = [[obj for obj in objects if obj.row == r] for r in range(rows)]
    assert sum(map(len, per_row)) == len(objects)
    for r in range(rows):
        streamed = per_row[r]
        assert [obj.index for obj in streamed] == list(range(len(out.pred_boxes[r])))
        assert [obj.position for obj in streamed] == out.vis_positions[r].tolist()
        for obj, box, score in zip(streamed, out.pred_boxes[r], out.vis_scores[r]):
            assert torch.equal(obj.box, box) and torch.equal(obj.score, score)
        if out.pred_masks[r] is None:
            assert all(obj.mask is None for obj in streamed)
        else:
            for obj, mask in zip(streamed, out.pred_masks[r]):
                torch.testing.assert_close(obj.mask, mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_new_tokens": 5}, {"use_cache": False}, {"do_sample": True, "num_return_sequences": 2}],
    ids=["greedy", "vis_at_the_last_step", "no_cache", "sample_n2"],
)
def test_streamed_objects_equal_the_returned_ones_in_order(tiny_model, kwargs):
    ids, attention, pixels, boxes = _prompt()
    streamer = ObjectStreamer()
    out = _generate(tiny_model, ids, attention, pixels, boxes, streamer=streamer, **kwargs)
    assert len(streamer.objects) >= 2 and all(isinstance(obj, GroundedObject) for obj in streamer.objects)
    _assert_streamed_equal_returned(streamer.objects, out)
    if kwargs.get("max_new_tokens") == 5:  # the `<vis>` of the last step, never fed back, is streamed too
        assert any(obj.position == out.sequences.shape[1] - 1 for obj in streamer.objects)


def test_each_object_follows_its_token_and_precedes_the_end(tiny_model):
    ids, attention, pixels, boxes = _prompt(batch_size=1)
    recorder = _Recorder()
    out = _generate(tiny_model, ids, attention, pixels, boxes, streamer=recorder, max_new_tokens=5)
    objects = [event[1] for event in recorder.events if event[0] == "object"]
    _assert_streamed_equal_returned(objects, out)
    assert recorder.events[-1] == ("end", out.sequences.shape[1])
    assert [event[0] for event in recorder.events].count("end") == 1
    seen = 0
    for kind, value in recorder.events:
        if kind == "tokens":
            seen = value
        elif kind == "object":  # its `<vis>` went through put() first, and nothing after it did yet
            assert seen == value.position + 1 and out.sequences[0, value.position] == VIS


def test_streaming_without_an_image_or_without_masks_gives_no_masks(tiny_model):
    ids, attention, _, boxes = _prompt(image=False)
    streamer = ObjectStreamer()
    out = _generate(tiny_model, ids, attention, None, boxes, streamer=streamer)
    assert streamer.objects and all(obj.mask is None for obj in streamer.objects)
    _assert_streamed_equal_returned(streamer.objects, out)
    ids, attention, pixels, boxes = _prompt()
    calls = []
    streamer = ObjectStreamer(on_object=calls.append, stream_masks=False)
    out = _generate(tiny_model, ids, attention, pixels, boxes, streamer=streamer)
    assert calls == streamer.objects and all(obj.mask is None for obj in calls)
    assert [obj.box.tolist() for obj in calls if obj.row == 0] == out.pred_boxes[0].tolist()


def test_a_token_streamer_still_gets_every_token_and_a_tensor_output_still_streams(tiny_model):
    ids, attention, pixels, boxes = _prompt(batch_size=1)
    recorder = _Recorder()
    streamer = ObjectStreamer(token_streamer=recorder)
    torch.manual_seed(0)
    sequences = tiny_model.generate(
        input_ids=ids, attention_mask=attention, pixel_values=pixels, vis_boxes=boxes, max_new_tokens=5,
        do_sample=False, streamer=streamer,
    )  # fmt: skip
    assert isinstance(sequences, torch.Tensor) and recorder.events[-1] == ("end", sequences.shape[1])
    positions = (sequences[0, ids.shape[1] :] == VIS).nonzero()[:, 0] + ids.shape[1]
    assert [obj.position for obj in streamer.objects] == positions.tolist() and len(positions) >= 1


def test_bad_streamer_arguments_raise(tiny_model):
    with pytest.raises(TypeError, match="`on_object` must be callable or None, got int"):
        ObjectStreamer(on_object=3)
    ids, attention, pixels, boxes = _prompt()
    with pytest.raises(ValueError, match="beam"):  # transformers' own rule: beam search takes no streamer
        _generate(tiny_model, ids, attention, pixels, boxes, streamer=ObjectStreamer(), num_beams=2)


def test_streamed_and_returned_regions_are_normal_tensors(tiny_model):
    """The heads run under inference mode inside generate(); what leaves it takes in-place edits (an inference
    tensor would raise outside inference mode)."""
    ids, attention, pixels, boxes = _prompt()
    streamer = ObjectStreamer()
    out = _generate(tiny_model, ids, attention, pixels, boxes, streamer=streamer)
    assert streamer.objects
    for obj in streamer.objects:
        assert not obj.box.is_inference() and not obj.mask.is_inference()
        obj.box.mul_(2.0)
    for boxes, masks in zip(out.pred_boxes, out.pred_masks):
        assert not boxes.is_inference() and not masks.is_inference()
        boxes.mul_(2.0), masks.mul_(2.0)

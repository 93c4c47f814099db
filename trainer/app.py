"""An interactive grounding app (Gradio): pick or upload an image, ask, and watch the boxes and masks come in.

Self-contained on purpose: it imports gradio, transformers, numpy and PIL only, so the same file runs as a Hugging
Face Space (`app.py` at the repo root) against a Hub repo id through the model's remote code. Run it with
`perceptiongpt app --model DIR_OR_REPO`, or `python app.py` with `PERCEPTIONGPT_MODEL` set.

A region question: click two opposite corners on the image (Gradio's select event), or paint the region in the
"Paint a region" tab; write `<vis>` in the question where the region goes.
"""

import os
import queue
import threading

import gradio as gr
import numpy as np
from transformers import TextStreamer, pipeline


VIS = "<vis>"


class _QueueTextStreamer(TextStreamer):
    """Decoded text chunks of the answer into the app's event queue."""

    def __init__(self, tokenizer, events):
        super().__init__(tokenizer, skip_prompt=True)
        self.events = events

    def on_finalized_text(self, text, stream_end=False):
        if text:
            self.events.put(("text", text))


def _annotations(objects):
    """Pipeline objects -> AnnotatedImage annotations: each box, and its mask where one was decoded."""
    annotations = []
    for index, obj in enumerate(objects):
        box = obj["box"]
        annotations.append(
            ((box["xmin"], box["ymin"], box["xmax"], box["ymax"]), f"obj{index + 1} {obj['score']:.2f}")
        )
        if obj["mask"] is not None:
            annotations.append((np.asarray(obj["mask"], dtype=np.float32) / 255.0, f"obj{index + 1} mask"))
    return annotations


def _table(objects):
    return [
        [
            index + 1,
            round(obj["score"], 3),
            obj["box"]["xmin"],
            obj["box"]["ymin"],
            obj["box"]["xmax"],
            obj["box"]["ymax"],
        ]
        for index, obj in enumerate(objects)
    ]


def region_from_clicks(points):
    """Two clicked (x, y) points -> the pixel xyxy box they span, or None before the second click."""
    if len(points) < 2:
        return None
    (x1, y1), (x2, y2) = points[-2:]
    return [min(x1, x2), min(y1, y2), max(x1, x2) + 1, max(y1, y2) + 1]


def mask_from_editor(value):
    """An ImageEditor value -> the painted (H, W) bool mask (any drawn layer pixel), or None when nothing is painted."""
    if not value or not value.get("layers"):
        return None
    painted = [np.asarray(layer.convert("RGBA"))[..., 3] > 0 for layer in value["layers"] if layer is not None]
    mask = np.logical_or.reduce(painted) if painted else None
    return mask if mask is not None and mask.any() else None


def stream_answer(pipe, image, question, box=None, mask=None, max_new_tokens=32):
    """Yields (annotated image value, answer text, objects table) as tokens and objects stream in; the last one is
    the pipeline's final result."""
    if image is None:
        raise gr.Error("Pick an example or upload an image first.")
    if not question or not question.strip():
        raise gr.Error("Type a question.")
    if (box is not None or mask is not None) and VIS not in question:
        raise gr.Error(f"A region is selected: write {VIS} in the question where it goes.")
    if VIS in question and box is None and mask is None:
        raise gr.Error(f"The question has {VIS}: click two corners on the image (or paint a region) first.")
    regions = {}
    if box is not None:
        regions["boxes"] = [box]
    if mask is not None:
        regions.update(masks=[mask], boxes=[None])
    image = image.convert("RGB")
    events = queue.Queue()

    def run():
        try:
            result = pipe(
                image,
                prompt=question,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                on_object=lambda obj: events.put(("object", obj)),
                streamer=_QueueTextStreamer(pipe.processor.tokenizer, events),
                **regions,
            )
            events.put(("done", result))
        except Exception as error:  # shown to the user: the processor's own message
            events.put(("error", error))

    threading.Thread(target=run, daemon=True).start()
    text, objects = "", []
    while True:
        kind, value = events.get()
        if kind == "error":
            raise gr.Error(str(value))
        if kind == "done":
            text, objects = value["generated_text"], value["objects"]
        elif kind == "text":
            text += value
        else:
            objects.append(value)
        yield (image, _annotations(objects)), text, _table(objects)
        if kind == "done":
            return


def build_app(pipe, examples=None, max_new_tokens=32) -> gr.Blocks:
    """The app around a `visual-grounding` pipeline; `examples`: [(PIL image, question), ...]."""
    with gr.Blocks(title="PerceptionGPT") as app:
        gr.Markdown(
            "# PerceptionGPT\nAsk where things are: boxes and masks stream in as the model writes each `<vis>`. "
            "For a region question, click two opposite corners on the image and write `<vis>` in the question."
        )
        points, region = gr.State([]), gr.State(None)
        with gr.Row():
            with gr.Column():
                with gr.Tab("Image"):
                    image = gr.Image(  # png: lossless, so the model sees the pixels it is given
                        type="pil",
                        format="png",
                        label="Image (click two corners to ask about a region)",
                        elem_id="image",
                    )
                with gr.Tab("Paint a region"):
                    editor = gr.ImageEditor(type="pil", label="Paint the region", elem_id="editor")
                question = gr.Textbox(label="Question", elem_id="question")
                region_text = gr.Textbox(label="Region", interactive=False, elem_id="region")
                with gr.Row():
                    submit = gr.Button("Ask", variant="primary", elem_id="submit")
                    clear = gr.Button("Clear region", elem_id="clear")
            with gr.Column():
                annotated = gr.AnnotatedImage(label="Answer", format="png", elem_id="annotated")
                answer = gr.Textbox(label="Answer text", elem_id="answer")
                table = gr.Dataframe(
                    headers=["object", "score", "xmin", "ymin", "xmax", "ymax"], label="Objects", elem_id="objects"
                )
        if examples:
            gr.Examples([[im, q] for im, q in examples], inputs=[image, question], elem_id="examples")

        def click(points_so_far, evt: gr.SelectData):
            points_so_far = [*points_so_far, tuple(int(v) for v in evt.index)][-2:]
            box = region_from_clicks(points_so_far)
            return points_so_far, box, ("" if box is None else str(box)) or f"first corner {points_so_far[-1]}"

        image.select(click, inputs=[points], outputs=[points, region, region_text])
        clear.click(lambda: ([], None, ""), outputs=[points, region, region_text])
        image.change(lambda: ([], None, ""), outputs=[points, region, region_text])

        def ask(image_value, editor_value, question_value, box):
            mask = mask_from_editor(editor_value)
            source = editor_value["background"] if mask is not None else image_value
            yield from stream_answer(pipe, source, question_value, box if mask is None else None, mask, max_new_tokens)

        submit.click(ask, inputs=[image, editor, question, region], outputs=[annotated, answer, table])
        question.submit(ask, inputs=[image, editor, question, region], outputs=[annotated, answer, table])
    return app


def main():
    """The Space entry point: the model from `PERCEPTIONGPT_MODEL` (a Hub repo id or folder), remote code."""
    model = os.environ.get("PERCEPTIONGPT_MODEL")
    if not model:
        raise SystemExit("Set PERCEPTIONGPT_MODEL to a Hub repo id or a model folder.")
    pipe = pipeline("visual-grounding", model=model, trust_remote_code=True)
    build_app(pipe).launch()


if __name__ == "__main__":
    main()

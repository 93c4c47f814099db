"""Chat template and task templates, as data.

Task templates fill `{expression}` (a referring expression or a region description) and `{objects}` (the answer's
`<vis>` tokens); a `<vis>` written in a question is a prompt region the caller must give a box or mask for. Messages use
the dataset schema of DESIGN.md ("Data"): `{"role", "content": str}`, `<vis>` in the text and no `<image>`.
"""

import random


VIS_TOKEN = "<vis>"

# Vicuna v1 (LLaVA-1.5) layout: "[system ]USER: <parts> ASSISTANT: <answer></s>USER: ... ASSISTANT:".
# A user message's parts are rendered in order and joined by "\n"; an image part becomes "<image>", so the caller
# decides whether the question comes before or after the image. The `generation` block marks the assistant answer
# (" " + text + eos) for `return_assistant_tokens_mask`, which the collator turns into labels.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for part in parts -%}"
    "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ eos_token }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Qwen2.5-VL's ChatML layout ("<|im_start|>role\n...<|im_end|>\n", the default system turn, an image part as
# "<|vision_start|><|image_pad|><|vision_end|>") with the assistant answer marked by a `generation` block, which Qwen's
# own template lacks and the collator's labels need. `image_token` is the tokenizer's named one when it has it.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|>' + (image_token | default('<|image_pad|>')) + '<|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Idefics3 / SmolVLM's layout ("<bos>User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"; the
# processor expands each `<image>` into its tiles) with the assistant answer marked by a `generation` block.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:' }}{% generation %}{{ ' ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '<end_of_utterance>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}{{ ':' if parts[0]['type'] == 'image' else ': ' }}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<end_of_utterance>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Where the image goes in the first user turn: part of the model (stored on the processor, saved with it).
IMAGE_POSITIONS = ("first", "after_text")
TASKS = ("rec", "res", "reg", "multi", "caption")

TASK_TEMPLATES = {
    # referring expression comprehension: expression -> one box
    "rec": {
        "questions": [
            "Where is {expression}?",
            "Locate {expression} in the image.",
            "Find {expression}.",
            "Which region shows {expression}?",
            "Point out {expression}.",
        ],
        "answers": ["{objects}", "It is at {objects}.", "Here: {objects}."],
    },
    # referring expression segmentation: expression -> one mask (decoded from the same `<vis>`)
    "res": {
        "questions": [
            "Segment {expression}.",
            "Give the mask of {expression}.",
            "Which pixels belong to {expression}?",
            "Outline {expression}.",
            "Please segment {expression} in the image.",
        ],
        "answers": ["{objects}", "The mask is {objects}.", "Here: {objects}."],
    },
    # region captioning: a prompt region -> its description
    "reg": {
        "questions": [
            "What is in the region <vis>?",
            "Describe the region <vis>.",
            "What object is at <vis>?",
            "Name the thing inside <vis>.",
            "What can you see at <vis>?",
        ],
        "answers": ["{expression}", "It is {expression}.", "That is {expression}."],
    },
    # multi-object grounding: expression -> one `<vis>` per object
    "multi": {
        "questions": [
            "Find all {expression}.",
            "Locate every {expression} in the image.",
            "Where are all the {expression}?",
            "Show each {expression}.",
            "Point out all {expression}.",
        ],
        "answers": ["{objects}", "They are at {objects}.", "Found: {objects}."],
        "none": "There is none.",
    },
    # grounded captioning: a caption whose object phrases are each followed by their `<vis>`
    "caption": {
        "questions": [
            "Describe the image with grounded objects.",
            "Write a grounded caption of the image.",
            "What is in the image? Ground each object.",
            "Give a caption that locates every object.",
            "Caption the image and locate the objects.",
        ],
        "answers": ["{expression}."],
        "none": "Nothing is in the image.",
    },
}


def user_content(text: str, image, image_position: str) -> list[dict]:
    """A user turn's content parts: `text` with `image` before it ("first") or after it ("after_text")."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"`image_position` must be one of {IMAGE_POSITIONS}, got {image_position!r}.")
    parts = [{"type": "text", "text": text}]
    image_part = {"type": "image", "image": image}
    return [image_part, *parts] if image_position == "first" else [*parts, image_part]


def _fill(template: str, expression: str, objects: str) -> str:
    # str.replace rather than str.format: expressions may contain braces.
    return template.replace("{expression}", expression).replace("{objects}", objects)


def build_task_messages(
    task: str,
    expression,
    n_objects: int = 1,
    seed: int | None = None,
    vary_answer: bool = False,
) -> list[dict[str, str]]:
    """Turn one grounding sample into a user/assistant exchange in the dataset schema.

    Args:
        task: one of `TASKS`.
        expression: the referring expression (rec, res, multi), the region's description (reg), or for caption the
            list of object phrases, each of which gets its own `<vis>`.
        n_objects: number of answer objects for `multi` (0 gives the "none" answer); rec and res always have one.
        seed: picks the paraphrase, so a dataset row is reproducible.
        vary_answer: also paraphrase the answer; the default keeps the first (shortest) answer, which tiny models
            trained from scratch learn fastest.

    Returns:
        `[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]`; the boxes of the `<vis>` tokens
        are the caller's, in order of appearance (the `reg` prompt region first).
    """
    if task not in TASK_TEMPLATES:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    spec = TASK_TEMPLATES[task]
    rng = random.Random(seed)
    question_template = rng.choice(spec["questions"])
    answer_template = rng.choice(spec["answers"]) if vary_answer else spec["answers"][0]
    if task == "caption":
        if isinstance(expression, str) or not all(isinstance(phrase, str) and phrase for phrase in expression):
            raise TypeError(
                f"`expression` must be a list of non-empty phrases for task 'caption', got {expression!r}."
            )
        phrases = [f"{phrase} {VIS_TOKEN}" for phrase in expression]
        answer = _fill(answer_template, ", ".join(phrases), "") if phrases else spec["none"]
        return [{"role": "user", "content": question_template}, {"role": "assistant", "content": answer}]
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"`expression` must be a non-empty string for task {task!r}, got {expression!r}.")
    if task == "multi":
        if not isinstance(n_objects, int) or n_objects < 0:
            raise ValueError(f"`n_objects` must be a non-negative int for task 'multi', got {n_objects!r}.")
    elif n_objects != 1:
        raise ValueError(f"`n_objects` must be 1 for task {task!r}, got {n_objects!r}.")
    objects = " ".join([VIS_TOKEN] * n_objects)
    answer = _fill(answer_template, expression, objects) if n_objects else spec["none"]
    return [
        {"role": "user", "content": _fill(question_template, expression, objects)},
        {"role": "assistant", "content": answer},
    ]


def template_corpus() -> list[str]:
    """Every question and answer template plus the chat markers, as text for training a BPE tokenizer."""
    texts = ["USER:", "ASSISTANT:"]
    for spec in TASK_TEMPLATES.values():
        texts.extend(_fill(text, "", "") for text in (*spec["questions"], *spec["answers"]))
        if "none" in spec:
            texts.append(spec["none"])
    return texts


__all__ = [
    "CHAT_TEMPLATE",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "TASKS",
    "TASK_TEMPLATES",
    "build_task_messages",
    "template_corpus",
]

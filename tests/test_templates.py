"""Task templates as data, the seeded message builder and the exact chat-template rendering."""

import pytest
from PIL import Image

from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.templates import TASK_TEMPLATES, TASKS, build_task_messages, template_corpus
from perceptiongpt.processing.tokenization_factory import build_tokenizer


def _vis_counts(messages):
    return [message["content"].count("<vis>") for message in messages]


def test_every_task_has_several_paraphrases():
    assert set(TASK_TEMPLATES) == set(TASKS) == {"rec", "res", "reg", "multi", "caption"}
    for spec in TASK_TEMPLATES.values():
        assert len(spec["questions"]) >= 5
        assert len(set(spec["questions"])) == len(spec["questions"])


@pytest.mark.parametrize(
    "task, expression, n_objects, expected_counts",
    [
        ("rec", "the red circle", 1, [0, 1]),
        ("res", "the red circle", 1, [0, 1]),
        ("reg", "a red circle", 1, [1, 0]),
        ("multi", "red circles", 3, [0, 3]),
        ("multi", "red circles", 0, [0, 0]),
        ("caption", ["a red circle", "a blue square"], 2, [0, 2]),
    ],
)
def test_messages_have_one_vis_per_object(task, expression, n_objects, expected_counts):
    messages = build_task_messages(task, expression, n_objects, seed=0)
    assert [message["role"] for message in messages] == ["user", "assistant"]
    assert _vis_counts(messages) == expected_counts
    assert all("<image>" not in message["content"] for message in messages)


def test_exact_answers():
    assert build_task_messages("rec", "the dot", seed=3)[1]["content"] == "<vis>"
    assert build_task_messages("reg", "a dot", seed=3)[1]["content"] == "a dot"
    assert build_task_messages("multi", "dots", 2, seed=3)[1]["content"] == "<vis> <vis>"
    assert build_task_messages("multi", "dots", 0, seed=3)[1]["content"] == "There is none."
    caption = build_task_messages("caption", ["a dot", "a square"], seed=3)[1]["content"]
    assert caption == "a dot <vis>, a square <vis>."


def test_seed_picks_the_paraphrase_reproducibly():
    first = build_task_messages("rec", "the dot", seed=7)
    assert build_task_messages("rec", "the dot", seed=7) == first
    questions = {build_task_messages("rec", "the dot", seed=seed)[0]["content"] for seed in range(40)}
    assert len(questions) == 5
    answers = {build_task_messages("rec", "x", seed=seed, vary_answer=True)[1]["content"] for seed in range(40)}
    assert answers == {"<vis>", "It is at <vis>.", "Here: <vis>."}


def test_expression_with_braces_is_kept_verbatim():
    messages = build_task_messages("reg", "a {weird} name", seed=0)
    assert messages[1]["content"] == "a {weird} name"


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="`task` must be one of"):
        build_task_messages("vqa", "x")
    with pytest.raises(ValueError, match="`expression` must be a non-empty string for task 'rec', got ''"):
        build_task_messages("rec", "")
    with pytest.raises(ValueError, match="`n_objects` must be 1 for task 'rec', got 2"):
        build_task_messages("rec", "x", 2)
    with pytest.raises(ValueError, match="`n_objects` must be a non-negative int"):
        build_task_messages("multi", "x", -1)
    with pytest.raises(TypeError, match="list of non-empty phrases"):
        build_task_messages("caption", "a dot")


def test_template_corpus_covers_markers_and_questions():
    corpus = template_corpus()
    assert corpus[:2] == ["USER:", "ASSISTANT:"]
    assert "Where is ?" in corpus and "There is none." in corpus


def test_chat_template_renders_vicuna_layout_with_image_where_placed():
    processor = build_processor(16, 4, 8, build_tokenizer("char"))
    image = Image.new("RGB", (8, 8))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Where is <vis>?"}, {"type": "image", "image": image}]},
        {"role": "assistant", "content": "It is <vis>."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (
        "Be brief. USER: Where is <vis>?\n<image> ASSISTANT: It is <vis>.</s>USER: And now? ASSISTANT:"
    )
    image_first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find it."}]}]
    rendered = processor.apply_chat_template(image_first, add_generation_prompt=True)
    assert rendered == "USER: <image>\nFind it. ASSISTANT:"
    assert processor.apply_chat_template(image_first) == "USER: <image>\nFind it. "

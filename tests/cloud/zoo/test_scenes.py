import numpy as np

from cloud.zoo import scenes


def test_seeded_and_deterministic():
    a, b = scenes.generate("noise", 20, 3), scenes.generate("noise", 20, 3)
    assert all(np.array_equal(x.image, y.image) and x.question == y.question and x.answer == y.answer for x, y in zip(a, b))
    c = scenes.generate("noise", 20, 4)
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_domains_shapes_and_tasks():
    for d in scenes.DOMAINS:
        s = scenes.generate(d, 12, 0)
        assert all(x.image.shape == (32, 32, 3) and x.image.dtype == np.uint8 for x in s)
        assert {x.task for x in s} == set(scenes.TASKS)


def test_student_never_sees_held_out_pairs_and_combo_only_has_them():
    for s in scenes.generate("source", 300, 1):
        if s.task == "shape":
            colour = s.question.split()[4]
            assert (colour, s.answer) not in scenes.HELD_OUT
    for s in scenes.generate("combo", 300, 1):
        if s.task == "shape":
            colour = s.question.split()[4]
            assert (colour, s.answer) in scenes.HELD_OUT


def test_question_alone_never_determines_combo_answer():
    """The field-notes trap: in the combo domain every colour question has >= 2 possible shapes."""
    by_colour: dict[str, set] = {}
    for c, s in scenes.UNSEEN:
        by_colour.setdefault(c, set()).add(s)
    assert all(len(v) >= 2 for v in by_colour.values())
    by_shape: dict[str, set] = {}
    for c, s in scenes.UNSEEN:
        by_shape.setdefault(s, set()).add(c)
    assert all(len(v) >= 2 for v in by_shape.values())


def test_target_domains_really_shift_pixels():
    src = np.stack([x.image for x in scenes.generate("source", 200, 5)]).astype(float)
    for d in ("texture", "noise"):
        tgt = np.stack([x.image for x in scenes.generate(d, 200, 5)]).astype(float)
        assert abs(tgt.mean() - src.mean()) > 5 or abs(tgt.std() - src.std()) > 5

"""User prompt sets: templates, mappings and YAML files, with one clear error for a bad one."""

import pytest

from jax_erasepro.evaluation.prompts import EvaluationError, user_sets


def test_yaml_file_of_sets(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text('target: ["a photo of {}"]\nothers: ["a dog"]\nrobust:\n  scene: ["{} in a street"]\n')
    target, others, robust = user_sets(str(path), ["cat"], ["bird"])
    assert [(p.text, p.anchor_text) for p in target.prompts] == [("a photo of cat", "a photo of bird")]
    assert others == ["a dog"] and robust[0].name == "robust:scene"
    assert robust[0].prompts[0].text == "cat in a street"


def test_a_list_is_target_templates():
    target, others, robust = user_sets(["a {}", "{} at night"], ["cat"], [""])
    assert [p.text for p in target.prompts] == ["a cat", "cat at night"] and others is None and robust == []
    assert target.prompts[0].anchor_text == "a"


@pytest.mark.parametrize(
    "spec, message", [(["a photo"], "exactly once"), ({"targets": ["{}"]}, "unknown prompt set")]
)
def test_bad_sets(spec, message):
    with pytest.raises(EvaluationError, match=message):
        user_sets(spec, ["cat"], ["dog"])

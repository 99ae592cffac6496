"""fljob.trainer.checkpoint.compat: which spec changes a resume refuses, which it allows and
says have no effect, which it applies, and what a checkpoint without a record gets.

Pure functions over real specs and the model arguments the trainer would build; the manager
applies them in tests/trainer/test_checkpoint_manager.py and a real `fljob train` in
tests/integration/test_checkpoint.py.
"""

from __future__ import annotations

from typing import Any

from fljob.spec.loader import dump_spec
from fljob.spec.models import JobSpec
from fljob.trainer.checkpoint.compat import VOCAB_SIZE, Change, compare, compatibility_record
from fljob.trainer.model.flavors import TINY_FLAVOR, args_for_spec

VOCAB = 512


def spec(**sections: dict[str, Any]) -> JobSpec:
    base: dict[str, Any] = {"name": "c", "model": {"flavor": "tiny"}, "optimizer": {"name": "adopt"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return JobSpec.model_validate(base)


def saved(job: JobSpec, vocab: int = VOCAB) -> dict[str, Any]:
    """The manifest fields compare() reads, as a save of ``job`` writes them."""
    return {"compatibility": compatibility_record(job, args_for_spec(job, vocab)), "spec": dump_spec(job)}


def resume(manifest: dict[str, Any], job: JobSpec, vocab: int = VOCAB):
    return compare(manifest, compatibility_record(job, args_for_spec(job, vocab)), dump_spec(job))


def test_the_same_spec_resumes_without_a_word() -> None:
    assert resume(saved(spec()), spec()) == type(resume(saved(spec()), spec()))()


def test_the_record_is_the_built_model_not_the_spelling() -> None:
    """`tiny` is the smallest registered flavor, and its width and depth spelled out are the same
    model: nothing changed, and nothing is logged as applied either."""
    record = compatibility_record(spec(), args_for_spec(spec(), VOCAB))
    assert record["model.flavor"] == TINY_FLAVOR and record[VOCAB_SIZE] == VOCAB
    spelled = spec(model={"flavor": TINY_FLAVOR, "width": record["model.width"],
                          "depth": record["model.depth"]})
    assert resume(saved(spec()), spelled).incompatible == ()
    assert resume(saved(spec()), spelled).applied == ()


def test_changes_of_what_the_state_means_are_refused_naming_fields_and_values() -> None:
    result = resume(saved(spec()), spec(optimizer={"name": "adamw"}, model={"width": 128, "mup": False}))
    assert {c.field for c in result.incompatible} == {"optimizer.name", "model.width", "model.mup"}
    line = result.refusal("s3://b/ckpt/step-8")
    assert line.startswith("cannot resume s3://b/ckpt/step-8: the spec changed what the checkpoint "
                           "depends on (")
    for text in ("optimizer.name 'adopt' -> 'adamw'", "model.width 64 -> 128", "model.mup True -> False",
                 "another checkpoint.uri", "run_dir"):
        assert text in line
    assert "\n" not in line


def test_every_recorded_field_is_checked() -> None:
    """One change at a time, each refused alone (the tokenizer's vocabulary included)."""
    changed = {"model.flavor": spec(model={"flavor": "7.61M", "width": 64}),  # same shape, other heads
               "model.depth": spec(model={"depth": 6}),
               "model.tie_embeddings": spec(model={"tie_embeddings": True}),
               "model.attention_scale": spec(model={"attention_scale": "standard"}),
               "model.input_alpha": spec(model={"input_alpha": 2.0}),
               "model.output_alpha": spec(model={"output_alpha": 0.5}),
               "model.depth_alpha_exp": spec(model={"depth_alpha_exp": 0.5}),
               "model.embedding_norm": spec(model={"embedding_norm": False}),
               "model.peri_norm": spec(model={"peri_norm": False})}
    for field, job in changed.items():
        assert [c.field for c in resume(saved(spec()), job).incompatible] == [field], field
    assert resume(saved(spec()), spec(), vocab=VOCAB * 2).incompatible == (
        Change(VOCAB_SIZE, VOCAB, VOCAB * 2),)
    recorded = set(compatibility_record(spec(), args_for_spec(spec(), VOCAB)))
    assert recorded == set(changed) | {"model.width", "model.mup", "optimizer.name", VOCAB_SIZE}


def test_safe_changes_are_sorted_into_applied_and_kept_from_the_checkpoint() -> None:
    job = spec(training={"steps": 900, "log_interval": 5}, schedule={"warmup_steps": 7},
               metrics={"port": 9999}, optimizer={"lr": 1e-3, "betas": [0.8, 0.9], "grad_clip_norm": 0.5},
               resources={"procs_per_node": 2}, parallelism={"tensor_parallel_degree": 2},
               model={"init_std": 0.01, "zero_init_query": True})
    result = resume(saved(spec()), job)
    assert result.incompatible == ()
    assert {str(c) for c in result.kept} == {"optimizer.lr 0.003 -> 0.001",
                                             "optimizer.betas [0.9, 0.95] -> [0.8, 0.9]",
                                             "model.init_std 0.02 -> 0.01",
                                             "model.zero_init_query False -> True"}
    assert {c.field for c in result.applied} == {
        "training.steps", "training.log_interval", "schedule.warmup_steps", "metrics.port",
        "optimizer.grad_clip_norm", "resources.procs_per_node", "parallelism.tensor_parallel_degree"}


def test_environment_values_are_not_shown() -> None:
    result = resume(saved(spec()), spec(env={"MY_SETTING": "abc123"}))
    assert [str(c) for c in result.applied] == ["env.MY_SETTING"]


def test_a_checkpoint_without_a_record_cannot_be_checked() -> None:
    """Written before records existed: nothing can be refused, every field is unrecorded, and
    the spec difference is still logged."""
    old = {"spec": dump_spec(spec())}
    result = resume(old, spec(optimizer={"name": "adamw"}, training={"steps": 9}))
    assert result.incompatible == ()
    assert set(result.unrecorded) == set(compatibility_record(spec(), args_for_spec(spec(), VOCAB)))
    assert [c.field for c in result.applied] == ["training.steps"]
    assert resume({}, spec()).applied == ()  # no manifest at all: nothing to compare


def test_a_record_with_fewer_fields_checks_those_it_has() -> None:
    manifest = saved(spec())
    del manifest["compatibility"]["model.depth_alpha_exp"]
    result = resume(manifest, spec(model={"depth_alpha_exp": 0.5}, optimizer={"name": "adamw"}))
    assert result.unrecorded == ("model.depth_alpha_exp",)
    assert [c.field for c in result.incompatible] == ["optimizer.name"]
